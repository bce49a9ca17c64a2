//! Parsing of human-friendly sizes and durations from the command line.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UnitError {
    #[error("invalid size {0:?}: expected a number with an optional unit (k, KiB, M, MiB, G, GiB), e.g. 64MiB")]
    Size(String),
    #[error("invalid duration {0:?}: expected e.g. 25ms, 10s, 2min ({1})")]
    Duration(String, String),
}

/// Parses `1GiB`, `64MiB`, `4096k`, `4096`: binary units, case-insensitive,
/// `B`/`iB` suffix optional. Overflow is an error.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::Size(s.to_string()))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let mul: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(UnitError::Size(s.to_string())),
    };
    n.checked_mul(mul)
        .ok_or_else(|| UnitError::Size(s.to_string()))
}

pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| UnitError::Duration(s.to_string(), e.to_string()))
}

/// Formats a byte count with a binary unit, e.g. `1.5 GiB`.
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("25ms").unwrap(), Duration::from_millis(25));
        assert!(parse_duration("fast").is_err());
    }
}
