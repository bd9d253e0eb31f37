//! Signs a message with a domain's active key through keyrotate's read-only consumer
//! API, then verifies the signature with the public key published in `jwks.json`
//! (found by `kid`), as a relying party would.
//!
//!     cargo run --example sign_with_active -- KEYSTORE_DIR DOMAIN MESSAGE
//!
//! Prints the `kid` and `verified`; exits non-zero if anything fails.

use std::process::ExitCode;

use keyrotate::keyring::{verify_with_jwk, Keyring};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [keystore, domain, message] = args.as_slice() else {
        eprintln!("usage: sign_with_active KEYSTORE_DIR DOMAIN MESSAGE");
        return ExitCode::from(2);
    };
    match run(keystore, domain, message) {
        Ok(kid) => {
            println!("kid {kid} verified");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sign_with_active: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(keystore: &str, domain: &str, message: &str) -> Result<String, Box<dyn std::error::Error>> {
    let ring = Keyring::open(keystore.as_ref(), domain)?;
    let active = ring.active()?;
    let signature = active.key.sign(message.as_bytes())?;

    // The relying party's side: only jwks.json, looked up by kid.
    let path = std::path::Path::new(keystore).join(domain).join("jwks.json");
    let jwks: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let jwk = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == active.kid.as_str()))
        .and_then(|k| k.as_object())
        .ok_or_else(|| format!("kid {} is not published in {}", active.kid, path.display()))?;
    if !verify_with_jwk(jwk, message.as_bytes(), &signature) {
        return Err(format!("the signature does not verify with the published key {}", active.kid).into());
    }
    Ok(active.kid)
}
