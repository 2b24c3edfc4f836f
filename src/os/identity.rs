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

/// Makes `cmd` start with `identity`: one pre_exec hook, registered after
/// the ones already on `cmd` (so a configured `limits.nofile` wins over
/// drover's own give-back of the open-files limit). Sets the login
/// variables the command's env does not set itself. A step the kernel
/// refuses fails the spawn with its errno: the instance's start error.
pub fn apply(cmd: &mut std::process::Command, identity: &Identity) {
    use std::os::unix::process::CommandExt;
    if identity.is_noop() {
        return;
    }
    for (k, v) in &identity.login_env {
        if !cmd.get_envs().any(|(set, _)| set == k.as_str()) {
            cmd.env(k, v);
        }
    }
    let hook = Hook::new(identity);
    // SAFETY: the hook only makes system calls (setrlimit, umask,
    // setpriority, open/write/close, setgroups, setgid, setuid, prctl) on
    // data prepared before the fork; none allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || hook.run());
    }
}

/// What the child does between fork and exec, prepared in the parent.
struct Hook {
    limits: Vec<(Resource, u64, u64)>,
    umask: Option<u32>,
    nice: Option<i32>,
    /// The file and the bytes to write to it.
    oom: Option<(CString, Vec<u8>)>,
    switch: Option<(Vec<nix::libc::gid_t>, nix::libc::gid_t, nix::libc::uid_t)>,
    no_new_privs: bool,
}

impl Hook {
    fn new(id: &Identity) -> Hook {
        let limits = id
            .limits
            .iter()
            .filter_map(|(name, l)| {
                RESOURCES.iter().find(|(n, ..)| n == name).map(|(_, r, _)| (*r, l.soft, l.hard))
            })
            .collect();
        let oom = id.oom_score_adj.map(|v| {
            // A literal path has no NUL: the conversion cannot fail.
            (CString::new("/proc/self/oom_score_adj").unwrap_or_default(), format!("{v}\n").into_bytes())
        });
        Hook {
            limits,
            umask: id.umask,
            nice: id.nice,
            oom,
            switch: id.switch.as_ref().map(|s| (s.groups.clone(), s.gid, s.uid)),
            no_new_privs: id.no_new_privs,
        }
    }

    /// Runs in the child: limits first (raising a hard limit needs the
    /// privileges given up last), then umask, nice and oom_score_adj
    /// (lowering needs privileges too), groups, gid, uid, and
    /// no_new_privs, which only restricts what exec may gain.
    fn run(&self) -> io::Result<()> {
        use nix::libc;
        for &(resource, soft, hard) in &self.limits {
            nix::sys::resource::setrlimit(resource, soft, hard)?;
        }
        if let Some(mask) = self.umask {
            // SAFETY: umask cannot fail.
            unsafe { libc::umask(mask as libc::mode_t) };
        }
        if let Some(n) = self.nice {
            // SAFETY: a plain system call on this process.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some((path, bytes)) = &self.oom {
            // SAFETY: open, write and close on a path and buffer made
            // before the fork.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n < 0 {
                    return Err(err);
                }
            }
        }
        if let Some((groups, gid, uid)) = &self.switch {
            // SAFETY: plain system calls; `groups` was made before the fork.
            unsafe {
                if libc::setgroups(groups.len(), groups.as_ptr()) == -1
                    || libc::setgid(*gid) == -1
                    || libc::setuid(*uid) == -1
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        if self.no_new_privs {
            nix::sys::prctl::set_no_new_privs()?;
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
        apply(&mut cmd, &id);
        let err = cmd.spawn().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EINVAL), "{err}");
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
