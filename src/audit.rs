//! The audit trail: one JSON object per line for every transition of a run.
//!
//! Lines are appended with O_APPEND in one write(2) each, so a line that was written
//! survives the process being killed right after, and every exit path (including the
//! deadline watchdog) has written its lines before the process ends. The line that
//! ends a run (anything with an exit code) and review events are also fdatasync'ed,
//! which makes every earlier line of the file durable with them; the in-between lines
//! (`started`, `committed`) are only lost if the machine loses power mid-run, and then
//! the ledger (which syncs every transition) still has the run and the next run flags
//! it for review. Each event is also logged through `tracing` for the job's stderr.
//! Nothing here ever carries key material: only versions and fingerprints.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One audit line.
#[derive(Clone, Debug, Serialize, Default)]
pub struct Event {
    pub ts: String,
    pub event: &'static str,
    pub run_id: String,
    pub domain: String,
    pub host: String,
    pub pool: Option<String>,
    pub operator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    pub reason: Option<String>,
    pub from_version: Option<u64>,
    pub to_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_fingerprint: Option<String>,
}

impl Event {
    /// An event about `run`, with the identity fields filled in.
    pub fn of(event: &'static str, run: &crate::ledger::NewRun) -> Event {
        Event {
            event,
            run_id: run.run_id.clone(),
            domain: run.domain.clone(),
            host: run.host.clone(),
            pool: run.pool.clone(),
            operator: run.operator.clone(),
            ..Event::default()
        }
    }
}

#[derive(Clone, Debug)]
pub struct Audit {
    path: PathBuf,
}

impl Audit {
    pub fn new(path: &Path) -> Audit {
        Audit {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a line could be appended now, without writing one: the audit trail is
    /// part of the run, so a run checks it before touching any key (DESIGN section 5).
    /// With `create` the folder and the file (0600) are created as the first line would
    /// create them; without, nothing is created or changed (dry run, `check`).
    pub fn preflight(&self, create: bool) -> Result<(), String> {
        let shown = self.path.display();
        let fail =
            |e: std::io::Error| format!("audit file {shown} cannot be written: {}", crate::fsutil::io_reason(&e));
        if create {
            // A step of the run like any other: the crash suite stops the run here too.
            crate::failpoint::hit("audit", "preflight").map_err(fail)?;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("audit file {shown} is a symlink; refusing to follow it"))
            }
            Ok(m) if !m.is_file() => return Err(format!("audit file {shown} is not a regular file")),
            Ok(_) => {
                // Opening for append changes nothing, and is the permission check that
                // counts (root passes access(2) for any mode, open tells the truth).
                OpenOptions::new()
                    .append(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                    .open(&self.path)
                    .map_err(fail)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                if let Some(parent) = self.path.parent().filter(|p| !p.exists()) {
                    crate::fsutil::ensure_private_dir(parent, "audit folder")?;
                }
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&self.path)
                    .map_err(fail)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The nearest folder that exists must let us create what is missing.
                let mut dir = self.path.parent();
                while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                    dir = d.parent();
                }
                let dir = dir.unwrap_or(Path::new("/"));
                if !dir.is_dir() {
                    return Err(format!(
                        "audit file {shown} cannot be created: {} is not a folder",
                        dir.display()
                    ));
                }
                if !crate::fsutil::can_write_dir(dir) {
                    return Err(format!(
                        "audit file {shown} cannot be created: folder {} is not writable",
                        dir.display()
                    ));
                }
            }
            Err(e) => return Err(fail(e)),
        }
        if let Some(why) = crate::fsutil::fs_trouble(&self.path) {
            return Err(format!("audit file {shown} cannot be written: {why}"));
        }
        Ok(())
    }

    /// Appends `event` durably. The timestamp is filled in here.
    pub fn emit(&self, mut event: Event) -> Result<(), String> {
        event.ts = crate::ledger::now();
        tracing::info!(
            target: "keyrotate::audit",
            event = event.event,
            run_id = %event.run_id,
            domain = %event.domain,
            exit_code = event.exit_code,
            reason = event.reason.as_deref().unwrap_or(""),
            "audit"
        );
        let mut line = serde_json::to_vec(&event).expect("json");
        line.push(b'\n');
        let fail = |e: std::io::Error| format!("audit file {}: {}", self.path.display(), crate::fsutil::io_reason(&e));
        if let Some(parent) = self.path.parent() {
            if !parent.exists() {
                crate::fsutil::ensure_private_dir(parent, "audit folder")?;
            }
        }
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(fail)?;
        f.write_all(&line).map_err(fail)?;
        let ends_something =
            event.exit_code.is_some() || !matches!(event.event, "rotation.started" | "rotation.committed");
        if ends_something {
            f.sync_data().map_err(fail)?;
        }
        Ok(())
    }
}
