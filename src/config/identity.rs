//! Resolving the identity keys of a table (`user`, `group`, `umask`,
//! `nice`, `oom_score_adj`, `no_new_privs`, `limits`) and its `env_file`
//! list: users and groups are looked up by name when the config is
//! loaded, so `check` reports an unknown one.

use std::collections::BTreeMap;
use std::path::Path;

use super::env_file::{self, EnvFile};
use super::load::nearest;
use super::raw::{LimitValue, RawLimit, RawLimits};
use super::resolve::Problems;
use super::types::ByteSize;
use crate::os::identity::{
    INFINITY, Identity, RESOURCES, Rlimit, Switch, Unit, UserEntry, group_by_name, names_in,
    supplementary_groups, user_by_name,
};

/// The identity keys of one table, as written.
#[derive(Clone, Copy, Default)]
pub struct RawIdentity<'a> {
    pub user: Option<&'a String>,
    pub group: Option<&'a String>,
    pub umask: Option<&'a String>,
    pub nice: Option<i32>,
    pub oom_score_adj: Option<i32>,
    pub no_new_privs: Option<bool>,
    pub limits: Option<&'a RawLimits>,
}

/// `base` overlaid by what `own` (the table at `at`) sets; `limits` merge
/// key by key. A problem is blamed on `at` only for what it sets itself.
/// `me` is drover's (euid, egid).
pub(super) fn resolve(
    p: &mut Problems,
    at: &[&str],
    base: &Identity,
    own: RawIdentity,
    me: (u32, u32),
) -> Identity {
    let key = |k: &str| -> Vec<String> { at.iter().map(|s| s.to_string()).chain([k.to_string()]).collect() };
    let mut id = base.clone();
    if let Some(u) = own.user {
        id.user = Some(u.clone());
    }
    if let Some(g) = own.group {
        id.group = Some(g.clone());
    }
    if let Some(text) = own.umask {
        match u32::from_str_radix(text, 8) {
            Ok(m) if m <= 0o777 && (3..=4).contains(&text.len()) => id.umask = Some(m),
            _ => p.add_owned(key("umask"), format!("expected an octal mask such as \"027\", found {text:?}")),
        }
    }
    id.nice = own.nice.or(base.nice);
    id.oom_score_adj = own.oom_score_adj.or(base.oom_score_adj);
    id.no_new_privs = own.no_new_privs.unwrap_or(base.no_new_privs);
    for (name, raw) in own.limits.map(RawLimits::set).unwrap_or_default() {
        let mut at_limit = key("limits");
        at_limit.push(name.to_string());
        match rlimit(name, raw) {
            Ok(l) => {
                id.limits.insert(name.to_string(), l);
            }
            Err(e) => p.add_owned(at_limit, e),
        }
    }
    if own.user.is_some() || own.group.is_some() {
        match switch(id.user.as_deref(), id.group.as_deref(), me) {
            Ok((sw, login)) => {
                id.switch = sw;
                id.login_env = login;
            }
            Err(errs) => {
                for (k, msg) in errs {
                    // An inherited name was blamed where it is written.
                    let own_key = if k == "user" { own.user.is_some() } else { own.group.is_some() };
                    if own_key {
                        p.add_owned(key(k), msg);
                    }
                }
            }
        }
    }
    id
}

/// A limit as written, in the kernel's numbers.
fn rlimit(name: &str, raw: &RawLimit) -> Result<Rlimit, String> {
    let unit = RESOURCES.iter().find(|(n, ..)| *n == name).map_or(Unit::Count, |r| r.2);
    let value = |v: &LimitValue| -> Result<u64, String> {
        match v {
            LimitValue::Number(n) => Ok(*n),
            LimitValue::Text(t) if matches!(t.trim(), "infinity" | "unlimited") => Ok(INFINITY),
            LimitValue::Text(t) if unit == Unit::Bytes => t.parse::<ByteSize>().map(|b| b.0),
            LimitValue::Text(t) => {
                Err(format!("{name} counts, it is no size: write a number or \"infinity\", found {t:?}"))
            }
        }
    };
    let (soft, hard) = match raw {
        RawLimit::Both(v) => {
            let v = value(v)?;
            (v, v)
        }
        RawLimit::Pair { soft, hard } => (value(soft)?, value(hard)?),
    };
    if soft > hard {
        let show = |v: u64| if v == INFINITY { "infinity".to_string() } else { v.to_string() };
        return Err(format!("the soft limit ({}) is above the hard limit ({})", show(soft), show(hard)));
    }
    Ok(Rlimit { soft, hard })
}

/// The key ("user" or "group") and what is wrong with it.
type KeyProblem = (&'static str, String);

/// The switch to `user` and `group` for a drover running as `me`, and the
/// login variables of `user`.
#[expect(clippy::type_complexity, reason = "a pair of results, named at the one caller")]
pub fn switch(
    user: Option<&str>,
    group: Option<&str>,
    me: (u32, u32),
) -> Result<(Option<Switch>, Vec<(String, String)>), Vec<KeyProblem>> {
    let mut errs = Vec::new();
    let u = user.and_then(|name| lookup("user", name, user_by_name, "/etc/passwd", &mut errs));
    let g = group.and_then(|name| lookup("group", name, group_by_name, "/etc/group", &mut errs));
    if !errs.is_empty() {
        return Err(errs);
    }
    let root = me.0 == 0;
    if !root {
        if let (Some(u), Some(name)) = (&u, user)
            && u.uid != me.0
        {
            errs.push((
                "user",
                format!(
                    "drover runs as uid {} (not root) and cannot start a process as user {name:?} (uid {}); \
                     run drover as root, or leave out `user`",
                    me.0, u.uid
                ),
            ));
        }
        if let (Some(gid), Some(name)) = (g, group)
            && gid != me.1
        {
            errs.push((
                "group",
                format!(
                    "drover runs as gid {} (not root) and cannot start a process in group {name:?} (gid {gid}); \
                     run drover as root, or leave out `group`",
                    me.1
                ),
            ));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
    }
    let login = u.as_ref().map(login_env).unwrap_or_default();
    if !root || (u.is_none() && g.is_none()) {
        // Already that user and group: nothing to switch.
        return Ok((None, login));
    }
    let gid = g.or(u.as_ref().map(|u| u.gid)).unwrap_or(me.1);
    let groups = match &u {
        Some(u) => supplementary_groups(&u.name, gid)
            .map_err(|e| vec![("user", format!("cannot read the groups of user {:?}: {e}", u.name))])?,
        None => vec![gid],
    };
    Ok((Some(Switch { uid: u.as_ref().map_or(me.0, |u| u.uid), gid, groups }), login))
}

/// The `what` ("user" or "group") named `name`, looked up with `find`;
/// a problem is pushed to `errs` (with names from `db` for a hint).
fn lookup<T>(
    what: &'static str,
    name: &str,
    find: impl Fn(&str) -> std::io::Result<Option<T>>,
    db: &str,
    errs: &mut Vec<KeyProblem>,
) -> Option<T> {
    match find(name) {
        Ok(Some(found)) => Some(found),
        Ok(None) => {
            errs.push((what, unknown(what, name, &names_in(db))));
            None
        }
        Err(e) => {
            errs.push((what, format!("cannot look up {what} {name:?}: {e}")));
            None
        }
    }
}

/// HOME, LOGNAME, SHELL and USER, as systemd sets them for `User=`.
fn login_env(u: &UserEntry) -> Vec<(String, String)> {
    let mut v = vec![
        ("HOME".to_string(), u.home.clone()),
        ("LOGNAME".to_string(), u.name.clone()),
        ("USER".to_string(), u.name.clone()),
    ];
    if !u.shell.is_empty() {
        v.push(("SHELL".to_string(), u.shell.clone()));
    }
    v
}

fn unknown(what: &str, name: &str, known: &[String]) -> String {
    let mut msg = format!("unknown {what} {name:?}");
    match nearest(name, known) {
        Some(near) => msg.push_str(&format!("; did you mean {near:?}?")),
        None => msg.push_str(&format!("; create it (useradd/groupadd) or name an existing {what}")),
    }
    msg
}

/// The env files a table lists (`at` is the table) and the variables
/// they set, later files over earlier ones.
pub(super) fn env_files(
    p: &mut Problems,
    at: &[&str],
    base_dir: &Path,
    own: Option<&Vec<String>>,
) -> (Vec<EnvFile>, BTreeMap<String, String>) {
    let mut files = Vec::new();
    let mut env = BTreeMap::new();
    for (i, written) in own.into_iter().flatten().enumerate() {
        let key: Vec<String> =
            at.iter().map(|s| s.to_string()).chain(["env_file".to_string(), i.to_string()]).collect();
        let bare = written.strip_prefix('-').unwrap_or(written);
        if bare.trim().is_empty() || written.contains('\0') {
            p.add_owned(key, "expected a file name such as \".env\" (\"-.env\": optional)");
            continue;
        }
        let file = EnvFile::new(written, base_dir);
        match env_file::read(&file) {
            Ok(vars) => env.extend(vars),
            Err(e) => p.add_owned(key, e),
        }
        files.push(file);
    }
    (files, env)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: (u32, u32) = (0, 0);
    const NOBODY: (u32, u32) = (65534, 65534);

    #[test]
    fn root_switches_to_the_user_and_its_groups() {
        let (sw, login) = switch(Some("root"), None, ROOT).unwrap();
        let sw = sw.unwrap();
        assert_eq!((sw.uid, sw.gid), (0, 0));
        assert!(sw.groups.contains(&0), "{sw:?}");
        assert!(login.contains(&("USER".to_string(), "root".to_string())), "{login:?}");
        assert!(login.iter().any(|(k, _)| k == "HOME"));
        // A group alone: that group and no other.
        let (sw, login) = switch(None, Some("root"), ROOT).unwrap();
        assert_eq!(sw, Some(Switch { uid: 0, gid: 0, groups: vec![0] }));
        assert!(login.is_empty());
    }

    #[test]
    fn a_user_other_than_drovers_needs_root() {
        let errs = switch(Some("root"), Some("root"), NOBODY).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].0, "user");
        assert!(errs[0].1.contains("not root") && errs[0].1.contains("leave out `user`"), "{}", errs[0].1);
        assert_eq!(errs[1].0, "group");
        // drover's own user is fine, and nothing is switched.
        let (sw, login) = switch(Some("root"), None, (0, 12345)).unwrap();
        assert!(sw.is_some(), "root switches even to itself (drops supplementary groups)");
        assert!(!login.is_empty());
    }

    #[test]
    fn unknown_names_get_a_hint() {
        let errs = switch(Some("roott"), Some("no-such-group-xyz"), ROOT).unwrap_err();
        assert_eq!(errs[0], ("user", "unknown user \"roott\"; did you mean \"root\"?".to_string()));
        assert_eq!(errs[1].0, "group");
        assert!(errs[1].1.starts_with("unknown group \"no-such-group-xyz\""), "{}", errs[1].1);
    }

    #[test]
    fn limits_take_numbers_sizes_and_infinity() {
        let n = |v: u64| LimitValue::Number(v);
        let t = |s: &str| LimitValue::Text(s.into());
        assert_eq!(rlimit("nofile", &RawLimit::Both(n(4096))), Ok(Rlimit { soft: 4096, hard: 4096 }));
        assert_eq!(
            rlimit("as", &RawLimit::Pair { soft: t("1GiB"), hard: t("infinity") }),
            Ok(Rlimit { soft: 1 << 30, hard: INFINITY })
        );
        assert!(rlimit("nofile", &RawLimit::Both(t("1GiB"))).unwrap_err().contains("nofile counts"));
        let e = rlimit("nofile", &RawLimit::Pair { soft: n(10), hard: n(5) }).unwrap_err();
        assert_eq!(e, "the soft limit (10) is above the hard limit (5)");
    }
}
