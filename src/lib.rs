//! keyrotate: rotate cryptographic keys and secrets safely as a single-shot job.
//!
//! The binary is the product (see README.md and DESIGN.md); the library exposes its
//! parts for the binary and its tests. Module map:
//!
//! - [`outcome`]: the exit-code table, the one source of the numbers;
//! - [`cli`] and `cmd`: the command line and one file per subcommand;
//! - [`config`]: `rotate.toml`; [`deadline`]: `--deadline` and its clock;
//! - [`lock`]: the per-domain OS lock; [`ledger`]: the rotation ledger (SQLite or PostgreSQL);
//! - [`keystore`]: the built-in key store (files, manifest, algorithms); [`kek`]: the
//!   shared store's key-encryption key and sealing;
//! - [`keyring`]: the read-only API applications use to load the keys (see its docs);
//! - [`backend`]: what one rotation does, per backend; [`guard`]: signals and deadline;
//! - [`shared`]: the shared key store on PostgreSQL, `sync` and the convergence gate;
//! - [`audit`]: the JSON audit trail; [`fsutil`]: durable, symlink-safe file writes;
//! - shared at the bottom: [`run`] (a run's identity), [`time`] (time formatting),
//!   [`due`] (the due-date rule), [`table`] (text tables).

// println!/eprintln! panic on a closed pipe (EPIPE), which would turn a finished
// rotation into exit 101: output goes through cmd's `out!` and the log, which ignore
// write errors.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod audit;
pub mod backend;
pub mod cli;
mod cmd;
pub mod config;
pub mod deadline;
pub mod due;
pub mod errout;
pub mod failpoint;
pub mod fsutil;
#[cfg(test)]
mod fuzz;
pub mod guard;
pub mod kek;
pub mod keyring;
pub mod keystore;
pub mod ledger;
pub mod lock;
pub mod outcome;
pub mod process;
pub mod run;
pub mod shared;
pub mod table;
pub mod time;

pub use cmd::main;
