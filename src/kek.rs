//! The key-encryption key (KEK) of the shared store (DESIGN 9) and the sealing of key
//! material under it.
//!
//! The KEK is either 32 random bytes in a file (`kek = "file:/path"`) that only its
//! owner (this user, or root) can read: mode 0400 or 0600, a regular file, never a
//! symlink, read into a zeroized buffer and never logged, stored or quoted in a message;
//! or an AES-256 key object in the `[pkcs11]` token (`kek = "pkcs11:object=<label>"`),
//! used there with `CKM_AES_GCM` and never leaving it (DESIGN 10).
//!
//! Sealing is AES-256-GCM with a fresh random 96-bit nonce per seal. A file KEK's
//! stored form is `nonce || ciphertext || tag` (aws-lc-rs, in process); a token KEK's is
//! `TOKEN_FORMAT || nonce || ciphertext || tag`, and its associated data names the
//! token form too, so a ciphertext of one kind can never be taken for the other. The
//! associated data binds the domain, the version and the fingerprint, so a ciphertext
//! copied into another row (another domain, version or key) fails to open instead of
//! installing the wrong key.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use cryptoki::object::ObjectHandle;
use zeroize::Zeroizing;

use crate::config::KekSource;
use crate::keystore::pkcs11::{Token, TokenConfig};

/// Exactly this many bytes: an AES-256 key.
pub const KEK_LEN: usize = 32;
const NONCE_LEN: usize = aead::NONCE_LEN;
const TAG_LEN: usize = 16;
/// The first bytes of a key sealed by a token KEK.
const TOKEN_FORMAT: &[u8] = b"krp11:";

/// A loaded KEK. Its `Debug` shows only where it came from.
pub struct Kek {
    key: Key,
    source: String,
}

enum Key {
    /// The key bytes, in process.
    File(LessSafeKey),
    /// A logged-in session and the handle of the token's AES key.
    Token(Token, ObjectHandle),
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Checks a KEK file without keeping its bytes: what `check` reports. `Err` is one line
/// naming the file and what is wrong (never its content).
pub fn check_file(path: &Path) -> Result<(), String> {
    Kek::load(path).map(|_| ())
}

/// What `check` reports about a configured KEK, one line per problem (empty: fit).
/// A token KEK: the module loads, the token is there, the PIN opens it, the object
/// exists and is a sensitive, non-extractable AES-256 key allowed to encrypt/decrypt.
pub fn check(source: &KekSource) -> Vec<String> {
    match source {
        KekSource::File(path) => check_file(path).err().into_iter().collect(),
        KekSource::Pkcs11 { token, object } => {
            let opened = Token::open(token).and_then(|t| t.find_secret(object).map(|h| (t, h)));
            match opened.and_then(|(t, h)| t.kek_problems(h, object)) {
                Ok(problems) => problems,
                Err(e) => vec![e],
            }
        }
    }
}

impl Kek {
    /// The configured KEK, ready to seal and open: a file read and validated, or a
    /// session on the token with the KEK object found (and fit, as `check` says).
    pub fn from_source(source: &KekSource) -> Result<Kek, String> {
        match source {
            KekSource::File(path) => Kek::load(path),
            KekSource::Pkcs11 { token, object } => Kek::in_token(token, object),
        }
    }

    /// The AES key labelled `object` in the `[pkcs11]` token. A key that is not fit
    /// (extractable, not AES-256, ...) is refused here too: the run must not seal the
    /// store's keys under a KEK `check` would reject.
    pub fn in_token(cfg: &TokenConfig, object: &str) -> Result<Kek, String> {
        let token = Token::open(cfg)?;
        let handle = token.find_secret(object)?;
        let problems = token.kek_problems(handle, object)?;
        if let Some(first) = problems.into_iter().next() {
            return Err(first);
        }
        Ok(Kek {
            key: Key::Token(token, handle),
            source: format!("pkcs11:object={object} (token {:?})", cfg.token),
        })
    }

    /// Reads and validates the KEK file: a regular file (not a symlink), owned by this
    /// user or root, mode 0400 or 0600, exactly 32 bytes.
    pub fn load(path: &Path) -> Result<Kek, String> {
        let shown = path.display();
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| format!("KEK file {shown}: {}", crate::fsutil::io_reason(&e)))?;
        if meta.file_type().is_symlink() {
            return Err(format!("KEK file {shown} is a symlink; refusing to follow it"));
        }
        if !meta.is_file() {
            return Err(format!("KEK file {shown} is not a regular file"));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(format!(
                "KEK file {shown} is owned by uid {}, not by this user (uid {euid}) or root",
                meta.uid()
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode != 0o400 && mode != 0o600 {
            return Err(format!(
                "KEK file {shown} has mode {mode:04o}; it must be 0400 or 0600 (readable by its owner only)"
            ));
        }
        let bytes = crate::fsutil::read_nofollow(path, 4096)
            .map_err(|e| format!("KEK file {shown}: {}", crate::fsutil::io_reason(&e)))?;
        if bytes.len() != KEK_LEN {
            return Err(format!(
                "KEK file {shown} holds {} bytes; it must hold exactly {KEK_LEN} random bytes (e.g. head -c 32 /dev/urandom)",
                bytes.len()
            ));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| format!("KEK file {shown}: not an AES-256 key"))?;
        Ok(Kek {
            key: Key::File(LessSafeKey::new(key)),
            source: format!("file:{shown}"),
        })
    }

    /// Where the KEK is (for messages).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Seals `plaintext` (a key file's bytes) for `(domain, version, fingerprint)`.
    pub fn seal(&self, domain: &str, version: u64, fingerprint: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "the OS random source failed".to_string())?;
        let key = match &self.key {
            Key::File(key) => key,
            Key::Token(token, handle) => {
                let aad = token_associated_data(domain, version, fingerprint);
                let sealed = token.aes_gcm_encrypt(*handle, &nonce, &aad, plaintext)?;
                return Ok([TOKEN_FORMAT, &nonce, &sealed].concat());
            }
        };
        let mut buf = Zeroizing::new(plaintext.to_vec());
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated_data(domain, version, fingerprint)),
            &mut *buf,
        )
        .map_err(|_| format!("sealing v{version} failed"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Opens what [`Kek::seal`] produced for the same `(domain, version, fingerprint)`.
    /// Fails with a wrong KEK, a damaged ciphertext, or one moved from another row.
    pub fn open(
        &self,
        domain: &str,
        version: u64,
        fingerprint: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let key = match &self.key {
            Key::File(key) => key,
            Key::Token(token, handle) => {
                return self.open_in_token(token, *handle, domain, version, fingerprint, sealed)
            }
        };
        if sealed.starts_with(TOKEN_FORMAT) {
            return Err(format!(
                "the sealed key of v{version} was sealed by a PKCS#11 token KEK, not by the KEK {}",
                self.source
            ));
        }
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(format!(
                "the sealed key of v{version} is truncated ({} bytes)",
                sealed.len()
            ));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
        let mut buf = Zeroizing::new(rest.to_vec());
        let len = key
            .open_in_place(
                nonce,
                Aad::from(associated_data(domain, version, fingerprint)),
                &mut buf,
            )
            .map_err(|_| {
                format!(
                    "the sealed key of v{version} does not open with the KEK {} (a different KEK than the one it \
                     was sealed with, or the row was altered or moved)",
                    self.source
                )
            })?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    fn open_in_token(
        &self,
        token: &Token,
        handle: ObjectHandle,
        domain: &str,
        version: u64,
        fingerprint: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let Some(rest) = sealed.strip_prefix(TOKEN_FORMAT) else {
            return Err(format!(
                "the sealed key of v{version} was sealed by a KEK file, not by the token KEK {}",
                self.source
            ));
        };
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(format!(
                "the sealed key of v{version} is truncated ({} bytes)",
                sealed.len()
            ));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = token_associated_data(domain, version, fingerprint);
        token.aes_gcm_decrypt(handle, nonce, &aad, ciphertext).map_err(|e| {
            format!(
                "the sealed key of v{version} does not open with the KEK {} ({e}: a different AES key than the \
                 one it was sealed with, or the row was altered or moved)",
                self.source
            )
        })
    }
}

/// What a sealed key is bound to. NUL-separated: no field can contain a NUL (domain
/// names and fingerprints are validated), so no two tuples give the same bytes.
fn associated_data(domain: &str, version: u64, fingerprint: &str) -> Vec<u8> {
    format!("keyrotate-shared-v1\0{domain}\0{version}\0{fingerprint}").into_bytes()
}

/// The same binding for a token KEK, under its own context string: a file KEK and a
/// token KEK never share associated data.
fn token_associated_data(domain: &str, version: u64, fingerprint: &str) -> Vec<u8> {
    format!("keyrotate-shared-pkcs11-v1\0{domain}\0{version}\0{fingerprint}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn kek_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_sealed_key_opens_only_in_its_own_slot_and_with_its_own_kek() {
        let d = tempfile::tempdir().unwrap();
        let a = Kek::load(&kek_file(d.path(), "a", &[7u8; 32], 0o600)).unwrap();
        let b = Kek::load(&kek_file(d.path(), "b", &[8u8; 32], 0o400)).unwrap();
        let sealed = a.seal("dom", 3, "sha256:ab", b"secret key bytes").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(&*a.open("dom", 3, "sha256:ab", &sealed).unwrap(), b"secret key bytes");
        for (dom, v, fp) in [
            ("other", 3, "sha256:ab"),
            ("dom", 4, "sha256:ab"),
            ("dom", 3, "sha256:ac"),
        ] {
            assert!(a.open(dom, v, fp, &sealed).is_err(), "{dom} {v} {fp}");
        }
        let e = b.open("dom", 3, "sha256:ab", &sealed).unwrap_err();
        assert!(e.contains("does not open"), "{e}");
        // Two seals of one key differ (a fresh nonce each time).
        assert_ne!(sealed, a.seal("dom", 3, "sha256:ab", b"secret key bytes").unwrap());
    }

    #[test]
    fn a_file_kek_names_a_key_sealed_by_a_token_instead_of_trying_it() {
        let d = tempfile::tempdir().unwrap();
        let a = Kek::load(&kek_file(d.path(), "a", &[7u8; 32], 0o600)).unwrap();
        let mut sealed = TOKEN_FORMAT.to_vec();
        sealed.extend_from_slice(&[0u8; NONCE_LEN + TAG_LEN + 8]);
        let e = a.open("dom", 3, "sha256:ab", &sealed).unwrap_err();
        assert!(e.contains("sealed by a PKCS#11 token KEK"), "{e}");
        // The two contexts never give the same associated data.
        assert_ne!(
            associated_data("dom", 3, "sha256:ab"),
            token_associated_data("dom", 3, "sha256:ab")
        );
    }

    #[test]
    fn the_kek_file_must_be_private_and_exactly_32_bytes() {
        let d = tempfile::tempdir().unwrap();
        let e = Kek::load(&kek_file(d.path(), "short", &[1u8; 31], 0o600)).unwrap_err();
        assert!(e.contains("31 bytes"), "{e}");
        let e = Kek::load(&kek_file(d.path(), "open", &[1u8; 32], 0o640)).unwrap_err();
        assert!(e.contains("0640"), "{e}");
        let good = kek_file(d.path(), "good", &[1u8; 32], 0o600);
        std::os::unix::fs::symlink(&good, d.path().join("link")).unwrap();
        let e = Kek::load(&d.path().join("link")).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        assert!(Kek::load(&d.path().join("missing")).is_err());
        // The bytes never show.
        let dbg = format!("{:?}", Kek::load(&good).unwrap());
        assert!(!dbg.contains("1, 1"), "{dbg}");
    }
}
