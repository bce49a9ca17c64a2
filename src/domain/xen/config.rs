//! The guest's configuration as it travels to the backup.
//!
//! The backup must build a domain like the primary's (memory, vCPUs, vifs,
//! disks) before it can load a checkpoint into it. The primary carries the
//! guest's `xl` configuration text (what `xl create` was given, which libxl
//! keeps as the domain's "xl" userdata) inside the domain description of the
//! handshake: zstd-compressed, then base64url without padding, so the value
//! holds neither `,` nor `=` and survives the `key=value,...` spec syntax.
//! [`summary`] reads the few fields castor itself needs from that text.

use base64::Engine as _;

/// Largest configuration text accepted (before compression).
pub const MAX_CONFIG: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("xl config of {0} bytes exceeds {MAX_CONFIG}")]
    TooLarge(usize),
    #[error("carried xl config is not base64url: {0}")]
    Base64(String),
    #[error("carried xl config does not decompress: {0}")]
    Compression(String),
    #[error("carried xl config is not UTF-8")]
    Utf8,
    #[error("xl config line {line}: {reason}")]
    Syntax { line: usize, reason: String },
}

/// Packs config text for the spec (`cfg=...`).
pub fn pack(text: &str) -> Result<String, ConfigError> {
    if text.len() > MAX_CONFIG {
        return Err(ConfigError::TooLarge(text.len()));
    }
    let z = zstd::bulk::compress(text.as_bytes(), 19)
        .map_err(|e| ConfigError::Compression(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(z))
}

/// Unpacks a `cfg=...` value; hostile input gets an error, never a panic
/// or an allocation beyond [`MAX_CONFIG`].
pub fn unpack(packed: &str) -> Result<String, ConfigError> {
    if packed.len() > MAX_CONFIG * 2 {
        return Err(ConfigError::TooLarge(packed.len()));
    }
    let z = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(packed)
        .map_err(|e| ConfigError::Base64(e.to_string()))?;
    let text = zstd::bulk::decompress(&z, MAX_CONFIG)
        .map_err(|e| ConfigError::Compression(e.to_string()))?;
    String::from_utf8(text).map_err(|_| ConfigError::Utf8)
}

/// A value in an xl config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Num(i64),
    List(Vec<String>),
}

/// What castor reads from an xl config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub name: Option<String>,
    /// `type` ("pv", "hvm", "pvh"); xl's default is pv when absent
    /// (unless `builder="hvm"`).
    pub kind: String,
    pub memory_mib: Option<i64>,
    pub vcpus: Option<i64>,
    pub vifs: Vec<String>,
    pub disks: Vec<String>,
}

/// Parses `key = value` lines (values: number, quoted string, or a
/// bracketed list of quoted strings, which may span lines; `#` comments).
pub fn parse(text: &str) -> Result<Vec<(String, Value)>, ConfigError> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, raw)) = lines.next() {
        let line = strip_comment(raw).trim().trim_end_matches(';').trim();
        if line.is_empty() {
            continue;
        }
        let syntax = |reason: String| ConfigError::Syntax {
            line: i + 1,
            reason,
        };
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| syntax(format!("{line:?} is not key = value")))?;
        let key = k.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(syntax(format!("bad key {key:?}")));
        }
        let mut v = v.trim().to_string();
        if v.starts_with('[') {
            while !strip_comment(&v).trim_end().ends_with(']') {
                let (_, more) = lines
                    .next()
                    .ok_or_else(|| syntax(format!("list for {key} is not closed")))?;
                v.push(' ');
                v.push_str(strip_comment(more).trim());
            }
        }
        out.push((
            key.to_string(),
            value(strip_comment(&v).trim()).map_err(syntax)?,
        ));
    }
    Ok(out)
}

/// Cuts a `#` comment that is not inside quotes.
fn strip_comment(s: &str) -> &str {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') => return &s[..i],
            _ => {}
        }
    }
    s
}

fn unquote(s: &str) -> Result<String, String> {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return Ok(s[1..s.len() - 1].to_string());
        }
    }
    Err(format!("{s:?} is not a quoted string"))
}

fn value(v: &str) -> Result<Value, String> {
    if let Some(inner) = v.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("list {v:?} is not closed"))?;
        let items = split_list(inner)?;
        return Ok(Value::List(items));
    }
    if let Ok(n) = v.parse::<i64>() {
        return Ok(Value::Num(n));
    }
    unquote(v).map(Value::Str)
}

/// Splits a list body on commas outside quotes.
fn split_list(inner: &str) -> Result<Vec<String>, String> {
    let mut items = Vec::new();
    let (mut quote, mut start) = (None, 0);
    for (i, c) in inner.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ',') => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(unquote)
        .collect()
}

/// Reads the fields castor needs.
pub fn summary(text: &str) -> Result<Summary, ConfigError> {
    let mut s = Summary {
        kind: "pv".into(),
        ..Default::default()
    };
    for (k, v) in parse(text)? {
        match (k.as_str(), v) {
            ("name", Value::Str(n)) => s.name = Some(n),
            ("type", Value::Str(t)) => s.kind = t,
            ("builder", Value::Str(b)) if b == "hvm" => s.kind = "hvm".into(),
            ("memory", Value::Num(m)) => s.memory_mib = Some(m),
            ("vcpus", Value::Num(n)) => s.vcpus = Some(n),
            ("vif", Value::List(l)) => s.vifs = l,
            ("disk", Value::List(l)) => s.disks = l,
            _ => {}
        }
    }
    Ok(s)
}

/// The config text with its `name` replaced (or added): the backup may
/// build its replica under another name while the primary still exists.
pub fn with_name(text: &str, name: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let is_name = strip_comment(line)
            .split_once('=')
            .is_some_and(|(k, _)| k.trim() == "name");
        if !is_name {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!("name = \"{name}\"\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CFG: &str = r#"
# castor lab guest
name = "guest1"
type = 'pv'
kernel = "/lab/vmlinuz"   # the Debian kernel
ramdisk = "/lab/guest.cpio.gz"
extra = "console=hvc0 castor#1"
memory = 256
vcpus = 2
vif = [ 'mac=00:16:3e:00:00:01,bridge=xenbr0',
        "script=vif-bridge" ]
disk = []
on_crash = "preserve"
"#;

    #[test]
    fn summary_reads_what_castor_needs() {
        let s = summary(CFG).unwrap();
        assert_eq!(s.name.as_deref(), Some("guest1"));
        assert_eq!(s.kind, "pv");
        assert_eq!(s.memory_mib, Some(256));
        assert_eq!(s.vcpus, Some(2));
        assert_eq!(
            s.vifs,
            vec!["mac=00:16:3e:00:00:01,bridge=xenbr0", "script=vif-bridge"]
        );
        assert!(s.disks.is_empty());
        // A '#' inside quotes is not a comment.
        let all = parse(CFG).unwrap();
        assert!(all.contains(&("extra".into(), Value::Str("console=hvc0 castor#1".into()))));
        assert_eq!(summary("builder = \"hvm\"\n").unwrap().kind, "hvm");
    }

    #[test]
    fn bad_syntax_names_the_line() {
        assert_eq!(
            parse("memory = 1\nnonsense\n").unwrap_err(),
            ConfigError::Syntax {
                line: 2,
                reason: "\"nonsense\" is not key = value".into()
            }
        );
        assert!(matches!(
            parse("vif = [ 'a',\n"),
            Err(ConfigError::Syntax { line: 1, .. })
        ));
        assert!(parse("kernel = unquoted\n").is_err());
        assert!(parse("bad key = 1\n").is_err());
    }

    #[test]
    fn pack_round_trips_and_stays_spec_safe() {
        let p = pack(CFG).unwrap();
        assert!(!p.contains(',') && !p.contains('='), "{p}");
        assert!(p.len() < 400, "{} bytes", p.len());
        assert_eq!(unpack(&p).unwrap(), CFG);
        assert!(matches!(
            pack(&"x".repeat(MAX_CONFIG + 1)),
            Err(ConfigError::TooLarge(_))
        ));
    }

    #[test]
    fn hostile_packed_values_are_refused() {
        assert!(matches!(unpack("!!!"), Err(ConfigError::Base64(_))));
        assert!(matches!(unpack("AAAA"), Err(ConfigError::Compression(_))));
        // A zstd bomb: 1 MiB of zeros compresses small but exceeds the cap.
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bomb);
        assert!(matches!(unpack(&b), Err(ConfigError::Compression(_))));
        let bad = zstd::bulk::compress(&[0xff, 0xfe], 3).unwrap();
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bad);
        assert_eq!(unpack(&b), Err(ConfigError::Utf8));
    }

    #[test]
    fn with_name_replaces_the_name() {
        let t = with_name(CFG, "guest1-replica");
        let s = summary(&t).unwrap();
        assert_eq!(s.name.as_deref(), Some("guest1-replica"));
        assert_eq!(s.memory_mib, Some(256));
        assert_eq!(t.matches("name =").count(), 1);
    }

    proptest! {
        #[test]
        fn parse_and_unpack_never_panic(s in ".{0,300}") {
            let _ = parse(&s);
            let _ = unpack(&s);
        }
    }
}
