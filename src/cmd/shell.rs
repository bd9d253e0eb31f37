//! `keyrotate completions SHELL` and `keyrotate manpage`: generated from the clap
//! definitions in `cli.rs`, so they can never drift from the real command line.

use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManpageArgs, Shell};
use crate::outcome::{Failure, Outcome};

pub fn completions(args: &CompletionsArgs) -> Outcome {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "keyrotate", &mut out);
    emit(&out)
}

pub fn manpage(args: &ManpageArgs) -> Outcome {
    if let Some(dir) = &args.dir {
        // One page per command, as `man keyrotate-rotate` expects; the main page's
        // SUBCOMMANDS section refers to them.
        return match std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir)) {
            Ok(()) => Outcome::Rotated,
            Err(e) => super::report_failure(&Failure::new(
                Outcome::Aborted,
                format!("man pages into {}: {}", dir.display(), crate::fsutil::io_reason(&e)),
            )),
        };
    }
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut out) {
        return super::report_failure(&Failure::new(Outcome::Aborted, format!("man page: {e}")));
    }
    emit(&out)
}

fn emit(bytes: &[u8]) -> Outcome {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Outcome::Rotated,
        Err(e) => super::report_failure(&Failure::new(
            Outcome::Aborted,
            format!("stdout: {}", crate::fsutil::io_reason(&e)),
        )),
    }
}
