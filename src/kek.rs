//! The key-encryption key (KEK) of the shared store (DESIGN 9) and the sealing of key
//! material under it.
//!
//! The KEK is 32 random bytes in a file (`kek = "file:/path"`) that only its owner (this
//! user, or root) can read: mode 0400 or 0600, a regular file, never a symlink. It is
//! read into a zeroized buffer and never logged, stored or quoted in a message.
//!
//! Sealing is AES-256-GCM (aws-lc-rs) with a fresh random 96-bit nonce per seal; the
//! stored form is `nonce || ciphertext || tag`. The associated data binds the domain,
//! the version and the fingerprint, so a ciphertext copied into another row (another
//! domain, version or key) fails to open instead of installing the wrong key.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Exactly this many bytes: an AES-256 key.
pub const KEK_LEN: usize = 32;
const NONCE_LEN: usize = aead::NONCE_LEN;
const TAG_LEN: usize = 16;

/// A loaded KEK. Its `Debug` shows only where it came from.
pub struct Kek {
    key: LessSafeKey,
    source: PathBuf,
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

impl Kek {
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
            key: LessSafeKey::new(key),
            source: path.to_path_buf(),
        })
    }

    /// Where the KEK was read from (for messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Seals `plaintext` (a key file's bytes) for `(domain, version, fingerprint)`.
    pub fn seal(&self, domain: &str, version: u64, fingerprint: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "the OS random source failed".to_string())?;
        let mut buf = Zeroizing::new(plaintext.to_vec());
        self.key
            .seal_in_place_append_tag(
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
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(format!(
                "the sealed key of v{version} is truncated ({} bytes)",
                sealed.len()
            ));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
        let mut buf = Zeroizing::new(rest.to_vec());
        let len = self
            .key
            .open_in_place(
                nonce,
                Aad::from(associated_data(domain, version, fingerprint)),
                &mut buf,
            )
            .map_err(|_| {
                format!(
                    "the sealed key of v{version} does not open with the KEK {} (a different KEK than the one it \
                     was sealed with, or the row was altered or moved)",
                    self.source.display()
                )
            })?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// What a sealed key is bound to. NUL-separated: no field can contain a NUL (domain
/// names and fingerprints are validated), so no two tuples give the same bytes.
fn associated_data(domain: &str, version: u64, fingerprint: &str) -> Vec<u8> {
    format!("keyrotate-shared-v1\0{domain}\0{version}\0{fingerprint}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
