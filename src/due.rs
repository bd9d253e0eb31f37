//! The due-date rule (DESIGN section 5, phase 5): a domain is due `min_interval` after
//! its last success. Shared by `rotate` (which refuses NOT_DUE before then), `status`
//! and the metrics.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::ledger::RunRow;

/// When a domain is next due, from its last success (`None`: it never succeeded, so it
/// is due now).
pub fn next_due(last_success: Option<&RunRow>, min_interval: Duration) -> Option<DateTime<Utc>> {
    let last = last_success?;
    let at = last.ended_at.as_deref().unwrap_or(&last.started_at);
    let at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
    Some(at + chrono::Duration::from_std(min_interval).unwrap_or(chrono::Duration::MAX))
}
