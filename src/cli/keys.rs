//! `--psk-file` / `$CASTOR_PSK`: the pre-shared key both ends authenticate with.

use std::path::PathBuf;

use castor::transport::handshake::Psk;

/// Loads the key, warning when the built-in development key is used.
pub fn load_psk(path: Option<&PathBuf>) -> Result<Psk, String> {
    let psk = Psk::load(path.map(|p| p.as_path())).map_err(|e| e.to_string())?;
    if psk.is_default {
        eprintln!(
            "castor: warning: no --psk-file or $CASTOR_PSK: using the built-in development key; \
             any castor can connect. Make a key with `castor keygen > key` for real use."
        );
    }
    Ok(psk)
}
