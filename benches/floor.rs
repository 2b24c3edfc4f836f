//! The floor of the supervisor comparison (benches/compare.py): the least a
//! supervisor can do. It spawns N copies of a command, blocks in waitpid(-1),
//! and respawns each child the moment it exits, with no backoff, no state, no
//! logging and no control interface. SIGTERM or SIGINT: it sends SIGTERM to
//! every child (to its whole process group when it leads one), reaps them all
//! and exits 0.
//!
//! Standalone on purpose: compare.py builds it with `rustc -O --edition 2021`
//! into a temporary directory, so it needs no Cargo changes. Cargo also sees it
//! as a bench target (benches/*.rs); under the libtest harness `main` is unused
//! and nothing runs.
//!
//!     floor N CMD [ARG]...

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const EINTR: i32 = 4;

static STOP: AtomicBool = AtomicBool::new(false);
static LEADER: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
    fn siginterrupt(sig: i32, flag: i32) -> i32;
    fn getpgrp() -> i32;
}

extern "C" fn on_signal(_sig: i32) {
    // The first signal also TERMs the process group when floor leads it (as
    // compare.py starts it): the children die at once, and a signal that lands
    // just before the blocking waitpid cannot leave floor waiting forever.
    if !STOP.swap(true, Ordering::SeqCst) && LEADER.load(Ordering::SeqCst) {
        // SAFETY: kill is async-signal-safe.
        unsafe { kill(0, SIGTERM) };
    }
}

fn spawn(argv: &[String]) -> i32 {
    match Command::new(&argv[0]).args(&argv[1..]).spawn() {
        // The Child handle is dropped without waiting: waitpid(-1) reaps it.
        Ok(child) => i32::try_from(child.id()).expect("pid fits in i32"),
        Err(e) => {
            eprintln!("floor: spawn {}: {e}", argv[0]);
            std::process::exit(1);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = match args.first().and_then(|s| s.parse().ok()) {
        Some(n) if args.len() >= 2 => n,
        _ => {
            eprintln!("usage: floor N CMD [ARG]...");
            std::process::exit(2);
        }
    };
    let argv = &args[1..];

    // SAFETY: the handler only stores to an atomic; siginterrupt makes a
    // blocked waitpid return EINTR instead of restarting.
    unsafe {
        LEADER.store(getpgrp() == i32::try_from(std::process::id()).unwrap_or(-1), Ordering::SeqCst);
        signal(SIGTERM, on_signal);
        signal(SIGINT, on_signal);
        siginterrupt(SIGTERM, 1);
        siginterrupt(SIGINT, 1);
    }

    // pid -> slot, so a respawn takes the place of the child that exited.
    let mut children: HashMap<i32, usize> = HashMap::with_capacity(n);
    for slot in 0..n {
        children.insert(spawn(argv), slot);
    }

    let mut status = 0i32;
    while !STOP.load(Ordering::SeqCst) {
        // SAFETY: plain syscall with a valid out-pointer.
        let pid = unsafe { waitpid(-1, &raw mut status, 0) };
        if pid > 0 {
            match children.remove(&pid) {
                Some(slot) if !STOP.load(Ordering::SeqCst) => {
                    children.insert(spawn(argv), slot);
                }
                _ => {}
            }
        } else if std::io::Error::last_os_error().raw_os_error() != Some(EINTR) {
            break; // ECHILD: nothing left to wait for
        }
    }

    // Stop: SIGTERM every child, then reap until none is left.
    for &pid in children.keys() {
        // SAFETY: plain syscall.
        unsafe { kill(pid, SIGTERM) };
    }
    loop {
        // SAFETY: plain syscall with a valid out-pointer.
        let pid = unsafe { waitpid(-1, &raw mut status, 0) };
        if pid > 0 {
            children.remove(&pid);
        } else if std::io::Error::last_os_error().raw_os_error() != Some(EINTR) {
            break;
        }
    }
}
