//! Integration tests: one binary, one module per area. Every test drives the real
//! `keyrotate` binary in its own temporary folder (see `common`).

mod common;

mod cli_and_config;
mod command_backend;
mod commands;
#[cfg(feature = "failpoints")]
mod crash;
mod dry_run;
mod failure_model;
mod hardening;
mod hygiene;
mod keystore;
mod observability;
mod pg_hook;
mod postgres;
mod rotate;
