//! A PKCS#11 token as the custodian of a domain's keys (DESIGN section 10): keys are
//! generated inside the token as sensitive, non-extractable token objects and used
//! there; only their public halves (and the manifest) reach the disk.
//!
//! All calls go through the maintained `cryptoki` crate; this module only picks the
//! mechanisms and templates. The PIN is read when a token is opened, handed to the
//! module as a `secrecy` secret and never formatted into any message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use aws_lc_rs::digest;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};

use super::algorithm::{self, Algorithm, PublicKey};

/// The label prefix of a domain's objects: `keyrotate/<domain>/`.
pub fn label_prefix(domain: &str) -> String {
    format!("keyrotate/{domain}/")
}

/// The label of a version's token object: `keyrotate/<domain>/v000008`.
pub fn label(domain: &str, version: u64) -> String {
    format!("{}v{version:06}", label_prefix(domain))
}

/// The version number a label of this domain names, if it is one of ours.
pub fn parse_label(domain: &str, label: &str) -> Option<u64> {
    let digits = label.strip_prefix(&label_prefix(domain))?.strip_prefix('v')?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The `[pkcs11]` table: which module, which token, where the PIN comes from. Also
/// recorded in `keyring.json`, so that the consumer API finds the token of a domain
/// (never the PIN itself: only where to read it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub module: PathBuf,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_env: Option<String>,
}

impl TokenConfig {
    /// Reads the PIN. The file must be a regular file (not a symlink) owned by this
    /// user and readable by nobody else (0600 or 0400): a PIN others can read is no
    /// PIN. Errors name the config key, never the PIN.
    pub fn pin(&self) -> Result<AuthPin, String> {
        if let Some(var) = &self.pin_env {
            return match std::env::var(var) {
                Ok(p) if !p.is_empty() => Ok(AuthPin::from(p)),
                _ => Err(format!(
                    "pkcs11.pin_env: the environment variable {var} is not set (or empty)"
                )),
            };
        }
        let Some(path) = &self.pin_file else {
            return Err("pkcs11: set pin_file or pin_env".into());
        };
        check_pin_file(path)?;
        let bytes = crate::fsutil::read_nofollow(path, 4096)
            .map_err(|e| format!("pkcs11.pin_file {}: {}", path.display(), crate::fsutil::io_reason(&e)))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| format!("pkcs11.pin_file {}: not text", path.display()))?;
        let pin = text.trim_end_matches(['\n', '\r']);
        if pin.is_empty() {
            return Err(format!("pkcs11.pin_file {}: empty", path.display()));
        }
        Ok(AuthPin::from(pin.to_string()))
    }
}

/// The PIN file's safety, without reading it.
pub fn check_pin_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("pkcs11.pin_file {shown}: {}", crate::fsutil::io_reason(&e)))?;
    if meta.file_type().is_symlink() {
        return Err(format!("pkcs11.pin_file {shown}: is a symlink; name the file itself"));
    }
    if !meta.is_file() {
        return Err(format!("pkcs11.pin_file {shown}: not a regular file"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(format!(
            "pkcs11.pin_file {shown}: owned by uid {}, not by this user (uid {euid})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o600 && mode != 0o400 {
        return Err(format!(
            "pkcs11.pin_file {shown}: mode {mode:04o}; it must be 0600 or 0400 (owner-only)"
        ));
    }
    Ok(())
}

/// One module per path per process: `C_Initialize` may be called once, and the
/// library is never finalized under another user of it.
fn context(module: &Path) -> Result<Pkcs11, String> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let shown = module.display();
    match std::fs::metadata(module) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(format!("pkcs11.module {shown}: not a regular file")),
        Err(e) => return Err(format!("pkcs11.module {shown}: {}", crate::fsutil::io_reason(&e))),
    }
    let ctx = Pkcs11::new(module).map_err(|e| format!("pkcs11.module {shown}: cannot load it: {e}"))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(ck(&format!("pkcs11.module {shown}: C_Initialize failed"), e)),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// An open, logged-in session on the configured token.
pub struct Token {
    ctx: Pkcs11,
    slot: Slot,
    label: String,
    session: Mutex<Session>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// One object of the token under a domain's prefix.
#[derive(Clone, Debug)]
pub struct TokenObject {
    pub label: String,
    pub handle: ObjectHandle,
    pub id: Vec<u8>,
}

/// One line for a cryptoki error: the PKCS#11 return value by name (the crate's
/// Display adds the specification's paragraph about it).
fn ck(what: &str, e: CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => format!("{what}: {rv:?}"),
        other => format!("{what}: {other}"),
    }
}

impl Token {
    /// Loads the module, finds the token by label, opens a read-write session and
    /// logs in. Every failure is one line naming what was wrong (the module, the
    /// token, the PIN), never the PIN.
    pub fn open(cfg: &TokenConfig) -> Result<Token, String> {
        let ctx = context(&cfg.module)?;
        let slots = ctx
            .get_slots_with_initialized_token()
            .map_err(|e| ck("pkcs11: listing the token slots failed", e))?;
        let mut found = Vec::new();
        for slot in slots {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| ck("pkcs11: reading token info failed", e))?;
            if info.label().trim_end() == cfg.token {
                found.push(slot);
            }
        }
        // Two tokens with one label: either could be the one the keys are in, and a
        // key generated in the other would be "missing" from the first.
        let slot = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(format!(
                    "pkcs11.token: no initialized token labelled {:?} in module {}",
                    cfg.token,
                    cfg.module.display()
                ))
            }
            many => {
                return Err(format!(
                    "pkcs11.token: {} tokens are labelled {:?} in module {}; relabel all but one",
                    many.len(),
                    cfg.token,
                    cfg.module.display()
                ))
            }
        };
        let pin = cfg.pin()?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| ck(&format!("pkcs11: cannot open a session on token {:?}", cfg.token), e))?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                let source = match &cfg.pin_env {
                    Some(var) => format!("pkcs11.pin_env (the variable {var})"),
                    None => "pkcs11.pin_file".to_string(),
                };
                return Err(format!(
                    "pkcs11: token {:?} refused the PIN (CKR_PIN_INCORRECT): check {source}",
                    cfg.token
                ));
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(format!(
                    "pkcs11: token {:?} has locked the user PIN (CKR_PIN_LOCKED): its security officer must reset it",
                    cfg.token
                ))
            }
            Err(e) => return Err(ck(&format!("pkcs11: login to token {:?} failed", cfg.token), e)),
        }
        Ok(Token {
            ctx,
            slot,
            label: cfg.token.clone(),
            session: Mutex::new(session),
        })
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mechanisms `algorithm` needs that the token lacks (empty: supported).
    pub fn missing_mechanisms(&self, algorithm: Algorithm) -> Result<Vec<String>, String> {
        let have = self
            .ctx
            .get_mechanism_list(self.slot)
            .map_err(|e| ck("pkcs11: listing the token's mechanisms failed", e))?;
        Ok(needed(algorithm)
            .into_iter()
            .filter(|m| !have.contains(m))
            .map(|m| m.to_string())
            .collect())
    }

    /// Every object (private, secret or public) whose label starts with `prefix`.
    pub fn objects(&self, prefix: &str) -> Result<Vec<TokenObject>, String> {
        let s = self.session();
        let handles = s
            .find_objects(&[Attribute::Token(true)])
            .map_err(|e| ck("pkcs11: listing the token's objects failed", e))?;
        let mut out = Vec::new();
        for handle in handles {
            let attrs = s
                .get_attributes(handle, &[AttributeType::Label, AttributeType::Id])
                .map_err(|e| ck("pkcs11: reading an object's label failed", e))?;
            let mut label = None;
            let mut id = Vec::new();
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = Some(String::from_utf8_lossy(&l).into_owned()),
                    Attribute::Id(i) => id = i,
                    _ => {}
                }
            }
            if let Some(label) = label.filter(|l| l.starts_with(prefix)) {
                out.push(TokenObject { label, handle, id });
            }
        }
        out.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(out)
    }

    /// Generates `algorithm`'s key inside the token as a token object labelled
    /// `label`: private (login needed), sensitive, never extractable. The public half
    /// of a pair is a session object: its copy on disk is the published one. Returns
    /// the private (or secret) key's handle and, for a pair, the public key.
    pub fn generate(&self, algorithm: Algorithm, label: &str) -> Result<(ObjectHandle, Option<PublicKey>), String> {
        let s = self.session();
        let lbl = Attribute::Label(label.as_bytes().to_vec());
        let private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            lbl.clone(),
        ];
        let fail = |e| {
            ck(
                &format!("pkcs11: generating {algorithm} key {label} in the token failed"),
                e,
            )
        };
        if algorithm.is_symmetric() {
            // Each key may do what its algorithm is for and nothing else (no wrapping
            // other keys out, no deriving): a token's defaults vary.
            let (mech, kind, usage) = if algorithm == Algorithm::Aes256 {
                (
                    Mechanism::AesKeyGen,
                    KeyType::AES,
                    vec![
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Sign(true),
                        Attribute::Verify(true),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                        Attribute::Derive(false),
                    ],
                )
            } else {
                (
                    Mechanism::GenericSecretKeyGen,
                    KeyType::GENERIC_SECRET,
                    vec![
                        Attribute::Sign(true),
                        Attribute::Verify(true),
                        Attribute::Encrypt(false),
                        Attribute::Decrypt(false),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                        Attribute::Derive(false),
                    ],
                )
            };
            let mut template = private;
            template.extend([
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(kind),
                Attribute::ValueLen(32.into()),
            ]);
            template.extend(usage);
            let handle = s.generate_key(&mech, &template).map_err(fail)?;
            return Ok((handle, None));
        }
        let mut public = vec![Attribute::Token(false), Attribute::Verify(true), lbl];
        let mut private = private;
        private.extend([
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        let mech = match algorithm {
            Algorithm::Ed25519 | Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => {
                public.push(Attribute::EcParams(ec_params(algorithm).to_vec()));
                if algorithm == Algorithm::Ed25519 {
                    Mechanism::EccEdwardsKeyPairGen
                } else {
                    Mechanism::EccKeyPairGen
                }
            }
            _ => {
                let bits = algorithm::rsa_bits(algorithm).unwrap_or(2048);
                public.push(Attribute::ModulusBits((bits as u64).into()));
                public.push(Attribute::PublicExponent(vec![1, 0, 1]));
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        let (pubh, privh) = s.generate_key_pair(&mech, &public, &private).map_err(fail)?;
        let key = read_public(&s, algorithm, pubh);
        // The public object was a session object: gone with the session anyway, but
        // not left for the session's whole life.
        let _ = s.destroy_object(pubh);
        Ok((privh, Some(key?)))
    }

    /// Sets `CKA_ID` (derived from the fingerprint) on a new object.
    pub fn set_id(&self, handle: ObjectHandle, id: &[u8]) -> Result<(), String> {
        self.session()
            .update_attributes(handle, &[Attribute::Id(id.to_vec())])
            .map_err(|e| ck("pkcs11: setting the object's CKA_ID failed", e))
    }

    /// Destroys every object labelled `label` (the private key, and a public one a
    /// crash may have left). Nothing to destroy is not an error.
    pub fn destroy(&self, label: &str) -> Result<usize, String> {
        let s = self.session();
        let handles = s
            .find_objects(&[Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| ck(&format!("pkcs11: finding {label} failed"), e))?;
        for h in &handles {
            s.destroy_object(*h)
                .map_err(|e| ck(&format!("pkcs11: destroying {label} failed"), e))?;
        }
        Ok(handles.len())
    }

    /// The one private or secret key labelled `label` with `CKA_ID` `id`.
    pub fn find_key(&self, label: &str, id: &[u8]) -> Result<ObjectHandle, String> {
        let s = self.session();
        let handles = s
            .find_objects(&[
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ])
            .map_err(|e| ck(&format!("pkcs11: finding {label} failed"), e))?;
        let keys: Vec<ObjectHandle> = handles
            .into_iter()
            .filter(|h| {
                s.get_attributes(*h, &[AttributeType::Class]).is_ok_and(|a| {
                    a.iter().any(|a| {
                        matches!(a, Attribute::Class(c) if *c == ObjectClass::PRIVATE_KEY || *c == ObjectClass::SECRET_KEY)
                    })
                })
            })
            .collect();
        match keys.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!(
                "token object {label} with the id of its fingerprint is missing from token {:?}",
                self.label
            )),
            many => Err(format!(
                "token {:?} holds {} keys labelled {label} with one id",
                self.label,
                many.len()
            )),
        }
    }

    /// Signs (or MACs) `message` with the key `handle` inside the token. The result is
    /// what a verifier of the JOSE `alg` expects, as for a key file.
    pub fn sign(&self, algorithm: Algorithm, handle: ObjectHandle, message: &[u8]) -> Result<Vec<u8>, String> {
        let s = self.session();
        let fail = |e| ck(&format!("pkcs11: {algorithm} signing in the token failed"), e);
        match algorithm {
            Algorithm::Ed25519 => s
                .sign(
                    &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                    handle,
                    message,
                )
                .map_err(fail),
            Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => {
                let alg = if algorithm == Algorithm::EcdsaP256 {
                    &digest::SHA256
                } else {
                    &digest::SHA384
                };
                // CKM_ECDSA signs a digest: hashing here is what ES256/ES384 specify,
                // and every token has plain CKM_ECDSA.
                let hash = digest::digest(alg, message);
                s.sign(&Mechanism::Ecdsa, handle, hash.as_ref()).map_err(fail)
            }
            Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
                s.sign(&Mechanism::Sha256RsaPkcs, handle, message).map_err(fail)
            }
            Algorithm::HmacSha256 => s.sign(&Mechanism::Sha256Hmac, handle, message).map_err(fail),
            Algorithm::Aes256 => s.sign(&Mechanism::AesCMac, handle, message).map_err(fail),
        }
    }

    /// The fingerprint of a secret key kept in the token: for HMAC the same as a key
    /// file's (its MAC over a fixed label); for AES the SHA-256 of its CMAC over that
    /// label (no token lets a key of one type MAC with another's mechanism).
    pub fn secret_fingerprint(&self, algorithm: Algorithm, handle: ObjectHandle) -> Result<String, String> {
        let mac = self.sign(algorithm, handle, algorithm::SYMMETRIC_FINGERPRINT_LABEL)?;
        Ok(match algorithm {
            Algorithm::HmacSha256 => format!("sha256:{}", algorithm::hex(&mac)),
            _ => format!(
                "sha256:{}",
                algorithm::hex(digest::digest(&digest::SHA256, &mac).as_ref())
            ),
        })
    }

    /// How well the token protects an object: what an auditor asks (PCI DSS 3.6.1.2)
    /// and the tests prove. `value_refused`: asking for the key's value
    /// (`CKA_VALUE`, or an RSA key's `CKA_PRIVATE_EXPONENT`) returned nothing.
    pub fn protection(&self, handle: ObjectHandle) -> Result<Protection, String> {
        let s = self.session();
        let attrs = s
            .get_attributes(
                handle,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Private,
                ],
            )
            .map_err(|e| ck("pkcs11: reading the object's attributes failed", e))?;
        let mut p = Protection::default();
        for a in attrs {
            match a {
                Attribute::Sensitive(b) => p.sensitive = b,
                Attribute::Extractable(b) => p.extractable = b,
                Attribute::NeverExtractable(b) => p.never_extractable = b,
                Attribute::Private(b) => p.private = b,
                _ => {}
            }
        }
        p.value_refused = match s.get_attributes(handle, &[AttributeType::Value, AttributeType::PrivateExponent]) {
            Err(_) => true,
            Ok(attrs) => !attrs
                .iter()
                .any(|a| matches!(a, Attribute::Value(v) | Attribute::PrivateExponent(v) if !v.is_empty())),
        };
        Ok(p)
    }
}

/// See [`Token::protection`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    pub sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub private: bool,
    pub value_refused: bool,
}

impl Protection {
    /// Sensitive, never extractable, login needed, and its value refused.
    pub fn holds(&self) -> bool {
        self.sensitive && !self.extractable && self.never_extractable && self.private && self.value_refused
    }
}

/// The mechanisms a domain of `algorithm` uses in the token.
fn needed(algorithm: Algorithm) -> Vec<MechanismType> {
    match algorithm {
        Algorithm::Ed25519 => vec![MechanismType::ECC_EDWARDS_KEY_PAIR_GEN, MechanismType::EDDSA],
        Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => vec![MechanismType::ECC_KEY_PAIR_GEN, MechanismType::ECDSA],
        Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
            vec![MechanismType::RSA_PKCS_KEY_PAIR_GEN, MechanismType::SHA256_RSA_PKCS]
        }
        Algorithm::HmacSha256 => vec![MechanismType::GENERIC_SECRET_KEY_GEN, MechanismType::SHA256_HMAC],
        Algorithm::Aes256 => vec![MechanismType::AES_KEY_GEN, MechanismType::AES_CMAC],
    }
}

/// DER of the curve's OID (`CKA_EC_PARAMS`).
fn ec_params(algorithm: Algorithm) -> &'static [u8] {
    match algorithm {
        // 1.3.101.112
        Algorithm::Ed25519 => &[0x06, 0x03, 0x2b, 0x65, 0x70],
        // 1.2.840.10045.3.1.7
        Algorithm::EcdsaP256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        // 1.3.132.0.34
        _ => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    }
}

/// The public key of a freshly generated pair, read from its public object.
fn read_public(s: &Session, algorithm: Algorithm, handle: ObjectHandle) -> Result<PublicKey, String> {
    let fail = |e| ck("pkcs11: reading the new public key failed", e);
    if matches!(algorithm, Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096) {
        let attrs = s
            .get_attributes(handle, &[AttributeType::Modulus, AttributeType::PublicExponent])
            .map_err(fail)?;
        let (mut n, mut e) = (Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = v,
                Attribute::PublicExponent(v) => e = v,
                _ => {}
            }
        }
        return algorithm::rsa_public_from_components(algorithm, &n, &e);
    }
    let attrs = s.get_attributes(handle, &[AttributeType::EcPoint]).map_err(fail)?;
    let point = attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or("pkcs11: the new public key has no CKA_EC_POINT")?;
    algorithm::public_from_raw(algorithm, unwrap_octet_string(&point))
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the point (some modules give the bare
/// point): the point either way.
fn unwrap_octet_string(der: &[u8]) -> &[u8] {
    match der {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        _ => der,
    }
}

/// A key of a token version, ready to sign: shared by the copies the consumer API
/// hands out.
#[derive(Clone)]
pub struct TokenKey {
    pub token: Arc<Token>,
    pub handle: ObjectHandle,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("token", &self.token.label)
            .finish_non_exhaustive()
    }
}

/// The `CKA_ID` of a version's object: the bytes of its fingerprint's digest.
pub fn id_of(fingerprint: &str) -> Vec<u8> {
    let hex = fingerprint.strip_prefix("sha256:").unwrap_or(fingerprint);
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// The shared store's KEK kept in the token (DESIGN 9, 10): an AES-256 secret key that
/// seals and opens key material with `CKM_AES_GCM` inside the token, so the KEK itself
/// is never on any host's disk or in its memory.
impl Token {
    /// The one secret key labelled `label`. Missing, or two of them (either could be
    /// the one the store was sealed with), is an error naming the label and token.
    pub fn find_secret(&self, label: &str) -> Result<ObjectHandle, String> {
        let s = self.session();
        let handles = s
            .find_objects(&[
                Attribute::Token(true),
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| ck(&format!("pkcs11: finding {label:?} failed"), e))?;
        match handles.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!(
                "pkcs11: token {:?} holds no secret key labelled {label:?}",
                self.label
            )),
            many => Err(format!(
                "pkcs11: token {:?} holds {} secret keys labelled {label:?}; keep exactly one",
                self.label,
                many.len()
            )),
        }
    }

    /// What disqualifies `handle` as a KEK, one line each (empty: fit): it must be an
    /// AES-256 key allowed to encrypt and decrypt, sensitive and not extractable, and
    /// the token must do `CKM_AES_GCM`.
    pub fn kek_problems(&self, handle: ObjectHandle, label: &str) -> Result<Vec<String>, String> {
        let have = self
            .ctx
            .get_mechanism_list(self.slot)
            .map_err(|e| ck("pkcs11: listing the token's mechanisms failed", e))?;
        let s = self.session();
        let attrs = s
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| ck(&format!("pkcs11: reading the attributes of {label:?} failed"), e))?;
        let (mut aes, mut len, mut enc, mut dec, mut sensitive, mut extractable) =
            (false, 0u64, false, false, false, true);
        for a in attrs {
            match a {
                Attribute::KeyType(k) => aes = k == KeyType::AES,
                Attribute::ValueLen(l) => len = l.into(),
                Attribute::Encrypt(b) => enc = b,
                Attribute::Decrypt(b) => dec = b,
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::Extractable(b) => extractable = b,
                _ => {}
            }
        }
        let mut problems = Vec::new();
        let what = format!("the KEK object {label:?} in token {:?}", self.label);
        if !aes || len != 32 {
            problems.push(format!("{what} is not an AES-256 key (CKK_AES, 32 bytes)"));
        }
        if !(enc && dec) {
            problems.push(format!("{what} does not allow CKA_ENCRYPT and CKA_DECRYPT"));
        }
        if !sensitive {
            problems.push(format!("{what} is not CKA_SENSITIVE: its value could be read out"));
        }
        if extractable {
            problems.push(format!(
                "{what} is CKA_EXTRACTABLE: it could be wrapped out of the token"
            ));
        }
        if !have.contains(&MechanismType::AES_GCM) {
            problems.push(format!("token {:?} does not offer CKM_AES_GCM", self.label));
        }
        Ok(problems)
    }

    /// AES-GCM (128-bit tag) of `data` under `handle` in the token: `ciphertext || tag`.
    pub fn aes_gcm_encrypt(&self, handle: ObjectHandle, iv: &[u8], aad: &[u8], data: &[u8]) -> Result<Vec<u8>, String> {
        let mut iv = iv.to_vec();
        let params = GcmParams::new(&mut iv, aad, 128.into()).map_err(|e| ck("pkcs11: AES-GCM parameters", e))?;
        self.session()
            .encrypt(&Mechanism::AesGcm(params), handle, data)
            .map_err(|e| ck("pkcs11: sealing with the token KEK (CKM_AES_GCM) failed", e))
    }

    /// Opens what [`Token::aes_gcm_encrypt`] produced; fails on a wrong key, a damaged
    /// ciphertext or other associated data. The plaintext is zeroized on drop.
    pub fn aes_gcm_decrypt(
        &self,
        handle: ObjectHandle,
        iv: &[u8],
        aad: &[u8],
        data: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        let mut iv = iv.to_vec();
        let params = GcmParams::new(&mut iv, aad, 128.into()).map_err(|e| ck("pkcs11: AES-GCM parameters", e))?;
        self.session()
            .decrypt(&Mechanism::AesGcm(params), handle, data)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| ck("CKM_AES_GCM", e))
    }
}
