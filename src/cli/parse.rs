//! Value parsers and cross-flag checks shared by the commands.

use std::time::Duration;

use castor::codec::Compressor;
use castor::domain::DomainSpec;

/// A validated `--cores` list: distinct cores this process may run on, in
/// the order given.
#[derive(Debug, Clone)]
pub struct CoreList(pub Vec<usize>);

/// `--cores 2,3` or `--cores 0-3`.
pub fn parse_cores(s: &str) -> Result<CoreList, String> {
    let online: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| {
                format!("--cores {s:?}: {t:?} is not a core number (use e.g. 0,1 or 0-3)")
            })
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("--cores {s:?}: range {a}-{b} runs backwards"));
        }
        for c in a..=b {
            if !online.contains(&c) {
                return Err(format!(
                    "--cores {s:?}: core {c} is not available to this process (available: {online:?})"
                ));
            }
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    Ok(CoreList(out))
}

/// `--compress`: a fixed compressor, or `auto` (per epoch).
#[derive(Debug, Clone, Copy)]
pub struct CompressArg {
    /// The compressor (with `auto`: the first candidate, lz4).
    pub fixed: Compressor,
    pub auto: bool,
}

/// `--compress lz4|zstd|zstd:LEVEL|none|auto`.
pub fn parse_compress(s: &str) -> Result<CompressArg, String> {
    if s == "auto" {
        return Ok(CompressArg {
            fixed: Compressor::Lz4,
            auto: true,
        });
    }
    parse_compressor(s)
        .map(|fixed| CompressArg { fixed, auto: false })
        .map_err(|e| format!("{e}, or auto"))
}

/// `lz4|zstd|zstd:LEVEL|none`.
pub fn parse_compressor(s: &str) -> Result<Compressor, String> {
    match s {
        "none" => Ok(Compressor::None),
        "lz4" => Ok(Compressor::Lz4),
        "zstd" => Ok(Compressor::Zstd(1)),
        _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
            Some(Ok(l)) if (1..=19).contains(&l) => Ok(Compressor::Zstd(l)),
            _ => Err(format!(
                "unknown compressor {s:?}: use lz4, zstd, zstd:LEVEL (1-19) or none"
            )),
        },
    }
}

/// `--domain SPEC`.
pub fn parse_spec(s: &str) -> Result<DomainSpec, String> {
    DomainSpec::parse(s).map_err(|e| e.to_string())
}

/// A heartbeat interval must leave the peer at least two beats per timeout.
pub fn check_heartbeat(
    interval: Duration,
    peer_timeout: Duration,
    names: &str,
) -> Result<(), String> {
    if interval.is_zero() || interval * 2 > peer_timeout {
        return Err(format!(
            "{names}: a heartbeat interval of {interval:?} leaves fewer than two beats within the \
             {peer_timeout:?} timeout; shorten the interval or lengthen the timeout"
        ));
    }
    Ok(())
}
