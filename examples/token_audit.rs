//! An auditor's check of a `custody = "pkcs11"` domain (PCI DSS v4 3.6.1.2: keys kept
//! inside a secure cryptographic device): lists the domain's token objects and, for
//! each, whether the token marks it sensitive, never extractable and private, and
//! whether it refuses to return the key's value when asked. Reads the token from the
//! domain's `keyring.json`; the PIN from where the config says.
//!
//!     cargo run --example token_audit -- KEYSTORE_DIR DOMAIN
//!
//! Prints one line per object; exits non-zero if any key could leave the token.

use std::process::ExitCode;

use keyrotate::keystore::{pkcs11, Keystore};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [keystore, domain] = args.as_slice() else {
        eprintln!("usage: token_audit KEYSTORE_DIR DOMAIN");
        return ExitCode::from(2);
    };
    let run = || -> Result<bool, String> {
        let token = Keystore::new(keystore.as_ref(), domain).token()?;
        let objects = token.objects(&pkcs11::label_prefix(domain))?;
        if objects.is_empty() {
            return Err(format!("no token object under {}", pkcs11::label_prefix(domain)));
        }
        let mut all = true;
        for o in objects {
            let p = token.protection(o.handle)?;
            all &= p.holds();
            println!(
                "{} sensitive={} extractable={} never_extractable={} private={} value={}",
                o.label,
                p.sensitive,
                p.extractable,
                p.never_extractable,
                p.private,
                if p.value_refused { "refused" } else { "READABLE" }
            );
        }
        Ok(all)
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("token_audit: {e}");
            ExitCode::FAILURE
        }
    }
}
