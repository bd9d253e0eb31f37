//! `rust-version` in Cargo.toml must be true: at least the highest `rust-version` any
//! locked dependency declares, or a toolchain that Cargo.toml admits fails to build
//! the locked tree. Read from `cargo metadata --locked`, so a dependency update that
//! raises the floor fails here, naming the dependency.

fn version(s: &str) -> Vec<u64> {
    s.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn rust_version_covers_the_locked_dependencies() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let packages = meta["packages"].as_array().expect("packages");
    let ours = packages
        .iter()
        .find(|p| p["name"] == env!("CARGO_PKG_NAME"))
        .and_then(|p| p["rust_version"].as_str())
        .expect("Cargo.toml declares rust-version");
    let (need, who) = packages
        .iter()
        .filter(|p| p["name"] != env!("CARGO_PKG_NAME"))
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?.to_string())))
        .max()
        .expect("dependencies declare rust-version");
    assert!(
        version(ours) >= need,
        "Cargo.toml says rust-version {ours}, but the locked dependency {who} needs {}",
        need.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
    );
}
