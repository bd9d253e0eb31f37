//! Property tests ("fuzzing" with proptest) of the parsers that face untrusted input:
//! the config loader, `--deadline`, and domain names. They must never panic, must
//! report errors on one line, and must only accept what the contract allows.
//! `tests/corpus/` keeps hand-made hostile inputs that run through the binary.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use crate::config::{validate_domain_name, Config};
use crate::deadline::parse_when;

fn config_key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "designated_pool",
        "backend",
        "algorithm",
        "keystore",
        "retain",
        "activation",
        "command",
        "max_deadline",
        "min_interval",
        "dir",
        "pool",
        "file",
        "colour",
    ])
    .prop_map(str::to_string)
}

fn config_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z0-9 ./_-]{0,12}".prop_map(|s| format!("{s:?}")),
        prop::sample::select(vec![
            "\"ed25519\"",
            "\"keystore\"",
            "\"command\"",
            "[\"./x\"]",
            "[]",
            "true",
            "1.5",
            "{}",
            "\"1h\"",
            "\"-1s\""
        ])
        .prop_map(str::to_string),
    ]
}

/// Configs built from the real sections and keys with random values and structure.
fn structured_config() -> impl Strategy<Value = String> {
    let section = prop_oneof![
        Just("[state]".to_string()),
        Just("[host]".to_string()),
        Just("[audit]".to_string()),
        Just("[defaults]".to_string()),
        "[a-z.]{0,10}".prop_map(|d| format!("[domains.\"{d}\"]")),
        "[a-z]{1,6}".prop_map(|d| format!("[domains.{d}]")),
    ];
    prop::collection::vec(
        (section, prop::collection::vec((config_key(), config_value()), 0..6)),
        0..6,
    )
    .prop_map(|sections| {
        let mut text = String::new();
        for (header, pairs) in sections {
            text.push_str(&header);
            text.push('\n');
            for (k, v) in pairs {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_parser_never_panics_and_errors_are_one_line(text in prop_oneof![any::<String>(), structured_config()]) {
        match Config::parse(&text, Path::new("/etc/keyrotate/rotate.toml")) {
            Ok(c) => {
                prop_assert!(c.state_dir.is_absolute());
                for name in c.domains.keys() {
                    prop_assert!(validate_domain_name(name).is_ok());
                }
            }
            Err(e) => {
                prop_assert!(!e.contains('\n'), "multi-line error: {e}");
                prop_assert!(e.starts_with("config /etc/keyrotate/rotate.toml"), "{e}");
            }
        }
    }

    #[test]
    fn deadline_parser_never_panics_and_accepts_only_future(when in prop_oneof![
        any::<String>(),
        "-?[0-9]{1,25}(ns|us|ms|s|m|h|d|w|y|)",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})",
    ]) {
        let now = chrono::Utc::now();
        if let Ok(d) = parse_when(&when, now) {
            prop_assert!(d > Duration::ZERO);
        }
    }

    #[test]
    fn domain_names_accepted_are_safe_file_names(name in prop_oneof![any::<String>(), "[a-z0-9._/-]{0,70}"]) {
        if validate_domain_name(&name).is_ok() {
            prop_assert!((1..=64).contains(&name.len()));
            prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
            prop_assert!(name.as_bytes()[0].is_ascii_alphanumeric());
            prop_assert!(name != "." && name != ".." && !name.contains('/'));
        }
    }
}
