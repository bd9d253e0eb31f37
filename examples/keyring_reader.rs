//! An application that reads a domain's keys in a tight loop through the consumer API,
//! as a busy signing service would, while rotations run beside it. Used by the tests to
//! prove the API's snapshot guarantee; also a template for a long-running consumer.
//!
//!     cargo run --example keyring_reader -- KEYSTORE_DIR DOMAIN STOP_FILE
//!
//! Each read opens the keyring, signs with the active key, and verifies the signature
//! with the public key the same snapshot publishes for that `kid`; a pending version,
//! if any, must load too. Runs until STOP_FILE exists, then prints
//! `reads N failures M` and exits non-zero if any read failed (each failure is printed
//! to stderr as it happens).

use std::path::Path;
use std::process::ExitCode;

use keyrotate::keyring::{verify_with_jwk, Keyring};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [keystore, domain, stop] = args.as_slice() else {
        eprintln!("usage: keyring_reader KEYSTORE_DIR DOMAIN STOP_FILE");
        return ExitCode::from(2);
    };
    let (mut reads, mut failures) = (0u64, 0u64);
    // At least one read, even if the stop file is already there.
    loop {
        reads += 1;
        if let Err(e) = read_once(Path::new(keystore), domain) {
            failures += 1;
            eprintln!("keyring_reader: read {reads}: {e}");
        }
        if Path::new(stop).exists() {
            break;
        }
    }
    println!("reads {reads} failures {failures}");
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn read_once(keystore: &Path, domain: &str) -> Result<(), Box<dyn std::error::Error>> {
    let ring = Keyring::open(keystore, domain)?;
    let active = ring.active()?;
    ring.pending()?;
    let signature = active.key.sign(b"probe")?;
    let keys = ring.verification_keys()?;
    let jwk = keys
        .iter()
        .find(|k| k.kid == active.kid)
        .ok_or_else(|| format!("the snapshot does not publish the active kid {}", active.kid))?;
    if !verify_with_jwk(&jwk.jwk, b"probe", &signature) {
        return Err(format!("the active key {} does not verify with its own JWK", active.kid).into());
    }
    Ok(())
}
