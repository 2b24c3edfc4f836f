//! What each command does. Every command returns an exit code; errors are
//! printed by the commands, and only there.

mod client;
pub mod completions;
mod config_cmds;
mod controls;
mod events;
mod export;
mod logread;
mod logs;
mod runs;
mod start;
mod top;

use crate::cli::{Cli, Command, ExportTarget, RunsAction};
use crate::supervisor::protocol::{InstanceAction, Request};

use crate::config::Overrides;

/// Exit codes, as DESIGN.md fixes them.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NO_SUPERVISOR: u8 = 3;
}

/// Prints `value` as pretty JSON and a newline, straight into stdout
/// through one buffer (a status report of a thousand instances is half a
/// megabyte: no second copy of it as a String).
pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let written = serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from);
    if let Err(e) = written.and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()) {
        eprintln!("drover: cannot write the output: {e}");
    }
}

pub fn run(cli: Cli) -> u8 {
    // These print what the CLI is, whatever the config or environment.
    match &cli.command {
        Command::Completions { shell } => return completions::print_script(shell),
        Command::Man { out } => return completions::man(out.as_deref()),
        _ => {}
    }
    let overrides = match Overrides::from_process(&cli.set) {
        Ok(o) => o,
        Err(d) => {
            eprintln!("drover: {d}");
            return exit::USAGE;
        }
    };
    let ctx = client::Ctx { config: &cli.config, overrides: &overrides };
    match cli.command {
        Command::Check { files, format, strict } => {
            let files = if files.is_empty() { vec![cli.config.clone()] } else { files };
            config_cmds::check(&files, &overrides, format, strict)
        }
        // Answered above, before the overrides are read.
        Command::Completions { .. } | Command::Man { .. } => exit::OK,
        Command::Export {
            target:
                ExportTarget::Kubernetes {
                    image,
                    namespace,
                    name_prefix,
                    workdir,
                    emit_secrets,
                    allow_lossy,
                    out,
                },
        } => export::kubernetes(
            &cli.config,
            &overrides,
            export::KubernetesArgs { image, namespace, name_prefix, workdir, emit_secrets, allow_lossy, out },
        ),
        Command::Export {
            target: ExportTarget::Systemd { prefix, systemd_version, workdir, unit_dir, allow_lossy, out },
        } => export::systemd(
            &cli.config,
            &overrides,
            export::SystemdArgs { prefix, systemd_version, workdir, unit_dir, allow_lossy, out },
        ),
        Command::Schema => {
            print!("{}", crate::config::schema::schema_text());
            exit::OK
        }
        Command::Config { json } => config_cmds::show_config(&cli.config, &overrides, json),
        Command::Start { detach, targets } if targets.is_empty() => {
            start::start(&cli.config, overrides.clone(), detach, cli.log_format)
        }
        Command::Start { targets, .. } => controls::act(&ctx, InstanceAction::Start, targets, true),
        Command::Stop { targets } if targets.is_empty() => client::stop(&ctx),
        Command::Stop { targets } => controls::act(&ctx, InstanceAction::Stop, targets, true),
        Command::Status { json, name, check: true } => controls::status_check(&ctx, json, name),
        Command::Status { json, name, check: false } => client::status(&ctx, json, name),
        Command::Plan { json } => client::plan(&ctx, json),
        Command::Reload => client::simple(&ctx, Request::Reload {}),
        Command::Restart { targets, wait } => controls::act(&ctx, InstanceAction::Restart, targets, wait),
        Command::Unpark { name } => client::simple(&ctx, Request::Unpark { name }),
        Command::Logs { name, follow, lines, since, instance } => {
            logs::logs(&ctx, name.as_deref(), logs::Options { follow, lines, since, instance })
        }
        Command::Events { json, follow, names } => events::events(&ctx, json, follow, names),
        Command::Top => top::top(&ctx),
        Command::Trigger { job } => runs::trigger(&ctx, &job),
        Command::Runs { action, json, job, state, limit } => match action {
            None => runs::list(&ctx, json, job.as_deref(), state.as_deref(), limit),
            Some(RunsAction::Show { id, json }) => runs::show(&ctx, id, json),
            Some(RunsAction::Cancel { id }) => client::simple(&ctx, Request::Cancel { id }),
            Some(RunsAction::Resume { id }) => runs::resume(&ctx, id),
        },
        Command::Bg { name, command } => runs::bg(&ctx, name, command),
        Command::Attach { id } => runs::attach(&ctx, &id),
        Command::Kill { id } => client::simple(&ctx, Request::Kill { key: id }),
    }
}
