//! Secret hygiene: rotate every algorithm with verbose text and JSON logs, run every
//! read command, and prove that no fragment of any key file (PEM body, base64, hex,
//! byte-array debug form) appears in stdout, stderr, the audit file, the lock files or
//! any column of the ledger.

use base64::Engine;

use crate::common::{Env, ALL_ALGORITHMS};

/// Every algorithm (RSA-2048 stands for RSA), plus a pre-published domain; retain 1
/// so that destroyed versions are part of the history too.
fn config() -> String {
    ALL_ALGORITHMS
        .replace(
            "[domains.rsa3072]\nalgorithm = \"rsa-3072\"\n[domains.rsa4096]\nalgorithm = \"rsa-4096\"\n",
            "",
        )
        .replace("min_interval = \"0s\"", "min_interval = \"0s\"\nretain = 1")
        + "[domains.pre]\nalgorithm = \"ed25519\"\nactivation = \"prepublish\"\n"
}

/// Every form in which a key's secret bytes could leak.
fn fragments(file_text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b64: String = file_text.lines().filter(|l| !l.starts_with("-----")).collect();
    let raw = base64::engine::general_purpose::STANDARD.decode(&b64).unwrap();
    // The secret: an EC private scalar follows `02 01 01 04 <len>` (ECPrivateKey's
    // version and OCTET STRING); elsewhere it ends the encoding (the Ed25519 seed,
    // RSA's last CRT coefficient, the raw symmetric key).
    let secret = raw
        .windows(5)
        .position(|w| w[..4] == [2, 1, 1, 4] && (w[4] == 32 || w[4] == 48))
        .map(|i| &raw[i + 5..i + 5 + raw[i + 4] as usize])
        .unwrap_or(&raw[raw.len().saturating_sub(32)..]);
    for line in file_text.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16) {
        out.push(line[line.len() - 16..].to_string());
    }
    out.push(b64[b64.len() - 24..].to_string());
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    out.push(hex[..32].to_string());
    out.push(hex[hex.len() - 32..].to_string());
    out.push(hex.to_uppercase()[..32].to_string());
    let debug = format!("{:?}", &secret[secret.len() - 8..]);
    out.push(debug.trim_start_matches('[').trim_end_matches(']').to_string());
    out.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&secret[secret.len() - 18..]));
    out
}

#[test]
fn no_key_material_reaches_output_logs_audit_or_ledger() {
    let env = Env::with_config(&config());
    let mut transcript = String::new();
    let domains = ["ed25519", "p256", "p384", "rsa2048", "hmac", "aes", "pre"];
    for domain in domains {
        for args in [vec!["-vv", "--log-format", "json"], vec!["-vv"]] {
            let out = env
                .cmd()
                .args(args)
                .args(["rotate", "--domain", domain, "--deadline", "1m", "--output", "json"])
                .status(0);
            transcript.push_str(&out.stdout);
            transcript.push_str(&out.stderr);
        }
        let out = env
            .cmd()
            .args(["-vv", "rotate", "--domain", domain, "--deadline", "1m", "--dry-run"])
            .status(0);
        transcript.push_str(&out.stdout);
        transcript.push_str(&out.stderr);
    }
    // A failure path too: a damaged key store's diagnosis must not quote the file.
    let victim = env.key_dir("hmac").join("v000002.key");
    let good = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").unwrap();
    let out = env
        .cmd()
        .args(["-vv", "rotate", "--domain", "hmac", "--deadline", "1m"])
        .status(4);
    transcript.push_str(&out.stdout);
    transcript.push_str(&out.stderr);
    std::fs::write(&victim, &good).unwrap();
    for cmd in [
        vec!["status", "--output", "json"],
        vec!["status"],
        vec!["history", "--output", "json"],
        vec!["history"],
        vec!["check"],
    ] {
        let out = env.cmd().args(["-vv"]).args(cmd).output();
        transcript.push_str(&out.stdout);
        transcript.push_str(&out.stderr);
    }
    transcript.push_str(&std::fs::read_to_string(env.path("state/audit.jsonl")).unwrap());
    for lock in std::fs::read_dir(env.path("state/locks")).unwrap() {
        transcript.push_str(&std::fs::read_to_string(lock.unwrap().path()).unwrap());
    }
    for row in env.rows() {
        transcript.push_str(&row.to_string());
    }
    let conn = rusqlite::Connection::open(env.path("state/ledger.sqlite3")).unwrap();
    let mut stmt = conn
        .prepare("SELECT run_id || ' ' || at || ' ' || phase || ' ' || coalesce(detail, '') FROM rotation_events")
        .unwrap();
    for e in stmt.query_map([], |r| r.get::<_, String>(0)).unwrap() {
        transcript.push_str(&e.unwrap());
    }

    let mut checked = 0;
    for domain in domains {
        for file in env.key_files(domain) {
            let text = std::fs::read_to_string(env.key_dir(domain).join(&file)).unwrap();
            for fragment in fragments(&text) {
                assert!(!transcript.contains(&fragment), "{domain}/{file}: {fragment:?} leaked");
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "only {checked} fragments checked");
    assert!(
        transcript.contains("rotation.succeeded") && transcript.contains("sha256:"),
        "the transcript is not what was expected"
    );
}

#[test]
fn key_types_do_not_reveal_themselves_in_debug_output() {
    for alg in keyrotate::keystore::Algorithm::ALL
        .into_iter()
        .filter(|a| !a.name().starts_with("rsa-3") && !a.name().starts_with("rsa-4"))
    {
        let key = alg.generate().unwrap();
        let text = String::from_utf8(key.file_bytes().to_vec()).unwrap();
        let debug = format!("{key:?}");
        for fragment in fragments(&text) {
            assert!(!debug.contains(&fragment), "{alg}: Debug shows {fragment:?}");
        }
        assert!(debug.contains(key.fingerprint()));
    }
}
