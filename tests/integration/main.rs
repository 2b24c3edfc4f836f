//! Integration tests: they run the built `drover` binary on real files and
//! real processes, each in its own temporary directory.

mod harness;

mod cgroups;
mod chaos;
mod chaos_ready;
mod check;
mod config_cmd;
mod containment;
mod control;
mod controls;
mod export;
mod faults;
mod identity;
mod jobs;
mod ledger_faults;
mod live;
mod memory;
mod metrics;
mod output;
mod readiness;
mod reload;
mod schema;
mod security;
mod sessions;
mod shell;
mod soak;
mod sockets;
mod state;
mod stopping;
mod supervise;
mod top;
mod worktree;
