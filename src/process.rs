//! Identities of processes this host runs, as the ledger records them: a pid alone is
//! reused, so a process is named by its pid, its start time (clock ticks since boot,
//! `/proc/<pid>/stat` field 22) and the boot it belongs to. The next run (or `resolve`)
//! uses them to tell "still running" from "died" on this host.

use std::time::Duration;

/// One process, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Debug)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub start: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// The boot this host is in (changes at every reboot), or "" where unknown.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl ProcId {
    pub fn of(pid: i32) -> Option<ProcId> {
        stat(pid).map(|s| ProcId { pid, start: s.start })
    }

    pub fn me() -> Option<ProcId> {
        ProcId::of(std::process::id() as i32)
    }

    /// Whether this very process still runs (a zombie does not count).
    pub fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|s| s.start == self.start && s.state != 'Z')
    }
}

/// Whether anything is left in process group `pgid` whose leader was `leader`. A pid
/// is not reused while a group of that id exists, so a group with no leader is still
/// the recorded one; a leader with another start time means the id was reused.
/// Zombies do not count (an init that never reaps them is common in containers).
pub fn group_alive(pgid: i32, leader: &ProcId) -> bool {
    if pgid <= 1 {
        return false;
    }
    match stat(pgid) {
        Some(s) if s.state != 'Z' && s.start != leader.start => false,
        _ => all().iter().any(|(_, s)| s.pgrp == pgid && s.state != 'Z'),
    }
}

/// Every process of this host (as far as `/proc` shows them).
fn all() -> Vec<(i32, Stat)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter_map(|pid| stat(pid).map(|s| (pid, s)))
        .collect()
}

/// Every live descendant of `root` (children, their children…), by walking `/proc`.
pub fn descendants(root: i32) -> Vec<i32> {
    let parent_of: Vec<(i32, i32)> = all()
        .into_iter()
        .filter(|(_, s)| s.state != 'Z')
        .map(|(pid, s)| (pid, s.ppid))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            if !out.contains(child) {
                out.push(*child);
                frontier.push(*child);
            }
        }
    }
    out
}

/// The hook processes of one step, as recorded in the ledger (event `hook_process`):
/// `step=set pgid=N leader_start=T watcher=W watcher_start=T boot=B`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookProcess {
    pub step: String,
    pub leader: ProcId,
    pub watcher: ProcId,
    pub boot: String,
}

impl HookProcess {
    pub fn record(&self) -> String {
        format!(
            "step={} pgid={} leader_start={} watcher={} watcher_start={} boot={}",
            self.step, self.leader.pid, self.leader.start, self.watcher.pid, self.watcher.start, self.boot
        )
    }

    pub fn parse(s: &str) -> Option<HookProcess> {
        let get = |k: &str| {
            s.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        };
        Some(HookProcess {
            step: get("step")?.to_string(),
            leader: ProcId {
                pid: get("pgid")?.parse().ok()?,
                start: get("leader_start")?.parse().ok()?,
            },
            watcher: ProcId {
                pid: get("watcher")?.parse().ok()?,
                start: get("watcher_start")?.parse().ok()?,
            },
            boot: get("boot")?.to_string(),
        })
    }

    /// Whether any of it still runs on this host (the caller checks the host name).
    pub fn alive(&self) -> bool {
        self.boot == boot_id() && (self.watcher.alive() || group_alive(self.leader.pid, &self.leader))
    }

    pub fn describe(&self) -> String {
        format!(
            "its hook step '{}' is still running (process group {}, watcher pid {})",
            self.step, self.leader.pid, self.watcher.pid
        )
    }
}

/// A run's own process, as recorded in the ledger (event `process`):
/// `pid=N start=T boot=B`.
pub fn record_me() -> String {
    let me = ProcId::me();
    format!(
        "pid={} start={} boot={}",
        std::process::id(),
        me.map_or(0, |m| m.start),
        boot_id()
    )
}

/// Whether the process of a `process` event still runs on this host.
pub fn recorded_alive(record: &str) -> Option<i32> {
    let get = |k: &str| {
        record
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let id = ProcId {
        pid: get("pid")?.parse().ok()?,
        start: get("start")?.parse().ok()?,
    };
    (get("boot")? == boot_id() && id.start != 0 && id.alive()).then_some(id.pid)
}

/// What of a run recorded in the ledger still runs on this host.
#[derive(Clone, Debug)]
pub enum Alive {
    /// keyrotate itself (it lost its lock, or nothing says it died): its pid.
    Run(i32),
    /// keyrotate is gone but a hook step it started is not.
    Hook(HookProcess),
}

impl Alive {
    pub fn describe(&self, run_id: &str) -> String {
        match self {
            Alive::Run(pid) => format!("run {run_id} lost its lock, still running (pid {pid} on this host)"),
            Alive::Hook(h) => format!(
                "run {run_id} is gone but {}: stop it (kill -TERM -- -{}) or wait for it to end",
                h.describe(),
                h.leader.pid
            ),
        }
    }
}

/// Whether the run recorded on `run_host` with these ledger events (`(at, phase,
/// detail)`) still runs here. Another host's processes cannot be seen: `None`.
pub fn liveness(this_host: &str, run_host: &str, events: &[(String, String, Option<String>)]) -> Option<Alive> {
    if this_host != run_host {
        return None;
    }
    let detail = |phase: &str| events.iter().rev().find(|e| e.1 == phase).and_then(|e| e.2.clone());
    if let Some(pid) = detail("process").and_then(|d| recorded_alive(&d)) {
        return Some(Alive::Run(pid));
    }
    events
        .iter()
        .filter(|e| e.1 == "hook_process")
        .filter_map(|e| e.2.as_deref().and_then(HookProcess::parse))
        .find(HookProcess::alive)
        .map(Alive::Hook)
}

/// Waits until `done()` or `limit` passes; true when `done()` came first.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The system host name (`gethostname`), as the ledger records a run's host.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call; gethostname
    // writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_this_process_is_alive() {
        let me = ProcId::me().unwrap();
        assert!(me.alive());
        assert!(!ProcId {
            start: me.start + 1,
            ..me.clone()
        }
        .alive());
        let h = HookProcess {
            step: "set".into(),
            leader: me.clone(),
            watcher: me.clone(),
            boot: boot_id(),
        };
        assert_eq!(HookProcess::parse(&h.record()), Some(h.clone()));
        assert!(h.alive());
        assert_eq!(recorded_alive(&record_me()), Some(me.pid));
        assert_eq!(recorded_alive("pid=1 start=0 boot=x"), None);
    }
}
