//! `keyrotate audit verify`: recompute the audit hash chain and check it against every
//! anchor the ledger holds for this host (DESIGN section 12). Exit 0 when intact, 4
//! (NEEDS_REVIEW) when a line was altered, removed, inserted or reordered or the tail
//! was cut, naming the first bad line; 3 when the trail or the ledger cannot be read.
//! Reads only.

use super::{hostname, load_config, print_json, report_failure};
use crate::audit;
use crate::cli::{AuditVerifyArgs, Cli, OutputFormat};
use crate::ledger::Ledger;
use crate::outcome::{Failure, Outcome};

pub fn verify(cli: &Cli, args: &AuditVerifyArgs) -> Outcome {
    match check(cli) {
        Ok(v) => {
            match args.output {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Text => print_text(&v),
            }
            if v.intact {
                Outcome::Rotated
            } else {
                Outcome::NeedsReview
            }
        }
        Err(f) => {
            if args.output == OutputFormat::Json && f.outcome != Outcome::Usage {
                print_json(&serde_json::json!({ "intact": null, "error": f.message }));
            }
            report_failure(&f)
        }
    }
}

fn check(cli: &Cli) -> Result<audit::Verification, Failure> {
    let config = load_config(cli, None)?;
    let unreadable = |e: String| Failure::new(Outcome::Aborted, e);
    let ledger_unreadable = |e: crate::ledger::LedgerError| unreadable(e.into());
    // Held while the anchors and the files are read: no writer is then between
    // recording its anchor and appending its line.
    let _lock = audit::lock_for_reading(&config.audit_file).map_err(unreadable)?;
    let anchors = match Ledger::open_read_only(&config.ledger).map_err(ledger_unreadable)? {
        Some(ledger) => ledger.audit_anchors(&hostname()).map_err(ledger_unreadable)?,
        None => Vec::new(),
    };
    audit::verify(&config.audit_file, &anchors).map_err(unreadable)
}

fn print_text(v: &audit::Verification) {
    let range = match (v.first_seq, v.last_seq) {
        (Some(a), Some(b)) => format!(" (seq {a}..{b})"),
        _ => String::new(),
    };
    let files = if v.files.len() == 1 {
        "1 file".to_string()
    } else {
        format!("{} files", v.files.len())
    };
    match &v.first_bad {
        None => {
            let mut notes = Vec::new();
            if v.unchained_lines > 0 {
                notes.push(format!(
                    "{} older lines from before the chain are not covered",
                    v.unchained_lines
                ));
            }
            if v.anchors_before_trail > 0 {
                notes.push(format!(
                    "{} anchors are older than the oldest file kept",
                    v.anchors_before_trail
                ));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            };
            out!(
                "INTACT audit trail: {} lines in {files}{range}, {} ledger anchors checked{notes}",
                v.lines,
                v.anchors_checked
            );
        }
        Some(b) => out!(
            "BROKEN audit trail: first bad line {}:{}{}: {} (see the runbook: audit verify exits 4)",
            b.file,
            b.line,
            b.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
            b.reason
        ),
    }
}
