//! `rotate.toml`: loading, defaults and validation.
//!
//! Everything an operator can get wrong in the file is caught here, before any lock,
//! ledger or key file is touched, and reported on one line that names the file, the
//! key and what was expected. Relative paths are resolved against the config file's
//! folder so that a config works the same from any working directory.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::deadline::parse_duration;
use crate::keystore::{Algorithm, TokenConfig};

mod narrow;

pub const DEFAULT_CONFIG: &str = "/etc/keyrotate/rotate.toml";
const DEFAULT_MAX_DEADLINE: Duration = Duration::from_secs(3600);
const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(86_400);
const DEFAULT_RETAIN: u32 = 3;
const DEFAULT_SYNC_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Larger files are refused unread: a config is a few KiB, never megabytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A loaded, validated configuration with every path absolute.
// Defined beside their users below the config, re-exported here as config values.
pub use crate::keystore::manifest::Activation;
pub use crate::ledger::LedgerLocation;

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub ledger: LedgerLocation,
    pub host_pool: Option<String>,
    /// `[host] name`: this host's identity in the shared store's acknowledgements
    /// (DESIGN 9); the system host name when unset.
    pub host_name: String,
    pub audit_file: PathBuf,
    pub domains: BTreeMap<String, DomainConfig>,
    /// `[metrics] textfile`: where to write the Prometheus metrics (DESIGN section 12).
    pub metrics_textfile: Option<PathBuf>,
    /// The domains a narrowed load (`load_for` with a domain) parsed but did not
    /// validate, with what validating them later needs.
    unchecked: Unchecked,
}

/// Domains left unvalidated by a narrowed load: validating all 5,000 domains of a
/// large config to rotate one would make every run pay for the whole file.
#[derive(Clone, Debug, Default)]
struct Unchecked {
    domains: BTreeMap<String, toml::Value>,
    defaults: RawDomain,
    base: PathBuf,
    /// Domains whose tables were not even built (see `narrow`): what validating them
    /// later needs is the file's text, parsed whole then.
    left_out: narrow::Names,
    text: String,
    ctx: DomainCtx,
}

/// What validating a domain needs from the rest of the file.
#[derive(Clone, Debug, Default)]
struct DomainCtx {
    /// Whether the ledger is PostgreSQL (what `store = "shared"` needs).
    shared_ledger: bool,
    /// `[host] name` (or the system host name).
    host_name: String,
    /// The `[pkcs11]` token, for the domains with `custody = "pkcs11"`.
    pkcs11: Option<TokenConfig>,
}

#[derive(Clone, Debug)]
pub struct DomainConfig {
    pub name: String,
    pub designated_pool: String,
    pub backend: Backend,
    pub max_deadline: Duration,
    pub min_interval: Duration,
    pub retain: u32,
    /// Who besides the keyrotate user may read the key folder (`group`, `public_jwks`;
    /// key store backend only).
    pub access: crate::fsutil::Access,
    /// `group` names a group this host does not have: a usage error for `check` and
    /// for every command that writes the key store (see [`DomainConfig::writable`]).
    pub unresolved_group: Option<String>,
    /// Where the key material lives: this host only, or the shared store (DESIGN 9).
    pub store: Store,
}

/// `store = "local" | "shared"` of a key store domain.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Store {
    /// Files on this host only (DESIGN 4).
    #[default]
    Local,
    /// The keyring in the PostgreSQL ledger's database, key material sealed under the
    /// KEK; every host keeps a local copy written by `sync` (DESIGN 9).
    Shared(SharedStore),
}

/// The settings of a shared-store domain.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedStore {
    /// Where the key-encryption key comes from.
    pub kek: KekSource,
    /// Pools that must each have a host that acknowledged the pending version before
    /// a `prepublish` rotation promotes it.
    pub require_pools: Vec<String>,
    /// Hosts whose last acknowledgement is older than this are stale: named, never
    /// counted as converged, never holding a promotion back.
    pub sync_ttl: Duration,
    /// This host's name (`[host] name`), as its acknowledgements record it.
    pub host: String,
}

/// `kek = "file:/path"`, or `kek = "pkcs11:object=<label>"`: an AES key in the
/// `[pkcs11]` token (DESIGN 10).
#[derive(Clone, Debug, PartialEq)]
pub enum KekSource {
    File(PathBuf),
    Pkcs11 { token: TokenConfig, object: String },
}

impl DomainConfig {
    /// The shared-store settings, when the domain uses the shared store.
    pub fn shared(&self) -> Option<&SharedStore> {
        match &self.store {
            Store::Shared(s) => Some(s),
            Store::Local => None,
        }
    }
}

impl DomainConfig {
    /// Whether this host can write the domain's key store as configured: `Err` names
    /// the config key and what is wrong.
    pub fn writable(&self) -> Result<(), String> {
        match &self.unresolved_group {
            Some(e) => Err(format!("domains.{}.group: {e}", self.name)),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Backend {
    Keystore {
        algorithm: Algorithm,
        keystore: PathBuf,
        activation: Activation,
        /// `custody = "pkcs11"`: the `[pkcs11]` token keys are generated and kept in;
        /// `None` for `custody = "file"`.
        custody: Option<TokenConfig>,
    },
    Command {
        program: PathBuf,
        args: Vec<String>,
    },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Keystore { .. } => "keystore",
            Backend::Command { .. } => "command",
        }
    }
    pub fn algorithm_name(&self) -> Option<&'static str> {
        match self {
            Backend::Keystore { algorithm, .. } => Some(algorithm.name()),
            Backend::Command { .. } => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state: RawState,
    host: Option<RawHost>,
    audit: Option<RawAudit>,
    metrics: Option<RawMetrics>,
    defaults: Option<RawDomain>,
    /// The PKCS#11 token of the domains with `custody = "pkcs11"` (DESIGN 10).
    pkcs11: Option<toml::Value>,
    /// Each domain is deserialized on its own (see `parse_all`).
    #[serde(default)]
    domains: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: PathBuf,
    ledger: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    pool: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    textfile: Option<PathBuf>,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    designated_pool: Option<String>,
    backend: Option<String>,
    algorithm: Option<String>,
    keystore: Option<PathBuf>,
    retain: Option<i64>,
    activation: Option<String>,
    command: Option<Vec<String>>,
    max_deadline: Option<String>,
    min_interval: Option<String>,
    group: Option<String>,
    public_jwks: Option<bool>,
    custody: Option<String>,
    store: Option<String>,
    kek: Option<String>,
    require_pools: Option<Vec<String>>,
    sync_ttl: Option<String>,
}

impl RawDomain {
    /// These defaults without the keys that do not apply to `backend`: a `[defaults]
    /// keystore` must not break a command domain (nor a default `command` a keystore
    /// domain). The same key set on the domain itself is still an error.
    fn for_backend(&self, backend: Option<&str>) -> RawDomain {
        let mut d = self.clone();
        match backend {
            Some("command") => {
                d.algorithm = None;
                d.keystore = None;
                d.activation = None;
                d.custody = None;
                d.store = None;
                d.kek = None;
                d.require_pools = None;
                d.sync_ttl = None;
            }
            Some("keystore") => d.command = None,
            _ => {}
        }
        d
    }

    /// Fills every unset key from `defaults`.
    fn or(self, d: &RawDomain) -> RawDomain {
        RawDomain {
            designated_pool: self.designated_pool.or_else(|| d.designated_pool.clone()),
            backend: self.backend.or_else(|| d.backend.clone()),
            algorithm: self.algorithm.or_else(|| d.algorithm.clone()),
            keystore: self.keystore.or_else(|| d.keystore.clone()),
            retain: self.retain.or(d.retain),
            activation: self.activation.or_else(|| d.activation.clone()),
            command: self.command.or_else(|| d.command.clone()),
            max_deadline: self.max_deadline.or_else(|| d.max_deadline.clone()),
            min_interval: self.min_interval.or_else(|| d.min_interval.clone()),
            group: self.group.or_else(|| d.group.clone()),
            public_jwks: self.public_jwks.or(d.public_jwks),
            custody: self.custody.or_else(|| d.custody.clone()),
            store: self.store.or_else(|| d.store.clone()),
            kek: self.kek.or_else(|| d.kek.clone()),
            require_pools: self.require_pools.or_else(|| d.require_pools.clone()),
            sync_ttl: self.sync_ttl.or_else(|| d.sync_ttl.clone()),
        }
    }
}

/// Where the config comes from: `--config`, else `$KEYROTATE_CONFIG`, else the default.
pub fn locate(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("KEYROTATE_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        Config::load_for(path, None)
    }

    /// Like `load`, validating only `domain` when one is named: the file is parsed
    /// whole (a syntax error anywhere still fails), the top-level sections are
    /// validated, and every other domain is left unchecked, so that a typo in one
    /// domain does not stop another from rotating (that domain's own runs and `check`
    /// report it).
    pub fn load_for(path: &Path, domain: Option<&str>) -> Result<Config, String> {
        let text = Config::read(path)?;
        let abs = std::path::absolute(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        Config::parse_for(&text, &abs, domain).map_err(|errors| first_of(errors, &abs))
    }

    fn read(path: &Path) -> Result<String, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("config {shown}: {}", crate::fsutil::io_reason(&e)))?;
        if !meta.is_file() {
            return Err(format!("config {shown}: not a regular file"));
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "config {shown}: {} bytes is too large for a config file (limit {MAX_CONFIG_BYTES})",
                meta.len()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("config {shown}: {}", crate::fsutil::io_reason(&e)))?;
        String::from_utf8(bytes)
            .map_err(|e| format!("config {shown}: not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
    }

    /// Parses config text as if it were the file at `path` (absolute). The first
    /// problem, saying how many more there are (`parse_all` lists every one).
    pub fn parse(text: &str, path: &Path) -> Result<Config, String> {
        Config::parse_all(text, path).map_err(|errors| first_of(errors, path))
    }

    /// Like `load`, with every problem found (for `check`), not only the first.
    pub fn load_all(path: &Path) -> Result<Config, Vec<String>> {
        let text = Config::read(path).map_err(|e| vec![e])?;
        let abs = std::path::absolute(path).map_err(|e| vec![format!("config {}: {e}", path.display())])?;
        Config::parse_all(&text, &abs)
    }

    /// Parses config text, collecting every problem across keys and domains: an operator
    /// fixing a config wants the whole list at once, not one per attempt.
    pub fn parse_all(text: &str, path: &Path) -> Result<Config, Vec<String>> {
        Config::parse_for(text, path, None)
    }

    /// `parse_all`, validating only `only`'s domain when one is named (see `load_for`).
    fn parse_for(text: &str, path: &Path, only: Option<&str>) -> Result<Config, Vec<String>> {
        let shown = path.display();
        // A narrowed load builds the global tables and its own domain only; the text
        // it parses has the file's lines, so an error names the file's line.
        let narrowed = only.and_then(|keep| narrow::narrow(text, keep));
        let (text, left_out, full) = match narrowed {
            Some(n) if !n.left_out.is_empty() => (Cow::Owned(n.text), n.left_out, text.to_string()),
            _ => (Cow::Borrowed(text), narrow::Names::default(), String::new()),
        };
        let text = text.as_ref();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().replace('\n', " ");
            vec![match line {
                Some(l) => format!("config {shown}:{l}: {msg}"),
                None => format!("config {shown}: {msg}"),
            }]
        })?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let err = |key: &str, what: String| format!("config {shown}: {key}: {what}");
        let mut errors = Vec::new();

        let state_dir = resolve(base, &raw.state.dir);
        if raw.state.dir.as_os_str().is_empty() {
            errors.push(err("state.dir", "expected a folder path, found an empty string".into()));
        }
        let ledger = match raw.state.ledger {
            None => LedgerLocation::Sqlite(state_dir.join("ledger.sqlite3")),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                if let Err(e) = crate::ledger::validate_postgres_url(&url) {
                    errors.push(err(
                        "state.ledger",
                        format!("not a usable PostgreSQL URL: {}", e.replace(&url, "…")),
                    ));
                }
                LedgerLocation::Postgres(url)
            }
            Some(_) => {
                errors.push(err(
                    "state.ledger",
                    "expected a postgres:// URL (omit it for the embedded SQLite ledger)".into(),
                ));
                LedgerLocation::Sqlite(state_dir.join("ledger.sqlite3"))
            }
        };
        let (raw_pool, raw_name) = raw.host.map(|h| (h.pool, h.name)).unwrap_or_default();
        let host_pool = match raw_pool {
            Some(p) => validate_pool(&p).map_err(|w| errors.push(err("host.pool", w))).ok(),
            None => None,
        };
        let host_name = match raw_name {
            Some(n) => validate_host_name(&n)
                .map_err(|w| errors.push(err("host.name", w)))
                .unwrap_or_default(),
            None => crate::process::hostname(),
        };
        let ctx = DomainCtx {
            shared_ledger: matches!(ledger, LedgerLocation::Postgres(_)),
            host_name: host_name.clone(),
            pkcs11: None,
        };
        let audit_file = match raw.audit.and_then(|a| a.file) {
            Some(f) if f.as_os_str().is_empty() => {
                errors.push(err("audit.file", "expected a file path, found an empty string".into()));
                f
            }
            Some(f) => resolve(base, &f),
            None => state_dir.join("audit.jsonl"),
        };
        let metrics_textfile = match raw.metrics.and_then(|m| m.textfile) {
            None => None,
            Some(f) if f.as_os_str().is_empty() => {
                errors.push(err(
                    "metrics.textfile",
                    "expected a file path, found an empty string".into(),
                ));
                None
            }
            // node_exporter's textfile collector reads only *.prom files: any other name
            // would be written faithfully and never scraped.
            Some(f) if f.extension() != Some(std::ffi::OsStr::new("prom")) => {
                errors.push(err(
                    "metrics.textfile",
                    format!(
                        "expected a file name ending in .prom (the textfile collector reads only those), found {:?}",
                        f.display().to_string()
                    ),
                ));
                None
            }
            Some(f) => Some(resolve(base, &f)),
        };
        let defaults = raw.defaults.unwrap_or_default();
        let pkcs11 = match raw.pkcs11.map(|v| pkcs11_table(v, base)) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(problems)) => {
                errors.extend(problems.into_iter().map(|(k, w)| err(&k, w)));
                None
            }
        };
        let ctx = DomainCtx { pkcs11, ..ctx };
        let mut domains = BTreeMap::new();
        let mut unchecked = BTreeMap::new();
        for (name, value) in raw.domains {
            if only.is_some_and(|o| o != name) {
                unchecked.insert(name, value);
                continue;
            }
            match checked_domain(&name, value, &defaults, base, path, &ctx) {
                Ok(dc) => {
                    domains.insert(name, dc);
                }
                Err(problems) => errors.extend(problems),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            path: path.to_path_buf(),
            state_dir,
            ledger,
            host_pool,
            host_name,
            audit_file,
            domains,
            metrics_textfile,
            unchecked: Unchecked {
                domains: unchecked,
                defaults,
                base: base.to_path_buf(),
                left_out,
                text: full,
                ctx,
            },
        })
    }

    /// Every domain of the file, validating those a narrowed load left unchecked; a
    /// domain with problems is left out with a warning (its own runs and `check`
    /// report them). For what must cover every domain, such as the metrics textfile.
    pub fn all_domains(&self) -> Vec<DomainConfig> {
        let mut all: BTreeMap<String, DomainConfig> = self.domains.clone();
        let mut unchecked = self.unchecked.domains.clone();
        if !self.unchecked.left_out.is_empty() {
            // The narrowed load proved the file parses; build the tables it left out.
            match toml::from_str::<RawConfig>(&self.unchecked.text) {
                Ok(raw) => unchecked.extend(
                    raw.domains
                        .into_iter()
                        .filter(|(name, _)| !self.domains.contains_key(name)),
                ),
                Err(e) => tracing::warn!(
                    "config {}: {} (domains other than the named one left out)",
                    self.path.display(),
                    e.message().replace('\n', " ")
                ),
            }
        }
        for (name, value) in unchecked {
            match checked_domain(
                &name,
                value,
                &self.unchecked.defaults,
                &self.unchecked.base,
                &self.path,
                &self.unchecked.ctx,
            ) {
                Ok(dc) => {
                    all.insert(name, dc);
                }
                Err(problems) => tracing::warn!(
                    "{} (domain {name:?} left out: keyrotate --config {} check lists its problems)",
                    problems[0],
                    self.path.display()
                ),
            }
        }
        all.into_values().collect()
    }

    /// The domain named on the command line, or a usage error naming the known ones.
    pub fn domain(&self, name: &str) -> Result<&DomainConfig, String> {
        validate_domain_name(name).map_err(|w| format!("--domain: {w}"))?;
        self.domains.get(name).ok_or_else(|| {
            let known: std::collections::BTreeSet<&str> = self
                .domains
                .keys()
                .chain(self.unchecked.domains.keys())
                .map(String::as_str)
                .chain(self.unchecked.left_out.iter())
                .collect();
            let known: Vec<&str> = known.into_iter().collect();
            format!(
                "--domain {name:?} is not configured in {} (known: {})",
                self.path.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })
    }

    pub fn lock_dir(&self) -> PathBuf {
        self.state_dir.join("locks")
    }
}

/// One `[domains.NAME]` table validated with `defaults` applied: the domain, or every
/// problem found, each naming the file and key.
fn checked_domain(
    name: &str,
    value: toml::Value,
    defaults: &RawDomain,
    base: &Path,
    path: &Path,
    ctx: &DomainCtx,
) -> Result<DomainConfig, Vec<String>> {
    let shown = path.display();
    let err = |key: &str, what: String| format!("config {shown}: {key}: {what}");
    let prefix = format!("domains.{name}");
    validate_domain_name(name).map_err(|w| vec![err(&prefix, w)])?;
    let d = raw_domain(value).map_err(|problems| {
        problems
            .into_iter()
            .map(|(key, what)| match key {
                Some(key) => err(&format!("{prefix}.{key}"), what),
                None => err(&prefix, what),
            })
            .collect::<Vec<_>>()
    })?;
    let mut applicable = defaults.for_backend(d.backend.as_deref().or(defaults.backend.as_deref()));
    // Shared-store defaults apply to shared domains only: a `[defaults] sync_ttl` must
    // not break a local one (the same key set on a local domain is still an error).
    if d.store.as_deref().or(applicable.store.as_deref()) != Some("shared") {
        applicable.kek = None;
        applicable.require_pools = None;
        applicable.sync_ttl = None;
    }
    let d = d.or(&applicable);
    let dc = domain(name, d, base, ctx).map_err(|problems| {
        problems
            .into_iter()
            .map(|(key, what)| match key.strip_prefix('/') {
                // A problem of the [pkcs11] table this domain uses, under its own key.
                Some(top) => err(top, what),
                None => err(&format!("{prefix}.{key}"), what),
            })
            .collect::<Vec<_>>()
    })?;
    Ok(dc)
}

/// The `[pkcs11]` table: module and token present, exactly one PIN source, paths
/// resolved against the config's folder. The PIN file itself is checked by each
/// domain that uses the token (a config whose domains keep their keys in files
/// does not depend on it).
fn pkcs11_table(value: toml::Value, base: &Path) -> Result<TokenConfig, Vec<(String, String)>> {
    let mut t: TokenConfig = value
        .try_into()
        .map_err(|e: toml::de::Error| vec![("pkcs11".to_string(), e.message().replace('\n', " "))])?;
    let mut problems = Vec::new();
    if t.module.as_os_str().is_empty() {
        problems.push((
            "pkcs11.module".into(),
            "expected the PKCS#11 module's path, found an empty string".into(),
        ));
    }
    if t.token.is_empty() {
        problems.push((
            "pkcs11.token".into(),
            "expected the token's label, found an empty string".into(),
        ));
    }
    match (&t.pin_file, &t.pin_env) {
        (Some(_), Some(_)) => problems.push(("pkcs11".into(), "set pin_file or pin_env, not both".into())),
        (None, None) => problems.push((
            "pkcs11".into(),
            "missing: pin_file (a 0600 file holding the user PIN) or pin_env (an environment variable)".into(),
        )),
        (Some(f), None) if f.as_os_str().is_empty() => problems.push((
            "pkcs11.pin_file".into(),
            "expected a file path, found an empty string".into(),
        )),
        (None, Some(v)) if v.is_empty() => problems.push((
            "pkcs11.pin_env".into(),
            "expected a variable name, found an empty string".into(),
        )),
        _ => {}
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    t.module = resolve(base, &t.module);
    t.pin_file = t.pin_file.map(|f| resolve(base, &f));
    Ok(t)
}

/// One `[domains.NAME]` table, checked key by key so that every unknown or mistyped
/// key is reported with its name (and one bad domain does not hide the next).
fn raw_domain(value: toml::Value) -> Result<RawDomain, Vec<(Option<String>, String)>> {
    let toml::Value::Table(table) = value else {
        return Err(vec![(None, "expected a table of domain keys".to_string())]);
    };
    let mut problems = Vec::new();
    for (key, v) in &table {
        let mut one = toml::Table::new();
        one.insert(key.clone(), v.clone());
        if let Err(e) = toml::Value::Table(one).try_into::<RawDomain>() {
            problems.push((Some(key.clone()), e.message().replace('\n', " ")));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e| vec![(None, e.message().replace('\n', " "))])
}

/// The first of `errors`, saying how many more there are.
fn first_of(mut errors: Vec<String>, path: &Path) -> String {
    let more = errors.len().saturating_sub(1);
    let mut first = errors.swap_remove(0);
    if more > 0 {
        first.push_str(&format!(
            " (and {more} more problem{} in this file: keyrotate --config {} check lists them all)",
            if more == 1 { "" } else { "s" },
            path.display()
        ));
    }
    first
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

type KeyError = (&'static str, String);

/// Built with a static glibc (`+crt-static`, README "A faster-starting binary")? Such a
/// process loads shared modules through glibc's static `dlopen`, which brings in a second
/// libc: an NSS module reached by a group lookup (a group not in `/etc/group`) or a
/// PKCS#11 module crashes it (SIGSEGV, exit 139, which Control-M reads as a kill). So
/// the config is refused (2) before anything would load one.
const STATIC_GLIBC: bool = cfg!(all(target_env = "gnu", target_feature = "crt-static"));

/// Refuses `what` in a static glibc build (see [`STATIC_GLIBC`]).
fn not_in_a_static_build(key: &'static str, what: &str) -> Result<(), KeyError> {
    if STATIC_GLIBC {
        return Err((
            key,
            format!(
                "{what} needs a shared module, which this static glibc build of keyrotate cannot load \
                 safely: use the default (dynamic) build"
            ),
        ));
    }
    Ok(())
}

/// The value, or `None` with its problem added to `errs`.
fn take<T>(errs: &mut Vec<KeyError>, r: Result<T, KeyError>) -> Option<T> {
    r.map_err(|e| errs.push(e)).ok()
}

/// Validates one domain (defaults already applied), collecting every key's problem.
fn domain(name: &str, d: RawDomain, base: &Path, ctx: &DomainCtx) -> Result<DomainConfig, Vec<KeyError>> {
    let mut errs: Vec<KeyError> = Vec::new();
    let store = take(&mut errs, store(&d, base, ctx));
    let designated_pool = take(
        &mut errs,
        d.designated_pool
            .ok_or((
                "designated_pool",
                "missing: every domain needs the pool that rotates it".to_string(),
            ))
            .and_then(|p| validate_pool(&p).map_err(|w| ("designated_pool", w))),
    );
    let max_deadline = take(
        &mut errs,
        match d.max_deadline {
            Some(s) => positive_duration(&s).map_err(|w| ("max_deadline", w)),
            None => Ok(DEFAULT_MAX_DEADLINE),
        },
    );
    let min_interval = take(
        &mut errs,
        match d.min_interval {
            Some(s) => {
                parse_duration(&s).map_err(|w| ("min_interval", format!("expected a duration such as 1d or 12h: {w}")))
            }
            None => Ok(DEFAULT_MIN_INTERVAL),
        },
    );
    let retain = take(
        &mut errs,
        match d.retain {
            Some(r) if (0..=1000).contains(&r) => Ok(r as u32),
            Some(r) => Err(("retain", format!("expected a whole number from 0 to 1000, found {r}"))),
            None => Ok(DEFAULT_RETAIN),
        },
    );
    // A group missing on this host is a problem only where the key store is written:
    // a host outside the designated pool must still answer NOT_DESIGNATED (6), so the
    // lookup's failure is kept for `check` and for the commands that write.
    let mut unresolved_group = None;
    let group_name = d
        .group
        .filter(|_| take(&mut errs, not_in_a_static_build("group", "a group lookup")).is_some());
    let group = group_name.and_then(|name| match crate::fsutil::lookup_group(&name) {
        Some(gid) => Some(crate::fsutil::Group { name, gid }),
        None => {
            unresolved_group = Some(format!("no such group {name:?} on this host"));
            None
        }
    });
    let access = Some(crate::fsutil::Access {
        group,
        public_jwks: d.public_jwks.unwrap_or(false),
    });
    let backend = match d.backend.as_deref() {
        Some("keystore") => {
            if d.command.is_some() {
                take::<()>(&mut errs, Err(("command", "only for backend = \"command\"".into())));
            }
            let algorithm = take(
                &mut errs,
                d.algorithm
                    .ok_or(("algorithm", format!("missing: expected one of {}", Algorithm::names())))
                    .and_then(|a| {
                        a.parse::<Algorithm>().map_err(|_| {
                            (
                                "algorithm",
                                format!("expected one of {}, found {a:?}", Algorithm::names()),
                            )
                        })
                    }),
            );
            let keystore = take(
                &mut errs,
                d.keystore
                    .ok_or(("keystore", "missing: expected the key store folder".to_string()))
                    .and_then(|k| {
                        if k.as_os_str().is_empty() {
                            Err(("keystore", "expected a folder path, found an empty string".into()))
                        } else {
                            Ok(resolve(base, &k))
                        }
                    }),
            );
            let activation = take(
                &mut errs,
                match d.activation.as_deref() {
                    None | Some("immediate") => Ok(Activation::Immediate),
                    Some("prepublish") => Ok(Activation::Prepublish),
                    Some(other) => Err((
                        "activation",
                        format!("expected \"immediate\" or \"prepublish\", found {other:?}"),
                    )),
                },
            );
            let mut custody = take(&mut errs, custody(d.custody.as_deref(), ctx.pkcs11.as_ref()));
            if matches!(store, Some(Store::Shared(_))) && matches!(custody, Some(Some(_))) {
                // The shared store keeps sealed key material in the database for every
                // host of the pool; a token on one host cannot be that.
                custody = take(
                    &mut errs,
                    Err((
                        "custody",
                        "\"pkcs11\" is not for store = \"shared\" (the shared store seals its keys under its kek); to keep \
                         that KEK in the token instead: kek = \"pkcs11:object=<label>\""
                            .into(),
                    )),
                );
            }
            match (algorithm, keystore, activation, custody) {
                (Some(algorithm), Some(keystore), Some(activation), Some(custody)) => Some(Backend::Keystore {
                    algorithm,
                    keystore,
                    activation,
                    custody,
                }),
                _ => None,
            }
        }
        Some("command") => {
            for key in [
                ("algorithm", d.algorithm.is_some()),
                ("keystore", d.keystore.is_some()),
                ("activation", d.activation.is_some()),
                ("custody", d.custody.is_some()),
            ] {
                if key.1 {
                    take::<()>(&mut errs, Err((key.0, "only for backend = \"keystore\"".into())));
                }
            }
            take(&mut errs, command(d.command, base))
        }
        Some(other) => take(
            &mut errs,
            Err((
                "backend",
                format!("expected \"keystore\" or \"command\", found {other:?}"),
            )),
        ),
        None => take(
            &mut errs,
            Err(("backend", "missing: expected \"keystore\" or \"command\"".into())),
        ),
    };
    match (
        designated_pool,
        max_deadline,
        min_interval,
        retain,
        backend,
        access,
        store,
    ) {
        (
            Some(designated_pool),
            Some(max_deadline),
            Some(min_interval),
            Some(retain),
            Some(backend),
            Some(access),
            Some(store),
        ) if errs.is_empty() => Ok(DomainConfig {
            name: name.to_string(),
            designated_pool,
            backend,
            max_deadline,
            min_interval,
            retain,
            access,
            unresolved_group,
            store,
        }),
        _ => Err(errs),
    }
}

/// `custody = "file" | "pkcs11"` of a key store domain: the token, for pkcs11.
fn custody(custody: Option<&str>, pkcs11: Option<&TokenConfig>) -> Result<Option<TokenConfig>, KeyError> {
    match custody {
        None | Some("file") => Ok(None),
        Some("pkcs11") => {
            not_in_a_static_build("custody", "a PKCS#11 token")?;
            let t = pkcs11.ok_or((
                "custody",
                "\"pkcs11\" needs a [pkcs11] table (module, token, and pin_file or pin_env)".to_string(),
            ))?;
            if let Some(f) = &t.pin_file {
                // Reported under the table's own key (the leading `/`), not the domain's.
                crate::keystore::pkcs11::check_pin_file(f)
                    .map_err(|e| ("/pkcs11.pin_file", e.trim_start_matches("pkcs11.pin_file ").to_string()))?;
            }
            Ok(Some(t.clone()))
        }
        Some(other) => Err(("custody", format!("expected \"file\" or \"pkcs11\", found {other:?}"))),
    }
}

/// `store`, `kek`, `require_pools` and `sync_ttl` of one domain (DESIGN 9). The shared
/// store lives in the ledger's PostgreSQL database and is a key store: any other
/// combination is refused here, so that no command starts on a config that cannot work.
fn store(d: &RawDomain, base: &Path, ctx: &DomainCtx) -> Result<Store, KeyError> {
    let only_shared = |key: &'static str| (key, "only for store = \"shared\"".to_string());
    match d.store.as_deref() {
        None | Some("local") => {
            if d.kek.is_some() {
                return Err(only_shared("kek"));
            }
            if d.require_pools.is_some() {
                return Err(only_shared("require_pools"));
            }
            if d.sync_ttl.is_some() {
                return Err(only_shared("sync_ttl"));
            }
            Ok(Store::Local)
        }
        Some("shared") => {
            if d.backend.as_deref() != Some("keystore") {
                return Err(("store", "\"shared\" needs backend = \"keystore\"".into()));
            }
            if !ctx.shared_ledger {
                return Err((
                    "store",
                    "\"shared\" needs the PostgreSQL ledger: set [state] ledger = \"postgres://…\"".into(),
                ));
            }
            let kek = kek_source(d.kek.as_deref(), base, ctx.pkcs11.as_ref())?;
            let mut require_pools = Vec::new();
            for p in d.require_pools.iter().flatten() {
                require_pools.push(validate_pool(p).map_err(|w| ("require_pools", w))?);
            }
            let sync_ttl = match &d.sync_ttl {
                Some(s) => positive_duration(s).map_err(|w| ("sync_ttl", w))?,
                None => DEFAULT_SYNC_TTL,
            };
            Ok(Store::Shared(SharedStore {
                kek,
                require_pools,
                sync_ttl,
                host: ctx.host_name.clone(),
            }))
        }
        Some(other) => Err(("store", format!("expected \"local\" or \"shared\", found {other:?}"))),
    }
}

/// `kek = "file:/path"` or `kek = "pkcs11:object=<label>"` (the `[pkcs11]` table names
/// the token; whether the object is there and fit is for `check` and the run: a token
/// can be unreachable now and fine later, the config text cannot).
fn kek_source(kek: Option<&str>, base: &Path, pkcs11: Option<&TokenConfig>) -> Result<KekSource, KeyError> {
    let kek = kek.ok_or((
        "kek",
        "missing: store = \"shared\" needs the key-encryption key, e.g. kek = \"file:/etc/keyrotate/kek\"".to_string(),
    ))?;
    if let Some(path) = kek.strip_prefix("file:") {
        if path.is_empty() {
            return Err(("kek", "expected file:/path/to/kek, found an empty path".into()));
        }
        return Ok(KekSource::File(resolve(base, Path::new(path))));
    }
    if let Some(attrs) = kek.strip_prefix("pkcs11:") {
        not_in_a_static_build("kek", "a KEK in a PKCS#11 token")?;
        let object = attrs.strip_prefix("object=").ok_or((
            "kek",
            format!(
                "expected \"pkcs11:object=<label>\" (the label of the AES key in the [pkcs11] token), found {kek:?}"
            ),
        ))?;
        if object.is_empty() || object.len() > 128 || object.chars().any(|c| c.is_control() || c == ';') {
            return Err((
                "kek",
                format!(
                    "pkcs11:object= needs the key's label: 1-128 printable characters without ';', found {object:?}"
                ),
            ));
        }
        let token = pkcs11.ok_or((
            "kek",
            "a PKCS#11 KEK needs a [pkcs11] table (module, token, and pin_file or pin_env)".to_string(),
        ))?;
        return Ok(KekSource::Pkcs11 {
            token: token.clone(),
            object: object.to_string(),
        });
    }
    Err((
        "kek",
        format!("expected \"file:/path\" or \"pkcs11:object=<label>\", found {kek:?}"),
    ))
}

/// `[host] name`: 1-253 characters of a host name (letters, digits, `.`, `_`, `-`).
fn validate_host_name(name: &str) -> Result<String, String> {
    if name.is_empty() || name.len() > 253 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(format!(
            "expected a host name of 1-253 characters from A-Z a-z 0-9 . _ -, found {:?}",
            name
        ));
    }
    Ok(name.to_string())
}

/// `command = ["/path/to/hook", "arg", ...]` of a command domain.
fn command(command: Option<Vec<String>>, base: &Path) -> Result<Backend, KeyError> {
    let mut command = command.ok_or((
        "command",
        "missing: expected [\"/path/to/hook\", \"arg\", ...]".to_string(),
    ))?;
    if command.is_empty() || command[0].is_empty() {
        return Err((
            "command",
            "expected a non-empty list whose first item is the program".into(),
        ));
    }
    let program = PathBuf::from(command.remove(0));
    if !program.is_absolute() && program.components().count() < 2 && !program.starts_with(".") {
        return Err((
            "command",
            format!(
                "program {:?} must be an absolute path or relative to the config file (./{}); PATH is not searched",
                program.display().to_string(),
                program.display()
            ),
        ));
    }
    Ok(Backend::Command {
        program: resolve(base, &program),
        args: command,
    })
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|w| format!("expected a duration such as 1h: {w}"))?;
    if d.is_zero() {
        return Err("expected a duration greater than zero".into());
    }
    Ok(d)
}

/// Domain names: 1–64 of `[a-z0-9._-]`, starting with a letter or digit. They become
/// file names, so anything that could be a path (or hide in one) is refused.
pub fn validate_domain_name(name: &str) -> Result<(), String> {
    let shown: String = name.escape_debug().take(80).collect();
    if name.is_empty() {
        return Err("domain name is empty".into());
    }
    if name.len() > 64 {
        return Err(format!(
            "domain name \"{shown}…\" is {} bytes, longer than 64",
            name.len()
        ));
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!("domain name \"{shown}\" must start with a-z or 0-9"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        return Err(format!(
            "domain name \"{shown}\" has {:?}: only a-z, 0-9, '.', '_' and '-' are allowed",
            c
        ));
    }
    Ok(())
}

fn validate_pool(pool: &str) -> Result<String, String> {
    if pool.is_empty() || pool.len() > 128 || !pool.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(format!(
            "expected a pool name of 1-128 characters from A-Z a-z 0-9 . _ -, found {:?}",
            pool
        ));
    }
    Ok(pool.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/kr/rotate.toml"))
    }

    const GOOD: &str = r#"
[state]
dir = "state"
[defaults]
designated_pool = "pool-a"
min_interval = "1h"
[domains.sig]
backend = "keystore"
algorithm = "ed25519"
keystore = "keys"
"#;

    #[test]
    fn relative_paths_and_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/kr/state"));
        assert_eq!(c.audit_file, Path::new("/etc/kr/state/audit.jsonl"));
        let d = &c.domains["sig"];
        assert_eq!(d.designated_pool, "pool-a");
        assert_eq!(d.min_interval, Duration::from_secs(3600));
        assert_eq!(d.retain, 3);
        match &d.backend {
            Backend::Keystore {
                keystore, activation, ..
            } => {
                assert_eq!(keystore, Path::new("/etc/kr/keys"));
                assert_eq!(*activation, Activation::Immediate);
            }
            _ => panic!("wrong backend"),
        }
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse(&GOOD.replace("ed25519", "rsa-512")).unwrap_err();
        assert!(
            e.contains("/etc/kr/rotate.toml") && e.contains("domains.sig.algorithm"),
            "{e}"
        );
        let e = parse(&format!("{GOOD}\ncolour = 1\n")).unwrap_err();
        assert!(e.contains("unknown field") && e.contains("colour"), "{e}");
        let e = parse("[state]\ndir = 5\n").unwrap_err();
        assert!(e.contains("rotate.toml:2"), "{e}");
        let e = parse(&GOOD.replace("[domains.sig]", "[domains.\"../x\"]")).unwrap_err();
        assert!(e.contains("domains.../x"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn domain_names() {
        for ok in ["a", "payments-signing", "0.x_y", &"a".repeat(64)] {
            validate_domain_name(ok).unwrap();
        }
        for bad in [
            "",
            "A",
            "../etc",
            ".hidden",
            "-x",
            "a/b",
            "a\u{7}",
            &"a".repeat(65),
            "é",
        ] {
            assert!(validate_domain_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shared_store_keys() {
        let pg = GOOD.replace("dir = \"state\"", "dir = \"state\"\nledger = \"postgres://u@h/db\"");
        let shared = pg.replace(
            "keystore = \"keys\"",
            "keystore = \"keys\"\nstore = \"shared\"\nkek = \"file:kek\"\nrequire_pools = [\"a\", \"b\"]",
        );
        let c = parse(&format!("{shared}\n[host]\nname = \"app-1\"\n")).unwrap();
        let s = c.domains["sig"].shared().expect("shared");
        assert_eq!(s.kek, KekSource::File("/etc/kr/kek".into()));
        assert_eq!(s.require_pools, ["a", "b"]);
        assert_eq!(s.sync_ttl, DEFAULT_SYNC_TTL);
        assert_eq!(s.host, "app-1");
        assert_eq!(c.host_name, "app-1");
        // The embedded ledger, a missing or PKCS#11 KEK, a shared key on a local domain.
        for (text, needle) in [
            (
                shared.replace("ledger = \"postgres://u@h/db\"", ""),
                "needs the PostgreSQL ledger",
            ),
            (shared.replace("kek = \"file:kek\"", ""), "domains.sig.kek: missing"),
            (
                shared.replace("file:kek", "pkcs11:object=k"),
                "domains.sig.kek: a PKCS#11 KEK needs a [pkcs11] table",
            ),
            (
                shared.replace("file:kek", "pkcs11:token=k"),
                "expected \"pkcs11:object=<label>\"",
            ),
            (shared.replace("file:kek", "pkcs11:object="), "needs the key's label"),
            (
                pg.replace("keystore = \"keys\"", "keystore = \"keys\"\nsync_ttl = \"1d\""),
                "only for store",
            ),
            (
                shared.replace("store = \"shared\"", "store = \"remote\""),
                "domains.sig.store",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // Shared defaults do not break a local domain.
        let defaults = pg.replace("min_interval = \"1h\"", "min_interval = \"1h\"\nsync_ttl = \"1d\"");
        assert!(parse(&defaults).unwrap().domains["sig"].shared().is_none());
    }

    #[test]
    fn command_program_must_be_a_path() {
        let text = "[state]\ndir='s'\n[domains.pw]\ndesignated_pool='p'\nbackend='command'\ncommand=['hook']\n";
        assert!(parse(text).unwrap_err().contains("PATH is not searched"));
        let text = text.replace("'hook'", "'./hooks/pg', '--role', 'x'");
        match &parse(&text).unwrap().domains["pw"].backend {
            Backend::Command { program, args } => {
                assert_eq!(program, Path::new("/etc/kr/./hooks/pg"));
                assert_eq!(args, &["--role", "x"]);
            }
            _ => panic!(),
        }
    }
}
