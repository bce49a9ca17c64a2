//! `--config FILE`: a TOML file whose keys are the command's long flags
//! (`backup = "10.0.0.2:7700"`, `heartbeat-timeout = "500ms"`,
//! `activate = true`; `_` may stand for `-`), turned into command-line
//! arguments placed *before* the ones typed, so a flag given on the command
//! line overrides the file: the file's value for that key is left out.
//!
//! Values: strings, integers and floats become the flag's value; `true`
//! adds a switch and `false` leaves it out; an array repeats a flag that
//! takes several values (`nfqueue-dev = ["vif1.0", "vif2.0"]`). A table
//! named like the subcommand (`[backup]`, `[protect]`) applies only to it,
//! so one file can serve both roles; top-level keys apply to every
//! subcommand that has the flag, and any other key is an error naming the
//! file and the key. Keys are checked against the command's own flags (its
//! clap definition), so the file accepts exactly what the command line does.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--config {path}: not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--config {path}: `castor {cmd}` has no option --{key}")]
    UnknownKey {
        path: PathBuf,
        cmd: String,
        key: String,
    },
    #[error("--config {path}: {key}: {reason}")]
    Value {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("--config needs a file name")]
    MissingPath,
}

/// Finds `--config FILE` (or `--config=FILE`) in `args` (the whole argv,
/// program name first) and returns argv with the file's flags for the
/// subcommand inserted right after the subcommand's name. `cmd` is the
/// program's clap definition. Without `--config`, `args` comes back as is.
pub fn expand(cmd: &clap::Command, args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(path) = config_path(&args)? else {
        return Ok(args);
    };
    // The subcommand: the first argument naming one.
    let Some((pos, sub)) = args.iter().enumerate().skip(1).find_map(|(i, a)| {
        let a = a.to_str()?;
        cmd.find_subcommand(a).map(|s| (i, s))
    }) else {
        return Ok(args);
    };
    let typed: Vec<String> = args[pos + 1..]
        .iter()
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect();
    let from_file = flags_for(&path, cmd, sub, &typed)?;
    let mut out = args[..=pos].to_vec();
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend(args[pos + 1..].iter().cloned());
    Ok(out)
}

fn config_path(args: &[OsString]) -> Result<Option<PathBuf>, ConfigError> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it
                .next()
                .map(|p| Some(PathBuf::from(p)))
                .ok_or(ConfigError::MissingPath);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Ok(Some(PathBuf::from(p)));
        }
    }
    Ok(None)
}

/// The arguments `path` gives subcommand `sub` of `root`, leaving out the
/// keys in `typed` (flags given on the command line).
pub fn flags_for(
    path: &Path,
    root: &clap::Command,
    sub: &clap::Command,
    typed: &[String],
) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let name = sub.get_name();
    let mut out = Vec::new();
    // Top-level keys first, then the subcommand's own table (which wins).
    let own = table.get(name).and_then(|v| v.as_table());
    for (key, value) in &table {
        if value.is_table() {
            continue; // a role table: its own or another subcommand's
        }
        let key = key.replace('_', "-");
        if own.is_some_and(|t| t.contains_key(&key) || t.contains_key(&key.replace('-', "_"))) {
            continue;
        }
        // A top-level key the subcommand lacks must belong to another one
        // (a file shared by both roles).
        if find_arg(sub, &key).is_none()
            && !root.get_subcommands().any(|c| find_arg(c, &key).is_some())
        {
            return Err(unknown(path, name, &key));
        }
        if find_arg(sub, &key).is_some() {
            push(path, sub, &key, value, typed, &mut out)?;
        }
    }
    if let Some(t) = own {
        for (key, value) in t {
            let key = key.replace('_', "-");
            if find_arg(sub, &key).is_none() {
                return Err(unknown(path, name, &key));
            }
            push(path, sub, &key, value, typed, &mut out)?;
        }
    }
    Ok(out)
}

fn unknown(path: &Path, cmd: &str, key: &str) -> ConfigError {
    ConfigError::UnknownKey {
        path: path.to_path_buf(),
        cmd: cmd.to_string(),
        key: key.to_string(),
    }
}

fn find_arg<'a>(sub: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    if key == "config" || key == "help" {
        return None;
    }
    sub.get_arguments().find(|a| a.get_long() == Some(key))
}

fn push(
    path: &Path,
    sub: &clap::Command,
    key: &str,
    value: &toml::Value,
    typed: &[String],
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if typed.iter().any(|t| t == key) {
        return Ok(()); // the command line overrides the file
    }
    let arg = find_arg(sub, key).expect("checked by the caller");
    let bad = |reason: String| ConfigError::Value {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let takes_value = arg.get_action().takes_values();
    let flag = format!("--{key}");
    match value {
        toml::Value::Boolean(b) if !takes_value => {
            if *b {
                out.push(flag);
            }
        }
        toml::Value::Boolean(_) => {
            return Err(bad("takes a value, not true/false".into()));
        }
        _ if !takes_value => {
            return Err(bad(format!(
                "is a switch: write {key} = true or false, not a {}",
                value.type_str()
            )));
        }
        toml::Value::Array(items) => {
            if !matches!(arg.get_action(), clap::ArgAction::Append) {
                return Err(bad("takes one value, not a list".into()));
            }
            for it in items {
                out.push(flag.clone());
                out.push(scalar(it).ok_or_else(|| {
                    bad(format!("a list item is a {}, not a value", it.type_str()))
                })?);
            }
        }
        v => {
            out.push(flag);
            out.push(scalar(v).ok_or_else(|| bad(format!("a {} is not a value", v.type_str())))?);
        }
    }
    Ok(())
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cli() -> Command {
        Command::new("castor")
            .subcommand(
                Command::new("backup")
                    .arg(Arg::new("listen").long("listen"))
                    .arg(Arg::new("state-dir").long("state-dir"))
                    .arg(
                        Arg::new("activate")
                            .long("activate")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(Arg::new("heartbeat-timeout").long("heartbeat-timeout")),
            )
            .subcommand(
                Command::new("protect")
                    .arg(Arg::new("backup").long("backup"))
                    .arg(Arg::new("inflight").long("inflight"))
                    .arg(
                        Arg::new("nfqueue-dev")
                            .long("nfqueue-dev")
                            .action(ArgAction::Append),
                    ),
            )
    }

    fn run(toml: &str, argv: &[&str]) -> Result<Vec<String>, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).unwrap();
        let mut args: Vec<OsString> = argv.iter().map(OsString::from).collect();
        args.push("--config".into());
        args.push(p.clone().into());
        let out = expand(&cli(), args)?;
        Ok(out
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .filter(|a| !a.ends_with("c.toml") && a != "--config")
            .collect())
    }

    #[test]
    fn file_keys_become_flags_and_typed_flags_override() {
        let t =
            "heartbeat_timeout = \"800ms\"\nactivate = true\n[backup]\nlisten = \"0.0.0.0:7700\"\n\
                 [protect]\nbackup = \"10.0.0.2:7700\"\n";
        let a = run(t, &["castor", "backup", "--listen", "127.0.0.1:1"]).unwrap();
        assert_eq!(
            a,
            [
                "castor",
                "backup",
                "--activate",
                "--heartbeat-timeout",
                "800ms",
                "--listen",
                "127.0.0.1:1"
            ]
        );
        let p = run(t, &["castor", "protect"]).unwrap();
        assert_eq!(p, ["castor", "protect", "--backup", "10.0.0.2:7700"]);
    }

    #[test]
    fn lists_integers_and_false_switches() {
        let t = "[protect]\ninflight = 3\nnfqueue-dev = [\"vif1.0\", \"vif2.0\"]\n[backup]\nactivate = false\n";
        let p = run(t, &["castor", "protect"]).unwrap();
        assert_eq!(
            p,
            [
                "castor",
                "protect",
                "--inflight",
                "3",
                "--nfqueue-dev",
                "vif1.0",
                "--nfqueue-dev",
                "vif2.0"
            ]
        );
        assert_eq!(run(t, &["castor", "backup"]).unwrap(), ["castor", "backup"]);
    }

    #[test]
    fn bad_keys_and_values_name_the_key() {
        let e = run("[backup]\nlisten_port = 3\n", &["castor", "backup"]).unwrap_err();
        assert!(e.to_string().contains("has no option --listen-port"), "{e}");
        let e = run("frobnicate = 1\n", &["castor", "backup"]).unwrap_err();
        assert!(e.to_string().contains("--frobnicate"), "{e}");
        let e = run("[backup]\nactivate = \"yes\"\n", &["castor", "backup"]).unwrap_err();
        assert!(e.to_string().contains("activate: is a switch"), "{e}");
        let e = run(
            "[protect]\nbackup = [\"a\", \"b\"]\n",
            &["castor", "protect"],
        )
        .unwrap_err();
        assert!(e.to_string().contains("takes one value"), "{e}");
        let e = run("[backup\n", &["castor", "backup"]).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }
}
