//! `keyring.json`, the manifest: the single source of truth for a domain's versions.
//!
//! Its atomic replacement is the commit point of a rotation. Parsing is strict (the
//! manifest names files that are opened, so a tampered one must not be able to point
//! outside the domain folder), and [`Manifest::rotated`] computes the next manifest
//! as a pure function so that a dry run and the real run agree on the plan.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Algorithm;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    Pending,
    Active,
    Retired,
    Destroyed,
    /// Revoked on purpose (`keyrotate revoke`, NIST SP 800-57 "compromised"): its
    /// material is destroyed and it is published nowhere. Final: no rotation,
    /// retention, `resolve` or adoption ever gives it another state.
    Compromised,
}

impl VersionState {
    /// The state's name as `keyring.json` and the shared store's tables spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Pending => "pending",
            VersionState::Active => "active",
            VersionState::Retired => "retired",
            VersionState::Destroyed => "destroyed",
            VersionState::Compromised => "compromised",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionEntry {
    pub version: u64,
    pub state: VersionState,
    pub algorithm: String,
    pub created_at: String,
    pub activated_at: Option<String>,
    pub retired_at: Option<String>,
    pub destroyed_at: Option<String>,
    /// When and why `keyrotate revoke` marked it compromised. Absent in manifests
    /// written before the state existed (and on every other version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromised_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromise_reason: Option<String>,
    pub fingerprint: String,
    pub file: String,
    pub created_by_run: String,
    /// The label of the token object that holds this version's key (custody =
    /// "pkcs11"); `file` then holds only its public half (or a secret key's
    /// reference line). Absent for a key kept in its file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The public half (SubjectPublicKeyInfo DER, base64) of an asymmetric version:
    /// what verifies it once its private half is destroyed at retirement. Its SHA-256
    /// is the fingerprint, so it cannot be swapped unnoticed. Absent in manifests
    /// written before it existed: the next commit records it from the key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

impl VersionEntry {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm.parse().expect("validated when the manifest was parsed")
    }
    /// Pending, active or retired: published in `jwks.json`, usable to verify.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            VersionState::Pending | VersionState::Active | VersionState::Retired
        )
    }
    /// Whether the version's key is kept in a PKCS#11 token.
    pub fn in_token(&self) -> bool {
        self.object.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub domain: String,
    pub primary: Option<u64>,
    pub versions: Vec<VersionEntry>,
    /// The run that last committed this manifest (or under whose review `resolve`
    /// adopted it into a ledger). A ledger that does not know this run is not the
    /// record of this key store: the run reports it instead of acting on it. Absent
    /// in manifests written before it existed, which still parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_by_run: Option<String>,
    /// The token that holds the versions with an `object` (module, token label and
    /// where the PIN comes from, never the PIN): how the consumer API finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<super::pkcs11::TokenConfig>,
}

/// A new version to be created by a rotation.
#[derive(Clone, Debug, PartialEq)]
pub struct NewVersion {
    pub version: u64,
    pub state: VersionState,
    pub algorithm: Algorithm,
}

/// What one rotation does to the manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub from_version: Option<u64>,
    pub to_version: u64,
    pub create: Vec<NewVersion>,
    pub promote: Option<u64>,
    pub retire: Vec<u64>,
    pub destroy: Vec<u64>,
    /// The version `keyrotate revoke` marks compromised, and why.
    pub compromise: Option<(u64, String)>,
}

pub fn version_file(version: u64, algorithm: Algorithm) -> String {
    format!("v{version:06}.{}", algorithm.extension())
}

/// The file of a version kept in a token: its public key (`v000008.pub.pem`), or for
/// a secret key a reference line (`v000008.ref`).
pub fn token_file(version: u64, algorithm: Algorithm) -> String {
    if algorithm.is_symmetric() {
        format!("v{version:06}.ref")
    } else {
        format!("v{version:06}.pub.pem")
    }
}

/// The version number in a `vNNNNNN.pem|key|pub.pem|ref` file name.
pub fn parse_version_file(name: &str) -> Option<u64> {
    let (stem, ext) = name.split_once('.')?;
    let digits = stem.strip_prefix('v')?;
    if digits.len() != 6
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || !matches!(ext, "pem" | "key" | "pub.pem" | "ref")
    {
        return None;
    }
    digits.parse().ok()
}

pub use crate::time::rfc3339 as now_rfc3339;

/// Manifests this process already parsed and validated, with the exact bytes they
/// were parsed from (a manifest holds no secret). A run reads `keyring.json` several
/// times under its lock (the repair pass, the plan recorded at admission, the
/// rotation), and it grows with every version ever made: bytes identical to ones parsed
/// before give the same manifest, so each content is parsed once (every read still
/// reads the whole file and compares it byte for byte, far cheaper than parsing it or
/// hashing it).
mod parsed {
    use std::sync::Mutex;

    use super::Manifest;

    /// The few contents one run sees (before and after its commit).
    const CAPACITY: usize = 4;

    static PARSED: Mutex<Vec<(Vec<u8>, Manifest)>> = Mutex::new(Vec::new());

    pub(super) fn get(bytes: &[u8], domain: &str) -> Option<Manifest> {
        let memo = PARSED.lock().unwrap_or_else(|e| e.into_inner());
        memo.iter()
            .find(|(b, m)| b.as_slice() == bytes && m.domain == domain)
            .map(|(_, m)| m.clone())
    }

    pub(super) fn put(bytes: &[u8], domain: &str, m: &Manifest) {
        debug_assert_eq!(m.domain, domain);
        let mut memo = PARSED.lock().unwrap_or_else(|e| e.into_inner());
        if memo.iter().any(|(b, _)| b.as_slice() == bytes) {
            return;
        }
        if memo.len() >= CAPACITY {
            memo.remove(0);
        }
        memo.push((bytes.to_vec(), m.clone()));
    }
}

/// When a new key becomes the active one (`activation` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// At once, in the run that creates it.
    Immediate,
    /// Published as pending first, promoted by the next rotation.
    Prepublish,
}

impl Manifest {
    pub fn empty(domain: &str) -> Manifest {
        Manifest {
            domain: domain.to_string(),
            primary: None,
            versions: Vec::new(),
            committed_by_run: None,
            pkcs11: None,
        }
    }

    /// Parses and validates a manifest for `domain`. Errors describe the inconsistency.
    pub fn parse(bytes: &[u8], domain: &str) -> Result<Manifest, String> {
        if let Some(m) = parsed::get(bytes, domain) {
            return Ok(m);
        }
        let m = Manifest::parse_anew(bytes, domain)?;
        parsed::put(bytes, domain, &m);
        Ok(m)
    }

    fn parse_anew(bytes: &[u8], domain: &str) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("keyring.json is not a valid manifest: {e}"))?;
        if m.domain != domain {
            return Err(format!("keyring.json belongs to domain {:?}, not {domain:?}", m.domain));
        }
        let mut last = 0;
        for v in &m.versions {
            if v.version <= last {
                return Err(format!(
                    "keyring.json lists version {} after {last}: versions must only grow",
                    v.version
                ));
            }
            last = v.version;
            if (v.state == VersionState::Compromised) != v.compromised_at.is_some() {
                return Err(format!(
                    "keyring.json v{}: compromised_at must be set exactly on compromised versions",
                    v.version
                ));
            }
            let alg: Algorithm = v
                .algorithm
                .parse()
                .map_err(|_| format!("keyring.json v{}: unknown algorithm {:?}", v.version, v.algorithm))?;
            let expected = match &v.object {
                None => version_file(v.version, alg),
                Some(object) => {
                    let label = super::pkcs11::label(domain, v.version);
                    if *object != label {
                        return Err(format!(
                            "keyring.json v{}: object {object:?} is not {label:?}",
                            v.version
                        ));
                    }
                    if m.pkcs11.is_none() {
                        return Err(format!(
                            "keyring.json v{} is kept in a token but names no pkcs11 token",
                            v.version
                        ));
                    }
                    token_file(v.version, alg)
                }
            };
            if v.file != expected {
                return Err(format!(
                    "keyring.json v{}: file {:?} is not {expected:?}",
                    v.version, v.file
                ));
            }
        }
        let active: Vec<&VersionEntry> = m.versions.iter().filter(|v| v.state == VersionState::Active).collect();
        let pending: Vec<&VersionEntry> = m.versions.iter().filter(|v| v.state == VersionState::Pending).collect();
        match (active.as_slice(), m.primary) {
            ([], None) if m.versions.iter().all(|v| !v.is_live()) && pending.is_empty() => {}
            ([], _) => return Err("keyring.json has no active version".into()),
            ([a], Some(p)) if a.version == p => {}
            ([a], p) => {
                return Err(format!(
                    "keyring.json primary is {p:?} but the active version is v{}",
                    a.version
                ))
            }
            (many, _) => {
                return Err(format!(
                    "keyring.json has {} active versions; exactly one is allowed",
                    many.len()
                ))
            }
        }
        if pending.len() > 1 {
            return Err(format!(
                "keyring.json has {} pending versions; at most one is allowed",
                pending.len()
            ));
        }
        if let (Some(p), Some(a)) = (pending.first(), active.first()) {
            if p.version < a.version {
                return Err(format!(
                    "keyring.json pending v{} is older than active v{}",
                    p.version, a.version
                ));
            }
        }
        Ok(m)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
    }

    pub fn active(&self) -> Option<&VersionEntry> {
        self.versions.iter().find(|v| v.state == VersionState::Active)
    }
    pub fn pending(&self) -> Option<&VersionEntry> {
        self.versions.iter().find(|v| v.state == VersionState::Pending)
    }
    pub fn live(&self) -> impl Iterator<Item = &VersionEntry> {
        self.versions.iter().filter(|v| v.is_live())
    }
    pub fn get(&self, version: u64) -> Option<&VersionEntry> {
        self.versions.iter().find(|v| v.version == version)
    }
    pub fn max_version(&self) -> u64 {
        self.versions.last().map_or(0, |v| v.version)
    }

    /// What a rotation does, given the next free version number.
    pub fn plan(&self, algorithm: Algorithm, activation: Activation, retain: u32, next: u64) -> Plan {
        let active = self.active().map(|v| v.version);
        let pending = self.pending().map(|v| v.version);
        let mut create = Vec::new();
        let mut retire = Vec::new();
        let mut promote = None;
        let to_version;
        match activation {
            Activation::Immediate => {
                create.push(NewVersion {
                    version: next,
                    state: VersionState::Active,
                    algorithm,
                });
                retire.extend(active);
                // A pending version left by a switch from prepublish is kept for
                // verification but never activated behind the operator's back.
                retire.extend(pending);
                to_version = next;
            }
            Activation::Prepublish => match (active, pending) {
                (None, _) => {
                    create.push(NewVersion {
                        version: next,
                        state: VersionState::Active,
                        algorithm,
                    });
                    create.push(NewVersion {
                        version: next + 1,
                        state: VersionState::Pending,
                        algorithm,
                    });
                    to_version = next;
                }
                (Some(a), None) => {
                    create.push(NewVersion {
                        version: next,
                        state: VersionState::Pending,
                        algorithm,
                    });
                    to_version = a;
                }
                (Some(a), Some(p)) => {
                    promote = Some(p);
                    retire.push(a);
                    create.push(NewVersion {
                        version: next,
                        state: VersionState::Pending,
                        algorithm,
                    });
                    to_version = p;
                }
            },
        }
        let mut retired: Vec<u64> = self
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Retired)
            .map(|v| v.version)
            .chain(retire.iter().copied())
            .collect();
        retired.sort_unstable_by(|a, b| b.cmp(a));
        let destroy = retired.into_iter().skip(retain as usize).collect();
        Plan {
            from_version: active,
            to_version,
            create,
            promote,
            retire,
            destroy,
            compromise: None,
        }
    }

    /// Why `version` cannot be revoked (a usage error), if it cannot: it must be a
    /// version of this manifest that is neither destroyed nor already compromised.
    pub fn revocable(&self, version: u64) -> Result<&VersionEntry, String> {
        let v = self.get(version).ok_or_else(|| {
            format!(
                "--version {version}: domain {} has no such version (its versions are {})",
                self.domain,
                if self.versions.is_empty() {
                    "none yet".to_string()
                } else {
                    format!("v{}..v{}", self.versions[0].version, self.max_version())
                }
            )
        })?;
        match v.state {
            VersionState::Destroyed => Err(format!(
                "--version {version}: v{version} of {} was destroyed at {}: nothing is left to revoke",
                self.domain,
                v.destroyed_at.as_deref().unwrap_or("an unrecorded time")
            )),
            VersionState::Compromised => Err(format!(
                "--version {version}: v{version} of {} is already compromised (revoked at {})",
                self.domain,
                v.compromised_at.as_deref().unwrap_or("an unrecorded time")
            )),
            _ => Ok(v),
        }
    }

    /// What `keyrotate revoke` does (DESIGN 11), given the next free version number:
    /// `version` becomes compromised; if it was active the pending version (already
    /// published) takes over, else a fresh key does (an emergency rotation); a
    /// prepublish domain left without a pending version gets a fresh one. Revoking a
    /// retired or pending version changes no other version (beyond that fresh pending
    /// one). `version` must be [`Manifest::revocable`].
    pub fn revoke_plan(
        &self,
        version: u64,
        reason: &str,
        algorithm: Algorithm,
        activation: Activation,
        next: u64,
    ) -> Plan {
        let active = self.active().map(|v| v.version);
        let pending = self.pending().map(|v| v.version);
        let mut create = Vec::new();
        let mut retire = Vec::new();
        let mut promote = None;
        let mut to_version = active;
        let new = |version: u64, state: VersionState| NewVersion {
            version,
            state,
            algorithm,
        };
        if active == Some(version) {
            match (activation, pending) {
                (Activation::Prepublish, Some(p)) => {
                    promote = Some(p);
                    to_version = Some(p);
                }
                _ => {
                    create.push(new(next, VersionState::Active));
                    to_version = Some(next);
                    // A pending version left by a switch from prepublish cannot stay
                    // pending behind a newer active one: it is kept for verification.
                    retire.extend(pending);
                }
            }
        }
        let left_pending = match pending {
            Some(p) if p == version || promote == Some(p) || retire.contains(&p) => None,
            other => other,
        };
        if activation == Activation::Prepublish && left_pending.is_none() {
            let n = create.last().map_or(next, |c| c.version + 1);
            create.push(new(n, VersionState::Pending));
        }
        Plan {
            from_version: active,
            to_version: to_version.unwrap_or(next),
            create,
            promote,
            retire,
            destroy: Vec::new(),
            compromise: Some((version, reason.to_string())),
        }
    }

    /// Records the public half of every live asymmetric version that does not carry it
    /// yet (manifests written before it was kept, and new versions), from `publics`.
    pub fn with_public_keys(mut self, publics: &std::collections::BTreeMap<u64, super::PublicKey>) -> Manifest {
        use base64::Engine;
        for v in &mut self.versions {
            if v.public_key.is_none() && v.is_live() {
                if let Some(p) = publics.get(&v.version) {
                    v.public_key = Some(base64::engine::general_purpose::STANDARD.encode(&p.spki_der));
                }
            }
        }
        self
    }

    /// The manifest after `plan`, with `created` giving each new version's
    /// fingerprint. This is what the commit writes.
    pub fn rotated(&self, plan: &Plan, fingerprints: &[String], run_id: &str, now: DateTime<Utc>) -> Manifest {
        let ts = now_rfc3339(now);
        let mut m = self.clone();
        for v in &mut m.versions {
            if Some(v.version) == plan.promote {
                v.state = VersionState::Active;
                v.activated_at = Some(ts.clone());
            }
            if plan.retire.contains(&v.version) {
                v.state = VersionState::Retired;
                v.retired_at = Some(ts.clone());
            }
            if plan.destroy.contains(&v.version) {
                v.state = VersionState::Destroyed;
                v.destroyed_at = Some(ts.clone());
            }
            if let Some((n, reason)) = &plan.compromise {
                if *n == v.version {
                    v.state = VersionState::Compromised;
                    v.compromised_at = Some(ts.clone());
                    v.compromise_reason = Some(reason.clone());
                }
            }
        }
        for (n, fp) in plan.create.iter().zip(fingerprints) {
            m.versions.push(VersionEntry {
                version: n.version,
                state: n.state,
                algorithm: n.algorithm.name().to_string(),
                created_at: ts.clone(),
                activated_at: (n.state == VersionState::Active).then(|| ts.clone()),
                retired_at: None,
                destroyed_at: None,
                compromised_at: None,
                compromise_reason: None,
                fingerprint: fp.clone(),
                file: version_file(n.version, n.algorithm),
                created_by_run: run_id.to_string(),
                object: None,
                public_key: None,
            });
        }
        m.primary = m.active().map(|v| v.version);
        m.committed_by_run = Some(run_id.to_string());
        m
    }

    /// The manifest with the versions `created` kept in `token` (custody =
    /// "pkcs11"): their entries name the token object and the public file.
    pub fn in_token(mut self, created: &[u64], token: &super::pkcs11::TokenConfig) -> Manifest {
        for v in &mut self.versions {
            if created.contains(&v.version) {
                v.object = Some(super::pkcs11::label(&self.domain, v.version));
                v.file = token_file(v.version, v.algorithm());
            }
        }
        self.pkcs11 = Some(token.clone());
        self
    }

    /// The versions `run_id` created (listed only if that run committed).
    pub fn created_by(&self, run_id: &str) -> impl Iterator<Item = &VersionEntry> {
        let run_id = run_id.to_string();
        self.versions.iter().filter(move |v| v.created_by_run == run_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotate(m: &Manifest, act: Activation, retain: u32) -> (Plan, Manifest) {
        let plan = m.plan(Algorithm::Ed25519, act, retain, m.max_version() + 1);
        let fps: Vec<String> = plan.create.iter().map(|n| format!("sha256:{}", n.version)).collect();
        let next = m.rotated(&plan, &fps, "run", Utc::now());
        Manifest::parse(&next.to_bytes(), "d").expect("rotated manifests are valid");
        (plan, next)
    }

    #[test]
    fn immediate_rotation_retires_and_destroys_beyond_retain() {
        let mut m = Manifest::empty("d");
        for _ in 0..5 {
            m = rotate(&m, Activation::Immediate, 2).1;
        }
        let states: Vec<VersionState> = m.versions.iter().map(|v| v.state).collect();
        use VersionState::*;
        assert_eq!(states, [Destroyed, Destroyed, Retired, Retired, Active]);
        assert_eq!(m.primary, Some(5));
    }

    #[test]
    fn prepublish_lifecycle() {
        let (p, m) = rotate(&Manifest::empty("d"), Activation::Prepublish, 3);
        assert_eq!((p.from_version, p.to_version), (None, 1));
        assert_eq!(m.pending().unwrap().version, 2);
        let (p, m) = rotate(&m, Activation::Prepublish, 3);
        assert_eq!((p.from_version, p.to_version, p.promote), (Some(1), 2, Some(2)));
        assert_eq!(m.pending().unwrap().version, 3);
        let (_, m) = rotate(&m, Activation::Immediate, 3);
        assert_eq!(m.active().unwrap().version, 4);
        assert!(m.pending().is_none());
        let (p, m) = rotate(&m, Activation::Prepublish, 3);
        assert_eq!((p.promote, p.to_version), (None, 4));
        assert_eq!(m.pending().unwrap().version, 5);
    }

    #[test]
    fn a_compromised_version_never_changes_state_again() {
        use VersionState::*;
        let (_, m) = rotate(&Manifest::empty("d"), Activation::Prepublish, 1);
        let m = revoked(&m, 1, Activation::Prepublish);
        assert_eq!(m.get(1).unwrap().state, Compromised);
        assert_eq!((m.active().unwrap().version, m.pending().unwrap().version), (2, 3));
        let before = m.get(1).unwrap().clone();
        let mut m = revoked(&m, 3, Activation::Prepublish);
        assert_eq!(m.pending().unwrap().version, 4);
        // Rotations of both kinds and retention down to nothing never touch them.
        for i in 0..8 {
            let act = if i % 3 == 0 {
                Activation::Immediate
            } else {
                Activation::Prepublish
            };
            m = rotate(&m, act, 0).1;
            assert_eq!(m.get(1).unwrap(), &before);
            assert_eq!(m.get(3).unwrap().state, Compromised);
        }
        assert!(m.revocable(1).unwrap_err().contains("already compromised"));
        assert!(m.revocable(2).unwrap_err().contains("destroyed"));
        assert!(m.revocable(99).unwrap_err().contains("no such version"));
        // A compromise time on a version that is not compromised does not parse (a
        // manifest edited to bring a compromised version back).
        let text = String::from_utf8(m.to_bytes()).unwrap();
        let bent = text.replacen("\"state\": \"compromised\"", "\"state\": \"retired\"", 1);
        assert_ne!(bent, text);
        let e = Manifest::parse(bent.as_bytes(), "d").unwrap_err();
        assert!(e.contains("compromised_at"), "{e}");
    }

    fn revoked(m: &Manifest, n: u64, act: Activation) -> Manifest {
        m.revocable(n).unwrap();
        let plan = m.revoke_plan(n, "leaked", Algorithm::Ed25519, act, m.max_version() + 1);
        let fps: Vec<String> = plan.create.iter().map(|n| format!("sha256:{}", n.version)).collect();
        let next = m.rotated(&plan, &fps, "revoke", Utc::now());
        Manifest::parse(&next.to_bytes(), "d").expect("revoked manifests are valid")
    }

    #[test]
    fn strict_parsing() {
        let (_, m) = rotate(&Manifest::empty("d"), Activation::Immediate, 3);
        let good = String::from_utf8(m.to_bytes()).unwrap();
        assert!(Manifest::parse(good.as_bytes(), "other").is_err());
        let evil = good.replace("v000001.pem", "../../etc/passwd");
        assert!(Manifest::parse(evil.as_bytes(), "d").unwrap_err().contains("file"));
        let none = good.replace("\"active\"", "\"retired\"");
        assert!(Manifest::parse(none.as_bytes(), "d").unwrap_err().contains("no active"));
        assert!(Manifest::parse(b"{", "d").is_err());
        assert_eq!(parse_version_file("v000012.pem"), Some(12));
        assert_eq!(parse_version_file("v12.pem"), None);
        assert_eq!(parse_version_file("v000012.pem.tmp"), None);
    }

    /// A manifest read again is the one parsed before only for the very same bytes: a
    /// copy changed after it was parsed is parsed (and refused) anew.
    #[test]
    fn a_parsed_manifest_is_remembered_only_for_its_exact_bytes() {
        let (_, m) = rotate(&Manifest::empty("d"), Activation::Immediate, 3);
        let (_, m) = rotate(&m, Activation::Immediate, 3);
        let good = m.to_bytes();
        for _ in 0..3 {
            assert_eq!(Manifest::parse(&good, "d").unwrap(), m);
            assert!(Manifest::parse(&good, "memo").is_err());
        }
        let evil = String::from_utf8(good.clone())
            .unwrap()
            .replace("v000002.pem", "v000009.pem");
        assert!(Manifest::parse(evil.as_bytes(), "d").unwrap_err().contains("file"));
        let two_active = String::from_utf8(good).unwrap().replace("\"retired\"", "\"active\"");
        assert!(Manifest::parse(two_active.as_bytes(), "d").is_err());
    }
}
