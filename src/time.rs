//! Time as keyrotate writes it: RFC 3339 in UTC with milliseconds, everywhere (ledger
//! rows, audit lines, manifests, reports). Below every module that writes a time.

use chrono::{DateTime, SecondsFormat, Utc};

/// `t` as keyrotate writes times.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Now, as keyrotate writes times.
pub fn now() -> String {
    rfc3339(Utc::now())
}
