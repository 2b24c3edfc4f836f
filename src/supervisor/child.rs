//! How drover starts and stops a process: worker instances, job steps and
//! exec probes alike. A child leads a process group of its own, is known to
//! the reaper before it can exit, runs with its worker's or job's identity
//! and limits, and gets none of the descriptors drover keeps in reserve.
//! Spawning blocks a thread until the child has exec'd, so the actor hands
//! it to a spawner thread ([`start_off_loop`]); the exit comes back through
//! the reaper, and [`InFlight`] holds what arrives out of order meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use crate::os::cgroup::{self, Hierarchy};
use crate::os::identity::Identity;
use crate::os::listen;
use crate::os::proc;
use crate::os::reaper::{Exit, Reaper};
use crate::os::spawn;

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
    /// Listening sockets passed as fds 3, 4, … (LISTEN_FDS), with their
    /// names (LISTEN_FDNAMES). Shared: the worker holds them meanwhile.
    pub sockets: Vec<(Arc<OwnedFd>, String)>,
    /// In cgroup mode, the cgroup of its own the child runs in.
    pub cgroup: Option<CgroupSpec>,
}

/// A cgroup to make for a child just before it is spawned (on the
/// spawning thread: mkdir in cgroupfs takes the kernel's cgroup mutex,
/// which other cgroup users may hold, so never on the event loop).
#[derive(Clone, Debug)]
pub struct CgroupSpec {
    pub hierarchy: Arc<Hierarchy>,
    /// Unique in this drover's life (see `containment::Mode::cgroup`).
    pub name: String,
    pub max_memory: Option<u64>,
}

/// The socket-activation variables; a child without sockets gets none of
/// drover's own (drover may be socket-activated itself).
const LISTEN_VARS: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// A child that was spawned.
#[derive(Debug)]
pub struct Started {
    /// Also its process group.
    pub pid: i32,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The cgroup it runs in (cgroup mode): empty of it once it is gone.
    pub cgroup: Option<PathBuf>,
    /// Its start time in clock ticks (None if it is already gone): with the
    /// pid, the identity a later supervisor checks before it kills. Read
    /// here, on the spawning thread: /proc/PID/stat of a child that is still
    /// mapping its libraries waits on its memory map.
    pub start_ticks: Option<u64>,
}

/// Why a child could not be started.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchError {
    pub message: String,
    /// For want of drover's own resources (descriptors, memory, processes):
    /// a retry, never a step toward parking.
    pub short: bool,
}

/// What a command holds until it is spawned.
struct Held {
    /// The sockets' copies the child takes.
    _fds: Vec<OwnedFd>,
    steps: Option<crate::os::identity::StepReport>,
}

impl Launch {
    /// The program to run and its arguments after argv\[0\], and the
    /// descriptors that must stay open until it is spawned: the worker's
    /// own command, or drover's shim when it has sockets.
    fn program(&self) -> Result<(OsString, Vec<OsString>, Vec<OwnedFd>), LaunchError> {
        let Some(program) = self.argv.first() else {
            return Err(LaunchError { message: "the command is empty".into(), short: false });
        };
        if self.sockets.is_empty() {
            Ok((program.into(), self.argv[1..].iter().map(OsString::from).collect(), Vec::new()))
        } else {
            self.through_shim(program)
        }
    }

    /// The command to spawn, and what must stay open until it is spawned:
    /// descriptors, and the report of which identity step failed.
    /// `join` is the child's cgroup's `cgroup.procs` (std's spawn, which
    /// moves the child into its cgroup: see [`Launch::own_spawn`]).
    fn command(&self, join: Option<OwnedFd>) -> Result<(Command, Held), LaunchError> {
        let (program, args, high) = self.program()?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        if self.clear_env {
            cmd.env_clear();
        }
        for name in self.remove_env.iter().chain(&LISTEN_VARS) {
            cmd.env_remove(name);
        }
        let out = || match self.output {
            Output::Piped => Stdio::piped(),
            Output::Null => Stdio::null(),
        };
        cmd.current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out())
            .stderr(out());
        if let Some(names) = self.fd_names() {
            cmd.env("LISTEN_FDNAMES", names);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if let Some(fd) = join {
            // The first hook: whatever fails after it (a limit, the user
            // switch) fails inside the cgroup.
            // SAFETY: join_in_child only calls write(2).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || cgroup::join_in_child(&fd));
            }
        }
        proc::give_back_fd_limit(&mut cmd);
        let steps = crate::os::identity::apply(&mut cmd, &self.identity);
        if !high.is_empty() {
            let keep: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
            // SAFETY: the hook only calls fcntl, which is async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    listen::keep_across_exec(&keep)
                });
            }
        }
        Ok((cmd, Held { _fds: high, steps }))
    }

    /// LISTEN_FDNAMES, when the child has sockets.
    fn fd_names(&self) -> Option<String> {
        if self.sockets.is_empty() {
            return None;
        }
        Some(self.sockets.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(":"))
    }

    /// The child's whole environment, as std computes it for
    /// [`Launch::command`]: drover's (or none), minus the removed names,
    /// plus the set ones, plus the login variables it sets nowhere.
    /// `fd_names` is [`Launch::fd_names`].
    fn child_env<'a>(&'a self, fd_names: Option<&'a str>) -> BTreeMap<&'a OsStr, &'a OsStr> {
        let mut env: BTreeMap<&OsStr, &OsStr> = if self.clear_env {
            BTreeMap::new()
        } else {
            own_environment().iter().map(|(k, v)| (k.as_os_str(), v.as_os_str())).collect()
        };
        let removed = || self.remove_env.iter().chain(&LISTEN_VARS).copied();
        for name in removed() {
            env.remove(OsStr::new(name));
        }
        for (k, v) in &self.env {
            env.insert(k.as_ref(), v.as_ref());
        }
        if let Some(names) = fd_names {
            env.insert("LISTEN_FDNAMES".as_ref(), names.as_ref());
        }
        // identity::apply sets them only where the command's env neither
        // sets nor removes them.
        let named = |k: &str| {
            removed().any(|r| r == k)
                || self.env.iter().any(|(n, _)| n == k)
                || (k == "LISTEN_FDNAMES" && !self.sockets.is_empty())
        };
        if !self.identity.is_noop() {
            for (k, v) in self.identity.login_env.iter().filter(|(k, _)| !named(k)) {
                env.insert(k.as_ref(), v.as_ref());
            }
        }
        env
    }

    /// drover's own spawn of the child straight into its cgroup `cgroup`
    /// (see `os::spawn`), with what must stay open until it is spawned.
    /// The program is looked for here, in the child's PATH, as exec would
    /// in the child.
    fn own_spawn(&self, cgroup: Option<&Path>) -> Result<(spawn::Spawn, Held), LaunchError> {
        let (program, args, high) = self.program()?;
        let fd_names = self.fd_names();
        let env = self.child_env(fd_names.as_deref());
        let resolved = if program.as_bytes().contains(&b'/') {
            PathBuf::from(&program)
        } else {
            let path_var = env.get(OsStr::new("PATH")).copied();
            match lookups().find(&program.to_string_lossy(), &self.dir, path_var) {
                Some(p) => p,
                None => return Err(self.failure(&io::Error::from_raw_os_error(nix::libc::ENOENT))),
            }
        };
        let fd = match cgroup {
            Some(dir) => Some(spawn::open_cgroup(dir).map_err(|e| cgroup_failure(e, dir))?),
            None => None,
        };
        let argv = std::iter::once(program).chain(args);
        let mut sp =
            spawn::Spawn::new(resolved.as_os_str(), argv, env, &self.dir, self.output == Output::Piped, fd)
                .map_err(|e| self.failure(&e))?;
        // The hooks in std's order (see `command`), without the join.
        if let Some(limit) = proc::fd_limit_to_give_back() {
            // SAFETY: setrlimit, a raw system call.
            unsafe { sp.hook(move || proc::give_back_in_child(limit)) };
        }
        let steps = crate::os::identity::prepare(&self.identity).map(|(hook, report)| {
            sp.carry(hook.report_fd());
            // SAFETY: Hook::run makes raw system calls only, on data
            // prepared before the clone.
            unsafe { sp.hook(move || hook.run()) };
            report
        });
        if !high.is_empty() {
            let keep: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
            for fd in keep.iter().copied().chain(listen::shim_fd()) {
                sp.carry(fd);
            }
            // SAFETY: fcntl only.
            unsafe { sp.hook(move || listen::keep_across_exec(&keep)) };
        }
        Ok((sp, Held { _fds: high, steps }))
    }

    /// The program that runs the child through drover's shim, which puts
    /// the sockets at fd 3 on and sets LISTEN_PID to its own pid, with its
    /// arguments. The shim cannot report a program it does not find as a
    /// failed start, so that is looked for here.
    fn through_shim(&self, program: &str) -> Result<(OsString, Vec<OsString>, Vec<OwnedFd>), LaunchError> {
        let path_var = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| std::ffi::OsString::from(v))
            .or_else(|| if self.clear_env { None } else { std::env::var_os("PATH") });
        if lookups().find(program, &self.dir, path_var.as_deref()).is_none() {
            return Err(self.failure(&io::Error::from_raw_os_error(nix::libc::ENOENT)));
        }
        let raw: Vec<RawFd> = self.sockets.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        let high = listen::high_copies(&raw).map_err(|e| self.failure(&e))?;
        let high_raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
        let (shim, args) = listen::shim_command(&high_raw, &self.argv).map_err(|e| LaunchError {
            message: format!("cannot pass the sockets to {program:?}: {e}"),
            short: false,
        })?;
        Ok((shim.into_os_string(), args, high))
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

    /// [`Launch::failure`], naming the identity step the kernel refused.
    fn refused(&self, e: &io::Error, held: &Held) -> LaunchError {
        let mut f = self.failure(e);
        if let Some(step) = held.steps.as_ref().and_then(|r| r.failed_step()) {
            f.message.push_str(&format!("; the kernel refused {step}"));
        }
        f
    }

    /// Makes the child's cgroup (cgroup mode).
    fn make_cgroup(&self) -> Result<Option<PathBuf>, LaunchError> {
        let Some(spec) = &self.cgroup else { return Ok(None) };
        let dir = spec
            .hierarchy
            .create(&spec.name, spec.max_memory)
            .map_err(|e| cgroup_failure(e, &spec.hierarchy.base))?;
        Ok(Some(dir))
    }

    /// Spawns the child by `by_clone3` (born in its cgroup, if it has
    /// one), or by `by_std` if clone3 cannot be used here (the child then
    /// joins its cgroup between fork and exec).
    fn spawn_with<T>(
        &self,
        by_std: impl FnOnce(&mut Command) -> io::Result<T>,
        by_clone3: impl FnOnce(&spawn::Spawn) -> Result<T, spawn::Error>,
    ) -> Result<(T, Option<PathBuf>, Option<u64>), LaunchError> {
        let dir = self.make_cgroup()?;
        match self.spawn_in(dir.as_deref(), by_std, by_clone3) {
            Ok((t, ticks)) => Ok((t, dir, ticks)),
            Err(e) => {
                // No process of it ever ran: the cgroup is empty.
                if let Some(d) = &dir {
                    let _ = cgroup::remove(d);
                }
                Err(e)
            }
        }
    }

    fn spawn_in<T>(
        &self,
        cgroup_dir: Option<&Path>,
        by_std: impl FnOnce(&mut Command) -> io::Result<T>,
        by_clone3: impl FnOnce(&spawn::Spawn) -> Result<T, spawn::Error>,
    ) -> Result<(T, Option<u64>), LaunchError> {
        let short = || {
            proc::descriptors_short().then(|| self.failure(&io::Error::from_raw_os_error(nix::libc::EMFILE)))
        };
        // Own spawn for a child with a cgroup, and for one that can leave
        // drover's descriptors behind (see `os::spawn`).
        if cgroup_dir.is_some() || spawn::slots_reserved() {
            let (sp, held) = self.own_spawn(cgroup_dir)?;
            if let Some(e) = short() {
                return Err(e);
            }
            let before = proc::boottime();
            match by_clone3(&sp) {
                Ok(t) => return Ok((t, proc::ticks_between(before, proc::boottime()))),
                Err(spawn::Error::Failed(e)) => return Err(self.refused(&e, &held)),
                // No child was made: std's spawn and a join instead.
                Err(spawn::Error::Unsupported(_)) => {}
            }
        }
        let join = match cgroup_dir {
            Some(dir) => Some(cgroup::open_procs(dir).map_err(|e| cgroup_failure(e, dir))?),
            None => None,
        };
        let (mut cmd, held) = self.command(join)?;
        if let Some(e) = short() {
            return Err(e);
        }
        let before = proc::boottime();
        let t = by_std(&mut cmd).map_err(|e| self.refused(&e, &held))?;
        Ok((t, proc::ticks_between(before, proc::boottime())))
    }
}

/// The error of a cgroup that could not be made or opened.
fn cgroup_failure(e: io::Error, dir: &Path) -> LaunchError {
    LaunchError {
        message: format!("cannot make its cgroup {}: {e}", dir.display()),
        short: out_of_resources(&e),
    }
}

/// drover's own environment, read once: nothing in the supervisor sets a
/// variable after start (the socket shim, which does, is a process of
/// its own).
fn own_environment() -> &'static [(OsString, OsString)] {
    static ENV: OnceLock<Vec<(OsString, OsString)>> = OnceLock::new();
    ENV.get_or_init(|| std::env::vars_os().collect())
}

/// Where each program was found in PATH. A restart looks at that one
/// file again (is it there, executable?) instead of at each directory
/// before it, which was a tenth of a restart; a program no longer found
/// there is looked for anew. Like a shell's `hash`, a program put since
/// into an earlier directory is found after [`Lookups::forget`]: at a
/// reload, and at a restart asked for.
#[derive(Default)]
pub struct Lookups {
    found: Mutex<HashMap<LookupKey, PathBuf>>,
}

/// The program, the directory it runs in (PATH may be relative) and PATH.
type LookupKey = (String, PathBuf, Option<OsString>);

/// More programs than this and the lookups start over: memory is bounded.
const LOOKUPS_MAX: usize = 1024;

impl Lookups {
    /// `program` in `path_var`, as exec would find it (one with a slash
    /// is a path, relative to `dir`).
    fn find(&self, program: &str, dir: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
        if program.contains('/') {
            return listen::find_program(program, dir, path_var);
        }
        let key: LookupKey = (program.to_owned(), dir.to_owned(), path_var.map(OsStr::to_owned));
        let known = self.lock().get(&key).cloned();
        if let Some(p) = known.filter(|p| listen::is_executable(p)) {
            return Some(p);
        }
        let found = listen::find_program(program, dir, path_var)?;
        let mut map = self.lock();
        if map.len() >= LOOKUPS_MAX {
            map.clear();
        }
        map.insert(key, found.clone());
        Some(found)
    }

    /// Forgets where programs were found: the next start of each looks
    /// through PATH again.
    pub fn forget(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LookupKey, PathBuf>> {
        self.found.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// This process's [`Lookups`].
pub fn lookups() -> &'static Lookups {
    static LOOKUPS: OnceLock<Lookups> = OnceLock::new();
    LOOKUPS.get_or_init(Lookups::default)
}

fn from_std(mut child: std::process::Child) -> spawn::Spawned {
    spawn::Spawned {
        pid: child.id() as i32,
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    }
}

/// `ticks`: the start time the clock around the spawn tells, if it does
/// (see `proc::ticks_between`); else it is read from /proc.
fn started(child: spawn::Spawned, cgroup: Option<PathBuf>, ticks: Option<u64>) -> Started {
    let start_ticks = ticks.or_else(|| proc::start_ticks(child.pid));
    Started { pid: child.pid, stdout: child.stdout, stderr: child.stderr, cgroup, start_ticks }
}

/// Starts the child; its exit is one of [`Reaper::reap`]'s. Blocks until
/// the child has exec'd.
pub fn start(reaper: &Reaper, launch: &Launch) -> Result<Started, LaunchError> {
    launch
        .spawn_with(|cmd| reaper.spawn(cmd).map(from_std), |sp| reaper.spawn_own(|| spawn::spawn(sp)))
        .map(|(child, cg, ticks)| started(child, cg, ticks))
}

/// Starts the child; its exit is sent on the receiver instead. Blocks until
/// the child has exec'd.
pub fn start_waited(
    reaper: &Reaper,
    launch: &Launch,
) -> Result<(Started, oneshot::Receiver<Exit>), LaunchError> {
    launch
        .spawn_with(
            |cmd| reaper.spawn_waited(cmd).map(|(c, rx)| (from_std(c), rx)),
            |sp| reaper.spawn_own_waited(|| spawn::spawn(sp)),
        )
        .map(|((child, rx), cg, ticks)| (started(child, cg, ticks), rx))
}

/// Starts the child on a spawner thread; `done` gets the outcome there.
pub fn start_off_loop(
    reaper: Arc<Reaper>,
    launch: Launch,
    done: impl FnOnce(Result<Started, LaunchError>) + Send + 'static,
) {
    super::spawner::run(move || done(start(&reaper, &launch)));
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
            sockets: vec![],
            cgroup: None,
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
    fn a_program_found_once_is_looked_for_again_when_gone_or_forgotten() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("a temp dir");
        let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
        for d in [&first, &second] {
            std::fs::create_dir(d).expect("mkdir");
        }
        let put = |dir: &Path, mode: u32| {
            let p = dir.join("prog");
            std::fs::write(&p, "#!/bin/sh\n").expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            p
        };
        let path_var = std::env::join_paths([&first, &second]).expect("a PATH");
        let lookups = Lookups::default();
        let find = || lookups.find("prog", Path::new("/"), Some(&path_var));
        assert_eq!(find(), None);
        let in_second = put(&second, 0o755);
        assert_eq!(find(), Some(in_second.clone()));
        // One put since into an earlier directory: the one found stays,
        // as a shell's hash does, until the lookups are forgotten.
        let in_first = put(&first, 0o755);
        assert_eq!(find(), Some(in_second.clone()));
        lookups.forget();
        assert_eq!(find(), Some(in_first.clone()));
        // Gone, or no longer executable: looked for anew.
        std::fs::set_permissions(&in_first, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(find(), Some(in_second.clone()));
        std::fs::remove_file(&in_second).expect("rm");
        assert_eq!(find(), None);
        // A path is no lookup: relative to the directory, as exec takes it.
        assert_eq!(lookups.find("first/prog", tmp.path(), Some(&path_var)), None, "not executable");
        let again = put(&first, 0o755);
        assert_eq!(lookups.find("first/prog", tmp.path(), None), Some(again));
    }

    #[test]
    fn the_start_time_told_by_the_clock_is_the_one_proc_shows() {
        let reaper = Reaper::default();
        let mut told = 0;
        for _ in 0..40 {
            let s = start(&reaper, &launch(&["sleep", "5"], "/")).expect("start");
            let shown = proc::start_ticks(s.pid);
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid), nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(s.pid), None);
            crate::os::groups::remove(s.pid);
            assert!(shown.is_some(), "no start time in /proc for {}", s.pid);
            assert_eq!(s.start_ticks, shown, "pid {}", s.pid);
            told += 1;
        }
        assert_eq!(told, 40);
    }

    #[test]
    fn a_shortage_of_descriptors_is_a_retry_not_a_crash() {
        let e = launch(&["true"], "/").failure(&io::Error::from_raw_os_error(nix::libc::EMFILE));
        assert!(e.short);
        assert!(e.message.contains("drover is short of resources"), "{}", e.message);
    }

    /// Real cgroups (root on a cgroup2 host): the child is in its cgroup
    /// from its first instruction, and a start that fails leaves none.
    #[test]
    fn a_child_runs_in_its_own_cgroup_and_a_failed_start_leaves_none() {
        let state_dir = std::env::temp_dir().join(format!("drover-child-cgroup-{}", std::process::id()));
        let h = match Hierarchy::set_up(&state_dir) {
            Ok((h, _)) => Arc::new(h),
            Err(e) if !crate::os::identity::drover_is_root() => return eprintln!("skipped: {e}"),
            Err(e) => panic!("as root, cgroups must be usable here: {e}"),
        };
        let spec =
            |name: &str| Some(CgroupSpec { hierarchy: h.clone(), name: name.into(), max_memory: None });
        let reaper = Reaper::default();
        let mut ok = launch(&["sleep", "60"], "/");
        ok.cgroup = spec("t.ok");
        let s = start(&reaper, &ok).expect("start");
        let cg = s.cgroup.clone().expect("a cgroup");
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        assert_eq!(procs.trim(), s.pid.to_string());
        cgroup::remove_when_empty(&cg).expect("killed and removed");
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(s.pid), None);
        crate::os::groups::remove(s.pid);

        let mut bad = launch(&["/no/such/program"], "/");
        bad.cgroup = spec("t.bad");
        assert!(start(&reaper, &bad).is_err());
        assert!(!h.base.join("t.bad").exists(), "the failed start's cgroup is removed");
        let mut refused = launch(&["true"], "/");
        refused.cgroup = spec("t.refused");
        refused.identity.limits =
            [("nofile".to_string(), crate::os::identity::Rlimit { soft: 300, hard: 200 })].into();
        let e = start(&reaper, &refused).expect_err("refused");
        assert!(
            e.message.ends_with("; the kernel refused limits.nofile (soft 300, hard 200)"),
            "{}",
            e.message
        );
        assert!(!h.base.join("t.refused").exists(), "the refused start's cgroup is removed");
        cgroup::remove(&h.base).expect("remove the base");
    }

    /// Where clone3 is refused, the child joins its cgroup after the fork
    /// (std's spawn), and a failed start still leaves no cgroup.
    #[test]
    fn without_clone3_the_child_joins_its_cgroup() {
        crate::os::reaper::isolated(module_path!(), "without_clone3_the_child_joins_its_cgroup", || {
            let state_dir = std::env::temp_dir().join(format!("drover-child-join-{}", std::process::id()));
            let h = match Hierarchy::set_up(&state_dir) {
                Ok((h, _)) => Arc::new(h),
                Err(e) if !crate::os::identity::drover_is_root() => return eprintln!("skipped: {e}"),
                Err(e) => panic!("as root, cgroups must be usable here: {e}"),
            };
            crate::os::spawn::refuse_clone3();
            let reaper = Reaper::default();
            let mut ok = launch(&["sleep", "60"], "/");
            ok.cgroup = Some(CgroupSpec { hierarchy: h.clone(), name: "t.join".into(), max_memory: None });
            let s = start(&reaper, &ok).expect("start");
            let cg = s.cgroup.clone().expect("a cgroup");
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            assert_eq!(procs.trim(), s.pid.to_string());
            cgroup::remove_when_empty(&cg).expect("killed and removed");
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(s.pid), None);
            let mut bad = launch(&["/no/such/program"], "/");
            bad.cgroup =
                Some(CgroupSpec { hierarchy: h.clone(), name: "t.joinbad".into(), max_memory: None });
            assert!(start(&reaper, &bad).is_err());
            assert!(!h.base.join("t.joinbad").exists(), "the failed start's cgroup is removed");
            cgroup::remove(&h.base).expect("remove the base");
        });
    }

    #[test]
    fn an_empty_command_is_an_error_not_a_panic() {
        let e = launch(&[], "/").command(None).err().map(|e| e.message);
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
