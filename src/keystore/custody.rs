//! Key custody: where a version's private (or secret) key lives and how it is made,
//! published, listed and destroyed. `custody = "file"` keeps it in a 0600 file of the
//! domain folder (DESIGN section 4); `custody = "pkcs11"` keeps it in a token, with
//! only its public half on disk (section 10). The rotation goes through this trait
//! whichever it is, so the crash and sweep rules are the same code for both.

use std::io;
use std::sync::Arc;

use super::manifest::{self, VersionEntry};
use super::pkcs11::{self, TokenKey, TokenObject};
use super::{Algorithm, KeyFile, Keystore};
use crate::fsutil::DirSync;

pub trait Custody: std::fmt::Debug {
    /// `file` or `pkcs11`, as the config names it.
    fn name(&self) -> &'static str;
    /// The file a new version keeps in the domain folder.
    fn file(&self, version: u64, algorithm: Algorithm) -> String;
    /// What a run records as staged, before it creates any of it: the file and, in a
    /// token, the object's label (DESIGN 4.4: the proof a later run may remove them).
    fn staged_names(&self, domain: &str, version: u64, algorithm: Algorithm) -> Vec<String>;
    /// What can be made before the staging record: a key file's key, generated in
    /// memory; nothing for a token, whose generation creates the object.
    fn pregenerate(&self, algorithm: Algorithm) -> Result<Option<KeyFile>, String>;
    /// Creates the version durably: generates it where it is kept (or stages the
    /// pregenerated key) and publishes its public half in the domain folder.
    /// `created` gets each name as it comes into being (before, for a partial write).
    fn generate(
        &self,
        ks: &Keystore,
        version: u64,
        algorithm: Algorithm,
        pre: Option<KeyFile>,
        created: &mut Vec<String>,
    ) -> Result<KeyFile, String>;
    /// Publishes a new version's public half in the domain folder (for a key file,
    /// the file itself), O_EXCL and fsynced; its name becomes durable with the next
    /// folder sync, before the commit.
    fn publish_public(&self, ks: &Keystore, file: &str, key: &KeyFile) -> Result<(), String> {
        ks.stage(file, key)
            .map_err(|e| format!("cannot stage {file}: {}", crate::fsutil::io_reason(&e)))
    }
    /// What this custody holds for the domain outside the folder (the token objects
    /// under `keyrotate/<domain>/`, with their ids); the files are listed by
    /// [`Keystore::inspect`].
    fn list_present(&self, ks: &Keystore) -> Result<Vec<TokenObject>, String>;
    /// Destroys a version's private half, keeping its public one (a retired signing
    /// key: nothing may sign with it again, verifiers may still need it).
    fn destroy_private(&self, ks: &Keystore, v: &VersionEntry, sync: DirSync) -> io::Result<()>;
    /// Destroys everything a version has (retention, `destroyed` in the manifest).
    fn destroy(&self, ks: &Keystore, v: &VersionEntry, sync: DirSync) -> io::Result<()> {
        ks.remove(&names_of(v), "destroy", sync)
    }
}

/// Every name a version has: its file, and its token object's label.
pub fn names_of(v: &VersionEntry) -> Vec<String> {
    std::iter::once(v.file.clone()).chain(v.object.clone()).collect()
}

/// Keys in 0600 files of the domain folder.
#[derive(Debug)]
pub struct FileCustody;

impl Custody for FileCustody {
    fn name(&self) -> &'static str {
        "file"
    }
    fn file(&self, version: u64, algorithm: Algorithm) -> String {
        manifest::version_file(version, algorithm)
    }
    fn staged_names(&self, _domain: &str, version: u64, algorithm: Algorithm) -> Vec<String> {
        vec![self.file(version, algorithm)]
    }
    fn pregenerate(&self, algorithm: Algorithm) -> Result<Option<KeyFile>, String> {
        algorithm.generate().map(Some)
    }
    fn generate(
        &self,
        ks: &Keystore,
        version: u64,
        algorithm: Algorithm,
        pre: Option<KeyFile>,
        created: &mut Vec<String>,
    ) -> Result<KeyFile, String> {
        let key = match pre {
            Some(k) => k,
            None => algorithm.generate()?,
        };
        let file = self.file(version, algorithm);
        created.push(file.clone());
        self.publish_public(ks, &file, &key)?;
        Ok(key)
    }
    fn list_present(&self, _ks: &Keystore) -> Result<Vec<TokenObject>, String> {
        Ok(Vec::new())
    }
    fn destroy_private(&self, ks: &Keystore, v: &VersionEntry, sync: DirSync) -> io::Result<()> {
        // The key file is the private half: the public one is what the manifest's
        // caller publishes from the inspection before this.
        match &v.object {
            Some(_) => Pkcs11Custody::destroy_object(ks, v),
            None => ks.remove(std::slice::from_ref(&v.file), "destroy", sync),
        }
    }
}

/// Keys generated and kept in a PKCS#11 token: the store's token ([`Keystore::token`],
/// from the config, else from the manifest of a domain that changed custody).
#[derive(Debug)]
pub struct Pkcs11Custody;

impl Pkcs11Custody {
    fn destroy_object(ks: &Keystore, v: &VersionEntry) -> io::Result<()> {
        match &v.object {
            Some(label) => ks.remove(std::slice::from_ref(label), "destroy", DirSync::Deferred),
            None => Ok(()),
        }
    }
}

impl Custody for Pkcs11Custody {
    fn name(&self) -> &'static str {
        "pkcs11"
    }
    fn file(&self, version: u64, algorithm: Algorithm) -> String {
        manifest::token_file(version, algorithm)
    }
    fn staged_names(&self, domain: &str, version: u64, algorithm: Algorithm) -> Vec<String> {
        vec![pkcs11::label(domain, version), self.file(version, algorithm)]
    }
    fn pregenerate(&self, _algorithm: Algorithm) -> Result<Option<KeyFile>, String> {
        Ok(None)
    }
    fn generate(
        &self,
        ks: &Keystore,
        version: u64,
        algorithm: Algorithm,
        _pre: Option<KeyFile>,
        created: &mut Vec<String>,
    ) -> Result<KeyFile, String> {
        let token = ks.token()?;
        let label = pkcs11::label(ks.domain(), version);
        // Recorded before the object exists: a generation that fails half-way (or a
        // kill) may still leave it in the token.
        created.push(label.clone());
        crate::failpoint::hit("stage", "token-create").map_err(|e| e.to_string())?;
        let (handle, public) = token.generate(algorithm, &label)?;
        let fingerprint = match &public {
            Some(p) => format!(
                "sha256:{}",
                super::algorithm::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &p.spki_der).as_ref())
            ),
            None => token.secret_fingerprint(algorithm, handle)?,
        };
        crate::failpoint::hit("stage", "token-id").map_err(|e| e.to_string())?;
        token.set_id(handle, &pkcs11::id_of(&fingerprint))?;
        let key = KeyFile::in_token(
            algorithm,
            fingerprint,
            public,
            Some(TokenKey {
                token: Arc::clone(&token),
                handle,
            }),
        );
        super::algorithm::self_test_token(&key)?;
        let file = self.file(version, algorithm);
        created.push(file.clone());
        self.publish_public(ks, &file, &key)?;
        Ok(key)
    }
    fn list_present(&self, ks: &Keystore) -> Result<Vec<TokenObject>, String> {
        ks.token()?.objects(&pkcs11::label_prefix(ks.domain()))
    }
    fn destroy_private(&self, ks: &Keystore, v: &VersionEntry, sync: DirSync) -> io::Result<()> {
        match &v.object {
            Some(_) => Pkcs11Custody::destroy_object(ks, v),
            None => FileCustody.destroy_private(ks, v, sync),
        }
    }
}
