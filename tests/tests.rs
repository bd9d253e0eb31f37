//! Integration tests: one binary, one module per area. Every test drives the real
//! `keyrotate` binary in its own temporary folder (see `common`).

mod common;

mod attacks;
mod cli_and_config;
mod command_backend;
mod commands;
mod config_narrow;
mod config_scope;
mod consumer_snapshot;
mod controlm_flow;
#[cfg(feature = "failpoints")]
mod crash;
mod dry_equals_real;
mod dry_run;
mod failure_model;
mod group_access;
mod hardening;
mod hook_safety;
mod hygiene;
#[cfg(feature = "failpoints")]
mod inspection_reuse;
mod keystore;
#[cfg(feature = "failpoints")]
mod keystore_safety;
mod layering;
mod ledger_cost;
mod ledger_wal;
mod lifecycle;
mod msrv;
mod observability;
mod operator_safety;
mod output_errors;
#[cfg(feature = "failpoints")]
mod perf_attacks;
mod pg_dba;
mod pg_fencing;
mod pg_hook;
mod pkcs11;
mod pkcs11_attacks;
#[cfg(feature = "failpoints")]
mod pkcs11_crash;
mod postgres;
#[cfg(feature = "failpoints")]
mod power_loss;
#[cfg(feature = "failpoints")]
mod revoke;
#[cfg(feature = "failpoints")]
mod revoke_attacks;
mod rotate;
mod shared_faults;
#[cfg(feature = "failpoints")]
mod shared_lifecycle;
mod shared_pkcs11_kek;
mod shared_store;
#[cfg(feature = "failpoints")]
mod shared_storm;
#[cfg(feature = "failpoints")]
mod staging_at_admission;
mod startup;
mod static_build;
#[cfg(feature = "failpoints")]
mod threads_and_locks;
