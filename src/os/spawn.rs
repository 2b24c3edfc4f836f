//! drover's own spawn. For a child that has a cgroup, `clone3` with
//! `CLONE_INTO_CGROUP` (Linux 5.7) makes the child in its cgroup, where
//! std's spawn followed by a write to `cgroup.procs` moves it there, and
//! each move takes the kernel's cgroup_threadgroup_rwsem for writing
//! (an RCU grace period, and a wait for every fork in flight).
//!
//! And a child leaves drover's descriptors behind without closing them
//! one by one. drover holds two pipes per instance: a child made by
//! fork gets a copy of every one, which exec then closes, and at 1000
//! instances that was most of a restart (0.9 ms of 2). Here the child
//! shares drover's table (`CLONE_FILES`) and its first act is
//! `close_range(end, ~0, CLOSE_RANGE_UNSHARE)` (Linux 5.9): a table of
//! its own with only the descriptors below `end`, copied. What it needs
//! waits there, in a set of slots reserved at start (each holds
//! /dev/null while no spawn uses it), and the parent, suspended until
//! the child has exec'd (`CLONE_VFORK`), then puts /dev/null back.
//!
//! Everything is prepared in the parent: the child is a copy of one thread
//! of a multithreaded process, made by a bare system call and not by
//! glibc's fork, so it may not allocate, take a lock or rely on glibc's
//! idea of its threads: it makes raw system calls only, on memory made
//! before the clone, then execs. What it does, in order (std's order):
//! signal mask and SIGPIPE back to default, stdio, its own process
//! group, the directory, the caller's hooks, exec. A step that fails
//! leaves its errno (and the step) where the parent reads it (in the
//! memory they share, or over a close-on-exec pipe when the child is a
//! copy) and exits 127; the parent reaps it and returns the error, as
//! `Command::spawn` would.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use nix::libc;

/// `CLONE_INTO_CGROUP` (linux/sched.h), as clone3's u64 flags.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `CLOSE_RANGE_UNSHARE` (linux/close_range.h).
const CLOSE_RANGE_UNSHARE: libc::c_uint = 1 << 1;

/// Sets of slots: spawns at once that leave drover's descriptors behind
/// (more wait for a set; a set is held for a fork and an exec).
const SLOT_SETS: usize = 2;

/// The open-files limit below which no slots are reserved: they would
/// take a share of it worth more than the time they save.
const SLOTS_MIN_LIMIT: u64 = 1024;

/// Slots must sit this low: the child copies every descriptor below them.
const SLOTS_BELOW: RawFd = 128;

/// Descriptors a spawn may carry over into its child, besides stdio (a
/// hook's report, sockets, the shim); one with more copies them all.
const CARRY: usize = 6;

/// The slots of one spawn: the child's stdin (/dev/null, always),
/// stdout, stderr, and what it carries.
type SlotSet = [RawFd; 3 + CARRY];

/// The stack a child that shares drover's memory runs on until exec
/// (see [`spawn`]): one per set of slots, reused.
struct Stack(Box<[u128]>);

/// A child's stack: `child` makes raw system calls and runs the hooks.
const STACK_BYTES: usize = 64 << 10;

struct Slots {
    free: Mutex<Vec<(SlotSet, Stack)>>,
    freed: Condvar,
    /// Above every slot: the child keeps the descriptors below it.
    end: RawFd,
}

static SLOTS: OnceLock<Option<Slots>> = OnceLock::new();

/// Reserves the slots, if the kernel has `close_range`: call it once at
/// start, before drover opens a descriptor per instance (the slots take
/// the lowest free numbers).
pub fn reserve_slots() {
    SLOTS.get_or_init(|| match make_slots() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "spawns copy drover's descriptors (no close_range slots)");
            None
        }
    });
}

fn make_slots() -> io::Result<Slots> {
    // SAFETY: close_range of the last possible descriptor alone: it closes
    // nothing; it fails where the kernel lacks the call.
    if unsafe { libc::syscall(libc::SYS_close_range, libc::c_uint::MAX, libc::c_uint::MAX, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    if soft < SLOTS_MIN_LIMIT {
        return Err(io::Error::other(format!("the open-files limit is {soft}")));
    }
    let null = dev_null()?;
    let mut sets = Vec::with_capacity(SLOT_SETS);
    let mut end = 0;
    for _ in 0..SLOT_SETS {
        let mut set: SlotSet = [0; 3 + CARRY];
        for slot in &mut set {
            // SAFETY: F_DUPFD_CLOEXEC makes a descriptor this process keeps
            // for its whole life.
            let fd = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            *slot = fd;
            end = end.max(fd + 1);
        }
        sets.push((set, Stack(vec![0u128; STACK_BYTES / 16].into_boxed_slice())));
    }
    if end > SLOTS_BELOW {
        for fd in sets.iter().flat_map(|(set, _)| set) {
            // SAFETY: closing the slots just made, which nothing else uses.
            unsafe { libc::close(*fd) };
        }
        return Err(io::Error::other(format!("descriptors up to {end} are open at start")));
    }
    Ok(Slots { free: Mutex::new(sets), freed: Condvar::new(), end })
}

/// Whether spawns can leave drover's descriptors behind (see the module).
pub fn slots_reserved() -> bool {
    SLOTS.get().is_some_and(Option::is_some)
}

/// A set of slots taken for one spawn; dropped, it holds /dev/null again.
struct Lease {
    slots: &'static Slots,
    set: SlotSet,
    stack: Option<Stack>,
    /// The slots given another descriptor, one bit each.
    used: u32,
}

impl Lease {
    fn take() -> Option<Lease> {
        let slots = SLOTS.get()?.as_ref()?;
        let mut free = slots.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((set, stack)) = free.pop() {
                return Some(Lease { slots, set, stack: Some(stack), used: 0 });
            }
            free = slots.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Puts `fd` in slot `i` (close-on-exec), closing what it held.
    fn put(&mut self, i: usize, fd: RawFd) -> io::Result<()> {
        self.used |= 1 << i;
        // SAFETY: dup3 onto a slot this lease holds.
        if unsafe { libc::dup3(fd, self.set[i], libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Slot 0 holds /dev/null for good. A slot that cannot be reset
        // would keep a pipe open: the set is not used again.
        let used = std::mem::take(&mut self.used);
        if let Some(stack) = self.stack.take()
            && (1..self.set.len()).filter(|i| used & (1 << i) != 0).all(|i| self.put(i, self.set[0]).is_ok())
        {
            self.slots.free.lock().unwrap_or_else(|e| e.into_inner()).push((self.set, stack));
            self.slots.freed.notify_one();
        } else {
            tracing::warn!(slots = ?self.set, "cannot reset a spawn's descriptor slots; they are retired");
        }
    }
}

/// The signals a child puts back to their default before it unblocks
/// signals, one bit each (see [`signal_bit`]), as [`note_signal_handlers`]
/// found them; 0 until then, and each child looks at all 64 itself.
static RESET_SIGNALS: AtomicU64 = AtomicU64::new(0);

fn signal_bit(sig: libc::c_int) -> u64 {
    1u64 << (sig - 1)
}

/// The signals drover catches, and SIGPIPE (which Rust ignores): a raw
/// system call per signal, so the child of a bare clone may call it too.
fn caught_signals() -> u64 {
    let mut caught = signal_bit(libc::SIGPIPE);
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: sigaction only reads the disposition into `old`.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } < 0 {
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
            caught |= signal_bit(sig);
        }
    }
    caught
}

/// Notes which signals drover catches, so that each child puts back
/// those alone instead of asking about all 64 between its clone and its
/// exec (a sixth of a restart). Call it once drover's handlers are in
/// place, before the first spawn: a handler installed after it would
/// stay the child's until exec.
pub fn note_signal_handlers() {
    RESET_SIGNALS.store(caught_signals(), Ordering::Relaxed);
}

/// The kernel's `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Set once clone3 turned out unusable here (old kernel, seccomp): later
/// spawns go to the fallback at once.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Makes every later spawn in this process take the fallback, as if
/// clone3 were refused (a test of the fallback, in a process of its own).
#[cfg(test)]
pub(crate) fn refuse_clone3() {
    UNSUPPORTED.store(true, Ordering::Relaxed);
}

/// A hook run in the child before exec; see [`Spawn::hook`].
type Hook = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

/// A child to spawn into a cgroup, everything converted for the child.
pub struct Spawn {
    program: CString,
    /// Kept for the pointers in `argv_ptrs`.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    env_ptrs: Vec<*const libc::c_char>,
    dir: CString,
    piped: bool,
    /// The cgroup's directory, for clone3.
    cgroup: Option<OwnedFd>,
    hooks: Vec<Hook>,
    /// Descriptors of drover's a hook uses in the child (a hook's report,
    /// sockets kept across exec), at the same numbers there.
    carried: Vec<RawFd>,
}

// SAFETY: the raw pointers point into the CStrings the Spawn owns, which
// are never changed; nothing is shared with another thread.
unsafe impl Send for Spawn {}

/// A child that was spawned and has exec'd.
#[derive(Debug)]
pub struct Spawned {
    /// Also its process group.
    pub pid: i32,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Why no child runs.
#[derive(Debug)]
pub enum Error {
    /// clone3 into a cgroup cannot be used here: no child was made; the
    /// caller spawns another way.
    Unsupported(io::Error),
    /// The spawn failed (a child that was made is reaped).
    Failed(io::Error),
}

/// The steps the child reports, after a hook's number (0, 1, …).
const STEP_SIGNALS: u32 = 1000;
const STEP_STDIO: u32 = 1001;
const STEP_PGROUP: u32 = 1002;
const STEP_DIR: u32 = 1003;
const STEP_EXEC: u32 = 1004;
const STEP_DESCRIPTORS: u32 = 1005;

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte found in provided data"))
}

/// A null-terminated array of pointers into `strings`.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

impl Spawn {
    /// `program` is run as it is (the caller resolves it against the
    /// child's PATH); `argv` includes argv\[0\]; `env` is the child's whole
    /// environment; stdin is /dev/null, stdout and stderr pipes
    /// (`piped`) or /dev/null.
    pub fn new<A, K, V>(
        program: &OsStr,
        argv: impl IntoIterator<Item = A>,
        env: impl IntoIterator<Item = (K, V)>,
        dir: &Path,
        piped: bool,
        cgroup: Option<OwnedFd>,
    ) -> io::Result<Spawn>
    where
        A: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let argv: Vec<CString> = argv.into_iter().map(|a| c_string(a.as_ref())).collect::<io::Result<_>>()?;
        let env: Vec<CString> = env
            .into_iter()
            .map(|(k, v)| {
                let mut kv = k.as_ref().as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_ref().as_bytes());
                c_string(OsStr::from_bytes(&kv))
            })
            .collect::<io::Result<_>>()?;
        Ok(Spawn {
            program: c_string(program)?,
            argv_ptrs: pointers(&argv),
            _argv: argv,
            env_ptrs: pointers(&env),
            _env: env,
            dir: c_string(dir.as_os_str())?,
            piped,
            cgroup,
            hooks: Vec::new(),
            carried: Vec::new(),
        })
    }

    /// Adds a hook the child runs after chdir and before exec, in the
    /// order added; its error fails the spawn. Hook `i` is reported as
    /// step `i`.
    ///
    /// # Safety
    /// `f` runs in a child made by a bare clone3: it must make raw system
    /// calls only (no allocation, no lock, no std I/O, nothing that relies
    /// on glibc's bookkeeping of threads, such as its setuid).
    pub unsafe fn hook(&mut self, f: impl Fn() -> io::Result<()> + Send + Sync + 'static) {
        self.hooks.push(Box::new(f));
    }

    /// Says that a hook uses descriptor `fd` of drover's (which stays
    /// open until the spawn returns): the child has it at that number.
    pub fn carry(&mut self, fd: RawFd) {
        self.carried.push(fd);
    }
}

/// Opens a cgroup's directory for [`Spawn::new`].
pub fn open_cgroup(dir: &Path) -> io::Result<OwnedFd> {
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(dir)?;
    Ok(OwnedFd::from(f))
}

/// A close-on-exec pipe: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fd` at a number above stdio (close-on-exec), so that the child's
/// dup2 onto 0, 1 and 2 clobbers none of its other sources.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 { Err(io::Error::last_os_error()) } else { Ok(unsafe { OwnedFd::from_raw_fd(new) }) }
}

fn dev_null() -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    above_stdio(OwnedFd::from(f))
}

/// /dev/null, open for drover's life (close-on-exec, above stdio): the
/// child's stdin, and its stdout and stderr when they are not piped.
static NULL: OnceLock<OwnedFd> = OnceLock::new();

fn null_fd() -> io::Result<RawFd> {
    if let Some(fd) = NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let fd = dev_null()?;
    Ok(NULL.get_or_init(|| fd).as_raw_fd())
}

/// The pipes of a child whose output is piped: the write ends are its
/// stdout and stderr, the read ends the parent's.
struct Pipes {
    out: (OwnedFd, OwnedFd),
    err: (OwnedFd, OwnedFd),
}

fn pipes() -> io::Result<Pipes> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok(Pipes { out: (out_r, above_stdio(out_w)?), err: (err_r, above_stdio(err_w)?) })
}

/// Spawns `s` (into its cgroup, if it has one); returns once the child
/// has exec'd (or the spawn failed). Call it with the reaper held off
/// (`Reaper::spawn_own`): a failed child is reaped here, by its pid.
/// Unsupported: neither a cgroup to be born in nor drover's descriptors
/// to leave behind make this spawn worth it here, or clone3 is refused.
pub fn spawn(s: &Spawn) -> Result<Spawned, Error> {
    let unsupported = || Err(Error::Unsupported(io::Error::from_raw_os_error(libc::ENOSYS)));
    let fits = s.carried.len() <= CARRY;
    if UNSUPPORTED.load(Ordering::Relaxed) || (s.cgroup.is_none() && (!fits || !slots_reserved())) {
        return unsupported();
    }
    let pipes = if s.piped { Some(pipes().map_err(Error::Failed)?) } else { None };
    // A lease's stack is for a child that shares drover's memory; into a
    // cgroup that takes clone3_vm, written for x86_64 alone. Elsewhere the
    // child into a cgroup is a copy, with a table of its own.
    let shares_memory = s.cgroup.is_none() || cfg!(target_arch = "x86_64");
    let mut lease = if fits && shares_memory { Lease::take() } else { None };
    if s.cgroup.is_none() && lease.is_none() {
        return unsupported();
    }
    // A child that shares drover's memory (it has a stack of the lease's)
    // reports a failure there, as posix_spawn's does; one made like fork
    // writes it to a close-on-exec pipe, whose EOF says it exec'd.
    let report_pipe = if lease.is_none() { Some(pipe().map_err(Error::Failed)?) } else { None };
    let null = match &lease {
        Some(l) => l.set[0],
        None => null_fd().map_err(Error::Failed)?,
    };
    let mut flags = 0;
    let mut sources = match &pipes {
        Some(p) => [null, p.out.1.as_raw_fd(), p.err.1.as_raw_fd()],
        None => [null; 3],
    };
    // (slot, number in drover's table) of each descriptor carried over.
    let mut carried = [(-1, -1); CARRY];
    if let Some(l) = &mut lease {
        // Slots 1 and 2 hold /dev/null while no spawn uses them.
        if let Some(p) = &pipes {
            l.put(1, p.out.1.as_raw_fd()).map_err(Error::Failed)?;
            l.put(2, p.err.1.as_raw_fd()).map_err(Error::Failed)?;
        }
        for (i, fd) in s.carried.iter().enumerate() {
            l.put(3 + i, *fd).map_err(Error::Failed)?;
            carried[i] = (l.set[3 + i], *fd);
        }
        sources = [l.set[0], l.set[1], l.set[2]];
        flags |= libc::CLONE_FILES as u64 | libc::CLONE_VFORK as u64;
    }
    if s.cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: s.cgroup.as_ref().map_or(0, |c| c.as_raw_fd() as u64),
        ..CloneArgs::default()
    };
    let keep_below = lease.as_ref().map(|l| l.slots.end);
    let report = match &report_pipe {
        Some((_, w)) => Report::Pipe(w.as_raw_fd()),
        None => Report::Shared,
    };
    let task = Task {
        s,
        stdio: sources,
        report,
        failure: AtomicU64::new(0),
        keep_below,
        carried,
        reset_signals: RESET_SIGNALS.load(Ordering::Relaxed),
    };
    // No signal reaches the child before it has put drover's handlers
    // aside (see `child`); this thread's mask comes back after the clone.
    let all = nix::sys::signal::SigSet::all();
    let old_mask = all.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_SETMASK).ok();
    let shared_memory = s.cgroup.is_none();
    let task_ptr = (&task as *const Task).cast_mut().cast::<libc::c_void>();
    let stack = lease.as_mut().and_then(|l| l.stack.as_mut());
    let pid = match stack {
        // With a stack of its own, the child shares drover's memory, as
        // posix_spawn's does: no page tables copied, no copy-on-write
        // faults after. This thread waits until it has exec'd
        // (CLONE_VFORK). No cgroup to be born in: glibc's clone.
        Some(stack) if shared_memory => {
            let top = stack.0.as_mut_ptr_range().end.cast::<libc::c_void>();
            let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::SIGCHLD;
            // SAFETY: the child runs `enter` on its own stack, reading
            // `task`, which outlives it: this thread is suspended until
            // the child has exec'd or exited.
            unsafe { libc::clone(enter, top, flags, task_ptr) as libc::c_long }
        }
        // Into a cgroup: clone3, which glibc does not wrap.
        #[cfg(target_arch = "x86_64")]
        Some(stack) => {
            let args = CloneArgs {
                flags: args.flags | libc::CLONE_VM as u64,
                stack: stack.0.as_mut_ptr() as u64,
                stack_size: std::mem::size_of_val(&*stack.0) as u64,
                ..args
            };
            // SAFETY: as for glibc's clone above; `args` lives across the
            // call.
            unsafe { clone3_vm(&args, enter, task_ptr) }
        }
        // SAFETY: clone3 without CLONE_VM: the child gets a copy of this
        // thread's memory and descriptor table (like fork; no lease here)
        // and runs only `child`, which execs or exits; `args` lives
        // across the call.
        _ => unsafe {
            let pid =
                libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>());
            if pid == 0 {
                child(&task)
            }
            pid
        },
    };
    let clone_error = (pid < 0).then(io::Error::last_os_error);
    if let Some(mask) = old_mask {
        let _ = mask.thread_set_mask();
    }
    if let Some(e) = clone_error {
        return Err(match e.raw_os_error() {
            // glibc's clone refused: this spawn goes std's way.
            Some(libc::ENOSYS | libc::EINVAL) if shared_memory => Error::Unsupported(e),
            Some(libc::ENOSYS | libc::EINVAL | libc::E2BIG) => {
                if !UNSUPPORTED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "clone3 into a cgroup is refused here; children join their cgroup after the fork instead"
                    );
                }
                Error::Unsupported(e)
            }
            _ => Error::Failed(e),
        });
    }
    let pid = pid as i32;
    // The child's ends: the parent must not hold the pipes' write ends
    // (their EOF says the child's output ended) nor the report's (its
    // EOF says the child exec'd). The slots' copies go too: the child,
    // past exec (CLONE_VFORK), no longer shares them.
    drop(lease);
    let (stdout, stderr) = match pipes {
        Some(Pipes { out, err }) => (Some(out.0), Some(err.0)),
        None => (None, None),
    };
    let failure = match report_pipe {
        Some((r, w)) => {
            drop(w);
            read_report(&r)
        }
        // The child has exec'd or exited (CLONE_VFORK): what it wrote
        // is there.
        None => shared_failure(task.failure.load(Ordering::SeqCst)),
    };
    match failure {
        None => Ok(Spawned { pid, stdout, stderr }),
        Some(e) => {
            reap(pid);
            Err(Error::Failed(e))
        }
    }
}

/// A failure the child left in shared memory: 0 (none), or
/// [`SHARED_FAILED`] with the step and the errno.
fn shared_failure(word: u64) -> Option<io::Error> {
    (word & SHARED_FAILED != 0).then(|| io::Error::from_raw_os_error(word as u32 as i32))
}

/// Marks a failure word in shared memory (see [`shared_failure`]).
const SHARED_FAILED: u64 = 1 << 63;

/// The child's report: None when it exec'd (EOF), else its error.
fn read_report(fd: &OwnedFd) -> Option<io::Error> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: a read into the rest of a buffer on the stack.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Some(e);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    match got {
        0 => None,
        8 => {
            let errno = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            Some(io::Error::from_raw_os_error(errno))
        }
        // A report cut short: the child died writing it, and never ran.
        _ => Some(io::Error::other("the child died before it could exec")),
    }
}

/// Waits for the failed child `pid` (it has exited or is about to).
fn reap(pid: i32) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child's pid.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// What the child is given: all of it prepared before the clone.
struct Task<'a> {
    s: &'a Spawn,
    /// The descriptors that become its 0, 1 and 2.
    stdio: [RawFd; 3],
    /// Where it reports a failed step.
    report: Report,
    /// [`Report::Shared`]'s word (see [`shared_failure`]).
    failure: AtomicU64,
    /// With slots: the descriptors below it are the ones it keeps.
    keep_below: Option<RawFd>,
    /// With slots: (slot, number) of what it carries over; -1 unused.
    carried: [(RawFd, RawFd); CARRY],
    /// [`RESET_SIGNALS`] when the clone was made.
    reset_signals: u64,
}

/// Where the child reports the step that failed.
#[derive(Clone, Copy)]
enum Report {
    /// A close-on-exec pipe's write end (a child made like fork).
    Pipe(RawFd),
    /// `Task::failure`, in the memory it shares with drover.
    Shared,
}

/// clone3 with `args` (CLONE_VM, a stack): the child calls `entry(arg)`
/// on its stack (it never returns); the parent gets the pid, or -1 with
/// errno set. Written out because glibc exports no clone3.
///
/// # Safety
/// `args` names a stack that is 16-byte aligned at its top and that no
/// one else uses while the child runs; `entry` must never return.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vm(
    args: &CloneArgs,
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> libc::c_long {
    let ret: libc::c_long;
    // SAFETY: the caller's. The child starts at the instruction after the
    // syscall, on the new stack, with every register but rax, rcx and
    // r11 as the parent had them: r12 and r13 carry `arg` and `entry`.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = -ret as libc::c_int };
        return -1;
    }
    ret
}

/// The child's entry from glibc's clone (and `clone3_vm`).
extern "C" fn enter(task: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `task` points to the parent's Task, alive until the child
    // has exec'd (the parent is suspended meanwhile).
    unsafe { child(&*task.cast::<Task>()) }
}

/// The child, after the clone: never returns.
///
/// # Safety
/// Only in the child of a bare clone (a copy of one thread, or one that
/// shares drover's memory while that thread is suspended): raw system
/// calls on memory prepared before the clone, then exec or _exit.
unsafe fn child(task: &Task) -> ! {
    let (s, stdio, keep_below) = (task.s, &task.stdio, task.keep_below);
    // Each step's failure: errno and step to the parent, then exit.
    let fail = |errno: i32, step: u32| -> ! {
        match task.report {
            Report::Pipe(fd) => {
                let mut buf = [0u8; 8];
                buf[..4].copy_from_slice(&errno.to_ne_bytes());
                buf[4..].copy_from_slice(&step.to_ne_bytes());
                // SAFETY: write is a raw system call.
                unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            }
            Report::Shared => task
                .failure
                .store(SHARED_FAILED | u64::from(step) << 32 | u64::from(errno as u32), Ordering::SeqCst),
        }
        // SAFETY: _exit is a raw system call.
        unsafe { libc::_exit(127) }
    };
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
    // SAFETY (each call below): a raw system call on values prepared
    // before the clone.
    unsafe {
        // First, a descriptor table of its own with the slots and what
        // sits below them: until then it shares drover's.
        if let Some(end) = keep_below {
            if libc::syscall(
                libc::SYS_close_range,
                end as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_UNSHARE,
            ) < 0
            {
                fail(errno(), STEP_DESCRIPTORS);
            }
            // Its table is its own now: what it carries goes back to the
            // numbers its hooks know (free here: above every slot).
            for &(slot, fd) in task.carried.iter().filter(|(slot, _)| *slot >= 0) {
                if libc::dup3(slot, fd, libc::O_CLOEXEC) < 0 {
                    fail(errno(), STEP_DESCRIPTORS);
                }
            }
        }
        // drover's handlers are not the child's: every signal caught
        // goes back to its default (one that came meanwhile waits in the
        // mask), and so does SIGPIPE, which Rust ignores; drover ignores
        // no other. Then no signal is blocked (drover's threads block
        // some, and every signal was blocked for the clone).
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        let reset = if task.reset_signals != 0 { task.reset_signals } else { caught_signals() };
        for sig in (1..=64).filter(|sig| reset & signal_bit(*sig) != 0) {
            if libc::sigaction(sig, &dfl, std::ptr::null_mut()) < 0 {
                fail(errno(), STEP_SIGNALS);
            }
        }
        let empty = [0u64; 1];
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            empty.as_ptr(),
            std::ptr::null::<u64>(),
            8,
        ) < 0
        {
            fail(errno(), STEP_SIGNALS);
        }
        for (fd, target) in stdio.iter().zip(0..) {
            // The sources are above 2 (see `above_stdio`; slots are too):
            // dup2 makes a copy that is not close-on-exec.
            if libc::dup2(*fd, target) < 0 {
                fail(errno(), STEP_STDIO);
            }
        }
        if libc::setpgid(0, 0) < 0 {
            fail(errno(), STEP_PGROUP);
        }
        if libc::chdir(s.dir.as_ptr()) < 0 {
            fail(errno(), STEP_DIR);
        }
    }
    for (i, hook) in s.hooks.iter().enumerate() {
        if let Err(e) = hook() {
            fail(e.raw_os_error().unwrap_or(libc::EINVAL), i as u32);
        }
    }
    // SAFETY: execve with null-terminated arrays made before the clone.
    unsafe { libc::execve(s.program.as_ptr(), s.argv_ptrs.as_ptr(), s.env_ptrs.as_ptr()) };
    fail(errno(), STEP_EXEC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::cgroup::{self, Hierarchy};

    /// A hierarchy of drover's own below the test's cgroup, or None (with
    /// a message) where cgroups cannot be made: not root, no cgroup2.
    fn hierarchy(test: &str) -> Option<Hierarchy> {
        let state_dir = std::env::temp_dir().join(format!("drover-spawn-{test}-{}", std::process::id()));
        match Hierarchy::set_up(&state_dir) {
            Ok((h, _)) => Some(h),
            Err(e) if !crate::os::identity::drover_is_root() => {
                eprintln!("skipped: {e}");
                None
            }
            Err(e) => panic!("as root, cgroups must be usable here: {e}"),
        }
    }

    /// Reads all of `fd`.
    fn read_all(fd: OwnedFd) -> String {
        use std::io::Read;
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).expect("read");
        s
    }

    fn wait(pid: i32) -> i32 {
        let mut status = 0;
        // SAFETY: waitpid on our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn env() -> Vec<(&'static str, &'static str)> {
        vec![("PATH", "/usr/bin:/bin"), ("DROVER_SPAWN_TEST", "yes")]
    }

    /// Where the cgroup of a /proc/PID/cgroup text is in the cgroup2 mount.
    fn cgroup_dir(proc_cgroup: &str) -> std::path::PathBuf {
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let (mount, root) = cgroup::mount_point(&info).expect("cgroup2");
        let own = cgroup::own_path(proc_cgroup).expect("a 0:: line");
        let rel = own.strip_prefix(root.trim_end_matches('/')).unwrap_or(&own).trim_start_matches('/');
        mount.join(rel)
    }

    /// cat's first act is to read its cgroup: no move can come before.
    fn assert_cat_is_born_in(cg: &Path) {
        let s = Spawn::new(
            OsStr::new("/bin/cat"),
            ["cat", "/proc/self/cgroup"],
            env(),
            Path::new("/"),
            true,
            Some(open_cgroup(cg).expect("open")),
        )
        .expect("prepare");
        let c = spawn(&s).unwrap_or_else(|e| panic!("spawn: {e:?}"));
        let out = read_all(c.stdout.expect("a pipe"));
        assert_eq!(wait(c.pid), 0);
        assert_eq!(cgroup_dir(&out), cg, "cat saw {out:?}");
    }

    #[test]
    fn the_child_is_born_in_its_cgroup_with_its_env_dir_argv_and_stdio() {
        let Some(h) = hierarchy("born") else { return };
        let cg = h.create("born", None).expect("mkdir");
        let s = Spawn::new(
            OsStr::new("/bin/sh"),
            ["sh", "-c", "cat /proc/self/cgroup; echo \"$0|$DROVER_SPAWN_TEST|$(pwd)\"; echo err >&2; ps -o pgid= -p $$", "arg1"],
            env(),
            Path::new("/tmp"),
            true,
            Some(open_cgroup(&cg).expect("open")),
        )
        .expect("prepare");
        assert_cat_is_born_in(&cg);

        let c = spawn(&s).unwrap_or_else(|e| panic!("spawn: {e:?}"));
        let (out, err) = (read_all(c.stdout.expect("a pipe")), read_all(c.stderr.expect("a pipe")));
        assert_eq!(wait(c.pid), 0);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.iter().any(|l| l.starts_with("0::") && l.ends_with("/born")), "{out}");
        assert!(out.contains("arg1|yes|/tmp\n"), "{out}");
        assert_eq!(lines.last().map(|l| l.trim()), Some(c.pid.to_string().as_str()), "its own group: {out}");
        assert_eq!(err, "err\n");
        cgroup::remove(&cg).expect("empty again");
        cgroup::remove(&h.base).expect("remove the base");
    }

    #[test]
    fn the_child_puts_back_the_handlers_noted_and_keeps_what_drover_ignores() {
        crate::os::reaper::isolated(
            module_path!(),
            "the_child_puts_back_the_handlers_noted_and_keeps_what_drover_ignores",
            || {
                crate::os::proc::close_inherited_on_exec();
                reserve_slots();
                extern "C" fn caught(_: libc::c_int) {}
                // SAFETY: a handler that does nothing, and an ignore, as a
                // parent of drover's may have left it.
                unsafe {
                    libc::signal(libc::SIGUSR1, caught as extern "C" fn(libc::c_int) as libc::sighandler_t);
                    libc::signal(libc::SIGUSR2, libc::SIG_IGN);
                }
                note_signal_handlers();
                assert_ne!(RESET_SIGNALS.load(Ordering::Relaxed) & signal_bit(libc::SIGUSR1), 0);
                let mut s = Spawn::new(
                    OsStr::new("/bin/cat"),
                    ["cat", "/proc/self/status"],
                    env(),
                    Path::new("/"),
                    true,
                    None,
                )
                .expect("prepare");
                // SAFETY: sigaction only reads the disposition.
                unsafe {
                    s.hook(|| {
                        let mut old: libc::sigaction = std::mem::zeroed();
                        libc::sigaction(libc::SIGUSR1, std::ptr::null(), &mut old);
                        if old.sa_sigaction == libc::SIG_DFL {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(libc::EBUSY))
                        }
                    })
                };
                let c = spawn(&s).unwrap_or_else(|e| panic!("drover's handler was still the child's: {e:?}"));
                let status = read_all(c.stdout.expect("a pipe"));
                assert_eq!(wait(c.pid), 0);
                let ignored = status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigIgn:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                    .unwrap_or_else(|| panic!("no SigIgn in {status}"));
                assert_ne!(ignored & signal_bit(libc::SIGUSR2), 0, "an ignore drover inherited stays");
                assert_eq!(ignored & signal_bit(libc::SIGPIPE), 0, "SIGPIPE, which Rust ignores, does not");
            },
        );
    }

    #[test]
    fn a_child_leaves_drovers_descriptors_behind_and_its_pipes_end_with_it() {
        // In a process of its own: the slots are reserved once per process.
        crate::os::reaper::isolated(
            module_path!(),
            "a_child_leaves_drovers_descriptors_behind_and_its_pipes_end_with_it",
            || {
                // As the supervisor does (the test harness leaves some open).
                crate::os::proc::close_inherited_on_exec();
                reserve_slots();
                assert!(slots_reserved(), "close_range is in every kernel drover is tested on");
                // drover at many instances: descriptors by the hundred.
                let held: Vec<(OwnedFd, OwnedFd)> = (0..300).map(|_| pipe().expect("pipe")).collect();
                let s = Spawn::new(
                    OsStr::new("/bin/sh"),
                    ["sh", "-c", r#"ls /proc/self/fd; echo "$DROVER_SPAWN_TEST $(pwd)"; echo err >&2"#],
                    env(),
                    Path::new("/tmp"),
                    true,
                    None,
                )
                .expect("prepare");
                for _ in 0..(SLOT_SETS + 2) {
                    let c = spawn(&s).unwrap_or_else(|e| panic!("spawn: {e:?}"));
                    // EOF comes: no copy of the pipes stayed in a slot.
                    let (out, err) =
                        (read_all(c.stdout.expect("a pipe")), read_all(c.stderr.expect("a pipe")));
                    assert_eq!(wait(c.pid), 0);
                    let mut fds: Vec<i32> = out.lines().filter_map(|l| l.parse().ok()).collect();
                    fds.sort_unstable();
                    // 0, 1, 2 and the one ls reads /proc/self/fd through.
                    assert!(fds.len() <= 4 && fds.starts_with(&[0, 1, 2]), "the child had {fds:?}");
                    assert!(out.contains("yes /tmp\n"), "{out}");
                    assert_eq!(err, "err\n");
                }
                // Before exec, too, the child holds only what sits below
                // the slots: a hook counts its descriptors (raw calls).
                let mut counted =
                    Spawn::new(OsStr::new("/bin/true"), ["true"], env(), Path::new("/"), false, None)
                        .expect("prepare");
                // SAFETY: open, getdents64 and close on a stack buffer.
                unsafe {
                    counted.hook(|| {
                        let dir = libc::open(c"/proc/self/fd".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                        if dir < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        let mut buf = [0u8; 4096];
                        let mut entries = 0usize;
                        loop {
                            let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
                            if n <= 0 {
                                break;
                            }
                            let mut at = 0usize;
                            while at < n as usize {
                                // d_reclen: after d_ino (8) and d_off (8).
                                at += u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                                entries += 1;
                            }
                        }
                        libc::close(dir);
                        if entries > SLOTS_BELOW as usize {
                            Err(io::Error::from_raw_os_error(libc::E2BIG))
                        } else {
                            Ok(())
                        }
                    })
                };
                let c =
                    spawn(&counted).unwrap_or_else(|e| panic!("the child held drover's descriptors: {e:?}"));
                assert_eq!(wait(c.pid), 0);
                // Into a cgroup as well (where cgroups can be made).
                if let Some(h) = hierarchy("slots") {
                    let cg = h.create("slots", None).expect("mkdir");
                    assert_cat_is_born_in(&cg);
                    cgroup::remove(&cg).expect("empty again");
                    cgroup::remove(&h.base).expect("remove the base");
                }
                // Failures report as ever, and reap their child.
                let missing =
                    Spawn::new(OsStr::new("/no/such/program"), ["x"], env(), Path::new("/"), false, None)
                        .expect("prepare");
                match spawn(&missing) {
                    Err(Error::Failed(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
                    other => panic!("{other:?}"),
                }
                // SAFETY: waitpid(-1) without blocking, in a process of its own.
                let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
                assert!(r <= 0, "a zombie was left: {r}");
                // Every set is back, and each slot holds /dev/null again.
                let slots = SLOTS.get().and_then(Option::as_ref).expect("slots");
                let free: Vec<SlotSet> = slots.free.lock().unwrap().iter().map(|(set, _)| *set).collect();
                assert_eq!(free.len(), SLOT_SETS);
                for fd in free.iter().flatten() {
                    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("a slot");
                    assert_eq!(target, Path::new("/dev/null"), "slot {fd}");
                }
                drop(held);
            },
        );
    }

    #[test]
    fn a_missing_program_or_directory_fails_as_std_does_and_leaves_no_zombie() {
        // In a process of its own: it looks for zombies with waitpid(-1).
        crate::os::reaper::isolated(
            module_path!(),
            "a_missing_program_or_directory_fails_as_std_does_and_leaves_no_zombie",
            failed_spawns,
        );
    }

    fn failed_spawns() {
        let Some(h) = hierarchy("missing") else { return };
        let cg = h.create("missing", None).expect("mkdir");
        let raw = |e: Error| match e {
            Error::Failed(e) => e.raw_os_error(),
            Error::Unsupported(e) => panic!("clone3 is supported on this kernel: {e}"),
        };
        let s = Spawn::new(
            OsStr::new("/no/such/program"),
            ["x"],
            env(),
            Path::new("/"),
            false,
            Some(open_cgroup(&cg).expect("open")),
        )
        .expect("prepare");
        let std_err = std::process::Command::new("/no/such/program").spawn().expect_err("missing");
        assert_eq!(raw(spawn(&s).expect_err("missing")), std_err.raw_os_error());
        let s = Spawn::new(
            OsStr::new("/bin/true"),
            ["true"],
            env(),
            Path::new("/no/such/dir"),
            false,
            Some(open_cgroup(&cg).expect("open")),
        )
        .expect("prepare");
        let std_err =
            std::process::Command::new("/bin/true").current_dir("/no/such/dir").spawn().expect_err("missing");
        assert_eq!(raw(spawn(&s).expect_err("missing")), std_err.raw_os_error());
        // A hook's error is the spawn's.
        let mut s = Spawn::new(
            OsStr::new("/bin/true"),
            ["true"],
            env(),
            Path::new("/"),
            false,
            Some(open_cgroup(&cg).expect("open")),
        )
        .expect("prepare");
        // SAFETY: the hook makes no call at all.
        unsafe { s.hook(|| Err(io::Error::from_raw_os_error(libc::EPERM))) };
        assert_eq!(raw(spawn(&s).expect_err("refused")), Some(libc::EPERM));
        // A limit the kernel refuses: its errno, and the step named.
        let id = crate::os::identity::Identity {
            limits: [("nofile".to_string(), crate::os::identity::Rlimit { soft: 300, hard: 200 })].into(),
            ..Default::default()
        };
        let (hook, report) = crate::os::identity::prepare(&id).expect("a hook");
        let mut s = Spawn::new(
            OsStr::new("/bin/true"),
            ["true"],
            env(),
            Path::new("/"),
            false,
            Some(open_cgroup(&cg).expect("open")),
        )
        .expect("prepare");
        // SAFETY: Hook::run makes raw system calls only.
        unsafe { s.hook(move || hook.run()) };
        assert_eq!(raw(spawn(&s).expect_err("refused")), Some(libc::EINVAL));
        assert_eq!(report.failed_step(), Some("limits.nofile (soft 300, hard 200)"));
        // The failed children were reaped and the cgroup is empty.
        // SAFETY: waitpid(-1) without blocking, in a process of its own.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        assert!(r <= 0, "a zombie was left: {r}");
        assert!(!cgroup::populated(&cg));
        cgroup::remove(&cg).expect("empty");
        cgroup::remove(&h.base).expect("remove the base");
    }
}
