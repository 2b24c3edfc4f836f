//! cgroup v2 containment: where drover can create cgroups below its own
//! (root, or a subtree delegated to it), every instance and run step runs
//! in a cgroup of its own. A process can leave its process group and clear
//! its environment, but not its cgroup: `cgroup.kill` kills all of it, and
//! `cgroup.events` says when it is empty.
//!
//! drover's cgroups live in one directory per state_dir below drover's own
//! cgroup (`drover.<hash of state_dir>`): the state_dir's lock makes it
//! drover's alone, so whatever is in it at start is what a drover that was
//! SIGKILLed left behind.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// drover's cgroups, set up once at start.
#[derive(Debug)]
pub struct Hierarchy {
    /// `<cgroup2 mount><drover's cgroup>/drover.<hash>`.
    pub base: PathBuf,
    /// The memory controller is on for drover's cgroups: `max_memory` is
    /// their `memory.max`.
    pub memory: bool,
}

/// The cgroup2 mount point, from /proc/self/mountinfo text, with the root
/// of the hierarchy it shows. A hybrid host mounts it beside the v1
/// controllers (often at /sys/fs/cgroup/unified).
pub fn mount_point(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut f = left.split_whitespace();
        let root = f.nth(3)?;
        let at = f.next()?;
        Some((PathBuf::from(unescape(at)), unescape(root)))
    })
}

/// mountinfo writes a space, tab, newline and backslash as `\040` and so on.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(n) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// drover's own cgroup v2 path ("/" for the root), from /proc/self/cgroup
/// text: the `0::` line.
pub fn own_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim_end().to_string())
}

/// A stable name for the state_dir's cgroup (FNV-1a: the same across
/// drover builds, unlike std's hasher).
fn base_name(state_dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("drover.{h:016x}")
}

/// How long the start-up clean-up waits for a leftover cgroup to empty.
const LEFTOVER_WAIT: Duration = Duration::from_secs(5);

impl Hierarchy {
    /// Finds the cgroup2 mount and drover's own cgroup, and makes drover's
    /// directory below it, killing what a dead drover left there (the
    /// state_dir's lock is held). `Err` says why cgroups cannot be used.
    /// Returns the hierarchy and how many leftover cgroups had processes.
    pub fn set_up(state_dir: &Path) -> Result<(Hierarchy, usize), String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let (mount, root) =
            mount_point(&info).ok_or("no cgroup2 file system is mounted (see /proc/self/mountinfo)")?;
        let cg = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own_path(&cg).ok_or("drover is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
        // A mount of a subtree shows paths below its root.
        let rel = own.strip_prefix(root.trim_end_matches('/')).unwrap_or(&own).trim_start_matches('/');
        let own_dir = mount.join(rel);
        if !own_dir.join("cgroup.procs").is_file() {
            return Err(format!("drover's cgroup {} is not in the cgroup2 mount", own_dir.display()));
        }
        let memory = enable_memory(&own_dir, rel.is_empty());
        let base = own_dir.join(base_name(state_dir));
        let leftovers = if base.is_dir() { clean_leftovers(&base) } else { 0 };
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create a cgroup in {}: {e}", own_dir.display())),
        }
        if !base.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&base);
            return Err("the kernel has no cgroup.kill (Linux 5.14 or later is needed)".into());
        }
        let memory = memory && write(&base.join("cgroup.subtree_control"), "+memory").is_ok();
        // For the panic hook, which has no Hierarchy to hand.
        let _ = BASE.set(base.clone());
        Ok((Hierarchy { base, memory }, leftovers))
    }

    /// Makes the cgroup `name` (a leftover of that name is emptied and
    /// reused), with `memory.max` when the memory controller is on.
    /// Call it off the event loop.
    pub fn create(&self, name: &str, max_memory: Option<u64>) -> io::Result<PathBuf> {
        let dir = self.base.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = kill(&dir);
            }
            Err(e) => return Err(e),
        }
        if let (true, Some(max)) = (self.memory, max_memory) {
            if let Err(e) = write(&dir.join("memory.max"), &max.to_string()) {
                let _ = std::fs::remove_dir(&dir);
                return Err(io::Error::new(e.kind(), format!("cannot set memory.max: {e}")));
            }
            // One OOM kill takes the whole instance, not one process of it.
            let _ = write(&dir.join("memory.oom.group"), "1");
        }
        Ok(dir)
    }

    /// SIGKILLs everything in drover's cgroups.
    pub fn kill_all(&self) -> io::Result<()> {
        kill(&self.base)
    }

    /// At drover's exit: kills what is left in its cgroups (nothing, but
    /// for a bug), removes them and its own directory. Blocks for at most
    /// a few seconds.
    pub fn tear_down(&self) -> io::Result<()> {
        clean_leftovers(&self.base);
        remove(&self.base)
    }
}

/// The base of the hierarchy set up in this process.
static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// SIGKILLs everything in the cgroups of the hierarchy this process set
/// up, if any: a panic's last act (one write to cgroup.kill).
pub fn kill_set_up() -> bool {
    BASE.get().is_some_and(|b| kill(b).is_ok())
}

/// Turns the memory controller on for the cgroups drover makes, if the
/// kernel offers it to drover's cgroup. A non-root cgroup with processes
/// may not hand controllers down (the no-internal-processes rule): drover
/// first moves itself into a leaf, `<own>/supervisor`. Whether it worked.
fn enable_memory(own_dir: &Path, is_root: bool) -> bool {
    let offered = std::fs::read_to_string(own_dir.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
    if !offered {
        return false;
    }
    let control = own_dir.join("cgroup.subtree_control");
    if std::fs::read_to_string(&control).is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) {
        return true;
    }
    if write(&control, "+memory").is_ok() {
        return true;
    }
    if is_root {
        return false;
    }
    let leaf = own_dir.join("supervisor");
    let moved = (std::fs::create_dir(&leaf).is_ok() || leaf.is_dir())
        && write(&leaf.join("cgroup.procs"), "0").is_ok();
    moved && write(&control, "+memory").is_ok()
}

/// Kills what is in the leftover `base` and removes its cgroups. Returns
/// how many had processes.
fn clean_leftovers(base: &Path) -> usize {
    let children: Vec<PathBuf> = std::fs::read_dir(base)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    let busy = children.iter().filter(|c| populated(c)).count();
    if populated(base) {
        let _ = kill(base);
        wait_empty(base, LEFTOVER_WAIT);
    }
    for c in &children {
        // One already gone (removed off the loop meanwhile) is no error.
        if let Err(e) = remove(c) {
            tracing::warn!(cgroup = %c.display(), error = %e, "cannot remove a leftover cgroup");
        }
    }
    busy
}

/// Blocks until `dir` has no process, or `limit` has passed: inotify on
/// its `cgroup.events`, no polling. For start-up only.
fn wait_empty(dir: &Path, limit: Duration) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let Ok(ino) = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) else { return };
    if ino.add_watch(&dir.join("cgroup.events"), AddWatchFlags::IN_MODIFY).is_err() {
        return;
    }
    let end = Instant::now().checked_add(limit).unwrap_or_else(Instant::now);
    while populated(dir) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&ino), nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).is_err() {
            return;
        }
        let _ = ino.read_events();
    }
}

fn write(path: &Path, what: &str) -> io::Result<()> {
    std::fs::OpenOptions::new().write(true).open(path)?.write_all(what.as_bytes())
}

/// Opens the cgroup's `cgroup.procs` for a child to join it between fork
/// and exec (see [`join_in_child`]).
pub fn open_procs(dir: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(dir.join("cgroup.procs"))?;
    Ok(OwnedFd::from(f))
}

/// In the child, between fork and exec: moves the calling process into
/// the cgroup whose `cgroup.procs` is `fd` ("0" is the writer). Only
/// write(2): async-signal-safe.
pub fn join_in_child(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: a write of two bytes from a static buffer to an open fd.
    let n = unsafe { nix::libc::write(fd.as_raw_fd(), b"0\n".as_ptr().cast(), 2) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Whether the cgroup has a process (a cgroup that is gone has none).
pub fn populated(dir: &Path) -> bool {
    use super::fsutil::Made;
    let mut buf = Vec::with_capacity(64);
    super::fsutil::read_kernel_file(&dir.join("cgroup.events"), Made::InOnePiece, &mut buf)
        .is_ok_and(events_say_populated)
}

fn events_say_populated(text: &str) -> bool {
    text.lines().any(|l| l.trim() == "populated 1")
}

/// SIGKILLs every process in the cgroup and below it.
pub fn kill(dir: &Path) -> io::Result<()> {
    write(&dir.join("cgroup.kill"), "1")
}

/// Sends `sig` to every process in the cgroup (as systemd's
/// KillMode=control-group does), then SIGCONT for a stopped one.
pub fn signal(dir: &Path, sig: Signal) {
    let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) else { return };
    for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, sig);
        let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
    }
}

/// Removes an empty cgroup (one already gone is no error).
pub fn remove(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes the cgroup; one that still has processes is killed first and
/// removed once they are gone (waited for by inotify, at most a few
/// seconds). Blocks: call it off the event loop.
pub fn remove_when_empty(dir: &Path) -> io::Result<()> {
    if remove(dir).is_ok() {
        return Ok(());
    }
    kill(dir)?;
    wait_empty(dir, LEFTOVER_WAIT);
    remove(dir)
}

/// How many times the kernel's OOM killer struck in the cgroup
/// (`memory.events` oom_kill; 0 without the memory controller).
pub fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.events"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_of_a_hybrid_host_is_found_beside_v1() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(mount_point(info), Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into())));
        assert_eq!(mount_point("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"), None);
        let spaced = "41 31 0:38 /sub /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(mount_point(spaced), Some((PathBuf::from("/mnt/my cg"), "/sub".into())));
    }

    #[test]
    fn own_cgroup_is_the_v2_line() {
        let text = "4:memory:/x\n1:name=systemd:/\n0::/system.slice/drover.service\n";
        assert_eq!(own_path(text).as_deref(), Some("/system.slice/drover.service"));
        assert_eq!(own_path("4:memory:/x\n"), None);
    }

    /// Real cgroups (root on a cgroup2 host): a `setsid env -i` grandchild
    /// stays in its cgroup, cgroup.kill ends it, and a dead drover's
    /// leftovers are killed by the next set-up.
    #[test]
    fn a_setsid_grandchild_cannot_leave_its_cgroup() {
        let dir = std::env::temp_dir().join(format!("drover-cgroup-unit-{}", std::process::id()));
        let (h, _) = match Hierarchy::set_up(&dir) {
            Ok(h) => h,
            Err(e) if !crate::os::identity::drover_is_root() => return eprintln!("skipped: {e}"),
            Err(e) => panic!("as root, cgroups must be usable here: {e}"),
        };
        let cg = h.create("t.0.1", None).expect("create");
        let fd = open_procs(&cg).expect("open");
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "setsid env -i /bin/sleep 60 & wait"]);
        // SAFETY: join_in_child only calls write(2).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || join_in_child(&fd));
        }
        let mut child = cmd.spawn().expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        let count = || std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default().lines().count();
        while count() < 2 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(count(), 2, "sh and its setsid grandchild are both in the cgroup");
        assert!(populated(&cg));
        let used = crate::os::usage::of_cgroup(&cg).expect("usage");
        assert!(used.rss_bytes > 0, "summed over cgroup.procs without memory.current: {used:?}");
        // A second set-up (a drover after a SIGKILLed one) kills and removes.
        let (h2, leftovers) = Hierarchy::set_up(&dir).expect("set up again");
        let _ = child.wait();
        assert_eq!(leftovers, 1);
        assert!(!cg.exists(), "the leftover cgroup is removed");
        assert!(!populated(&h2.base));
        remove(&h2.base).expect("remove the base");
    }

    #[test]
    fn events_and_names() {
        assert!(events_say_populated("populated 1\nfrozen 0\n"));
        assert!(!events_say_populated("populated 0\nfrozen 0\n"));
        let (a, b) = (base_name(Path::new("/var/lib/a")), base_name(Path::new("/var/lib/b")));
        assert!(a.starts_with("drover.") && a.len() == 23 && a != b, "{a} {b}");
        assert_eq!(a, base_name(Path::new("/var/lib/a")));
    }
}
