//! A SoftHSM2 token made fresh for one test, in the test's own folder: a
//! `softhsm2.conf` whose `directories.tokendir` is `<env>/tokens`, handed to every
//! child through `SOFTHSM2_CONF`, and a token initialised with `softhsm2-util`. The
//! tests never load the module themselves (its configuration is read once per
//! process); they drive the real binary, the examples and `pkcs11-tool`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{Env, Run};

/// Where Debian and other distributions put the module.
const MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

pub const TOKEN: &str = "keyrotate-test";
/// Distinctive, so that a test can prove it never shows up anywhere.
pub const PIN: &str = "pin-5e1f09c3";
const SO_PIN: &str = "so-pin-77";

pub struct Hsm {
    pub module: PathBuf,
    pub conf: PathBuf,
}

fn on_path(tool: &str) -> bool {
    Command::new(tool).arg("--help").output().is_ok()
}

/// The module, or `None` after printing why the test is skipped.
pub fn module(test: &str) -> Option<PathBuf> {
    let found = MODULES.iter().map(PathBuf::from).find(|p| p.is_file());
    match found {
        Some(m) if on_path("softhsm2-util") && on_path("pkcs11-tool") => Some(m),
        Some(_) => {
            println!("SKIPPED {test}: softhsm2-util or pkcs11-tool (opensc) is not installed");
            None
        }
        None => {
            println!("SKIPPED {test}: no SoftHSM2 module (Debian package softhsm2) in {MODULES:?}");
            None
        }
    }
}

/// The `[pkcs11]` table and the head of a config whose domains rotate without a
/// minimum interval; `domains` follows it.
pub fn config(module: &Path, domains: &str) -> String {
    format!(
        r#"
[state]
dir = "state"
[host]
pool = "p"
[defaults]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
min_interval = "0s"
retain = 1
[pkcs11]
module = "{}"
token = "{TOKEN}"
pin_file = "pin"
{domains}
"#,
        module.display()
    )
}

impl Hsm {
    /// A token in `env`'s folder, and the PIN file (0600) the config names. `None`
    /// (after SKIPPED) without SoftHSM2. `extra_conf` is added to `softhsm2.conf`.
    pub fn new(env: &Env, test: &str, extra_conf: &str) -> Option<Hsm> {
        let module = module(test)?;
        let hsm = Hsm::adopt(env, &module, extra_conf);
        std::fs::create_dir_all(env.path("tokens")).unwrap();
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                TOKEN,
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ])
            .env("SOFTHSM2_CONF", &hsm.conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        write_pin(env, PIN);
        Some(hsm)
    }

    /// The token of a copied test folder: its `softhsm2.conf` pointed at the copy.
    pub fn adopt(env: &Env, module: &Path, extra_conf: &str) -> Hsm {
        let conf = env.path("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n{extra_conf}\n",
                env.path("tokens").display()
            ),
        )
        .unwrap();
        Hsm {
            module: module.to_path_buf(),
            conf,
        }
    }

    /// `run` with this token visible to the child.
    pub fn with<'a>(&self, run: Run<'a>) -> Run<'a> {
        run.env("SOFTHSM2_CONF", &self.conf)
    }

    /// A command (an example, a tool) with this token visible.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", &self.conf);
        c
    }

    /// `pkcs11-tool` logged in to the token.
    pub fn tool(&self, args: &[&str]) -> Output {
        self.command("pkcs11-tool")
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", TOKEN, "--login", "--pin", PIN])
            .args(args)
            .output()
            .unwrap()
    }

    /// The labels of every object in the token, sorted (one per object).
    pub fn labels(&self) -> Vec<String> {
        let out = self.tool(&["--list-objects"]);
        assert!(
            out.status.success(),
            "pkcs11-tool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut labels: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(|l| l.trim().to_string())
            .collect();
        labels.sort();
        labels
    }

    /// The object listing's block for `label` (class, usage, access flags).
    pub fn describe(&self, label: &str) -> String {
        let out = self.tool(&["--list-objects", "--label", label]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Writes the PIN file the config names (0600).
pub fn write_pin(env: &Env, pin: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = env.path("pin");
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
