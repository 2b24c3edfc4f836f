//! The command line, as DESIGN.md fixes it.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::load::CONFIG_ENV;

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "A declarative, config-driven multi-worker supervisor"
)]
pub struct Cli {
    /// The config file.
    #[arg(short = 'c', long = "config", global = true, env = CONFIG_ENV, default_value = "daemon.toml", value_name = "FILE")]
    pub config: PathBuf,

    /// Override a config key: a dotted path and a TOML value (else a
    /// string), e.g. `--set workers.web.capacity=4`. Repeatable; the last wins.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,

    /// Format of drover's own log lines (on stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate config files; exit 0 when all are valid, 1 otherwise.
    Check {
        /// Files to check (default: the -c file).
        files: Vec<PathBuf>,
        /// `json` prints diagnostics for machines (file, line, column, key, message).
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Print the JSON schema of daemon.toml.
    Schema,
    /// Print the effective config: the file with env and --set overrides
    /// applied and every default filled in.
    Config {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}
