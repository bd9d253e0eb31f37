//! The exit-code table: the one place where keyrotate's outcome numbers live.
//!
//! Control-M (and every shell script around it) reads these numbers, so they are a
//! public contract: never renumber, never reuse 1, 101, 126, 127 or >= 128, which
//! shells, panics and signals already mean.

use std::fmt;
use std::process::ExitCode;

/// How a keyrotate invocation ended.
///
/// | code | name | meaning |
/// |---|---|---|
/// | 0 | ROTATED | the new key is active and durable |
/// | 2 | USAGE | bad arguments or configuration; nothing was touched |
/// | 3 | ABORTED | a step failed before the commit point; old key state kept |
/// | 4 | NEEDS_REVIEW | key state may be inconsistent, or the domain is blocked |
/// | 5 | BUSY | another rotation of this domain holds the lock |
/// | 6 | NOT_DESIGNATED | this host's pool is not the domain's designated pool |
/// | 7 | NOT_DUE | the last success is within `min_interval` |
/// | 8 | TIMED_OUT | the deadline came before the commit point; old state kept |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Rotated,
    Usage,
    Aborted,
    NeedsReview,
    Busy,
    NotDesignated,
    NotDue,
    TimedOut,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Rotated,
        Outcome::Usage,
        Outcome::Aborted,
        Outcome::NeedsReview,
        Outcome::Busy,
        Outcome::NotDesignated,
        Outcome::NotDue,
        Outcome::TimedOut,
    ];

    /// The process exit code.
    pub const fn code(self) -> u8 {
        match self {
            Outcome::Rotated => 0,
            Outcome::Usage => 2,
            Outcome::Aborted => 3,
            Outcome::NeedsReview => 4,
            Outcome::Busy => 5,
            Outcome::NotDesignated => 6,
            Outcome::NotDue => 7,
            Outcome::TimedOut => 8,
        }
    }

    /// The stable upper-case name printed in results and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Rotated => "ROTATED",
            Outcome::Usage => "USAGE",
            Outcome::Aborted => "ABORTED",
            Outcome::NeedsReview => "NEEDS_REVIEW",
            Outcome::Busy => "BUSY",
            Outcome::NotDesignated => "NOT_DESIGNATED",
            Outcome::NotDue => "NOT_DUE",
            Outcome::TimedOut => "TIMED_OUT",
        }
    }

    pub fn from_code(code: i64) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| i64::from(o.code()) == code)
    }

    /// The audit event a run with this outcome ends with.
    pub const fn audit_event(self) -> &'static str {
        match self {
            Outcome::Rotated => "rotation.succeeded",
            Outcome::Aborted => "rotation.aborted",
            Outcome::TimedOut => "rotation.timed_out",
            Outcome::NeedsReview => "rotation.needs_review",
            Outcome::Usage | Outcome::Busy | Outcome::NotDesignated | Outcome::NotDue => "rotation.refused",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<Outcome> for ExitCode {
    fn from(o: Outcome) -> ExitCode {
        ExitCode::from(o.code())
    }
}

/// An error that carries the outcome it must end the process with.
///
/// Anything that is not wrapped in a `Failure` and reaches the top of a command is
/// treated by the command as its own default (usage for argument errors, aborted for
/// rotation steps).
#[derive(Debug)]
pub struct Failure {
    pub outcome: Outcome,
    pub message: String,
}

impl Failure {
    pub fn new(outcome: Outcome, message: impl Into<String>) -> Failure {
        Failure {
            outcome,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Outcome::Usage, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_avoid_reserved_numbers() {
        let mut seen = std::collections::HashSet::new();
        for o in Outcome::ALL {
            assert!(seen.insert(o.code()), "{o} reuses {}", o.code());
            assert!(![1, 101, 126, 127].contains(&o.code()) && o.code() < 128);
            assert_eq!(Outcome::from_code(i64::from(o.code())), Some(o));
        }
    }
}
