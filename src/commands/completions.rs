//! Shell completions (`drover completions SHELL`) and the man pages
//! (`drover man`), both generated from the clap definition of the CLI, so
//! they never drift from it.
//!
//! Completions are dynamic: the script a shell sources calls drover back
//! (with `_DROVER_COMPLETE` set) for each completion, so worker and job
//! names come from the config file at the time of the <Tab>.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::engine::CompletionCandidate;
use clap_complete::env::Shells;

use super::exit;
use crate::cli::Cli;
use crate::config::load::CONFIG_ENV;

/// The variable the completion scripts set when they call drover back.
/// Not `DROVER_…`: those are config overrides.
pub const COMPLETE_ENV: &str = "_DROVER_COMPLETE";

/// Answers a completion request and exits, when the shell's script is
/// what started this process; returns otherwise.
pub fn answer_if_asked() {
    clap_complete::CompleteEnv::with_factory(Cli::command).var(COMPLETE_ENV).complete();
}

/// Prints the script that hooks drover's completions into `shell`.
pub fn print_script(shell: &str) -> u8 {
    let shells = Shells::builtins();
    let Some(completer) = shells.completer(shell) else {
        let names: Vec<&str> = shells.names().collect();
        eprintln!("drover: no completions for shell {shell:?}; one of {}", names.join(", "));
        return exit::USAGE;
    };
    let mut script = Vec::new();
    // `drover` as found on PATH when the shell completes, not this path:
    // the script outlives the binary it was printed by.
    match completer.write_registration(COMPLETE_ENV, "drover", "drover", "drover", &mut script) {
        Ok(()) => write_out(&script),
        Err(e) => {
            eprintln!("drover: cannot write the completion script: {e}");
            exit::FAILED
        }
    }
}

fn write_out(bytes: &[u8]) -> u8 {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("drover: cannot write: {e}");
            exit::FAILED
        }
    }
}

/// Which table of the config a completion takes names from.
#[derive(Clone, Copy)]
pub enum Names {
    Workers,
    Jobs,
    /// Workers and jobs (`logs`).
    Both,
}

impl Names {
    /// The names in the config file the command would use (`$DROVER_CONFIG`
    /// or `./daemon.toml`; a `-c` on the line being completed is not seen
    /// by the completer). A file that does not parse offers nothing.
    pub fn candidates(self) -> Vec<CompletionCandidate> {
        let path = std::env::var_os(CONFIG_ENV).map_or_else(|| PathBuf::from("daemon.toml"), PathBuf::from);
        names_in(&path, self)
            .into_iter()
            .map(|(name, help)| CompletionCandidate::new(name).help(Some(help.into())))
            .collect()
    }
}

fn names_in(path: &Path, which: Names) -> Vec<(String, &'static str)> {
    let Some(table) = std::fs::read_to_string(path).ok().and_then(|t| t.parse::<toml::Table>().ok()) else {
        return Vec::new();
    };
    let keys = |table_name: &str, help: &'static str| -> Vec<(String, &'static str)> {
        table
            .get(table_name)
            .and_then(|v| v.as_table())
            .map_or_else(Vec::new, |t| t.keys().map(|k| (k.clone(), help)).collect())
    };
    match which {
        Names::Workers => keys("workers", "worker"),
        Names::Jobs => keys("jobs", "job"),
        Names::Both => [keys("workers", "worker"), keys("jobs", "job")].concat(),
    }
}

/// `drover man`: the page of drover(1) on stdout, or with `dir`, one page
/// per command (drover.1, drover-start.1, …) written there.
pub fn man(dir: Option<&Path>) -> u8 {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        if let Err(e) = clap_mangen::Man::new(cmd).render(&mut page) {
            eprintln!("drover: cannot render the man page: {e}");
            return exit::FAILED;
        }
        return write_out(&page);
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("drover: cannot create {}: {e}", dir.display());
        return exit::FAILED;
    }
    match clap_mangen::generate_to(cmd, dir) {
        Ok(()) => {
            println!("man pages written to {}", dir.display());
            exit::OK
        }
        Err(e) => {
            eprintln!("drover: cannot write the man pages to {}: {e}", dir.display());
            exit::FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_tables_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.toml");
        std::fs::write(
            &path,
            "[workers.api]\ncommand=[\"x\"]\n[workers.web]\ncommand=[\"x\"]\n[jobs.tick]\ncommand=[\"x\"]\n",
        )
        .unwrap();
        let names = |w| names_in(&path, w).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(Names::Workers), ["api", "web"]);
        assert_eq!(names(Names::Jobs), ["tick"]);
        assert_eq!(names(Names::Both), ["api", "web", "tick"]);
        std::fs::write(&path, "[workers.api\n").unwrap();
        assert!(names(Names::Both).is_empty(), "a broken file offers nothing");
        assert!(names_in(&dir.path().join("missing.toml"), Names::Both).is_empty());
    }
}
