//! The one place where drover waits for children. drover is a child
//! subreaper, so orphaned grandchildren become its children too; a single
//! `waitpid(-1)` loop reaps them all. Every spawn goes through
//! [`Reaper::spawn`], which records the pid under the same lock the reaper
//! takes, so a child that dies at once is never mistaken for a stray.

use std::collections::HashSet;
use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, RwLock};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use serde::{Deserialize, Serialize};

use super::groups;

/// How a process ended: an exit code, or the signal that killed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<String>,
}

impl Exit {
    pub fn code(code: i32) -> Self {
        Exit { code: Some(code), signal: None }
    }
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.code, &self.signal) {
            (Some(c), _) => write!(f, "exit {c}"),
            (None, Some(s)) => write!(f, "killed by {s}"),
            (None, None) => write!(f, "ended"),
        }
    }
}

/// What one pass of the reaper found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reaped {
    /// A child drover spawned.
    Child { pid: i32, exit: Exit },
    /// An orphaned grandchild that was re-parented to drover.
    Stray { pid: i32 },
}

#[derive(Default)]
pub struct Reaper {
    tracked: Mutex<HashSet<i32>>,
    /// Spawns hold it shared (several may run at once, from several
    /// threads); the reaper holds it exclusively, so it never reaps a child
    /// whose spawn has not yet recorded its pid.
    spawning: RwLock<()>,
}

impl Reaper {
    /// Makes this process a child subreaper, so orphaned descendants of
    /// its workers are re-parented to it (and reaped) rather than to init.
    pub fn become_subreaper() -> io::Result<()> {
        nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
    }

    /// Spawns `cmd` (which leads a process group of its own), recording
    /// its pid before the reaper can see it exit, and its group in
    /// [`groups`], the registry a dying drover kills.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let _spawning = self.spawning.read().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        groups::add(pid);
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
        Ok(child)
    }

    /// Runs a short helper command (such as `git worktree add`) to its end.
    /// The reaper is held off meanwhile, so it cannot take the exit status
    /// that the helper's own wait needs; keep such commands brief.
    pub fn run_to_end(&self, cmd: &mut Command) -> io::Result<std::process::Output> {
        let _spawning = self.spawning.read().unwrap_or_else(|e| e.into_inner());
        cmd.output()
    }

    /// Reaps every child that has ended, without blocking.
    pub fn reap(&self) -> Vec<Reaped> {
        let mut out = Vec::new();
        let _reaping = self.spawning.write().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Exit::code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    (pid.as_raw(), Exit { code: None, signal: Some(sig.as_str().to_string()) })
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            };
            if tracked.remove(&pid) {
                if !super::proc::group_alive(pid) {
                    groups::remove(pid);
                }
                out.push(Reaped::Child { pid, exit });
            } else {
                out.push(Reaped::Stray { pid });
            }
        }
        out
    }
}
