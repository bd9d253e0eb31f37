//! Layers point one way: no module below `src/cmd` uses `cmd`, and the top-level
//! modules of `src/` import each other without a cycle (a shared helper has a home
//! below its users). Read from the sources, so a new import that breaks either fails
//! here, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `path`.
fn files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// Top-level module -> the top-level modules its code names as `crate::<name>`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        // The crate root and the binary wire everything; `fuzz` is test-only.
        if ["lib", "main", "fuzz"].contains(&name.as_str()) {
            continue;
        }
        let deps: &mut BTreeSet<String> = g.entry(name.clone()).or_default();
        for f in files(&p) {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, _) in text.match_indices("crate::") {
                let rest = &text[i + "crate::".len()..];
                let dep: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `$crate::` is the `out!` macro, defined and used in `cmd`.
                let dollar = i > 0 && text.as_bytes()[i - 1] == b'$';
                if !dep.is_empty() && dep != name && !dollar {
                    deps.insert(dep);
                }
            }
        }
    }
    g
}

#[test]
fn nothing_below_cmd_uses_cmd() {
    let offenders: Vec<String> = graph()
        .into_iter()
        .filter(|(m, deps)| m != "cmd" && deps.contains("cmd"))
        .map(|(m, _)| m)
        .collect();
    assert!(
        offenders.is_empty(),
        "modules below cmd that use crate::cmd: {offenders:?}"
    );
}

#[test]
fn the_modules_import_each_other_without_a_cycle() {
    let g = graph();
    assert!(
        g.contains_key("ledger") && g.contains_key("cmd"),
        "read the wrong folder: {g:?}"
    );
    // Depth-first search; a module met again on the current path closes a cycle.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(m, &g, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

/// No function in `src/cmd` is longer than this many lines: a subcommand reads as a
/// sequence of named steps.
const MAX_FN_LINES: usize = 80;

#[test]
fn no_long_function_in_cmd() {
    let cmd = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cmd");
    let mut long = Vec::new();
    for f in files(&cmd) {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            let is_fn = ["fn ", "pub fn ", "pub(crate) fn ", "pub(super) fn "]
                .iter()
                .any(|p| t.starts_with(p));
            if !is_fn || t.ends_with(';') {
                continue;
            }
            // rustfmt closes a function at its own indentation.
            let close = format!("{}}}", &l[..l.len() - t.len()]);
            if let Some(n) = lines[i + 1..].iter().position(|x| *x == close) {
                if n + 2 > MAX_FN_LINES {
                    long.push(format!("{}:{} ({} lines)", f.display(), i + 1, n + 2));
                }
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FN_LINES} lines: {long:?}");
}

/// Run states are spelled as text only in the ledger module (`RunState`); everywhere
/// else they are the enum.
#[test]
fn run_state_names_are_spelled_only_in_the_ledger() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let states = [
        "started",
        "staged",
        "committed",
        "succeeded",
        "aborted",
        "timed_out",
        "needs_review",
        "refused",
        "resolved",
    ];
    let mut found = Vec::new();
    for f in files(&src) {
        if f.starts_with(src.join("ledger")) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for st in states {
            for quoted in [format!("\"{st}\""), format!("'{st}'")] {
                if text.contains(&quoted) {
                    found.push(format!("{}: {quoted}", f.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "run states spelled outside src/ledger: {found:?}");
}
