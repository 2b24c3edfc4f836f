//! The one place where drover waits for children. drover is a child
//! subreaper, so orphaned grandchildren become its children too; a single
//! `waitpid(-1)` loop reaps them all. Every spawn goes through
//! [`Reaper::spawn`], which records the pid under the same lock the reaper
//! takes, so a child that dies at once is never mistaken for a stray.
//! A helper whose exit one task awaits (an exec probe) is spawned with
//! [`Reaper::spawn_waited`]: its exit goes to that task, not to the actor.

use std::collections::{HashMap, HashSet};
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, RwLock};

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::groups;
use super::spawn::Spawned;

/// How a process ended: an exit code, or the signal that killed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<std::borrow::Cow<'static, str>>,
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
    /// Counts spawns, so that a reaper thread with no child to wait for
    /// sleeps until there is one.
    spawned: Mutex<u64>,
    spawned_cv: Condvar,
    /// Children whose exit is delivered to the one waiting on it.
    waiters: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
    /// Spawns hold it shared (several may run at once, from several
    /// threads); the reaper holds it exclusively, so it never reaps a child
    /// whose spawn has not yet recorded its pid.
    spawning: RwLock<()>,
}

impl Reaper {
    /// A child exists now: wakes a reaper thread that had none to wait for.
    fn note_spawn(&self) {
        let mut n = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.wrapping_add(1);
        self.spawned_cv.notify_all();
    }

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
        self.note_spawn();
        Ok(child)
    }

    /// Spawns `cmd` (leading a process group of its own) like
    /// [`Reaper::spawn`], but its exit is sent on the returned receiver
    /// and never appears in [`Reaper::reap`]'s list. Dropping the receiver
    /// is fine: the exit is reaped all the same, and discarded. The group
    /// stays in [`groups`] until the waiter removes it (it may outlive
    /// its leader).
    pub fn spawn_waited(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<Exit>)> {
        let _spawning = self.spawning.read().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        groups::add(pid);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(pid, tx);
        self.note_spawn();
        Ok((child, rx))
    }

    /// Like [`Reaper::spawn`], for drover's own spawn (`spawn`, called
    /// with the reaper held off): a child it failed to start is reaped
    /// there by its pid, before the reaper can see it.
    pub fn spawn_own<E>(&self, spawn: impl FnOnce() -> Result<Spawned, E>) -> Result<Spawned, E> {
        let _spawning = self.spawning.read().unwrap_or_else(|e| e.into_inner());
        let child = spawn()?;
        groups::add(child.pid);
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).insert(child.pid);
        self.note_spawn();
        Ok(child)
    }

    /// Like [`Reaper::spawn_waited`], for drover's own spawn (see
    /// [`Reaper::spawn_own`]).
    pub fn spawn_own_waited<E>(
        &self,
        spawn: impl FnOnce() -> Result<Spawned, E>,
    ) -> Result<(Spawned, oneshot::Receiver<Exit>), E> {
        let _spawning = self.spawning.read().unwrap_or_else(|e| e.into_inner());
        let child = spawn()?;
        groups::add(child.pid);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(child.pid, tx);
        self.note_spawn();
        Ok((child, rx))
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
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
                Ok(status) => out.extend(self.sort(status)),
            }
        }
        out
    }

    /// Reaps children as they end, on the calling thread (one of its own),
    /// handing each to `deliver` until it returns false. It sleeps in the
    /// kernel until a child ends: no signal handler and no other thread
    /// stands between an exit and its delivery. Each exit is looked for
    /// once among the children (the kernel walks all of them), then taken
    /// by its pid.
    pub fn run(&self, mut deliver: impl FnMut(Reaped) -> bool) {
        loop {
            let seen = *self.spawned.lock().unwrap_or_else(|e| e.into_inner());
            let pid = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => status.pid(),
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    // No child at all (ECHILD): none can end before the
                    // next spawn, which wakes this.
                    let mut n = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
                    while *n == seen {
                        n = self.spawned_cv.wait(n).unwrap_or_else(|e| e.into_inner());
                    }
                    continue;
                }
            };
            let Some(pid) = pid else { continue };
            let reaped = {
                let _reaping = self.spawning.write().unwrap_or_else(|e| e.into_inner());
                loop {
                    match waitpid(Some(pid), Some(WaitPidFlag::WNOHANG)) {
                        Err(Errno::EINTR) => continue,
                        // Taken by its own waiter meanwhile (run_to_end).
                        Ok(WaitStatus::StillAlive) | Err(_) => break None,
                        Ok(status) => break self.sort(status),
                    }
                }
            };
            if let Some(r) = reaped
                && !deliver(r)
            {
                return;
            }
        }
    }

    /// What a reaped status is: the exit of a child the actor hears of,
    /// of one a waiter awaits (sent there), or of a stray. Called with
    /// the reaper holding `spawning`.
    fn sort(&self, status: WaitStatus) -> Option<Reaped> {
        let (pid, exit) = match status {
            WaitStatus::Exited(pid, code) => (pid.as_raw(), Exit::code(code)),
            WaitStatus::Signaled(pid, sig, _) => {
                (pid.as_raw(), Exit { code: None, signal: Some(sig.as_str().into()) })
            }
            _ => return None,
        };
        if let Some(waiter) = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid) {
            let _ = waiter.send(exit);
            None
        } else if self.tracked.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid) {
            if !super::proc::group_alive(pid) {
                groups::remove(pid);
            }
            Some(Reaped::Child { pid, exit })
        } else {
            Some(Reaped::Stray { pid })
        }
    }
}

/// Runs the test `module::name` alone in a process of its own (the test
/// binary again, filtered to it), where `body` runs. A test that reaps
/// with `waitpid(-1)` needs this: in the shared test process it would
/// take the exits of other tests' children.
#[cfg(test)]
pub(crate) fn isolated(module: &str, name: &str, body: impl FnOnce()) {
    const VAR: &str = "DROVER_TEST_ISOLATED";
    let module = module.split_once("::").map_or(module, |(_, rest)| rest);
    let test = format!("{module}::{name}");
    if std::env::var(VAR).is_ok_and(|v| v == test) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args([test.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env(VAR, &test)
        .output()
        .expect("run the test binary");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test}, in a process of its own, failed:\n{text}");
    assert!(text.contains("1 passed"), "{test} did not run in its own process:\n{text}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn the_reaper_thread_delivers_exits_and_waits_for_a_first_child() {
        isolated(module_path!(), "the_reaper_thread_delivers_exits_and_waits_for_a_first_child", || {
            let reaper = std::sync::Arc::new(Reaper::default());
            let (tx, rx) = std::sync::mpsc::channel();
            let thread = {
                let reaper = reaper.clone();
                // It starts with no child at all: it must sleep, not end.
                std::thread::spawn(move || {
                    reaper.run(|r| {
                        let last = matches!(r, Reaped::Child { exit: Exit { code: Some(5), .. }, .. });
                        tx.send(r).is_ok() && !last
                    })
                })
            };
            let wait = std::time::Duration::from_secs(10);
            let mut waited = Command::new("sh");
            waited.args(["-c", "exit 3"]).process_group(0);
            let (_child, waited_rx) = reaper.spawn_waited(&mut waited).unwrap();
            let mut plain = Command::new("sh");
            plain.args(["-c", "exit 4"]).process_group(0);
            let plain_pid = reaper.spawn(&mut plain).unwrap().id() as i32;
            assert_eq!(rx.recv_timeout(wait).unwrap(), Reaped::Child { pid: plain_pid, exit: Exit::code(4) });
            assert_eq!(waited_rx.blocking_recv().unwrap(), Exit::code(3));
            // No child left: the thread sleeps, and the next one wakes it.
            let mut last = Command::new("sh");
            last.args(["-c", "exit 5"]).process_group(0);
            let last_pid = reaper.spawn(&mut last).unwrap().id() as i32;
            assert_eq!(rx.recv_timeout(wait).unwrap(), Reaped::Child { pid: last_pid, exit: Exit::code(5) });
            thread.join().unwrap();
        });
    }

    #[test]
    fn a_waited_child_exit_goes_to_its_waiter_and_not_to_the_actor() {
        isolated(module_path!(), "a_waited_child_exit_goes_to_its_waiter_and_not_to_the_actor", || {
            let reaper = Reaper::default();
            let mut plain = Command::new("sh");
            plain.args(["-c", "exit 4"]).process_group(0);
            let mut waited = Command::new("sh");
            waited.args(["-c", "exit 3"]).process_group(0);
            let plain_pid = reaper.spawn(&mut plain).unwrap().id() as i32;
            let (child, mut rx) = reaper.spawn_waited(&mut waited).unwrap();
            let waited_pid = child.id() as i32;
            let mut seen = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let exit = loop {
                seen.extend(reaper.reap());
                if let Ok(exit) = rx.try_recv() {
                    break exit;
                }
                assert!(std::time::Instant::now() < deadline, "the waited exit never came");
                std::thread::sleep(std::time::Duration::from_millis(5));
            };
            assert_eq!(exit, Exit::code(3));
            while !seen.iter().any(|r| matches!(r, Reaped::Child { pid, .. } if *pid == plain_pid)) {
                assert!(std::time::Instant::now() < deadline, "the plain exit never came");
                seen.extend(reaper.reap());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(seen.contains(&Reaped::Child { pid: plain_pid, exit: Exit::code(4) }));
            assert!(
                !seen.iter().any(
                    |r| matches!(r, Reaped::Child { pid, .. } | Reaped::Stray { pid } if *pid == waited_pid)
                ),
                "the waited child was reported to the actor too: {seen:?}"
            );
        });
    }
}
