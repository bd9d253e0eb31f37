//! Signs (or MACs) a file's bytes with a domain's active key through keyrotate's
//! consumer API and writes the raw signature, for a verifier outside keyrotate (the
//! openssl CLI in the tests). Works the same whether the key is kept in a file or in a
//! PKCS#11 token (`custody = "pkcs11"`).
//!
//!     cargo run --example sign_message -- KEYSTORE_DIR DOMAIN MESSAGE_FILE SIGNATURE_FILE
//!
//! Prints the `kid` of the key that signed.

use std::process::ExitCode;

use keyrotate::keyring::Keyring;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [keystore, domain, message, signature] = args.as_slice() else {
        eprintln!("usage: sign_message KEYSTORE_DIR DOMAIN MESSAGE_FILE SIGNATURE_FILE");
        return ExitCode::from(2);
    };
    let run = || -> Result<String, Box<dyn std::error::Error>> {
        let ring = Keyring::open(keystore.as_ref(), domain)?;
        let active = ring.active()?;
        let sig = active.key.sign(&std::fs::read(message)?)?;
        std::fs::write(signature, sig)?;
        Ok(active.kid)
    };
    match run() {
        Ok(kid) => {
            println!("{kid}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sign_message: {e}");
            ExitCode::FAILURE
        }
    }
}
