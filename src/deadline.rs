//! `--deadline WHEN`: parsing, and the monotonic clock that enforces it.
//!
//! The deadline is given as wall-clock time (a duration from now or an RFC 3339
//! instant) because that is what a scheduler knows, but once computed it is enforced
//! on `Instant`, so a wall-clock jump (NTP step, DST) cannot stretch or shrink it.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// When this run must be finished by.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: DateTime<Utc>,
    instant: Instant,
}

impl Deadline {
    /// Parses WHEN relative to `now`, refusing zero, negative, past and over-long values.
    pub fn parse(when: &str, max: Duration) -> Result<Deadline, String> {
        let now = Utc::now();
        let start = Instant::now();
        let total = parse_when(when, now)?;
        if total > max {
            return Err(format!(
                "--deadline {when:?} is {} from now, longer than max_deadline {}",
                humantime::format_duration(round_secs(total)),
                humantime::format_duration(max)
            ));
        }
        let chrono_total =
            chrono::Duration::from_std(total).map_err(|_| format!("--deadline {when:?} is out of range"))?;
        Ok(Deadline {
            at: now + chrono_total,
            instant: start + total,
        })
    }

    pub fn at(&self) -> DateTime<Utc> {
        self.at
    }

    pub fn instant(&self) -> Instant {
        self.instant
    }

    pub fn remaining(&self) -> Duration {
        self.instant.saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Parses `WHEN` into the time left from `now`.
pub fn parse_when(when: &str, now: DateTime<Utc>) -> Result<Duration, String> {
    let when_trimmed = when.trim();
    if when_trimmed.is_empty() {
        return Err("--deadline is empty: give a duration (90s, 10m, 1h30m) or an RFC 3339 instant".into());
    }
    if when_trimmed.starts_with('-') {
        return Err(format!("--deadline {when:?} is negative: it must be in the future"));
    }
    if looks_like_instant(when_trimmed) {
        let at = DateTime::parse_from_rfc3339(when_trimmed)
            .map_err(|e| format!("--deadline {when:?} is not a valid RFC 3339 instant: {e}"))?
            .with_timezone(&Utc);
        return (at - now)
            .to_std()
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("--deadline {when:?} is in the past"));
    }
    let d = humantime::parse_duration(when_trimmed).map_err(|e| {
        format!("--deadline {when:?} is neither a duration (90s, 10m, 1h30m) nor an RFC 3339 instant: {e}")
    })?;
    if d.is_zero() {
        return Err(format!("--deadline {when:?} is zero: give the time the run may take"));
    }
    Ok(d)
}

fn looks_like_instant(s: &str) -> bool {
    s.len() >= 10 && s.as_bytes()[4] == b'-' && s[..4].bytes().all(|b| b.is_ascii_digit())
}

/// Parses a config or CLI duration such as `1d` or `90m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-25T19:00:00Z".parse().unwrap()
    }

    #[test]
    fn durations_and_instants() {
        assert_eq!(parse_when("90s", now()).unwrap(), Duration::from_secs(90));
        assert_eq!(parse_when("1h30m", now()).unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_when("2026-11-25T20:00:00Z", now()).unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_when("2026-11-25T21:00:00+01:00", now()).unwrap(),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn refuses_bad_values() {
        for bad in [
            "",
            "-5m",
            "0s",
            "soon",
            "2026-11-25T18:00:00Z",
            "2026-13-01T00:00:00Z",
            "99999999999999999999999h",
        ] {
            assert!(parse_when(bad, now()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn caps_at_max() {
        let e = Deadline::parse("2h", Duration::from_secs(3600)).unwrap_err();
        assert!(e.contains("max_deadline"), "{e}");
        assert!(Deadline::parse("10m", Duration::from_secs(3600)).is_ok());
    }
}
