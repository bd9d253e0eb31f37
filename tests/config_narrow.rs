//! A command that names a domain builds only the global tables and that domain's table
//! (issue 16): the other domains' tables are checked by TOML's grammar and blanked
//! line for line. What the full parse of the file would reject, it must still reject,
//! with the same one line naming the same line of the file; a domain written in any
//! other TOML form is still seen.

use crate::common::{Env, DEFAULT_CONFIG};

/// The first `config …` line of a command's stderr or stdout.
fn config_error(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.contains("config ") && l.contains("rotate.toml:"))
        .unwrap_or_else(|| panic!("no config error line in:\n{text}"));
    line[line.find("config ").unwrap()..].to_string()
}

#[test]
fn a_toml_error_in_another_domains_table_stops_every_command_with_the_full_parse_line() {
    for extra in [
        // A key given twice, a table given twice, a dotted key over a value, a bad
        // escape, a bad number, a key given twice in [defaults] after other domains.
        "[domains.zz]\nalgorithm = \"ed25519\"\nalgorithm = \"ed25519\"\n",
        "[domains.zz]\nalgorithm = \"ed25519\"\n\n[domains.zz]\nretain = 1\n",
        "[domains.zz]\nx = 1\nx.y = 2\n",
        "[domains.zz]\nalgorithm = \"ed\\q\"\n",
        "[domains.zz]\nretain = 1__0\n",
        "[domains.zz]\nretain = 1\n[domains.yy]\nretain = 2\n[defaults]\nretain = 1\n",
    ] {
        let env = Env::with_config(&format!("{DEFAULT_CONFIG}\n{extra}"));
        let check = env.cmd().arg("check").status(2);
        let whole = config_error(&format!("{}{}", check.stdout, check.stderr));
        for args in [
            &["rotate", "--domain", "sig", "--deadline", "1m"][..],
            &["status", "--domain", "sig"],
            &["history", "--domain", "sig"],
        ] {
            let out = env.cmd().args(args).status(2);
            assert_eq!(config_error(&out.stderr), whole, "{extra:?} {args:?}");
        }
        assert!(!env.path("state").exists(), "{extra:?}: a run touched the state folder");
    }
}

#[test]
fn an_error_below_thousands_of_left_out_tables_names_the_files_line() {
    let mut text = DEFAULT_CONFIG.to_string();
    for i in 0..2_000 {
        text.push_str(&format!("\n[domains.d{i:04}]\nalgorithm = \"ed25519\"\n# a comment\n"));
    }
    text.push_str("\n[domains.last]\nretain = \"two\"\n");
    let line = text.lines().count();
    let env = Env::with_config(&text);
    env.rotate("d0007").status(0);
    env.rotate("d1999").status(0);
    let out = env.rotate("last").status(2);
    assert!(out.stderr.contains("domains.last.retain"), "{}", out.stderr);
    // A TOML error there: the line number counts every blanked line.
    let env = Env::with_config(&format!("{text}retain = 3\n"));
    let out = env.rotate("d0001").status(2);
    assert!(
        out.stderr.contains(&format!("rotate.toml:{}:", line + 1)),
        "line {}: {}",
        line + 1,
        out.stderr
    );
}

#[test]
fn domains_written_in_other_toml_forms_are_still_configured() {
    // Dotted keys in the root table and an inline table under [domains] define domains
    // too; the narrowed load leaves such files to the full parse.
    let text = format!(
        "domains.dotted.algorithm = \"ed25519\"\n{DEFAULT_CONFIG}\n[domains.inline]\nalgorithm = \"ed25519\"\nsub = {{ a = 1 }}\n"
    );
    let env = Env::with_config(&text);
    env.rotate("dotted").status(0);
    env.rotate("sig").status(0);
    let out = env.rotate("inline").status(2);
    assert!(out.stderr.contains("domains.inline.sub"), "{}", out.stderr);
    let out = env.rotate("nope").status(2);
    for d in ["dotted", "inline", "sig", "pre"] {
        assert!(out.stderr.contains(d), "{d}: {}", out.stderr);
    }
}
