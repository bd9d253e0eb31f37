//! The PostgreSQL ledger URL as the driver reads it, and the credentials libpq users
//! expect around it.
//!
//! - [`split`] cuts a URL where the driver does: the user-info runs to the *first*
//!   `@`, whatever it holds (`/`, `?`, `#`, `:` included), so redaction and TLS options
//!   never disagree with what is sent to the server.
//! - [`redact`] is the only form of a URL that reaches a message: the password in the
//!   user-info and every `password=` parameter are masked.
//! - [`check`] refuses what would be read differently from what the operator meant
//!   (an unencoded `@` in the password), without echoing the URL.
//! - [`password_from_file`] reads a libpq password file (`PGPASSFILE`, else
//!   `~/.pgpass`) with libpq's rules.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A URL cut into the driver's parts.
pub(super) struct Parts<'a> {
    /// `postgres://` or `postgresql://`
    pub scheme: &'a str,
    /// Everything before the first `@`, if there is one.
    pub userinfo: Option<&'a str>,
    /// Hosts, ports, database and query: everything after the user-info.
    pub rest: &'a str,
}

impl Parts<'_> {
    /// The host list (`host[:port][,host[:port]]…`): up to the path or query.
    pub fn hosts(&self) -> &str {
        let end = self.rest.find(['/', '?']).unwrap_or(self.rest.len());
        &self.rest[..end]
    }

    /// The query string, without its `?`.
    pub fn query(&self) -> &str {
        self.rest.split_once('?').map_or("", |(_, q)| q)
    }

    /// The URL up to (not including) its query.
    pub fn base(&self) -> String {
        let before_query = self.rest.split_once('?').map_or(self.rest, |(b, _)| b);
        match self.userinfo {
            Some(u) => format!("{}{u}@{before_query}", self.scheme),
            None => format!("{}{before_query}", self.scheme),
        }
    }

    /// Whether every host it names is a Unix-domain socket folder (a path, `%2F…` in
    /// the host part or `host=/…` in the query).
    pub fn unix_socket_only(&self) -> bool {
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let in_query: Vec<String> = pairs(self.query())
            .filter(|(k, _)| k == "host")
            .map(|(_, v)| v)
            .collect();
        let hosts: Vec<String> = if !in_query.is_empty() {
            in_query.iter().flat_map(|h| h.split(',')).map(str::to_string).collect()
        } else {
            self.hosts()
                .split(',')
                .map(|chunk| decode(chunk.split(':').next().unwrap_or("")))
                .collect()
        };
        !hosts.is_empty() && hosts.iter().all(|h| h.starts_with('/'))
    }
}

/// The query's `key=value` pairs, both percent-decoded.
pub(super) fn pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    query.split('&').filter(|p| !p.is_empty()).map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k), decode(v))
    })
}

/// Cuts `url` as the driver does. `None` when it is not a `postgres://` URL.
pub(super) fn split(url: &str) -> Option<Parts<'_>> {
    let scheme_len = ["postgres://", "postgresql://"]
        .iter()
        .find(|p| url.starts_with(*p))?
        .len();
    let (scheme, after) = url.split_at(scheme_len);
    Some(match after.split_once('@') {
        Some((userinfo, rest)) => Parts {
            scheme,
            userinfo: Some(userinfo),
            rest,
        },
        None => Parts {
            scheme,
            userinfo: None,
            rest: after,
        },
    })
}

/// The URL as messages show it: the user name kept, every password masked.
pub(super) fn redact(url: &str) -> String {
    let Some(p) = split(url) else {
        // Not a URL the driver reads: show nothing of it rather than guess.
        return "(the configured ledger URL)".to_string();
    };
    let mut out = p.scheme.to_string();
    if let Some(u) = p.userinfo {
        match u.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{u}@")),
        }
    }
    match p.rest.split_once('?') {
        None => out.push_str(p.rest),
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| {
                    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                    let key_text = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
                    if key_text.eq_ignore_ascii_case("password") {
                        format!("{key}=***")
                    } else {
                        pair.to_string()
                    }
                })
                .collect();
            out.push_str(&masked.join("&"));
        }
    }
    out
}

/// Refuses a URL whose password would be cut short (an unencoded `@` in it), naming
/// the fix and never the URL.
pub(super) fn check(url: &str) -> Result<(), String> {
    let Some(p) = split(url) else {
        return Err("expected a postgres:// or postgresql:// URL".into());
    };
    if p.userinfo.is_some() && p.hosts().contains('@') {
        return Err("the user name or password holds an unencoded '@' (write it as %40), \
             or better, move the password to a password file (PGPASSFILE or ~/.pgpass)"
            .into());
    }
    Ok(())
}

/// One password file line's fields, or `None` for comments, blank and short lines.
fn fields(line: &str) -> Option<Vec<String>> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    out.last_mut().expect("one field").push(next);
                }
            }
            ':' => out.push(String::new()),
            c => out.last_mut().expect("one field").push(c),
        }
    }
    // libpq ends the password at the next unescaped ':' and ignores the rest.
    (out.len() >= 5).then_some(out)
}

/// What a connection is looked up by: libpq's `host:port:database:username`.
pub(super) struct Lookup<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
}

/// The first matching password in `text` (a password file's content).
fn find(text: &str, want: &Lookup<'_>) -> Option<String> {
    // libpq reads a Unix socket folder as "localhost" when it is the default one; the
    // default differs between builds, so both spellings match the usual folders.
    let default_socket = ["/tmp", "/var/run/postgresql", "/run/postgresql"].contains(&want.host.trim_end_matches('/'));
    let host_ok = |field: &str| field == "*" || field == want.host || (default_socket && field == "localhost");
    let port = want.port.to_string();
    text.lines().filter_map(fields).find_map(|f| {
        let ok = host_ok(&f[0])
            && (f[1] == "*" || f[1] == port)
            && (f[2] == "*" || f[2] == want.database)
            && (f[3] == "*" || f[3] == want.user);
        ok.then(|| f[4].clone())
    })
}

/// The password file libpq would read: `PGPASSFILE`, else `~/.pgpass`.
fn password_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".pgpass"))
}

/// The password for `want` from the password file, as libpq finds it: the file is
/// ignored (with a warning) unless it is a regular file that neither group nor others
/// may read or write; the first matching line wins.
pub(super) fn password_from_file(want: &Lookup<'_>) -> Option<String> {
    let path = password_file()?;
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(_) => return None,
    };
    if !meta.is_file() {
        tracing::warn!("password file {} is not a plain file: ignored", path.display());
        return None;
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access (mode {:04o}): ignored; permissions should be u=rw (0600) or less",
            path.display(),
            meta.mode() & 0o7777
        );
        return None;
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => find(&text, want),
        Err(e) => {
            tracing::warn!(
                "password file {}: {}: ignored",
                path.display(),
                crate::fsutil::io_reason(&e)
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_password_form_is_masked() {
        for (url, shown) in [
            (
                "postgres://kr:s3cret@db:5432/ledger",
                "postgres://kr:***@db:5432/ledger",
            ),
            ("postgres://kr@db/ledger", "postgres://kr@db/ledger"),
            (
                "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/db",
                "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/db",
            ),
            ("postgresql://a:b:c@h/d", "postgresql://a:***@h/d"),
            ("postgres://kr:pa/ss?w#x@db/ledger", "postgres://kr:***@db/ledger"),
            ("postgres://kr:pa%2Fss@db/ledger", "postgres://kr:***@db/ledger"),
            (
                "postgres://kr@db/ledger?sslmode=require&password=s/e:c@r#e?t",
                "postgres://kr@db/ledger?sslmode=require&password=***",
            ),
            (
                "postgres://kr@db/ledger?Password=x&a=b",
                "postgres://kr@db/ledger?Password=***&a=b",
            ),
            (
                "postgres://kr@db/ledger?pass%77ord=x",
                "postgres://kr@db/ledger?pass%77ord=***",
            ),
            ("mysql://kr:x@db", "(the configured ledger URL)"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn an_unencoded_at_sign_in_the_password_is_refused() {
        let e = check("postgres://kr:p@ss@db/ledger").unwrap_err();
        assert!(e.contains("%40") && !e.contains("p@ss"), "{e}");
        check("postgres://kr:p%40ss@db/ledger").unwrap();
        check("postgres://kr:pa/ss@db/ledger").unwrap();
        check("postgres://db/ledger?application_name=a@b").unwrap();
    }

    #[test]
    fn unix_sockets_are_recognised() {
        let sock = |u: &str| split(u).unwrap().unix_socket_only();
        assert!(sock("postgres://kr@%2Fvar%2Frun%2Fpostgresql/db?sslmode=require"));
        assert!(sock("postgres://kr@/db?host=/var/run/postgresql"));
        assert!(sock("postgres://kr@/db?host=%2Ftmp"));
        assert!(!sock("postgres://kr@db/db?sslmode=require"));
        assert!(!sock("postgres://kr@%2Ftmp,db/db"));
    }

    fn look<'a>(host: &'a str, port: u16, database: &'a str, user: &'a str) -> Lookup<'a> {
        Lookup {
            host,
            port,
            database,
            user,
        }
    }

    #[test]
    fn password_files_match_as_libpq_does() {
        let text = "# comment\n\
            \n\
            short:line\n\
            db.example:5432:ledger:kr:first\n\
            db.example:*:ledger:kr:second\n\
            *:*:*:other:with\\:colon\\\\and:more\n\
            localhost:5432:*:sock:socket-pw\n\
            /srv/pg:5432:*:sock:custom-dir\n\
            h\\:x:5432:*:*:escaped-host\n";
        let f = |h, p, d, u| find(text, &look(h, p, d, u));
        assert_eq!(f("db.example", 5432, "ledger", "kr").as_deref(), Some("first"));
        assert_eq!(f("db.example", 6432, "ledger", "kr").as_deref(), Some("second"));
        assert_eq!(f("db.example", 5432, "other", "kr"), None);
        assert_eq!(f("x", 1, "y", "other").as_deref(), Some("with:colon\\and"));
        assert_eq!(
            f("/var/run/postgresql", 5432, "d", "sock").as_deref(),
            Some("socket-pw")
        );
        assert_eq!(f("/srv/pg", 5432, "d", "sock").as_deref(), Some("custom-dir"));
        assert_eq!(f("h:x", 5432, "d", "anyone").as_deref(), Some("escaped-host"));
        assert_eq!(f("DB.example", 5432, "ledger", "kr"), None, "host names match exactly");
    }
}
