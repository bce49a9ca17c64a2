//! `--psk-file` / `$CASTOR_PSK`: the pre-shared key both ends authenticate
//! with, `--encrypt`, and the rule that the built-in development key never
//! leaves the host.

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use castor::transport::auth::Protection;
use castor::transport::handshake::Psk;

/// How to make a key, for every message that needs one.
const MAKE_A_KEY: &str = "make a key with `castor keygen > castor.key`, copy it to both hosts \
     and pass --psk-file castor.key (or set $CASTOR_PSK) on both";

/// Loads the key, protecting records as `--encrypt` says; warns when the
/// built-in development key is used (only loopback connections accept it).
pub fn load_psk(path: Option<&PathBuf>, encrypt: bool) -> Result<Psk, String> {
    let psk = Psk::load(path.map(|p| p.as_path())).map_err(|e| e.to_string())?;
    let psk = psk.with_protection(if encrypt {
        Protection::Encrypt
    } else {
        Protection::Mac
    });
    if psk.is_default {
        eprintln!(
            "castor: warning: no --psk-file or $CASTOR_PSK: using the built-in development key, \
             which anyone has; it is accepted only when both ends are on loopback. For real use, {MAKE_A_KEY}."
        );
    }
    Ok(psk)
}

/// Refuses at startup what every connection would refuse: the built-in
/// key where this end listens or dials (`flag` `addr`) off loopback. An
/// unspecified listening address (0.0.0.0) passes; its connections are
/// checked one by one.
pub fn check_dev_key(psk: &Psk, flag: &str, addr: &str) -> Result<(), String> {
    if !psk.is_default {
        return Ok(());
    }
    let ips: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{flag} {addr}: {e}"))?
        .map(|a| a.ip())
        .collect();
    match ips
        .iter()
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
    {
        Some(ip) => Err(format!(
            "{flag} {addr} ({ip}) is not loopback, and the built-in development key is only \
             allowed when both ends are on loopback: {MAKE_A_KEY}"
        )),
        None => Ok(()),
    }
}
