//! Helpers for the shared key store's fault tests (`shared_faults`, `shared_storm`):
//! simulated hosts on one database, and the two questions every such test asks of a
//! host's local copy: does it verify (every live key loads, matches its fingerprint,
//! and signs what the `jwks.json` beside it verifies), and which committed keyring is
//! it (so that a copy mixing two epochs cannot pass for either).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use keyrotate::keyring::{verify_with_jwk, Keyring};

use super::pg::Database;
use super::{have_openssl, Env, Run};

/// The KEK every simulated host shares (tests only).
pub const KEK: [u8; 32] = *b"kek-of-the-fault-tests-32-bytes!";

/// One simulated host `name` in `pool`, on `db`, with its own state and key folders.
/// Domains, all shared and designated to pool-a: `sess` (ed25519, prepublish, pools
/// `require` required), `mac` (hmac-sha256, immediate), `ec` (ecdsa-p256, immediate),
/// `aes` (aes-256, immediate). `retain = 1`, so a steady rotation also destroys.
pub fn host(db: &Database, name: &str, pool: &str, require: &[&str]) -> Env {
    host_with(&db.url(), name, pool, require)
}

/// [`host`] with any ledger URL (a wrong one for "database down").
pub fn host_with(url: &str, name: &str, pool: &str, require: &[&str]) -> Env {
    let pools: Vec<String> = require.iter().map(|p| format!("{p:?}")).collect();
    let env = Env::with_config(&format!(
        r#"
[state]
dir = "state"
ledger = "{url}"
[host]
name = "{name}"
pool = "{pool}"
[defaults]
designated_pool = "pool-a"
backend = "keystore"
keystore = "keys"
store = "shared"
kek = "file:kek"
min_interval = "0s"
retain = 1
[domains.sess]
algorithm = "ed25519"
activation = "prepublish"
require_pools = [{pools}]
sync_ttl = "1h"
[domains.mac]
algorithm = "hmac-sha256"
[domains.ec]
algorithm = "ecdsa-p256"
[domains.aes]
algorithm = "aes-256"
"#,
        pools = pools.join(", ")
    ));
    write_kek(&env, &KEK);
    env
}

/// Writes the KEK file, mode 0600.
pub fn write_kek(env: &Env, bytes: &[u8]) {
    let p = env.path("kek");
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `sync --deadline 1m [--domain D]`.
pub fn sync<'a>(env: &'a Env, domain: Option<&str>) -> Run<'a> {
    let run = env.cmd().args(["sync", "--deadline", "1m"]);
    match domain {
        Some(d) => run.args(["--domain", d]),
        None => run,
    }
}

/// The domain's committed epoch (0 before the first commit).
pub fn epoch(db: &Database, domain: &str) -> i64 {
    db.sql(&format!(
        "SELECT coalesce((SELECT epoch FROM shared_keyrings WHERE domain = '{domain}'), 0)"
    ))
    .parse()
    .unwrap()
}

/// The committed keyring in the database as `v:state:fingerprint` items.
pub fn db_ring(db: &Database, domain: &str) -> String {
    db.sql(&format!(
        "SELECT coalesce(string_agg(version || ':' || state || ':' || fingerprint, ' ' ORDER BY version), '') \
         FROM shared_key_versions WHERE domain = '{domain}'"
    ))
}

/// A host's `keyring.json` in the form of [`db_ring`] (`""` when it has none).
pub fn local_ring(env: &Env, domain: &str) -> String {
    let Ok(bytes) = std::fs::read(env.key_dir(domain).join("keyring.json")) else {
        return String::new();
    };
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{}:{}:{}",
                v["version"],
                v["state"].as_str().unwrap(),
                v["fingerprint"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts that a host's copy verifies as an application would use it: every live
/// version loads through the consumer API (fingerprint checked), every asymmetric one
/// signs what its entry in the `jwks.json` beside it verifies, `jwks.json` publishes
/// exactly those versions, and `openssl` parses every private key file (where
/// installed). Returns the copy as [`local_ring`].
#[track_caller]
pub fn verify_copy(env: &Env, domain: &str, context: &str) -> String {
    verify(env, domain, context, true)
}

/// [`verify_copy`] for a copy a write may have been cut short in: `jwks.json` may also
/// publish keys the next `keyring.json` adds (they are published first), never fewer.
#[track_caller]
pub fn verify_interrupted_copy(env: &Env, domain: &str, context: &str) -> String {
    verify(env, domain, context, false)
}

#[track_caller]
fn verify(env: &Env, domain: &str, context: &str, exact: bool) -> String {
    let dir = env.path("keys");
    let ring = Keyring::open(&dir, domain).unwrap_or_else(|e| panic!("{context}: {domain}: {e}"));
    // Symmetric domains publish nothing: no jwks.json is no key published.
    let jwks: serde_json::Value = match std::fs::read(env.key_dir(domain).join("jwks.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(_) => serde_json::json!({"keys": []}),
    };
    let published: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["kid"].as_str().unwrap().to_string(), k.as_object().unwrap().clone()))
        .collect();
    let mut expected_kids = Vec::new();
    let verifiers = ring
        .verification_keys()
        .unwrap_or_else(|e| panic!("{context}: {domain}: {e}"));
    for entry in ring.manifest().versions.iter().filter(|v| v.is_live()) {
        if !keyrotate::keystore::private_half_allowed(entry) {
            // A retired signature key: only its public half is kept (DESIGN 11), and
            // jwks.json publishes exactly the one the manifest records. Its private
            // file goes in the tidy-up after the local commit (it cannot go before:
            // the old keyring.json still calls the version active), so a copy cut
            // short may still hold it, but only as that version's own key, garbage
            // by the manifest's word that the next sync removes. A whole copy never.
            let file = env.key_dir(domain).join(&entry.file);
            if exact {
                assert!(
                    std::fs::symlink_metadata(&file).is_err(),
                    "{context}: {domain} v{}: a retired signature key kept its private file",
                    entry.version
                );
            } else if std::fs::symlink_metadata(&file).is_ok() {
                keyrotate::keystore::Keystore::new(&dir, domain)
                    .load_version(entry)
                    .unwrap_or_else(|e| panic!("{context}: {domain}: leftover private file: {e}"));
            }
            let vk = verifiers
                .iter()
                .find(|k| k.version == entry.version)
                .unwrap_or_else(|| panic!("{context}: {domain}: no verification key for v{}", entry.version));
            let jwk = published
                .get(&vk.kid)
                .unwrap_or_else(|| panic!("{context}: {domain}: jwks.json lacks v{}", entry.version));
            assert_eq!(
                jwk, &vk.jwk,
                "{context}: {domain} v{}: jwks.json differs",
                entry.version
            );
            expected_kids.push(vk.kid.clone());
            continue;
        }
        let v = ring
            .version(entry.version)
            .unwrap_or_else(|e| panic!("{context}: {domain} v{}: {e}", entry.version));
        v.key
            .self_test()
            .unwrap_or_else(|e| panic!("{context}: {domain} v{}: {e}", v.version));
        if v.key.public().is_some() {
            let sig = v.key.sign(b"probe").unwrap();
            let jwk = published
                .get(&v.kid)
                .unwrap_or_else(|| panic!("{context}: {domain}: jwks.json lacks v{}", v.version));
            assert!(
                verify_with_jwk(jwk, b"probe", &sig),
                "{context}: {domain} v{}: jwks.json does not verify its key",
                v.version
            );
            expected_kids.push(v.kid.clone());
            if have_openssl() {
                openssl_parses(&env.key_dir(domain).join(&entry.file), context);
            }
        }
    }
    expected_kids.sort();
    if exact {
        assert_eq!(
            published.keys().cloned().collect::<Vec<_>>(),
            expected_kids,
            "{context}: {domain}: jwks.json publishes other versions than the live ones"
        );
    }
    local_ring(env, domain)
}

/// `openssl pkey` reads a private key file.
#[track_caller]
pub fn openssl_parses(path: &Path, context: &str) {
    let out = Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{context}: openssl rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file of a host's copy of `domain` with its bytes (symlinks as targets), the
/// lock file left out: equal on two hosts means the same keyring, byte for byte.
pub fn copy_of(env: &Env, domain: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(env.key_dir(domain))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != ".lock")
        .map(|e| {
            let p = e.path();
            let bytes = match std::fs::read_link(&p) {
                Ok(t) => t.into_os_string().into_encoded_bytes(),
                Err(_) => std::fs::read(&p).unwrap(),
            };
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect();
    files.sort();
    files
}
