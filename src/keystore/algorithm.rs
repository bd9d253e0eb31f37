//! Key algorithms: generation from the OS CSPRNG, the self-test every new key must
//! pass, the on-disk encoding, fingerprints and public JWKs.
//!
//! All cryptography is aws-lc-rs (maintained, FIPS-capable). Private keys are written
//! as PKCS#8 v1 PEM, the form `openssl pkey` reads; symmetric keys as base64 on one
//! line. Every buffer that holds key bytes is `Zeroizing`, and `KeyFile`'s `Debug`
//! shows only the algorithm and fingerprint.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey, AES_256_GCM};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use aws_lc_rs::{digest, hmac, rsa};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

const SELF_TEST_MESSAGE: &[u8] = b"keyrotate self-test";
pub(crate) const SYMMETRIC_FINGERPRINT_LABEL: &[u8] = b"keyrotate-fingerprint-v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Ed25519,
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
    HmacSha256,
    Aes256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 8] = [
        Algorithm::Ed25519,
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP384,
        Algorithm::Rsa2048,
        Algorithm::Rsa3072,
        Algorithm::Rsa4096,
        Algorithm::HmacSha256,
        Algorithm::Aes256,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256 => "ecdsa-p256",
            Algorithm::EcdsaP384 => "ecdsa-p384",
            Algorithm::Rsa2048 => "rsa-2048",
            Algorithm::Rsa3072 => "rsa-3072",
            Algorithm::Rsa4096 => "rsa-4096",
            Algorithm::HmacSha256 => "hmac-sha256",
            Algorithm::Aes256 => "aes-256",
        }
    }

    pub fn names() -> String {
        Algorithm::ALL.map(Algorithm::name).join(", ")
    }

    pub const fn is_symmetric(self) -> bool {
        matches!(self, Algorithm::HmacSha256 | Algorithm::Aes256)
    }

    /// The key file extension: `pem` for PKCS#8, `key` for base64 symmetric keys.
    pub const fn extension(self) -> &'static str {
        if self.is_symmetric() {
            "key"
        } else {
            "pem"
        }
    }

    /// The JOSE `alg` a verifier should expect.
    pub const fn jose_alg(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "EdDSA",
            Algorithm::EcdsaP256 => "ES256",
            Algorithm::EcdsaP384 => "ES384",
            Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => "RS256",
            Algorithm::HmacSha256 => "HS256",
            Algorithm::Aes256 => "A256GCM",
        }
    }

    fn ecdsa(
        self,
    ) -> Option<(
        &'static signature::EcdsaSigningAlgorithm,
        &'static signature::EcdsaVerificationAlgorithm,
        &'static str,
    )> {
        match self {
            Algorithm::EcdsaP256 => Some((
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &signature::ECDSA_P256_SHA256_FIXED,
                "P-256",
            )),
            Algorithm::EcdsaP384 => Some((
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &signature::ECDSA_P384_SHA384_FIXED,
                "P-384",
            )),
            _ => None,
        }
    }

    fn rsa_size(self) -> Option<rsa::KeySize> {
        match self {
            Algorithm::Rsa2048 => Some(rsa::KeySize::Rsa2048),
            Algorithm::Rsa3072 => Some(rsa::KeySize::Rsa3072),
            Algorithm::Rsa4096 => Some(rsa::KeySize::Rsa4096),
            _ => None,
        }
    }

    /// Generates a new key from the OS CSPRNG and self-tests it.
    pub fn generate(self) -> Result<KeyFile, String> {
        let fail = |what: &str| format!("{}: {what}", self.name());
        let secret: Zeroizing<Vec<u8>> = if self.is_symmetric() {
            let mut bytes = Zeroizing::new(vec![0u8; 32]);
            SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| fail("the OS random source failed"))?;
            bytes
        } else if self == Algorithm::Ed25519 {
            let pair = Ed25519KeyPair::generate().map_err(|_| fail("key generation failed"))?;
            let doc = pair.to_pkcs8v1().map_err(|_| fail("PKCS#8 encoding failed"))?;
            Zeroizing::new(doc.as_ref().to_vec())
        } else if let Some((alg, _, _)) = self.ecdsa() {
            let pair = EcdsaKeyPair::generate(alg).map_err(|_| fail("key generation failed"))?;
            let doc = pair.to_pkcs8v1().map_err(|_| fail("PKCS#8 encoding failed"))?;
            Zeroizing::new(doc.as_ref().to_vec())
        } else {
            let size = self.rsa_size().expect("every algorithm is handled");
            let pair = rsa::KeyPair::generate(size).map_err(|_| fail("key generation failed"))?;
            let der: Pkcs8V1Der = pair.as_der().map_err(|_| fail("PKCS#8 encoding failed"))?;
            Zeroizing::new(der.as_ref().to_vec())
        };
        let key = KeyFile::from_secret(self, secret)?;
        self_test(self, &key.secret, key.public.as_ref())?;
        derived::put(&key, derived::digest(&key.file_bytes));
        Ok(key)
    }
}

impl FromStr for Algorithm {
    type Err = ();
    fn from_str(s: &str) -> Result<Algorithm, ()> {
        Algorithm::ALL.into_iter().find(|a| a.name() == s).ok_or(())
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed key: its algorithm, the exact bytes of its file, its fingerprint and (for
/// asymmetric keys) its public half. Cloning copies the secret into another zeroized
/// buffer (the consumer API hands out copies of the keys of one loaded snapshot).
#[derive(Clone)]
pub struct KeyFile {
    algorithm: Algorithm,
    /// PKCS#8 DER, or the raw symmetric key.
    secret: Zeroizing<Vec<u8>>,
    file_bytes: Zeroizing<Vec<u8>>,
    fingerprint: String,
    public: Option<PublicKey>,
    /// A key kept in a PKCS#11 token: `secret` is empty and every use goes through
    /// the token; `file_bytes` is what the disk holds for it (the public key, or for a
    /// secret key a reference line).
    token: Option<super::pkcs11::TokenKey>,
}

/// The public half of an asymmetric key.
#[derive(Clone, Debug)]
pub struct PublicKey {
    pub spki_der: Vec<u8>,
    /// RFC 7517 members for this key, without `kid`.
    pub jwk: Map<String, Value>,
}

impl PublicKey {
    /// The SubjectPublicKeyInfo as PEM (`PUBLIC KEY`, LF line endings).
    pub fn pem(&self) -> String {
        pem::encode_config(
            &pem::Pem::new("PUBLIC KEY", self.spki_der.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFile")
            .field("algorithm", &self.algorithm)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl KeyFile {
    /// Parses a key file's bytes as `algorithm`, checking it is well formed (its
    /// identity is checked by the caller against the manifest's fingerprint; the
    /// sign/verify self-test is for new keys). Errors never quote the bytes.
    pub fn parse(algorithm: Algorithm, file_bytes: &[u8]) -> Result<KeyFile, String> {
        let name = algorithm.name();
        let secret = if algorithm.is_symmetric() {
            let text = std::str::from_utf8(file_bytes).map_err(|_| format!("{name} key file is not text"))?;
            let bytes = Zeroizing::new(
                STANDARD
                    .decode(text.trim_end_matches('\n'))
                    .map_err(|_| format!("{name} key file is not one line of base64"))?,
            );
            if bytes.len() != 32 {
                return Err(format!("{name} key file holds {} bytes, expected 32", bytes.len()));
            }
            bytes
        } else {
            let parsed = pem::parse(file_bytes).map_err(|_| format!("{name} key file is not PEM"))?;
            if parsed.tag() != "PRIVATE KEY" {
                return Err(format!(
                    "{name} key file is PEM {:?}, expected \"PRIVATE KEY\" (PKCS#8)",
                    parsed.tag()
                ));
            }
            Zeroizing::new(parsed.into_contents())
        };
        let digest = derived::digest(file_bytes);
        if let Some((fingerprint, public)) = derived::get(algorithm, &digest) {
            return Ok(KeyFile {
                algorithm,
                secret,
                file_bytes: Zeroizing::new(file_bytes.to_vec()),
                fingerprint,
                public,
                // Parsed from PKCS#8 bytes: a key in a file, never a token's.
                token: None,
            });
        }
        let key = KeyFile::from_secret(algorithm, secret)?;
        if key.file_bytes.as_slice() != file_bytes {
            return Err(format!("{name} key file is not in keyrotate's canonical encoding"));
        }
        derived::put(&key, digest);
        Ok(key)
    }

    fn from_secret(algorithm: Algorithm, secret: Zeroizing<Vec<u8>>) -> Result<KeyFile, String> {
        let public = public_key(algorithm, &secret)?;
        let fingerprint = match &public {
            Some(p) => format!("sha256:{}", hex(digest::digest(&digest::SHA256, &p.spki_der).as_ref())),
            None => {
                let k = hmac::Key::new(hmac::HMAC_SHA256, &secret);
                format!("sha256:{}", hex(hmac::sign(&k, SYMMETRIC_FINGERPRINT_LABEL).as_ref()))
            }
        };
        let file_bytes = if algorithm.is_symmetric() {
            let mut line = Zeroizing::new(STANDARD.encode(secret.as_slice()));
            line.push('\n');
            Zeroizing::new(std::mem::take(&mut *line).into_bytes())
        } else {
            let encoded = Zeroizing::new(pem::encode_config(
                &pem::Pem::new("PRIVATE KEY", secret.to_vec()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            ));
            Zeroizing::new(encoded.as_bytes().to_vec())
        };
        Ok(KeyFile {
            algorithm,
            secret,
            file_bytes,
            fingerprint,
            public,
            token: None,
        })
    }

    /// A key held by a token: its identity and public half, signing through `token`
    /// (absent for a key only inspected, not used).
    pub(crate) fn in_token(
        algorithm: Algorithm,
        fingerprint: String,
        public: Option<PublicKey>,
        token: Option<super::pkcs11::TokenKey>,
    ) -> KeyFile {
        let file_bytes = token_file_bytes(fingerprint.as_str(), public.as_ref());
        KeyFile {
            algorithm,
            secret: Zeroizing::new(Vec::new()),
            file_bytes: Zeroizing::new(file_bytes),
            fingerprint,
            public,
            token,
        }
    }

    /// Parses what the disk holds for a token key: `v000008.pub.pem` (SPKI PEM) or a
    /// secret key's `v000008.ref` line (`pkcs11 <label> <fingerprint>`).
    pub(crate) fn parse_token_file(algorithm: Algorithm, file_bytes: &[u8]) -> Result<KeyFile, String> {
        let name = algorithm.name();
        let key = if algorithm.is_symmetric() {
            let text = std::str::from_utf8(file_bytes).map_err(|_| format!("{name} reference file is not text"))?;
            let fingerprint = text
                .split_whitespace()
                .last()
                .filter(|f| f.starts_with("sha256:"))
                .ok_or_else(|| format!("{name} reference file names no fingerprint"))?;
            KeyFile::in_token(algorithm, fingerprint.to_string(), None, None)
        } else {
            let parsed = pem::parse(file_bytes).map_err(|_| format!("{name} public key file is not PEM"))?;
            if parsed.tag() != "PUBLIC KEY" {
                return Err(format!(
                    "{name} public key file is PEM {:?}, expected \"PUBLIC KEY\"",
                    parsed.tag()
                ));
            }
            let public = public_from_spki(algorithm, parsed.contents())?;
            KeyFile::in_token(algorithm, spki_fingerprint(&public.spki_der), Some(public), None)
        };
        if algorithm.is_symmetric() {
            // The reference line's label part is not checked here: the caller checks
            // the fingerprint against the manifest and finds the object by label.
            return Ok(key);
        }
        if key.file_bytes.as_slice() != file_bytes {
            return Err(format!(
                "{name} public key file is not in keyrotate's canonical encoding"
            ));
        }
        Ok(key)
    }

    /// The same key with its token handle attached (to sign with).
    pub(crate) fn with_token(mut self, token: super::pkcs11::TokenKey) -> KeyFile {
        self.token = Some(token);
        self
    }

    /// Whether the key is kept in a token (its private half never in this process).
    pub fn in_a_token(&self) -> bool {
        self.secret.is_empty()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    pub fn public(&self) -> Option<&PublicKey> {
        self.public.as_ref()
    }
    /// The bytes to write to the key file. Handle with care: this is key material.
    pub fn file_bytes(&self) -> &[u8] {
        &self.file_bytes
    }

    /// Proves the key works: sign and verify, or seal and open (what every new key
    /// passes; `sync` runs it on every key it installs).
    pub fn self_test(&self) -> Result<(), String> {
        self_test(self.algorithm, &self.secret, self.public.as_ref())
    }

    /// Signs `message` (asymmetric keys and HMAC). The signature is what a verifier of
    /// the JOSE `alg` expects: raw r||s for ECDSA, PKCS#1 v1.5 for RSA.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        if let Some(t) = &self.token {
            if self.algorithm == Algorithm::Aes256 {
                return Err(format!(
                    "{} is an encryption key: it does not sign",
                    self.algorithm.name()
                ));
            }
            return t.token.sign(self.algorithm, t.handle, message);
        }
        if self.secret.is_empty() {
            return Err(format!(
                "{} key is kept in a PKCS#11 token that this keyring did not open",
                self.algorithm.name()
            ));
        }
        sign(self.algorithm, &self.secret, message)
    }
}

fn spki_fingerprint(spki: &[u8]) -> String {
    format!("sha256:{}", hex(digest::digest(&digest::SHA256, spki).as_ref()))
}

/// What the disk holds for a token key (see [`KeyFile::parse_token_file`]).
fn token_file_bytes(fingerprint: &str, public: Option<&PublicKey>) -> Vec<u8> {
    match public {
        Some(p) => pem::encode_config(
            &pem::Pem::new("PUBLIC KEY", p.spki_der.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
        .into_bytes(),
        None => format!("pkcs11 {fingerprint}\n").into_bytes(),
    }
}

/// The modulus size of an RSA algorithm, in bits.
pub(crate) fn rsa_bits(algorithm: Algorithm) -> Option<usize> {
    algorithm.rsa_size().map(|s| s.len() * 8)
}

fn verification(algorithm: Algorithm) -> Option<&'static dyn signature::VerificationAlgorithm> {
    Some(match algorithm {
        Algorithm::Ed25519 => &signature::ED25519,
        Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => algorithm.ecdsa()?.1,
        Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::HmacSha256 | Algorithm::Aes256 => return None,
    })
}

/// A public key from its raw form (an EC point, an Ed25519 key's 32 bytes), as a
/// token gives it.
pub(crate) fn public_from_raw(algorithm: Algorithm, raw: &[u8]) -> Result<PublicKey, String> {
    let name = algorithm.name();
    let alg = verification(algorithm).ok_or_else(|| format!("{name} has no public key"))?;
    let parsed = signature::ParsedPublicKey::new(alg, raw).map_err(|_| format!("{name} public key is invalid"))?;
    let spki: PublicKeyX509Der = parsed
        .as_der()
        .map_err(|_| format!("{name} public key encoding failed"))?;
    public_from_spki(algorithm, spki.as_ref())
}

/// An RSA public key from its modulus and exponent (big-endian), as a token gives them.
pub(crate) fn rsa_public_from_components(algorithm: Algorithm, n: &[u8], e: &[u8]) -> Result<PublicKey, String> {
    // RFC 8017 RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    fn der_len(len: usize, out: &mut Vec<u8>) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
    }
    fn integer(v: &[u8], out: &mut Vec<u8>) {
        let v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        let pad = v.first().is_some_and(|b| b & 0x80 != 0);
        out.push(0x02);
        der_len(v.len() + usize::from(pad), out);
        if pad {
            out.push(0);
        }
        out.extend(v);
    }
    let mut body = Vec::new();
    integer(n, &mut body);
    integer(e, &mut body);
    let mut der = vec![0x30];
    der_len(body.len(), &mut der);
    der.extend(body);
    let key = rsa::PublicKey::from_der(&der).map_err(|_| format!("{} public key is invalid", algorithm.name()))?;
    let spki: PublicKeyX509Der = key
        .as_der()
        .map_err(|_| format!("{} public key encoding failed", algorithm.name()))?;
    public_from_spki(algorithm, spki.as_ref())
}

/// A public key from its SubjectPublicKeyInfo DER, checked to be `algorithm`'s.
pub(crate) fn public_from_spki(algorithm: Algorithm, spki: &[u8]) -> Result<PublicKey, String> {
    let name = algorithm.name();
    let bad = || format!("{name} public key does not parse");
    let alg = verification(algorithm).ok_or_else(|| format!("{name} has no public key"))?;
    let jwk = match algorithm {
        Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
            let key = rsa::PublicKey::from_der(spki).map_err(|_| bad())?;
            let expected = algorithm.rsa_size().expect("rsa").len();
            if key.modulus_len() != expected {
                return Err(format!("{name} key has a {}-bit modulus", key.modulus_len() * 8));
            }
            let n = URL_SAFE_NO_PAD.encode(key.modulus().big_endian_without_leading_zero());
            let e = URL_SAFE_NO_PAD.encode(key.exponent().big_endian_without_leading_zero());
            json!({"kty": "RSA", "n": n, "e": e})
        }
        _ => {
            signature::ParsedPublicKey::new(alg, spki).map_err(|_| bad())?;
            if algorithm == Algorithm::Ed25519 {
                let x = spki.get(spki.len().saturating_sub(32)..).ok_or_else(bad)?;
                json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(x)})
            } else {
                let (_, _, crv) = algorithm.ecdsa().expect("ecdsa");
                let half = if algorithm == Algorithm::EcdsaP256 { 32 } else { 48 };
                let point = spki.get(spki.len().saturating_sub(2 * half)..).ok_or_else(bad)?;
                let (x, y) = point.split_at(half);
                json!({"kty": "EC", "crv": crv, "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)})
            }
        }
    };
    let Value::Object(mut jwk) = jwk else {
        unreachable!("jwk literals are objects")
    };
    jwk.insert("alg".into(), algorithm.jose_alg().into());
    jwk.insert("use".into(), "sig".into());
    Ok(PublicKey {
        spki_der: spki.to_vec(),
        jwk,
    })
}

/// The sign/verify self-test of a key kept in a token: signs there, verifies here
/// with the public key it published.
pub(crate) fn self_test_token(key: &KeyFile) -> Result<(), String> {
    let failed = || format!("{} self-test failed", key.algorithm.name());
    let Some(public) = key.public() else {
        return Ok(());
    };
    let sig = key.sign(SELF_TEST_MESSAGE)?;
    verify(key.algorithm, &public.spki_der, SELF_TEST_MESSAGE, &sig)
        .then_some(())
        .ok_or_else(failed)
}

/// What this process already derived from a key file's bytes: its fingerprint and
/// public half. A run reads the same live key files several times (the repair pass,
/// the plan recorded at admission, the rotation itself, the read-back of the new key),
/// and deriving a public key is the costly part (a scalar multiplication, or an RSA
/// key check). Parsing is a pure function of the bytes, so bytes identical to ones
/// parsed before give the same key: the files are still read and compared in full
/// every time (by SHA-256), only the derivation is not repeated. Nothing secret is
/// kept here: the digest of the file, its algorithm and public values.
mod derived {
    use std::sync::Mutex;

    use aws_lc_rs::digest;

    use super::{Algorithm, KeyFile, PublicKey};

    struct Derived {
        digest: [u8; 32],
        algorithm: Algorithm,
        fingerprint: String,
        public: Option<PublicKey>,
    }

    /// A handful of entries: one domain's live versions and the new ones. Bounded so
    /// that a process reading many domains (the consumer API) does not grow it.
    const CAPACITY: usize = 32;

    static DERIVED: Mutex<Vec<Derived>> = Mutex::new(Vec::new());

    pub(super) fn digest(file_bytes: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, file_bytes).as_ref());
        out
    }

    pub(super) fn get(algorithm: Algorithm, digest: &[u8; 32]) -> Option<(String, Option<PublicKey>)> {
        let memo = DERIVED.lock().unwrap_or_else(|e| e.into_inner());
        memo.iter()
            .find(|d| d.algorithm == algorithm && &d.digest == digest)
            .map(|d| (d.fingerprint.clone(), d.public.clone()))
    }

    pub(super) fn put(key: &KeyFile, digest: [u8; 32]) {
        let mut memo = DERIVED.lock().unwrap_or_else(|e| e.into_inner());
        if memo.iter().any(|d| d.algorithm == key.algorithm && d.digest == digest) {
            return;
        }
        if memo.len() >= CAPACITY {
            memo.remove(0);
        }
        memo.push(Derived {
            digest,
            algorithm: key.algorithm,
            fingerprint: key.fingerprint.clone(),
            public: key.public.clone(),
        });
    }
}

fn public_key(algorithm: Algorithm, secret: &[u8]) -> Result<Option<PublicKey>, String> {
    let name = algorithm.name();
    let bad = |_| format!("{name} key does not parse as PKCS#8");
    let der_fail = |_| format!("{name} public key encoding failed");
    let (spki, jwk) = match algorithm {
        Algorithm::HmacSha256 | Algorithm::Aes256 => return Ok(None),
        Algorithm::Ed25519 => {
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(secret).map_err(bad)?;
            let spki: PublicKeyX509Der = pair.public_key().as_der().map_err(der_fail)?;
            let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
            (spki.as_ref().to_vec(), json!({"kty": "OKP", "crv": "Ed25519", "x": x}))
        }
        Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => {
            let (alg, _, crv) = algorithm.ecdsa().expect("ecdsa");
            let pair = EcdsaKeyPair::from_pkcs8(alg, secret).map_err(bad)?;
            let spki: PublicKeyX509Der = pair.public_key().as_der().map_err(der_fail)?;
            let point = pair.public_key().as_ref();
            let half = (point.len() - 1) / 2;
            let (x, y) = (&point[1..1 + half], &point[1 + half..]);
            (
                spki.as_ref().to_vec(),
                json!({"kty": "EC", "crv": crv, "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}),
            )
        }
        Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
            let pair = rsa::KeyPair::from_pkcs8(secret).map_err(bad)?;
            let expected = algorithm.rsa_size().expect("rsa").len();
            if pair.public_modulus_len() != expected {
                return Err(format!(
                    "{name} key has a {}-bit modulus",
                    pair.public_modulus_len() * 8
                ));
            }
            let public = pair.public_key();
            let spki: PublicKeyX509Der = public.as_der().map_err(der_fail)?;
            let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
            let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
            (spki.as_ref().to_vec(), json!({"kty": "RSA", "n": n, "e": e}))
        }
    };
    Ok(Some(PublicKey {
        spki_der: spki,
        jwk: jwk_members(algorithm, jwk),
    }))
}

impl PublicKey {
    /// The public half of an `algorithm` key from its SubjectPublicKeyInfo DER, as the
    /// manifest keeps it for versions whose private half is gone (retired signature
    /// keys). The DER is parsed by aws-lc-rs and must re-encode to exactly these bytes;
    /// the caller checks it against the version's fingerprint (the SHA-256 of it).
    pub fn from_spki(algorithm: Algorithm, spki: &[u8]) -> Result<PublicKey, String> {
        let name = algorithm.name();
        let bad = || format!("{name} public key is not a valid SubjectPublicKeyInfo");
        let jwk = match algorithm {
            Algorithm::HmacSha256 | Algorithm::Aes256 => {
                return Err(format!("{name} is a symmetric algorithm: it has no public key"))
            }
            Algorithm::Ed25519 | Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => {
                let (alg, raw_len): (&'static dyn signature::VerificationAlgorithm, usize) = match algorithm {
                    Algorithm::Ed25519 => (&signature::ED25519, 32),
                    Algorithm::EcdsaP256 => (&signature::ECDSA_P256_SHA256_FIXED, 65),
                    _ => (&signature::ECDSA_P384_SHA384_FIXED, 97),
                };
                // The key is the tail of its SPKI (the BIT STRING's contents): proven
                // by parsing that raw key and re-encoding it to the same SPKI.
                let raw = spki
                    .get(spki.len().checked_sub(raw_len).ok_or_else(bad)?..)
                    .ok_or_else(bad)?;
                let parsed = signature::ParsedPublicKey::new(alg, raw).map_err(|_| bad())?;
                let der: PublicKeyX509Der = parsed.as_der().map_err(|_| bad())?;
                if der.as_ref() != spki {
                    return Err(bad());
                }
                if algorithm == Algorithm::Ed25519 {
                    json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(raw)})
                } else {
                    let (_, _, crv) = algorithm.ecdsa().expect("ecdsa");
                    let half = (raw.len() - 1) / 2;
                    let (x, y) = (&raw[1..1 + half], &raw[1 + half..]);
                    json!({"kty": "EC", "crv": crv, "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)})
                }
            }
            Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
                let public = rsa::PublicKey::from_der(spki).map_err(|_| bad())?;
                let der: PublicKeyX509Der = public.as_der().map_err(|_| bad())?;
                if der.as_ref() != spki || public.modulus_len() != algorithm.rsa_size().expect("rsa").len() {
                    return Err(bad());
                }
                let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
                let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
                json!({"kty": "RSA", "n": n, "e": e})
            }
        };
        Ok(PublicKey {
            spki_der: spki.to_vec(),
            jwk: jwk_members(algorithm, jwk),
        })
    }

    /// The SHA-256 fingerprint of this key, as the manifest records it.
    pub fn fingerprint(&self) -> String {
        format!(
            "sha256:{}",
            hex(digest::digest(&digest::SHA256, &self.spki_der).as_ref())
        )
    }
}

/// The RFC 7517 members of a public key: its key members, `alg` and `use`.
fn jwk_members(algorithm: Algorithm, jwk: Value) -> Map<String, Value> {
    let mut jwk = match jwk {
        Value::Object(m) => m,
        _ => unreachable!("jwk literals are objects"),
    };
    jwk.insert("alg".into(), algorithm.jose_alg().into());
    jwk.insert("use".into(), "sig".into());
    jwk
}

fn sign(algorithm: Algorithm, secret: &[u8], message: &[u8]) -> Result<Vec<u8>, String> {
    let name = algorithm.name();
    let fail = |_| format!("{name} signing failed");
    match algorithm {
        Algorithm::Ed25519 => {
            let pair =
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(secret).map_err(|_| format!("{name} key does not parse"))?;
            Ok(pair.sign(message).as_ref().to_vec())
        }
        Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => {
            let (alg, _, _) = algorithm.ecdsa().expect("ecdsa");
            let pair = EcdsaKeyPair::from_pkcs8(alg, secret).map_err(|_| format!("{name} key does not parse"))?;
            Ok(pair
                .sign(&SystemRandom::new(), message)
                .map_err(fail)?
                .as_ref()
                .to_vec())
        }
        Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
            let pair = rsa::KeyPair::from_pkcs8(secret).map_err(|_| format!("{name} key does not parse"))?;
            let mut sig = vec![0u8; pair.public_modulus_len()];
            pair.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut sig)
                .map_err(fail)?;
            Ok(sig)
        }
        Algorithm::HmacSha256 => {
            let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
            Ok(hmac::sign(&k, message).as_ref().to_vec())
        }
        Algorithm::Aes256 => Err(format!("{name} is an encryption key: it does not sign")),
    }
}

/// Verifies `sig` over `message` with a public key in SPKI DER form.
pub fn verify(algorithm: Algorithm, spki_der: &[u8], message: &[u8], sig: &[u8]) -> bool {
    let alg: &'static dyn signature::VerificationAlgorithm = match algorithm {
        Algorithm::Ed25519 => &signature::ED25519,
        Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => algorithm.ecdsa().expect("ecdsa").1,
        Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::HmacSha256 | Algorithm::Aes256 => return false,
    };
    signature::ParsedPublicKey::new(alg, spki_der).is_ok_and(|key| key.verify_sig(message, sig).is_ok())
}

/// Proves a key works before it is staged: sign and verify, or seal and open.
fn self_test(algorithm: Algorithm, secret: &[u8], public: Option<&PublicKey>) -> Result<(), String> {
    let failed = || format!("{} self-test failed", algorithm.name());
    match algorithm {
        Algorithm::Aes256 => {
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, secret).map_err(|_| failed())?);
            let mut nonce = [0u8; aead::NONCE_LEN];
            SystemRandom::new().fill(&mut nonce).map_err(|_| failed())?;
            let mut buf = SELF_TEST_MESSAGE.to_vec();
            key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::empty(), &mut buf)
                .map_err(|_| failed())?;
            let opened = key
                .open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::empty(), &mut buf)
                .map_err(|_| failed())?;
            (opened == SELF_TEST_MESSAGE).then_some(()).ok_or_else(failed)
        }
        Algorithm::HmacSha256 => {
            let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
            let tag = hmac::sign(&k, SELF_TEST_MESSAGE);
            hmac::verify(&k, SELF_TEST_MESSAGE, tag.as_ref()).map_err(|_| failed())
        }
        _ => {
            let public = public.ok_or_else(failed)?;
            let sig = sign(algorithm, secret, SELF_TEST_MESSAGE)?;
            verify(algorithm, &public.spki_der, SELF_TEST_MESSAGE, &sig)
                .then_some(())
                .ok_or_else(failed)
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fast_algorithm_round_trips_through_its_file() {
        for alg in Algorithm::ALL.into_iter().filter(|a| a.rsa_size().is_none()) {
            let key = alg.generate().unwrap();
            let again = KeyFile::parse(alg, key.file_bytes()).unwrap();
            assert_eq!(again.fingerprint(), key.fingerprint(), "{alg}");
            assert!(key.fingerprint().starts_with("sha256:") && key.fingerprint().len() == 71);
            assert_eq!(alg.is_symmetric(), key.public().is_none());
            let dbg = format!("{key:?}");
            assert!(!dbg.contains(std::str::from_utf8(&key.file_bytes()[30..40]).unwrap()));
        }
    }

    #[test]
    fn a_public_key_is_rebuilt_from_its_spki_alone() {
        for alg in Algorithm::ALL
            .into_iter()
            .filter(|a| !a.is_symmetric() && *a != Algorithm::Rsa4096 && *a != Algorithm::Rsa3072)
        {
            let key = alg.generate().unwrap();
            let public = key.public().unwrap();
            let again = PublicKey::from_spki(alg, &public.spki_der).unwrap();
            assert_eq!(again.jwk, public.jwk, "{alg}");
            assert_eq!(again.fingerprint(), key.fingerprint(), "{alg}");
            let mut bent = public.spki_der.clone();
            bent.push(0);
            assert!(PublicKey::from_spki(alg, &bent).is_err(), "{alg}");
        }
        let ed = Algorithm::Ed25519.generate().unwrap();
        assert!(PublicKey::from_spki(Algorithm::EcdsaP256, &ed.public().unwrap().spki_der).is_err());
    }

    #[test]
    fn rejects_wrong_algorithm_and_garbage() {
        let ed = Algorithm::Ed25519.generate().unwrap();
        assert!(KeyFile::parse(Algorithm::EcdsaP256, ed.file_bytes()).is_err());
        assert!(KeyFile::parse(Algorithm::Ed25519, b"garbage").is_err());
        assert!(KeyFile::parse(Algorithm::HmacSha256, b"AAAA\n").is_err());
    }

    /// The parse memo answers only for bytes it parsed: a file whose bytes changed
    /// (another key, one byte flipped) is parsed anew, never given the old identity, and
    /// a known file keeps its own, with its secret, however often it is read.
    #[test]
    fn a_parsed_key_is_remembered_only_for_its_exact_bytes() {
        for alg in [Algorithm::Ed25519, Algorithm::EcdsaP256, Algorithm::HmacSha256] {
            let a = alg.generate().unwrap();
            let b = alg.generate().unwrap();
            for _ in 0..3 {
                let pa = KeyFile::parse(alg, a.file_bytes()).unwrap();
                let pb = KeyFile::parse(alg, b.file_bytes()).unwrap();
                assert_eq!(pa.fingerprint(), a.fingerprint(), "{alg}");
                assert_eq!(pb.fingerprint(), b.fingerprint(), "{alg}");
                assert_ne!(pa.fingerprint(), pb.fingerprint(), "{alg}");
                assert_eq!(pa.secret, a.secret, "{alg}");
                assert_eq!(pa.file_bytes(), a.file_bytes(), "{alg}");
            }
            let mut damaged = a.file_bytes().to_vec();
            let at = damaged.len() / 2;
            damaged[at] = if damaged[at] == b'A' { b'B' } else { b'A' };
            if let Ok(k) = KeyFile::parse(alg, &damaged) {
                assert_ne!(
                    k.fingerprint(),
                    a.fingerprint(),
                    "{alg}: damaged bytes took the old identity"
                );
            }
            // Another algorithm is never answered from the memo of these bytes.
            let other = if alg == Algorithm::Ed25519 {
                Algorithm::EcdsaP256
            } else {
                Algorithm::Ed25519
            };
            assert!(KeyFile::parse(other, a.file_bytes()).is_err(), "{alg} as {other}");
        }
    }
}
