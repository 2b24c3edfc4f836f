//! How drover starts and stops a process: worker instances, job steps and
//! exec probes alike. A child leads a process group of its own, is known to
//! the reaper before it can exit, runs with its worker's or job's identity
//! and limits, and gets none of the descriptors drover keeps in reserve.
//! Spawning blocks a thread until the child has exec'd, so the actor hands
//! it to a blocking thread ([`start_off_loop`]); the exit comes back through
//! the reaper, and [`InFlight`] holds what arrives out of order meanwhile.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use crate::os::identity::Identity;
use crate::os::proc;
use crate::os::reaper::{Exit, Reaper};

/// Where the child's stdout and stderr go (stdin is always /dev/null).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Pipes, handed back in [`Started`] for the log pumps.
    Piped,
    Null,
}

/// Everything a child is started with.
#[derive(Clone, Debug)]
pub struct Launch {
    pub argv: Vec<String>,
    pub dir: PathBuf,
    /// Set over drover's own environment (or over nothing, `clear_env`).
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    /// Names of drover's own environment the child must not inherit.
    pub remove_env: Vec<&'static str>,
    pub identity: Identity,
    pub output: Output,
}

/// A child that was spawned.
#[derive(Debug)]
pub struct Started {
    /// Also its process group.
    pub pid: i32,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Why a child could not be started.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchError {
    pub message: String,
    /// For want of drover's own resources (descriptors, memory, processes):
    /// a retry, never a step toward parking.
    pub short: bool,
}

impl Launch {
    fn command(&self) -> Result<Command, LaunchError> {
        let Some(program) = self.argv.first() else {
            return Err(LaunchError { message: "the command is empty".into(), short: false });
        };
        let mut cmd = Command::new(program);
        if self.clear_env {
            cmd.env_clear();
        }
        for name in &self.remove_env {
            cmd.env_remove(name);
        }
        let out = || match self.output {
            Output::Piped => Stdio::piped(),
            Output::Null => Stdio::null(),
        };
        cmd.args(&self.argv[1..])
            .current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out())
            .stderr(out());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        proc::give_back_fd_limit(&mut cmd);
        crate::os::identity::apply(&mut cmd, &self.identity);
        Ok(cmd)
    }

    /// The error of a failed spawn, saying what the OS does not: whether
    /// the directory or the program is missing, and whether drover itself
    /// is short of resources. Call it off the event loop (it looks at the
    /// directory).
    fn failure(&self, e: &io::Error) -> LaunchError {
        let program = self.argv.first().map(String::as_str).unwrap_or_default();
        let short = out_of_resources(e);
        let mut message = if !self.dir.is_dir() {
            format!(
                "cannot start {program:?}: its directory {} does not exist or is not a directory",
                self.dir.display()
            )
        } else {
            format!("cannot start {program:?} in {}: {e}", self.dir.display())
        };
        if short {
            message.push_str(&format!(
                "; drover is short of resources (it keeps {} descriptors in reserve): \
                 retrying, not counted as a crash",
                proc::FD_RESERVE
            ));
        }
        LaunchError { message, short }
    }

    fn spawn_with<T>(&self, spawn: impl FnOnce(&mut Command) -> io::Result<T>) -> Result<T, LaunchError> {
        let mut cmd = self.command()?;
        let spawned = if proc::descriptors_short() {
            Err(io::Error::from_raw_os_error(nix::libc::EMFILE))
        } else {
            spawn(&mut cmd)
        };
        spawned.map_err(|e| self.failure(&e))
    }
}

fn started(mut child: std::process::Child) -> Started {
    Started {
        pid: child.id() as i32,
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    }
}

/// Starts the child; its exit is one of [`Reaper::reap`]'s. Blocks until
/// the child has exec'd.
pub fn start(reaper: &Reaper, launch: &Launch) -> Result<Started, LaunchError> {
    launch.spawn_with(|cmd| reaper.spawn(cmd)).map(started)
}

/// Starts the child; its exit is sent on the receiver instead. Blocks until
/// the child has exec'd.
pub fn start_waited(
    reaper: &Reaper,
    launch: &Launch,
) -> Result<(Started, oneshot::Receiver<Exit>), LaunchError> {
    launch.spawn_with(|cmd| reaper.spawn_waited(cmd)).map(|(child, rx)| (started(child), rx))
}

/// Starts the child on a blocking thread; `done` gets the outcome there.
pub fn start_off_loop(
    reaper: Arc<Reaper>,
    launch: Launch,
    done: impl FnOnce(Result<Started, LaunchError>) + Send + 'static,
) {
    tokio::task::spawn_blocking(move || done(start(&reaper, &launch)));
}

/// Asks the group to stop: `sig`, then SIGCONT, which a stopped (SIGSTOP)
/// process needs to see it.
pub fn signal_stop(pgid: i32, sig: Signal) {
    let _ = proc::signal_group(pgid, sig);
    let _ = proc::signal_group(pgid, Signal::SIGCONT);
}

/// SIGKILLs the whole group.
pub fn kill(pgid: i32) {
    let _ = proc::signal_group(pgid, Signal::SIGKILL);
}

/// Whether an OS error means drover itself is short of something.
pub fn out_of_resources(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|n| {
        [Errno::EMFILE, Errno::ENFILE, Errno::EAGAIN, Errno::ENOMEM].contains(&Errno::from_raw(n))
    })
}

/// Spawns handed to blocking threads and not yet reported to the actor.
/// The reaper may see such a child exit before the actor hears of its
/// spawn: the exit waits here until the spawn lands. A spawn whose owner
/// went away meanwhile is discarded: its group is killed and its exit
/// forgotten.
#[derive(Debug, Default)]
pub struct InFlight {
    count: usize,
    early: HashMap<i32, Exit>,
    discarded: HashSet<i32>,
}

impl InFlight {
    pub fn begin(&mut self) {
        self.count += 1;
    }

    /// A spawn was reported (whatever its outcome).
    pub fn landed(&mut self) {
        self.count = self.count.saturating_sub(1);
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// An exit the actor has no owner for: the spawn not reported yet, or
    /// a discarded one.
    pub fn unowned_exit(&mut self, pid: i32, exit: Exit) {
        if !self.discarded.remove(&pid) {
            self.early.insert(pid, exit);
        }
    }

    /// The exit of a child that ended before its spawn was reported.
    pub fn take_early_exit(&mut self, pid: i32) -> Option<Exit> {
        self.early.remove(&pid)
    }

    /// A spawned child nobody wants: kill its group, forget its exit.
    pub fn discard(&mut self, pid: i32) {
        kill(pid);
        crate::os::groups::remove(pid);
        if self.early.remove(&pid).is_none() {
            self.discarded.insert(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(argv: &[&str], dir: &str) -> Launch {
        Launch {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            dir: dir.into(),
            env: vec![("DROVER_CHILD_TEST".into(), "1".into())],
            clear_env: false,
            remove_env: vec![],
            identity: Identity::default(),
            output: Output::Null,
        }
    }

    #[test]
    fn a_missing_directory_is_named_apart_from_a_missing_program() {
        let e = launch(&["true"], "/no/such/dir").failure(&io::Error::from_raw_os_error(nix::libc::ENOENT));
        assert_eq!(
            e.message,
            "cannot start \"true\": its directory /no/such/dir does not exist or is not a directory"
        );
        assert!(!e.short);
        let e = launch(&["/no/such/program"], "/").failure(&io::Error::from_raw_os_error(nix::libc::ENOENT));
        assert!(e.message.starts_with("cannot start \"/no/such/program\" in /: "), "{}", e.message);
    }

    #[test]
    fn a_shortage_of_descriptors_is_a_retry_not_a_crash() {
        let e = launch(&["true"], "/").failure(&io::Error::from_raw_os_error(nix::libc::EMFILE));
        assert!(e.short);
        assert!(e.message.contains("drover is short of resources"), "{}", e.message);
    }

    #[test]
    fn an_empty_command_is_an_error_not_a_panic() {
        let e = launch(&[], "/").command().err().map(|e| e.message);
        assert_eq!(e.as_deref(), Some("the command is empty"));
    }

    #[test]
    fn an_exit_before_the_spawn_lands_waits_for_it_and_a_discarded_one_is_forgotten() {
        let mut f = InFlight::default();
        f.begin();
        assert!(!f.is_empty());
        f.unowned_exit(10, Exit::code(3));
        f.landed();
        assert!(f.is_empty());
        assert_eq!(f.take_early_exit(10), Some(Exit::code(3)));
        assert_eq!(f.take_early_exit(10), None);
        // Discarded before its exit: the exit, when it comes, is dropped.
        // (pid 0x7fff_fff0 is no process: kill fails quietly.)
        f.discard(0x7fff_fff0);
        f.unowned_exit(0x7fff_fff0, Exit::code(0));
        assert_eq!(f.take_early_exit(0x7fff_fff0), None);
    }
}
