//! The process groups drover runs, kept where a dying drover can still
//! find them: a panic hook (see `supervisor::runtime`) SIGKILLs them all,
//! so a drover that dies takes its processes with it.

use std::collections::BTreeSet;
use std::sync::{Mutex, TryLockError};

use nix::sys::signal::Signal;

use super::proc;

static LIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn with<T>(f: impl FnOnce(&mut BTreeSet<i32>) -> T) -> T {
    f(&mut LIVE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// `pgid` (a child drover spawned as a group leader) now runs.
pub fn add(pgid: i32) {
    with(|s| s.insert(pgid));
}

/// `pgid` is empty, or was SIGKILLed.
pub fn remove(pgid: i32) {
    with(|s| s.remove(&pgid));
}

/// How many groups are registered (for tests).
pub fn len() -> usize {
    with(|s| s.len())
}

/// SIGKILLs every registered group that is still drover's: its leader is
/// drover's child, or is gone while the group lives on (Linux hands out no
/// pid that is still some group's id). Never blocks: it is called from a
/// panic hook, possibly on the thread that holds the registry, so it
/// gives up on the registry after a few tries (the caller has a fallback).
/// Returns how many groups were signalled, or `None` if the registry
/// could not be had.
pub fn kill_all() -> Option<usize> {
    let me = std::process::id() as i32;
    for _ in 0..1000 {
        let set = match LIVE.try_lock() {
            Ok(g) => g.clone(),
            Err(TryLockError::Poisoned(p)) => p.into_inner().clone(),
            Err(TryLockError::WouldBlock) => {
                std::thread::yield_now();
                continue;
            }
        };
        let ours = |g: i32| match proc::parent_of(g) {
            Some(parent) => parent == me,
            None => proc::group_alive(g),
        };
        return Some(
            set.into_iter().filter(|&g| ours(g) && proc::signal_group(g, Signal::SIGKILL).is_ok()).count(),
        );
    }
    None
}
