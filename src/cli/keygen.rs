//! `castor keygen`: a new random pre-shared key, in hex, for --psk-file.

use std::process::ExitCode;

use castor::transport::handshake::random_nonce;

pub fn run() -> Result<ExitCode, String> {
    println!(
        "{}",
        random_nonce()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    Ok(ExitCode::SUCCESS)
}
