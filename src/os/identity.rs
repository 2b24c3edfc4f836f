//! Who a child runs as and under which limits: the user and groups, umask,
//! nice, oom_score_adj, no_new_privs and resource limits of a worker or a
//! job, resolved when the config is loaded and applied between fork and
//! exec by [`apply`].
//!
//! Everything that may allocate or read files (the user and group
//! databases, the supplementary groups, the path written for
//! oom_score_adj) is done before the fork; the hook [`apply`] installs
//! makes only system calls, which are async-signal-safe.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;

use nix::sys::resource::Resource;
use nix::unistd::{Gid, Group, Uid, User};
use serde::Serialize;
use serde::ser::SerializeMap;

/// The resource limits drover knows, by the name the config gives them
/// (the names of `ulimit` and systemd's `Limit…=`, lowercase).
pub const RESOURCES: &[(&str, Resource, Unit)] = &[
    ("as", Resource::RLIMIT_AS, Unit::Bytes),
    ("core", Resource::RLIMIT_CORE, Unit::Bytes),
    ("cpu", Resource::RLIMIT_CPU, Unit::Count),
    ("data", Resource::RLIMIT_DATA, Unit::Bytes),
    ("fsize", Resource::RLIMIT_FSIZE, Unit::Bytes),
    ("locks", Resource::RLIMIT_LOCKS, Unit::Count),
    ("memlock", Resource::RLIMIT_MEMLOCK, Unit::Bytes),
    ("msgqueue", Resource::RLIMIT_MSGQUEUE, Unit::Bytes),
    ("nice", Resource::RLIMIT_NICE, Unit::Count),
    ("nofile", Resource::RLIMIT_NOFILE, Unit::Count),
    ("nproc", Resource::RLIMIT_NPROC, Unit::Count),
    ("rss", Resource::RLIMIT_RSS, Unit::Bytes),
    ("rtprio", Resource::RLIMIT_RTPRIO, Unit::Count),
    ("rttime", Resource::RLIMIT_RTTIME, Unit::Count),
    ("sigpending", Resource::RLIMIT_SIGPENDING, Unit::Count),
    ("stack", Resource::RLIMIT_STACK, Unit::Bytes),
];

/// What a limit counts: bytes may also be written as sizes ("64MiB").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Count,
}

/// `RLIM_INFINITY`: no limit ("infinity" in the config).
pub const INFINITY: u64 = nix::libc::RLIM_INFINITY;

/// One resource limit, soft and hard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub soft: u64,
    pub hard: u64,
}

/// The identity switch a root drover makes for the child: primary group,
/// supplementary groups (the user's, from the group database, computed
/// before the fork as `initgroups` would), then the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switch {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A child's identity and limits, everything looked up. The default
/// changes nothing: the child runs as drover does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The user, as the config names it.
    pub user: Option<String>,
    /// The primary group, as the config names it.
    pub group: Option<String>,
    pub umask: Option<u32>,
    pub nice: Option<i32>,
    pub oom_score_adj: Option<i32>,
    pub no_new_privs: bool,
    /// By resource name (a key of [`RESOURCES`]).
    pub limits: BTreeMap<String, Rlimit>,
    /// The switch to make; `None` when drover already runs as that user
    /// and group (or none is named).
    pub switch: Option<Switch>,
    /// HOME, LOGNAME, SHELL and USER of `user`, set in the child's
    /// environment unless its env sets them (as systemd does for `User=`).
    pub login_env: Vec<(String, String)>,
}

impl Identity {
    /// Whether applying it changes anything at all.
    pub fn is_noop(&self) -> bool {
        self == &Identity::default()
    }
}

/// A user of the user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// The user named `name`: `Ok(None)` when there is none.
pub fn user_by_name(name: &str) -> io::Result<Option<UserEntry>> {
    let u = User::from_name(name).map_err(io::Error::from)?;
    Ok(u.map(|u| UserEntry {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir.to_string_lossy().into_owned(),
        shell: u.shell.to_string_lossy().into_owned(),
    }))
}

/// The gid of the group named `name`: `Ok(None)` when there is none.
pub fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    Ok(Group::from_name(name).map_err(io::Error::from)?.map(|g| g.gid.as_raw()))
}

/// The groups `user` belongs to, with `gid` among them (what
/// `initgroups(user, gid)` would set).
pub fn supplementary_groups(user: &str, gid: u32) -> io::Result<Vec<u32>> {
    let name = CString::new(user).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut groups: Vec<u32> = nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
        .map_err(io::Error::from)?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

/// The names in a colon-separated database file such as /etc/passwd, for
/// "did you mean" hints (NSS sources beyond the file are not listed).
pub fn names_in(db: &str) -> Vec<String> {
    std::fs::read_to_string(db)
        .map(|t| {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(':').next().filter(|n| !n.is_empty()).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether drover runs as root (and so may switch users).
pub fn drover_is_root() -> bool {
    Uid::effective().is_root()
}

/// drover's own effective uid and gid.
pub fn drover_ids() -> (u32, u32) {
    (Uid::effective().as_raw(), Gid::effective().as_raw())
}

/// Which step of the hook the kernel refused, told by the child: std
/// carries only the errno back from a failed pre_exec hook, so the child
/// first sends the step's number over this socket pair (close-on-exec: a
/// child that execs sends nothing). A socket, not a pipe: a report
/// dropped before the spawn makes the child's send fail, where a pipe's
/// write would kill it with SIGPIPE (and std would take that for an exec).
pub struct StepReport {
    read: std::os::fd::OwnedFd,
    /// What each step number sets, as the config writes it.
    steps: Vec<String>,
}

impl StepReport {
    /// The setting whose step failed, once the spawn has failed.
    pub fn failed_step(&self) -> Option<&str> {
        use std::os::fd::AsRawFd;
        let mut b = [0u8; 1];
        match nix::sys::socket::recv(self.read.as_raw_fd(), &mut b, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
        {
            Ok(1) => self.steps.get(usize::from(b[0])).map(String::as_str),
            _ => None,
        }
    }
}

/// Makes `cmd` start with `identity`: one pre_exec hook, registered after
/// the ones already on `cmd` (so a configured `limits.nofile` wins over
/// drover's own give-back of the open-files limit). Sets the login
/// variables the command's env does not set itself. A step the kernel
/// refuses fails the spawn with its errno: the instance's start error,
/// which names the setting from the report returned.
pub fn apply(cmd: &mut std::process::Command, identity: &Identity) -> Option<StepReport> {
    use std::os::unix::process::CommandExt;
    if identity.is_noop() {
        return None;
    }
    for (k, v) in &identity.login_env {
        if !cmd.get_envs().any(|(set, _)| set == k.as_str()) {
            cmd.env(k, v);
        }
    }
    let (hook, report) = prepare(identity)?;
    // SAFETY: the hook only makes system calls (setrlimit, umask,
    // setpriority, open/write/close, setgroups, setgid, setuid, prctl) on
    // data prepared before the fork; none allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || hook.run());
    }
    Some(report)
}

/// The hook that applies `identity` in a child, to call there with
/// [`Hook::run`] (drover's own spawn, `os::spawn`), and its report. The
/// login variables are the caller's to set. None when there is nothing to
/// apply (or no socket pair for the report could be made).
pub fn prepare(identity: &Identity) -> Option<(Hook, StepReport)> {
    if identity.is_noop() {
        return None;
    }
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (read, write) = socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .ok()?;
    let (hook, steps) = Hook::new(identity, write);
    Some((hook, StepReport { read, steps }))
}

/// What the child does between fork and exec, prepared in the parent.
pub struct Hook {
    limits: Vec<(Resource, u64, u64)>,
    umask: Option<u32>,
    nice: Option<i32>,
    /// The file and the bytes to write to it.
    oom: Option<(CString, Vec<u8>)>,
    switch: Option<(Vec<nix::libc::gid_t>, nix::libc::gid_t, nix::libc::uid_t)>,
    no_new_privs: bool,
    /// Where the child tells which step failed (see [`StepReport`]).
    report: std::os::fd::OwnedFd,
}

/// The step numbers after the limits' (which are 0, 1, … in order).
const NICE: usize = 0;
const OOM: usize = 1;
const GROUPS: usize = 2;
const GID: usize = 3;
const UID: usize = 4;
const NO_NEW_PRIVS: usize = 5;

impl Hook {
    /// The descriptor the child writes a failed step to: a spawn that
    /// leaves drover's descriptors behind carries it over (`os::spawn`).
    pub fn report_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.report.as_raw_fd()
    }

    fn new(id: &Identity, report: std::os::fd::OwnedFd) -> (Hook, Vec<String>) {
        let known: Vec<(&String, &Rlimit, Resource)> = id
            .limits
            .iter()
            .filter_map(|(name, l)| RESOURCES.iter().find(|(n, ..)| n == name).map(|(_, r, _)| (name, l, *r)))
            .collect();
        let limits = known.iter().map(|(_, l, r)| (*r, l.soft, l.hard)).collect();
        let value = |v: u64| limit_value(v).to_string();
        let mut steps: Vec<String> = known
            .iter()
            .map(|(n, l, _)| format!("limits.{n} (soft {}, hard {})", value(l.soft), value(l.hard)))
            .collect();
        let user = id.user.as_deref().unwrap_or("drover's");
        steps.extend([
            format!("nice = {}", id.nice.unwrap_or_default()),
            format!("oom_score_adj = {}", id.oom_score_adj.unwrap_or_default()),
            format!("the supplementary groups of user {user:?}"),
            match &id.group {
                Some(g) => format!("group = {g:?}"),
                None => format!("the primary group of user {user:?}"),
            },
            format!("user = {user:?}"),
            "no_new_privs".to_string(),
        ]);
        let oom = id.oom_score_adj.map(|v| {
            // A literal path has no NUL: the conversion cannot fail.
            (CString::new("/proc/self/oom_score_adj").unwrap_or_default(), format!("{v}\n").into_bytes())
        });
        let hook = Hook {
            limits,
            umask: id.umask,
            nice: id.nice,
            oom,
            switch: id.switch.as_ref().map(|s| (s.groups.clone(), s.gid, s.uid)),
            no_new_privs: id.no_new_privs,
            report,
        };
        (hook, steps)
    }

    /// The error of step `step` (numbered as [`StepReport`] reads them),
    /// told to the parent first. `err` is taken before the write, which
    /// may change errno.
    fn failed(&self, step: usize, err: io::Error) -> io::Error {
        use std::os::fd::AsRawFd;
        let b = [u8::try_from(step).unwrap_or(u8::MAX)];
        // SAFETY: send(2) of a byte on the stack on a socket we own.
        unsafe { nix::libc::send(self.report.as_raw_fd(), b.as_ptr().cast(), 1, nix::libc::MSG_NOSIGNAL) };
        err
    }

    /// Runs in the child: limits first (raising a hard limit needs the
    /// privileges given up last), then umask, nice and oom_score_adj
    /// (lowering needs privileges too), groups, gid, uid, and
    /// no_new_privs, which only restricts what exec may gain. Only raw
    /// system calls: it also runs in a child of a bare clone3, where
    /// glibc's setuid & co. (which signal every thread glibc believes
    /// the process has) may not be used.
    pub fn run(&self) -> io::Result<()> {
        use nix::libc;
        for (i, &(resource, soft, hard)) in self.limits.iter().enumerate() {
            if let Err(e) = nix::sys::resource::setrlimit(resource, soft, hard) {
                return Err(self.failed(i, e.into()));
            }
        }
        let after = self.limits.len();
        if let Some(mask) = self.umask {
            // SAFETY: umask cannot fail.
            unsafe { libc::umask(mask as libc::mode_t) };
        }
        if let Some(n) = self.nice {
            // SAFETY: a plain system call on this process.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) } == -1 {
                return Err(self.failed(after + NICE, io::Error::last_os_error()));
            }
        }
        if let Some((path, bytes)) = &self.oom {
            // SAFETY: open, write and close on a path and buffer made
            // before the fork.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(self.failed(after + OOM, io::Error::last_os_error()));
                }
                let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n < 0 {
                    return Err(self.failed(after + OOM, err));
                }
            }
        }
        if let Some((groups, gid, uid)) = &self.switch {
            // SAFETY (each): a raw system call on this thread alone (the
            // child has no other); `groups` was made before the fork.
            if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } == -1 {
                return Err(self.failed(after + GROUPS, io::Error::last_os_error()));
            }
            if unsafe { libc::syscall(libc::SYS_setgid, *gid) } == -1 {
                return Err(self.failed(after + GID, io::Error::last_os_error()));
            }
            if unsafe { libc::syscall(libc::SYS_setuid, *uid) } == -1 {
                return Err(self.failed(after + UID, io::Error::last_os_error()));
            }
        }
        if self.no_new_privs
            && let Err(e) = nix::sys::prctl::set_no_new_privs()
        {
            return Err(self.failed(after + NO_NEW_PRIVS, e.into()));
        }
        Ok(())
    }
}

/// A umask as written: octal, "027".
pub fn umask_text(m: u32) -> String {
    format!("{m:04o}")
}

/// A limit value as the config writes it.
fn limit_value(v: u64) -> serde_json::Value {
    if v == INFINITY { "infinity".into() } else { v.into() }
}

/// `config --json` shows an identity as the file writes it; the keys that
/// change nothing are left out.
impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(u) = &self.user {
            m.serialize_entry("user", u)?;
        }
        if let Some(g) = &self.group {
            m.serialize_entry("group", g)?;
        }
        if let Some(mask) = self.umask {
            m.serialize_entry("umask", &umask_text(mask))?;
        }
        if let Some(n) = self.nice {
            m.serialize_entry("nice", &n)?;
        }
        if let Some(n) = self.oom_score_adj {
            m.serialize_entry("oom_score_adj", &n)?;
        }
        if self.no_new_privs {
            m.serialize_entry("no_new_privs", &true)?;
        }
        if !self.limits.is_empty() {
            let shown: BTreeMap<&str, serde_json::Value> = self
                .limits
                .iter()
                .map(|(k, l)| {
                    let v = if l.soft == l.hard {
                        limit_value(l.soft)
                    } else {
                        serde_json::json!({ "soft": limit_value(l.soft), "hard": limit_value(l.hard) })
                    };
                    (k.as_str(), v)
                })
                .collect();
            m.serialize_entry("limits", &shown)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_identity_installs_nothing() {
        let mut cmd = std::process::Command::new("true");
        apply(&mut cmd, &Identity::default());
        assert_eq!(cmd.get_envs().count(), 0);
        assert!(cmd.status().unwrap().success());
    }

    #[test]
    fn login_variables_do_not_override_the_commands_env() {
        let id = Identity {
            user: Some("x".into()),
            login_env: vec![("HOME".into(), "/home/x".into()), ("USER".into(), "x".into())],
            ..Default::default()
        };
        let mut cmd = std::process::Command::new("true");
        cmd.env("HOME", "/mine");
        apply(&mut cmd, &id);
        let envs: BTreeMap<_, _> =
            cmd.get_envs().map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned()))).collect();
        assert_eq!(envs[std::ffi::OsStr::new("HOME")].as_deref(), Some(std::ffi::OsStr::new("/mine")));
        assert_eq!(envs[std::ffi::OsStr::new("USER")].as_deref(), Some(std::ffi::OsStr::new("x")));
    }

    #[test]
    fn limits_umask_and_no_new_privs_reach_the_child() {
        let id = Identity {
            umask: Some(0o027),
            no_new_privs: true,
            limits: [("nofile".to_string(), Rlimit { soft: 200, hard: 300 })].into(),
            ..Default::default()
        };
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "echo $(ulimit -Sn) $(ulimit -Hn) $(umask); grep NoNewPrivs /proc/self/status"]);
        apply(&mut cmd, &id);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("200 300 0027\n"), "{text}");
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    }

    #[test]
    fn a_limit_the_kernel_refuses_fails_the_spawn() {
        // The soft limit above the hard one is refused whoever asks.
        let id = Identity {
            limits: [("nofile".to_string(), Rlimit { soft: 300, hard: 200 })].into(),
            ..Default::default()
        };
        let mut cmd = std::process::Command::new("true");
        let report = apply(&mut cmd, &id).expect("a report");
        let err = cmd.spawn().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EINVAL), "{err}");
        assert_eq!(report.failed_step(), Some("limits.nofile (soft 300, hard 200)"));
        // A report dropped before the spawn: the child's send fails
        // quietly and the spawn still fails with the kernel's error.
        let mut cmd = std::process::Command::new("true");
        drop(apply(&mut cmd, &id));
        assert_eq!(cmd.spawn().unwrap_err().raw_os_error(), Some(nix::libc::EINVAL));
    }

    #[test]
    fn the_shown_identity_uses_the_files_keys() {
        let id = Identity {
            user: Some("app".into()),
            umask: Some(0o22),
            limits: [
                ("core".to_string(), Rlimit { soft: 0, hard: 0 }),
                ("nofile".to_string(), Rlimit { soft: 1024, hard: INFINITY }),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&id).unwrap(),
            serde_json::json!({
                "user": "app",
                "umask": "0022",
                "limits": { "core": 0, "nofile": { "soft": 1024, "hard": "infinity" } }
            })
        );
    }
}
