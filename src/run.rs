//! The identity of one run, as its ledger row and its audit lines record it. Below
//! both the ledger and the audit trail, which each take it.

/// The identity of a new run, as recorded in its row.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub run_id: String,
    pub domain: String,
    pub trigger: &'static str,
    pub operator: Option<String>,
    pub host: String,
    pub pid: u32,
    pub pool: Option<String>,
    pub started_at: String,
    pub deadline_at: String,
    pub forced: bool,
    pub requested_reason: Option<String>,
}
