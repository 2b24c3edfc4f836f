//! Process groups and process identity, from signals and /proc.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Sends `sig` to every process of group `pgid`. A group that is already
/// empty is not an error.
pub fn signal_group(pgid: i32, sig: Signal) -> io::Result<()> {
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether any process (zombies included) is left in group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    !matches!(killpg(Pid::from_raw(pgid), None), Err(Errno::ESRCH))
}

/// Whether process `pid` exists (zombies included).
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

/// The start time of `pid` in clock ticks since boot (field 22 of
/// /proc/PID/stat): with the pid, it names a process uniquely, so a
/// recorded pid is never confused with a later process that reused it.
pub fn start_ticks(pid: i32) -> Option<u64> {
    stat_fields(pid).and_then(|f| f.get(19).and_then(|s| s.parse().ok()))
}

/// CLOCK_BOOTTIME now, the clock of a process's start time; None if it
/// cannot be read.
pub fn boottime() -> Option<std::time::Duration> {
    let mut ts = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec it is given.
    if unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(std::time::Duration::new(u64::try_from(ts.tv_sec).ok()?, u32::try_from(ts.tv_nsec).ok()?))
}

/// The start time, in clock ticks, of a child made between two readings
/// of [`boottime`] taken around its clone: the kernel stamps the child in
/// between and /proc shows whole ticks, so when both readings fall in one
/// tick, that tick is the child's [`start_ticks`], told without reading
/// /proc (which, right after an exec, waits on the child's new memory
/// map). None when a tick ends between them.
pub fn ticks_between(before: Option<std::time::Duration>, after: Option<std::time::Duration>) -> Option<u64> {
    let per_tick = 1_000_000_000u128 / u128::from(clock_ticks()?);
    let tick = |d: std::time::Duration| u64::try_from(d.as_nanos() / per_tick).ok();
    let (a, b) = (tick(before?)?, tick(after?)?);
    (a == b).then_some(a)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), read once.
fn clock_ticks() -> Option<u64> {
    static TICKS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
    })
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
pub fn pgid_of(pid: i32) -> Option<i32> {
    stat_fields(pid).and_then(|f| f.get(2).and_then(|s| s.parse().ok()))
}

/// The parent of `pid` (field 4 of /proc/PID/stat).
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_fields(pid).and_then(|f| f.get(1).and_then(|s| s.parse().ok()))
}

/// Whether `pid` is a zombie (state Z).
pub fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) == Some("Z"))
}

/// The fields of /proc/PID/stat after the command name, which may itself
/// contain spaces and parentheses (so split after the last ')').
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// SIGKILLs group `pgid`, recorded (with its leader's start time) by a
/// supervisor that has died, if it is still that group. Linux never hands
/// out a pid that is still some group's id, so a live group whose leader
/// is gone is the recorded one; a live leader must match the recorded
/// start time, else the number was reused and the group is left alone.
pub fn kill_recorded_group(pgid: i32, recorded_start: Option<u64>) -> bool {
    let same = match (start_ticks(pgid), recorded_start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => false,
        (None, _) => true,
    };
    same && group_alive(pgid) && signal_group(pgid, Signal::SIGKILL).is_ok()
}

/// The direct children of this process (of all its threads).
pub fn own_children() -> Vec<i32> {
    children_of_task_dir("/proc/self/task")
}

/// The children of this process's main thread: among them, every orphan
/// re-parented to this process as a subreaper (the kernel gives one to
/// the first live thread of the group, and the main thread is the first),
/// without the children that other threads spawned.
pub fn adopted_children() -> Vec<i32> {
    // Open for drover's life: it is read after every exit, and the open
    // (a path walk through /proc) cost more than the read of a list
    // that is nearly always empty. Each read from offset 0 lists anew.
    static MAIN: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let main = MAIN
        .get_or_init(|| std::fs::File::open(format!("/proc/self/task/{}/children", std::process::id())).ok());
    let mut out = Vec::new();
    match main {
        Some(f) if read_children(f, &mut Vec::new(), &mut out) => out,
        _ => own_children(),
    }
}

/// Adds the pids a `children` file lists to `out`; false if it cannot be
/// read. Read in large pieces: the kernel walks the list from its start
/// again at each read.
fn push_children(path: std::path::PathBuf, buf: &mut Vec<u8>, out: &mut Vec<i32>) -> bool {
    std::fs::File::open(path).is_ok_and(|f| read_children(&f, buf, out))
}

/// Adds the pids of the open `children` file `f` to `out`, read from its
/// start; false if it cannot be read.
fn read_children(f: &std::fs::File, buf: &mut Vec<u8>, out: &mut Vec<i32>) -> bool {
    use std::os::unix::fs::FileExt;
    let read_at = |into: &mut [u8], at: usize| loop {
        match f.read_at(into, at as u64) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => break other,
        }
    };
    // Most lists are empty (the orphans adopted, looked for after each
    // exit): one small read says so, with no buffer to allocate.
    let mut first = [0u8; 64];
    let Ok(n) = read_at(&mut first, 0) else { return false };
    if n == 0 {
        return true;
    }
    buf.clear();
    buf.reserve(CHILDREN_READ);
    buf.extend_from_slice(&first[..n]);
    loop {
        let at = buf.len();
        buf.resize(at + CHILDREN_READ, 0);
        match read_at(&mut buf[at..], at) {
            Ok(0) => {
                buf.truncate(at);
                break;
            }
            Ok(got) => buf.truncate(at + got),
            Err(_) => return false,
        }
    }
    let text = String::from_utf8_lossy(buf);
    out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    true
}

/// The first read of a `children` file: 1000 pids' worth.
const CHILDREN_READ: usize = 8 << 10;

/// `pid`'s children, their children and so on (at most `cap` processes).
pub fn descendants(pid: i32, cap: usize) -> Vec<i32> {
    let mut out = Vec::new();
    let mut next = 0;
    let mut at = pid;
    loop {
        for c in children_of_task_dir(&format!("/proc/{at}/task")) {
            if out.len() < cap && !out.contains(&c) {
                out.push(c);
            }
        }
        let Some(&p) = out.get(next) else { break };
        at = p;
        next += 1;
    }
    out
}

fn children_of_task_dir(dir: &str) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for t in tasks.flatten() {
        push_children(t.path().join("children"), &mut buf, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The value of variable `name` in the environment `pid` started with.
pub fn environ_var(pid: i32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        let rest = kv.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(rest).into_owned())
    })
}

/// The processes that carry `DROVER_STATE_DIR=state_dir` and the mark of a
/// worker instance or a run in their environment: whatever a supervisor of
/// this state_dir started, even what its state file and ledger never got to
/// record (a spawn just before it was SIGKILLed). This process and its
/// ancestors are left out.
pub fn marked_processes(state_dir: &std::path::Path) -> Vec<i32> {
    let spared = self_and_ancestors();
    let want = state_dir.as_os_str().as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !spared.contains(pid))
        .filter(|&pid| {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { return false };
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            let has = |name: &[u8]| vars.iter().any(|kv| kv.starts_with(name));
            vars.iter().any(|kv| kv.strip_prefix(b"DROVER_STATE_DIR=") == Some(want))
                && (has(b"DROVER_WORKER=") || has(b"DROVER_RUN="))
        })
        .collect()
}

/// This process, its parent, and so on up to (not including) init.
pub fn self_and_ancestors() -> Vec<i32> {
    let mut chain = vec![std::process::id() as i32];
    while let Some(parent) = stat_fields(*chain.last().unwrap()).and_then(|f| f.get(1)?.parse::<i32>().ok()) {
        if parent <= 1 || chain.contains(&parent) {
            break;
        }
        chain.push(parent);
    }
    chain
}

/// The soft and hard limits on open files drover started with, once
/// [`raise_fd_limit`] raised the soft one (`u64::MAX`: not raised).
static STARTED_NOFILE: [AtomicU64; 2] = [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)];

/// Raises drover's soft limit on open files to the hard limit, as systemd
/// and most daemons do: every instance holds two pipe ends, and 1000
/// workers exceed the usual soft limit of 1024. Workers do not inherit
/// the raise: see [`give_back_fd_limit`].
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok()
    {
        STARTED_NOFILE[0].store(soft, Ordering::Relaxed);
        STARTED_NOFILE[1].store(hard, Ordering::Relaxed);
    }
}

/// Marks every descriptor drover inherited beyond stdio close-on-exec, so
/// that none of them reaches a worker: what drover opens is close-on-exec
/// already, and a worker gets only stdio and its sockets. A descriptor
/// drover was handed on purpose is used by drover itself, never passed on.
pub fn close_inherited_on_exec() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: fcntl on a number; one that is closed (the listing's own
        // descriptor) just fails.
        unsafe {
            let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
            if flags >= 0 && flags & nix::libc::FD_CLOEXEC == 0 {
                nix::libc::fcntl(fd, nix::libc::F_SETFD, flags | nix::libc::FD_CLOEXEC);
            }
        }
    }
}

/// Descriptors drover keeps free for itself (control connections, the
/// state file, /proc reads): a worker's start or a log file that would eat
/// into them waits instead.
pub const FD_RESERVE: u64 = 16;

/// Whether fewer than about [`FD_RESERVE`] descriptors are left below
/// the soft limit. The kernel hands out the lowest free number, so when
/// the lowest free one lies in the top [`FD_RESERVE`], all below are taken
/// (a hole lower down is used first, and soon). Two system calls.
pub fn descriptors_short() -> bool {
    use nix::sys::resource::{Resource, getrlimit};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else { return false };
    match nix::fcntl::fcntl(std::io::stderr(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0)) {
        Ok(fd) => {
            // SAFETY: fd was just made by F_DUPFD and is owned here alone.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            u64::try_from(fd).unwrap_or(0).saturating_add(FD_RESERVE) >= soft
        }
        // EBADF (no stderr at all) says nothing about the limit.
        Err(e) => e == Errno::EMFILE,
    }
}

/// Makes `cmd` start with the soft limit on open files that drover itself
/// started with (programs that size tables by the limit, or that select(2),
/// expect the usual one). Nothing to do when drover raised nothing.
pub fn give_back_fd_limit(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let Some(limit) = fd_limit_to_give_back() else { return };
    // SAFETY: setrlimit is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || give_back_in_child(limit));
    }
}

/// The open-files limit drover started with, when it raised its own (see
/// [`give_back_fd_limit`]): soft and hard.
pub fn fd_limit_to_give_back() -> Option<(u64, u64)> {
    let (soft, hard) = (STARTED_NOFILE[0].load(Ordering::Relaxed), STARTED_NOFILE[1].load(Ordering::Relaxed));
    (soft != u64::MAX).then_some((soft, hard))
}

/// In the child, between fork and exec: sets the open-files limit back.
/// A plain system call.
pub fn give_back_in_child((soft, hard): (u64, u64)) -> io::Result<()> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_is_told_only_when_both_readings_fall_in_it() {
        let hz = clock_ticks().expect("clock ticks");
        let tick = std::time::Duration::from_nanos(1_000_000_000 / hz);
        let at = |ticks: u32, plus_ns: u64| Some(tick * ticks + std::time::Duration::from_nanos(plus_ns));
        assert_eq!(ticks_between(at(500, 1), at(500, 2)), Some(500));
        assert_eq!(ticks_between(at(500, 0), at(501, 0)), None);
        assert_eq!(ticks_between(None, at(1, 0)), None);
        // The clock is the one /proc counts in: this process began before now.
        let now = ticks_between(boottime(), boottime()).or_else(|| ticks_between(boottime(), boottime()));
        let me = start_ticks(std::process::id() as i32).expect("own start");
        assert!(now.is_some_and(|n| n >= me), "{now:?} before {me}");
    }

    #[test]
    fn own_process_identity() {
        let me = std::process::id() as i32;
        assert!(pid_alive(me));
        assert!(start_ticks(me).is_some());
        assert_eq!(pgid_of(me), Some(nix::unistd::getpgrp().as_raw()));
        assert!(!pid_alive(0));
    }

    #[test]
    fn an_orphan_is_adopted_by_the_main_thread_and_a_thread_s_child_is_not() {
        crate::os::reaper::isolated(
            module_path!(),
            "an_orphan_is_adopted_by_the_main_thread_and_a_thread_s_child_is_not",
            || {
                nix::sys::prctl::set_child_subreaper(true).unwrap();
                // Spawned from another thread, as the supervisor spawns:
                // a child that stays, and one that leaves an orphan.
                // (A thread that ends hands its children to the main
                // thread: this one stays until the checks are done.)
                let (tx, rx) = std::sync::mpsc::channel();
                let (done, wait_done) = std::sync::mpsc::channel::<()>();
                let spawner = std::thread::spawn(move || {
                    let stays = std::process::Command::new("sleep").arg("5").spawn().unwrap();
                    let parent = std::process::Command::new("sh")
                        .args(["-c", "sleep 5 >/dev/null & echo $!"])
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .unwrap();
                    tx.send((stays, parent)).unwrap();
                    let _ = wait_done.recv();
                });
                let (mut stays, mut parent) = rx.recv().unwrap();
                let mut line = String::new();
                std::io::Read::read_to_string(parent.stdout.as_mut().unwrap(), &mut line).unwrap();
                let orphan: i32 = line.trim().parse().unwrap();
                parent.wait().unwrap();
                let adopted = adopted_children();
                assert!(adopted.contains(&orphan), "{orphan} not in {adopted:?}");
                assert!(!adopted.contains(&(stays.id() as i32)), "{adopted:?}");
                assert!(own_children().contains(&(stays.id() as i32)));
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(orphan), Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(orphan), None);
                stays.kill().unwrap();
                stays.wait().unwrap();
                drop(done);
                spawner.join().unwrap();
            },
        );
    }

    #[test]
    fn a_list_of_children_longer_than_the_first_read_is_read_whole() {
        // 40 pids are more than the 64 bytes of the first read.
        let mut kids: Vec<std::process::Child> =
            (0..40).map(|_| std::process::Command::new("sleep").arg("5").spawn().unwrap()).collect();
        let listed = own_children();
        let missing: Vec<u32> =
            kids.iter().map(|c| c.id()).filter(|p| !listed.contains(&(*p as i32))).collect();
        for c in &mut kids {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(missing.is_empty(), "not listed: {missing:?} (listed {listed:?})");
    }

    #[test]
    fn children_and_environ() {
        let mut child =
            std::process::Command::new("sleep").arg("5").env("DROVER_TEST_MARK", "x1").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(own_children().contains(&pid));
        // Right after the spawn the child may still be in exec, with an
        // empty environ: wait for it, with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while environ_var(pid, "DROVER_TEST_MARK").is_none() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(environ_var(pid, "DROVER_TEST_MARK").as_deref(), Some("x1"));
        assert_eq!(environ_var(pid, "DROVER_TEST_MAR"), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn marked_processes_are_found_by_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let spawn = |sd: &std::path::Path, mark: &str| {
            std::process::Command::new("sleep")
                .arg("5")
                .env("DROVER_STATE_DIR", sd)
                .env(mark, "1")
                .spawn()
                .unwrap()
        };
        let mut ours = spawn(dir.path(), "DROVER_WORKER");
        let mut run = spawn(dir.path(), "DROVER_RUN");
        let mut other_dir = spawn(&dir.path().join("x"), "DROVER_WORKER");
        let mut unmarked = spawn(dir.path(), "DROVER_TEST_MARK");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut found = marked_processes(dir.path());
        while found.len() < 2 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            found = marked_processes(dir.path());
        }
        found.sort_unstable();
        let mut want = vec![ours.id() as i32, run.id() as i32];
        want.sort_unstable();
        assert_eq!(found, want);
        for c in [&mut ours, &mut run, &mut other_dir, &mut unmarked] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}
