//! The read-only consumer API: how an application on the same host uses the keys
//! keyrotate maintains, without ever writing to the key store.
//!
//! ```no_run
//! use keyrotate::keyring::Keyring;
//!
//! let ring = Keyring::open("/var/lib/keyrotate/keys".as_ref(), "payments-signing")?;
//! let active = ring.active()?;                  // verified against keyring.json
//! let signature = active.key.sign(b"payload")?;  // EdDSA / ES256 / ES384 / RS256 / HS256
//! println!("signed with kid {}", active.kid);
//!
//! // A verifier trusts every published version (pending, active, retired):
//! for v in ring.verification_keys()? {
//!     if keyrotate::keyring::verify_with_jwk(&v.jwk, b"payload", &signature) {
//!         println!("verified by {}", v.kid);
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every key is read without following symlinks and checked against the fingerprint
//! the manifest records before it is returned; a damaged key store is an error, never
//! a silently different key. A `Keyring` is a snapshot of one commit: the manifest and
//! every live key, loaded together by [`Keyring::open`] so that a rotation running
//! beside it (its commit, its tidy-up unlinking destroyed versions) never makes a read
//! fail or mix two commits. Re-open the keyring to see a newer rotation.
//!
//! A domain with `custody = "pkcs11"` keeps its keys in a PKCS#11 token: the keyring
//! logs in to the token `keyring.json` names (the PIN from the source the config gave)
//! and [`KeyFile::sign`] signs or MACs there; the key never enters this process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::keystore::manifest::{Manifest, VersionEntry, VersionState};
use crate::keystore::{Algorithm, Half, KeyFile, Keystore};

/// Why a keyring or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("domain {domain:?} has no keyring in {dir} (never rotated?)")]
    NotFound { domain: String, dir: PathBuf },
    #[error("domain {domain:?} has no {what} version")]
    NoSuchVersion { domain: String, what: String },
    #[error("key store {dir}: {reason}")]
    Invalid { dir: PathBuf, reason: String },
}

/// One domain's keyring: a snapshot of one commit, the manifest and every live
/// version's key as that manifest describes them.
#[derive(Debug)]
pub struct Keyring {
    store: Keystore,
    manifest: Manifest,
    domain: String,
    /// Each live version's key (or, for a retired signature key, its public half),
    /// or why it could not be loaded (with the manifest unchanged around the attempt:
    /// damage, not a rotation in progress).
    keys: BTreeMap<u64, Result<Half, String>>,
}

/// How many times [`Keyring::open`] re-reads when rotations keep committing under it.
/// A rotation's commit and tidy-up take milliseconds; a reader that loses this many
/// races in a row sees a store that changes faster than anyone can use it.
const SNAPSHOT_ATTEMPTS: u32 = 50;

/// A loaded, verified key version.
#[derive(Debug)]
pub struct Version {
    pub version: u64,
    pub state: VersionState,
    /// The `kid` under which `jwks.json` publishes this version.
    pub kid: String,
    pub key: KeyFile,
}

/// A public key a verifier should trust, as published in `jwks.json`.
#[derive(Debug, Clone)]
pub struct VerificationKey {
    pub version: u64,
    pub state: VersionState,
    pub kid: String,
    /// The RFC 7517 JWK, `kid` included.
    pub jwk: Map<String, Value>,
}

impl Keyring {
    /// Opens `<keystore>/<domain>/keyring.json` and loads every live version it lists,
    /// as one consistent snapshot whatever runs beside it.
    ///
    /// A rotation may commit (replace `keyring.json`) and tidy up (unlink the files of
    /// versions it destroyed) while this reads. So the manifest is read again after the
    /// keys: if it changed, the keys may belong to two commits, or a file may have
    /// vanished because the newer commit destroyed it; both mean "read again", never an
    /// error. Only a failure that the unchanged manifest cannot explain (a missing,
    /// swapped or damaged file) is kept, and reported by the version it concerns.
    pub fn open(keystore: &Path, domain: &str) -> Result<Keyring, KeyringError> {
        crate::config::validate_domain_name(domain).map_err(|reason| KeyringError::Invalid {
            dir: keystore.to_path_buf(),
            reason,
        })?;
        let store = Keystore::new(keystore, domain);
        let mut bytes = read_manifest(&store, domain)?;
        let mut best: Option<Keyring> = None;
        for attempt in 0..SNAPSHOT_ATTEMPTS {
            let manifest = parse_manifest(&bytes, domain).map_err(|reason| KeyringError::Invalid {
                dir: store.dir().to_path_buf(),
                reason,
            })?;
            let keys: BTreeMap<u64, Result<Half, String>> =
                manifest.live().map(|v| (v.version, store.load_half(v))).collect();
            let after = read_manifest(&store, domain)?;
            let ring = Keyring {
                store: store.clone(),
                manifest,
                domain: domain.to_string(),
                keys,
            };
            let whole = ring.keys.values().all(Result::is_ok);
            if after == bytes {
                // The same commit before and after: what failed to load is damage.
                return Ok(ring);
            }
            if whole {
                // Every key verified against its manifest: a consistent (older)
                // snapshot, kept in case the store never holds still.
                best = Some(ring);
            }
            bytes = after;
            // Let the rotation finish its tidy-up before looking again.
            std::thread::sleep(std::time::Duration::from_millis(u64::from(attempt.min(10))));
        }
        best.ok_or_else(|| KeyringError::Invalid {
            dir: store.dir().to_path_buf(),
            reason: format!("keyring.json changed {SNAPSHOT_ATTEMPTS} times while its keys were being read; try again"),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The active version: the one to sign or encrypt with.
    pub fn active(&self) -> Result<Version, KeyringError> {
        let entry = self.manifest.active().ok_or_else(|| self.missing("active"))?;
        self.load(entry)
    }

    /// The pending version (pre-published, not yet signing), if any.
    pub fn pending(&self) -> Result<Option<Version>, KeyringError> {
        self.manifest.pending().map(|e| self.load(e)).transpose()
    }

    /// Any live version by number (to verify or decrypt with an older key). A retired
    /// signature key has no private half any more (NIST SP 800-57: nothing may sign
    /// with it): verify with [`Keyring::verification_keys`] instead.
    pub fn version(&self, version: u64) -> Result<Version, KeyringError> {
        let entry = self
            .manifest
            .get(version)
            .filter(|e| e.is_live())
            .ok_or_else(|| self.missing(&format!("live v{version}")))?;
        self.load(entry)
    }

    /// Every version a verifier should accept (pending, active, retired), newest
    /// first within each state, with the JWK published for it.
    pub fn verification_keys(&self) -> Result<Vec<VerificationKey>, KeyringError> {
        let mut out = Vec::new();
        for state in [VersionState::Pending, VersionState::Active, VersionState::Retired] {
            for entry in self.manifest.versions.iter().rev().filter(|v| v.state == state) {
                if let Some(public) = self.half(entry)?.public() {
                    let kid = crate::keystore::kid(entry);
                    let mut jwk = public.jwk.clone();
                    jwk.insert("kid".into(), kid.clone().into());
                    out.push(VerificationKey {
                        version: entry.version,
                        state,
                        kid,
                        jwk,
                    });
                }
            }
        }
        Ok(out)
    }

    fn half(&self, entry: &VersionEntry) -> Result<&Half, KeyringError> {
        match self.keys.get(&entry.version) {
            Some(Ok(half)) => Ok(half),
            Some(Err(reason)) => Err(KeyringError::Invalid {
                dir: self.store.dir().to_path_buf(),
                reason: reason.clone(),
            }),
            None => Err(self.missing(&format!("live v{}", entry.version))),
        }
    }

    fn load(&self, entry: &VersionEntry) -> Result<Version, KeyringError> {
        let key = match self.half(entry)? {
            Half::Private(key) => key.clone(),
            Half::Public(_) => {
                return Err(self.missing(&format!(
                    "private v{} (a retired signature key keeps only its public half; verify with verification_keys)",
                    entry.version
                )))
            }
        };
        Ok(Version {
            version: entry.version,
            state: entry.state,
            kid: crate::keystore::kid(entry),
            key,
        })
    }

    fn missing(&self, what: &str) -> KeyringError {
        KeyringError::NoSuchVersion {
            domain: self.domain.clone(),
            what: what.to_string(),
        }
    }
}

fn read_manifest(store: &Keystore, domain: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyringError> {
    crate::fsutil::read_nofollow(&store.dir().join(crate::keystore::MANIFEST), 16 << 20).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            KeyringError::NotFound {
                domain: domain.to_string(),
                dir: store.dir().to_path_buf(),
            }
        } else {
            KeyringError::Invalid {
                dir: store.dir().to_path_buf(),
                reason: format!("keyring.json: {}", crate::fsutil::io_reason(&e)),
            }
        }
    })
}

/// Parses the manifest strictly, except that members this version does not know
/// (added by a newer keyrotate, at the top level or on a version) are ignored: an
/// application built against this release keeps reading a newer store.
fn parse_manifest(bytes: &[u8], domain: &str) -> Result<Manifest, String> {
    match Manifest::parse(bytes, domain) {
        Ok(m) => Ok(m),
        Err(strict) => {
            let Ok(Value::Object(mut doc)) = serde_json::from_slice::<Value>(bytes) else {
                return Err(strict);
            };
            let known = ["domain", "primary", "versions"];
            let known_version = [
                "version",
                "state",
                "algorithm",
                "created_at",
                "activated_at",
                "retired_at",
                "destroyed_at",
                "compromised_at",
                "compromise_reason",
                "fingerprint",
                "file",
                "created_by_run",
                "public_key",
            ];
            let mut dropped = doc.len();
            doc.retain(|k, _| known.contains(&k.as_str()));
            dropped -= doc.len();
            if let Some(Value::Array(versions)) = doc.get_mut("versions") {
                for v in versions.iter_mut().filter_map(Value::as_object_mut) {
                    let before = v.len();
                    v.retain(|k, _| known_version.contains(&k.as_str()));
                    dropped += before - v.len();
                }
            }
            if dropped == 0 {
                return Err(strict);
            }
            Manifest::parse(&serde_json::to_vec(&doc).expect("json"), domain)
        }
    }
}

/// Verifies `signature` over `message` with a public JWK (`OKP`/Ed25519, `EC` P-256 or
/// P-384, `RSA` with RS256) such as an entry of `jwks.json`.
pub fn verify_with_jwk(jwk: &Map<String, Value>, message: &[u8], signature: &[u8]) -> bool {
    use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
    let field = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
    };
    let text = |name: &str| jwk.get(name).and_then(Value::as_str).unwrap_or("");
    match (text("kty"), text("crv"), text("alg")) {
        ("OKP", "Ed25519", _) => field("x").is_some_and(|x| {
            UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, signature)
                .is_ok()
        }),
        ("EC", crv, _) => {
            let alg: &'static dyn signature::VerificationAlgorithm = match crv {
                "P-256" => &signature::ECDSA_P256_SHA256_FIXED,
                "P-384" => &signature::ECDSA_P384_SHA384_FIXED,
                _ => return false,
            };
            let (Some(x), Some(y)) = (field("x"), field("y")) else {
                return false;
            };
            let point: Vec<u8> = [&[4u8][..], &x, &y].concat();
            UnparsedPublicKey::new(alg, point).verify(message, signature).is_ok()
        }
        ("RSA", _, "RS256") => {
            let (Some(n), Some(e)) = (field("n"), field("e")) else {
                return false;
            };
            RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok()
        }
        _ => false,
    }
}

/// The algorithm a JWK's key belongs to, as keyrotate names it.
pub fn jwk_algorithm(jwk: &Map<String, Value>) -> Option<Algorithm> {
    match (
        jwk.get("kty")?.as_str()?,
        jwk.get("crv").and_then(Value::as_str),
        jwk.get("alg").and_then(Value::as_str),
    ) {
        ("OKP", Some("Ed25519"), _) => Some(Algorithm::Ed25519),
        ("EC", Some("P-256"), _) => Some(Algorithm::EcdsaP256),
        ("EC", Some("P-384"), _) => Some(Algorithm::EcdsaP384),
        ("RSA", _, _) => match URL_SAFE_NO_PAD.decode(jwk.get("n")?.as_str()?).ok()?.len() {
            256 => Some(Algorithm::Rsa2048),
            384 => Some(Algorithm::Rsa3072),
            512 => Some(Algorithm::Rsa4096),
            _ => None,
        },
        _ => None,
    }
}
