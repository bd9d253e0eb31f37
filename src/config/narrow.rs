//! A command that names one domain reads the whole config file but builds only the
//! parts it uses: the file is checked by TOML's own grammar (`toml_parser`: every
//! token, key and value decoded, no tree built), and the `[domains.NAME]` tables of the
//! other domains are blanked out (their lines kept, empty) before the full TOML parser
//! builds the rest. With 5,000 domains, building every domain's table cost more than
//! the rotation itself.
//!
//! Anything this scan does not prove harmless sends the caller back to parsing the
//! whole file (`None`), which then reports the problem exactly as before: a syntax
//! error anywhere, a table defined twice, a key given twice in a left-out table, and any
//! form of domain the scan does not follow (`[domains]` with keys, dotted
//! `domains.x.y = …` keys, `[domains.x.sub]` or `[[domains…]]` tables, inline tables).

use std::borrow::Cow;
use std::collections::HashSet;

use toml_parser::parser::{Event, EventKind, RecursionGuard, ValidateWhitespace};
use toml_parser::{ParseError, Source};

/// The config text with the other domains' tables blanked, and their names.
pub(super) struct Narrowed {
    /// Same lines as the file (so a line number in an error still names the file's line).
    pub text: String,
    /// The domains whose tables were left out, in file order.
    pub left_out: Names,
}

/// Names in one buffer: thousands of them cost two allocations, not thousands.
#[derive(Clone, Debug, Default)]
pub(super) struct Names {
    all: String,
    ends: Vec<usize>,
}

impl Names {
    fn push(&mut self, name: &str) {
        self.all.push_str(name);
        self.ends.push(self.all.len());
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(s, &e)| &self.all[s..e])
    }
}

/// Nesting depth the full parser also allows (toml's own limit).
const DEPTH: u32 = 80;

/// Where the tables of the domains other than `keep` start and end, or `None` when the
/// file must be parsed whole (see the module doc).
pub(super) fn narrow(text: &str, keep: &str) -> Option<Narrowed> {
    let source = Source::new(text);
    let tokens = source.lex().into_vec();
    let mut events: Vec<Event> = Vec::with_capacity(tokens.len());
    let mut errors: Vec<ParseError> = Vec::new();
    {
        let mut whitespace = ValidateWhitespace::new(&mut events, source);
        let mut receiver = RecursionGuard::new(&mut whitespace, DEPTH);
        toml_parser::parser::parse_document(&tokens, &mut receiver, &mut errors);
    }
    if !errors.is_empty() {
        return None;
    }
    let mut scan = Scan {
        source,
        domains: Vec::new(),
        others: HashSet::new(),
        table: Table::Root,
        keys: Vec::new(),
        cut: Vec::new(),
    };
    let mut i = 0;
    while i < events.len() {
        i = scan.event(&events, i, keep)?;
    }
    scan.close_table(text.len());
    // A domain's table given twice is an error the full parse reports.
    let mut sorted: Vec<&str> = scan.domains.iter().map(|(n, _)| n.as_ref()).collect();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let mut left_out = Names::default();
    for (name, _) in scan.domains.iter().filter(|(_, out)| *out) {
        left_out.push(name);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in scan.cut {
        out.push_str(&text[at..start]);
        out.extend(text[start..end].matches('\n'));
        at = end;
    }
    out.push_str(&text[at..]);
    Some(Narrowed { text: out, left_out })
}

/// The table the scan is in.
enum Table {
    Root,
    /// `[domains]` itself: keys there define domains in a form the scan leaves whole.
    Domains,
    /// `[domains.NAME]` of a domain left out, from where its header starts.
    LeftOut(usize),
    /// Any other table, kept as it is.
    Kept,
}

/// A dotted key as the scan needs it: its first two parts (decoded) and its length.
struct Key<'i> {
    first: Cow<'i, str>,
    second: Option<Cow<'i, str>>,
    len: usize,
}

struct Scan<'i> {
    source: Source<'i>,
    /// Every `[domains.NAME]` header, and whether its table is left out.
    domains: Vec<(Cow<'i, str>, bool)>,
    /// Every other table header (few): one given twice is an error of the file.
    others: HashSet<Vec<Cow<'i, str>>>,
    table: Table,
    /// The keys of the left-out table being scanned.
    keys: Vec<Cow<'i, str>>,
    /// Byte ranges to blank.
    cut: Vec<(usize, usize)>,
}

impl<'i> Scan<'i> {
    /// Handles the event at `i`; the index of the next one, or `None` to parse whole.
    fn event(&mut self, events: &[Event], i: usize, keep: &str) -> Option<usize> {
        let e = &events[i];
        match e.kind() {
            EventKind::StdTableOpen | EventKind::ArrayTableOpen => {
                let (key, next) = self.key(events, i + 1)?;
                self.close_table(e.span().start());
                let array = e.kind() == EventKind::ArrayTableOpen;
                self.table = match (key.first.as_ref(), key.second) {
                    ("domains", _) if array || key.len > 2 => return None,
                    ("domains", None) => Table::Domains,
                    ("domains", Some(name)) => {
                        let out = name != keep;
                        self.domains.push((name, out));
                        if out {
                            self.keys.clear();
                            Table::LeftOut(e.span().start())
                        } else {
                            Table::Kept
                        }
                    }
                    _ if array => Table::Kept,
                    _ => {
                        // Rare (the global sections): the whole path, for duplicates.
                        let path = self.path(events, i + 1)?;
                        if !self.others.insert(path) {
                            return None;
                        }
                        Table::Kept
                    }
                };
                Some(next)
            }
            EventKind::SimpleKey => {
                let (key, next) = self.key(events, i)?;
                match self.table {
                    Table::Root if key.first == "domains" => return None,
                    Table::Domains => return None,
                    Table::LeftOut(_) => {
                        // Only plain keys, each once: anything else (dotted keys, a key
                        // given twice) is left to the full parse.
                        if key.len != 1 || self.keys.contains(&key.first) {
                            return None;
                        }
                        self.keys.push(key.first);
                    }
                    _ => {}
                }
                Some(next)
            }
            EventKind::InlineTableOpen if matches!(self.table, Table::LeftOut(_)) => None,
            EventKind::Scalar => {
                let raw = self.source.get(e)?;
                let mut errors: Vec<ParseError> = Vec::new();
                let mut value = Cow::Borrowed("");
                let _kind = raw.decode_scalar(&mut value, &mut errors);
                errors.is_empty().then_some(i + 1)
            }
            EventKind::Error => None,
            _ => Some(i + 1),
        }
    }

    /// The decoded dotted key starting at `i` (a header's or a key-value's), and the
    /// index of the event after its last part.
    fn key(&self, events: &[Event], mut i: usize) -> Option<(Key<'i>, usize)> {
        let mut key: Option<Key<'i>> = None;
        while let Some(e) = events.get(i) {
            match e.kind() {
                EventKind::SimpleKey => {
                    let part = self.decode_key(e)?;
                    match &mut key {
                        None => {
                            key = Some(Key {
                                first: part,
                                second: None,
                                len: 1,
                            })
                        }
                        Some(k) => {
                            if k.len == 1 {
                                k.second = Some(part);
                            }
                            k.len += 1;
                        }
                    }
                }
                EventKind::KeySep | EventKind::Whitespace => {}
                _ => break,
            }
            i += 1;
        }
        key.map(|k| (k, i))
    }

    /// Every part of the dotted key starting at `i`, decoded.
    fn path(&self, events: &[Event], i: usize) -> Option<Vec<Cow<'i, str>>> {
        let mut path = Vec::new();
        for e in &events[i..] {
            match e.kind() {
                EventKind::SimpleKey => path.push(self.decode_key(e)?),
                EventKind::KeySep | EventKind::Whitespace => {}
                _ => break,
            }
        }
        Some(path)
    }

    fn decode_key(&self, e: &Event) -> Option<Cow<'i, str>> {
        let raw = self.source.get(e)?;
        // A bare key of the plainest kind is its own text (TOML's unquoted-key rule);
        // anything else is decoded by the grammar's decoder. Half the scan's time went
        // to decoding the thousands of `[domains.NAME]` headers.
        let bare = raw.as_str();
        if e.encoding().is_none()
            && !bare.is_empty()
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Some(Cow::Borrowed(bare));
        }
        let mut errors: Vec<ParseError> = Vec::new();
        let mut key = Cow::Borrowed("");
        raw.decode_key(&mut key, &mut errors);
        errors.is_empty().then_some(key)
    }

    /// Ends the current table at byte `end`: a left-out one is blanked to there.
    fn close_table(&mut self, end: usize) {
        if let Table::LeftOut(start) = self.table {
            self.cut.push((start, end));
        }
        self.table = Table::Kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_domains_are_blanked_line_for_line() {
        let text = "[state]\ndir = \"s\"\n\n[domains.a]\nretain = 2\n# note\n\n[domains.b]\nretain = 3\n[domains.c]\nalgorithm = \"ed25519\"\n";
        let n = narrow(text, "b").unwrap();
        assert_eq!(n.left_out.iter().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(n.text.lines().count(), text.lines().count());
        assert!(n.text.contains("[domains.b]\nretain = 3\n"));
        assert!(!n.text.contains("[domains.a]") && !n.text.contains("ed25519"));
        assert!(n.text.starts_with("[state]\ndir = \"s\"\n\n"));
    }

    #[test]
    fn anything_unusual_is_left_to_the_full_parse() {
        let base = "[state]\ndir = \"s\"\n[domains.b]\nretain = 1\n";
        for extra in [
            "[domains.a]\nretain = 1\nretain = 2\n",         // a key given twice
            "[domains.a]\nretain = 1\n[domains.a]\nx = 1\n", // a table given twice
            "[domains.b]\nx = 1\n",                          // the kept one twice
            "[domains.a]\nretain = 1\n[domains.\"a\"]\n",    // spelled another way
            "[domains.a]\nx.y = 1\n",                        // dotted key
            "[domains.a.sub]\nx = 1\n",                      // sub-table
            "[[domains.a]]\nx = 1\n",                        // array of tables
            "[domains]\na = { retain = 1 }\n",               // keys in [domains]
            "[domains.a]\nx = { y = 1, y = 2 }\n",           // inline table
            "[domains.a]\nx = \"\\q\"\n",                    // bad escape
            "[domains.a]\nx = 1__0\n",                       // bad number
            "[domains.a]\nx = \"open\n",                     // unterminated string
            "[domains.a\n",                                  // broken header
        ] {
            assert!(narrow(&format!("{base}{extra}"), "b").is_none(), "{extra:?}");
        }
        assert!(narrow("domains.a.retain = 1\n[state]\ndir = \"s\"\n", "b").is_none());
    }
}
