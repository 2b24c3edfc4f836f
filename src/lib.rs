//! drover: a declarative, config-driven multi-worker supervisor.
//!
//! The binary is a thin layer over this library; integration tests drive
//! the binary, unit tests drive the library.

pub mod cli;
pub mod commands;
pub mod config;
pub mod export;
pub mod ledger;
pub mod os;
pub mod supervisor;
