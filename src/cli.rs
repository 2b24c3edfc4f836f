//! The command line, as DESIGN.md fixes it.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum, ValueHint};
use clap_complete::engine::ArgValueCandidates;

use crate::commands::completions::Names;
use crate::config::load::CONFIG_ENV;
use crate::supervisor::protocol::Target;

#[derive(Debug, Parser)]
#[command(name = "drover", version, about = "A declarative, config-driven multi-worker supervisor")]
pub struct Cli {
    /// The config file.
    #[arg(short = 'c', long = "config", global = true, env = CONFIG_ENV, default_value = "daemon.toml", value_name = "FILE", value_hint = ValueHint::FilePath)]
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

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum RunsAction {
    /// A run with its steps, times, exit and log.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued, waiting or running run, flow or session.
    Cancel { id: i64 },
    /// Continue a waiting flow, or restart a failed or cancelled one from
    /// its first step that did not succeed (a new run, linked to the old).
    Resume { id: i64 },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ExportTarget {
    /// Deployments for workers, CronJobs for jobs, Jobs for flows run by
    /// hand: multi-document YAML.
    Kubernetes {
        /// The image the commands run in.
        #[arg(long, default_value = "app:latest", value_name = "IMG")]
        image: String,
        /// The namespace of every object (else kubectl's current one).
        #[arg(long, value_name = "NS")]
        namespace: Option<String>,
        /// Prepended to every object name.
        #[arg(long, default_value = "", value_name = "P")]
        name_prefix: String,
        /// Where the config file's directory is in the image: each `dir`
        /// under it becomes the same path under this one.
        #[arg(long, value_name = "PATH")]
        workdir: Option<PathBuf>,
        /// Put the secret_env values into Secret objects (stringData);
        /// otherwise the Secrets are only referenced, and named on stderr.
        #[arg(long)]
        emit_secrets: bool,
        /// Write the output even when some keys cannot be expressed
        /// (listed as warnings).
        #[arg(long)]
        allow_lossy: bool,
        /// A file, or a directory (existing, or ending in /) to write into;
        /// default stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE|DIR")]
        out: Option<PathBuf>,
    },
    /// A template service per worker (P-NAME@.service) and a target
    /// starting its instances, a oneshot service and timer per job, and
    /// P.target wanting them all: `systemctl enable --now P.target`.
    Systemd {
        /// Every unit is named P-NAME…, the whole config P.target.
        #[arg(long, default_value = "drover", value_name = "P")]
        prefix: String,
        /// The oldest systemd the units must load on: 254 or later adds
        /// RestartSteps= and RestartMaxDelaySec= (the backoff's growth).
        /// Default 252, the oldest the output is verified on.
        #[arg(long, default_value_t = crate::export::systemd::OLDEST_VERIFIED, value_name = "N",
              value_parser = clap::value_parser!(u32).range(i64::from(crate::export::systemd::OLDEST_VERIFIED)..))]
        systemd_version: u32,
        /// Where the config file's directory is on the target machine:
        /// each path under it becomes the same path under this one.
        #[arg(long, value_name = "PATH")]
        workdir: Option<PathBuf>,
        /// Where the units will be installed; the secret env files
        /// (P-NAME.env) sit beside them and EnvironmentFile= names them there.
        #[arg(long, default_value = crate::export::systemd::DEFAULT_UNIT_DIR, value_name = "DIR")]
        unit_dir: PathBuf,
        /// Write the output even when some keys cannot be expressed
        /// (listed as warnings).
        #[arg(long)]
        allow_lossy: bool,
        /// The directory to write the units into (the secret env files only
        /// go there); default stdout, each file after a `### NAME` line.
        #[arg(short = 'o', long = "output", value_name = "DIR")]
        out: Option<PathBuf>,
    },
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
// Each command's arguments are built only when it is the one given: a
// client's start builds one command's, not some thirty's.
#[command(defer = true)]
pub enum Command {
    /// Run the supervisor (in the foreground unless --detach); with
    /// NAME[:INDEX]…, start those workers or instances in the running one.
    Start {
        /// Run in the background; return once the supervisor is ready
        /// (exit 0) or has failed to start (exit 1, with the reason).
        #[arg(long)]
        detach: bool,
        /// Workers (`web`) or instances (`web:1`) to start again after
        /// `drover stop NAME`, in the running supervisor.
        #[arg(value_name = "NAME[:INDEX]", conflicts_with = "detach", add = ArgValueCandidates::new(|| Names::Workers.candidates()))]
        targets: Vec<Target>,
    },
    /// Stop the supervisor gracefully; returns once it has exited. With
    /// NAME[:INDEX]…, stop only those, and keep them stopped until `start`.
    Stop {
        /// Workers (`web`) or instances (`web:1`) to stop by hand.
        #[arg(value_name = "NAME[:INDEX]", add = ArgValueCandidates::new(|| Names::Workers.candidates()))]
        targets: Vec<Target>,
    },
    /// Show the supervisor, its workers and their instances.
    Status {
        /// Print the JSON report instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this worker.
        #[arg(add = ArgValueCandidates::new(|| Names::Workers.candidates()))]
        name: Option<String>,
        /// For scripts and probes: exit 1 (naming them) when an instance
        /// is parked or in backoff, 0 when every instance runs or was
        /// stopped on purpose; prints the report only with --json.
        #[arg(long)]
        check: bool,
    },
    /// Re-read the config file now and apply what changed.
    Reload,
    /// Show what applying the config file on disk would change, without
    /// applying it: exit 0 with no changes, 1 with changes (or errors).
    Plan {
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restart every instance of a worker, one at a time, or the
    /// instances named (`web:1`).
    Restart {
        #[arg(value_name = "NAME[:INDEX]", required = true, add = ArgValueCandidates::new(|| Names::Workers.candidates()))]
        targets: Vec<Target>,
        /// Return once every instance restarted and runs (exit 0), or
        /// one failed to start or was parked (exit 1, with the reason).
        #[arg(long)]
        wait: bool,
    },
    /// Give a parked worker's instances another start.
    Unpark {
        #[arg(add = ArgValueCandidates::new(|| Names::Workers.candidates()))]
        name: String,
    },
    /// Queue a run of a job now; prints the run id.
    Trigger {
        #[arg(add = ArgValueCandidates::new(|| Names::Jobs.candidates()))]
        job: String,
    },
    /// The run ledger: list runs (newest first), or act on one.
    Runs {
        #[command(subcommand)]
        action: Option<RunsAction>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only this job's runs.
        #[arg(long, add = ArgValueCandidates::new(|| Names::Jobs.candidates()))]
        job: Option<String>,
        /// Only runs in this state (queued, running, waiting, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many runs.
        #[arg(short = 'n', long = "limit", default_value_t = 20)]
        limit: usize,
    },
    /// Start a transient background session; prints its id.
    Bg {
        /// A name to address the session by.
        #[arg(long)]
        name: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print a session's output from its start and follow it until it
    /// ends; exits with the session's exit code. Ctrl-C detaches.
    Attach { id: String },
    /// Stop a session (stop signal, grace, then SIGKILL).
    Kill { id: String },
    /// Print a worker's, session's or run's output; with no name, every
    /// worker's, interleaved by time. Reads the log files: no supervisor
    /// needs to run.
    Logs {
        /// A worker, a session (name or id), a run id, or a job (its
        /// latest run). Every worker when left out.
        #[arg(add = ArgValueCandidates::new(|| Names::Both.candidates()))]
        name: Option<String>,
        /// Keep printing new output as it comes.
        #[arg(short, long)]
        follow: bool,
        /// Lines of past output to print first (default 50; with --since,
        /// every line since, at most 10000).
        #[arg(short = 'n', long = "lines")]
        lines: Option<usize>,
        /// Only output since this time: a duration ago (`10m`, `2h`) or an
        /// RFC 3339 time (`2026-12-03T08:00:00Z`).
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Only this instance's output.
        #[arg(long, value_name = "N")]
        instance: Option<u32>,
    },
    /// State changes as they happen: instances started, ready, unhealthy,
    /// exited, in backoff, parked, stopped; reloads; job runs. Prints the
    /// recent ones (up to 256) and exits; with -f, keeps printing.
    Events {
        /// One JSON object a line (time, kind, names, details).
        #[arg(long)]
        json: bool,
        /// Keep printing events as they happen, until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only these workers and jobs (reloads are always shown).
        #[arg(add = ArgValueCandidates::new(|| Names::Both.candidates()))]
        names: Vec<String>,
    },
    /// A live view in the terminal: workers and their instances, jobs and
    /// recent events, with keys to restart (r), stop (s), start (S),
    /// unpark (u), trigger a job (t), show a worker's log (l), filter (/)
    /// and quit (q). Needs a terminal; no colour when NO_COLOR is set.
    Top,
    /// Validate config files; exit 0 when all are valid, 1 otherwise.
    Check {
        /// Files to check (default: the -c file).
        #[arg(value_hint = ValueHint::FilePath)]
        files: Vec<PathBuf>,
        /// `json` prints diagnostics for machines (file, line, column, key, message).
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
        /// Treat warnings (such as a program not on PATH) as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Print the JSON schema of daemon.toml.
    Schema,
    /// Turn the config into another engine's objects; exits 1 listing what
    /// the target cannot express (each key and why) unless --allow-lossy.
    Export {
        #[command(subcommand)]
        target: ExportTarget,
    },
    /// Print the script that hooks drover's completions (commands, flags,
    /// and worker and job names from the config file) into a shell.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_parser = ["bash", "zsh", "fish", "elvish", "powershell"])]
        shell: String,
    },
    /// Print the man page drover(1); with --out DIR, write one page per
    /// command there (drover.1, drover-start.1, …).
    Man {
        #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
        out: Option<PathBuf>,
    },
    /// Print the effective config: the file with env and --set overrides
    /// applied and every default filled in.
    Config {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}
