//! Identity, environment files and limits, seen from inside the processes
//! drover starts: each worker or job writes what it runs with (uid, gid,
//! groups, umask, limits, nice, oom_score_adj, NoNewPrivs, variables) to a
//! report file, and the tests read it. Switching users needs root: those
//! tests say so and skip when run without.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Sandbox, Supervisor, instance, run, sh, wait_until, worker};
use crate::jobs::{trigger, wait_state};

const LIMIT: Duration = Duration::from_secs(10);

/// A script that writes `KEY=VALUE` lines about its own process to
/// out/NAME.txt (whole, by rename), then `then` (e.g. `exec sleep 1000`).
fn report(name: &str, extra: &str, then: &str) -> String {
    let script = format!(
        "{{ echo uid=$(id -u); echo gid=$(id -g); echo groups=$(id -G); echo umask=$(umask); \
         echo nofile=$(ulimit -Sn)/$(ulimit -Hn); echo nice=$(nice); \
         echo oom=$(cat /proc/self/oom_score_adj); \
         echo nnp=$(grep NoNewPrivs /proc/self/status | tr -dc 0-9); \
         echo home=$HOME; echo user=$USER; echo logname=$LOGNAME; {extra} }} > out/{name}.tmp \
         && mv out/{name}.tmp out/{name}.txt; {then}"
    );
    sh(&script)
}

/// The report of `name`, once it is there.
fn read_report(sb: &Sandbox, name: &str) -> BTreeMap<String, String> {
    let rel = format!("out/{name}.txt");
    let lines = wait_until(&format!("the report of {name}"), LIMIT, || {
        let l = sb.lines(&rel);
        (!l.is_empty()).then_some(l)
    });
    lines.iter().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn running_pid(v: &Value, name: &str) -> Option<i64> {
    let i = instance(v, name, 0);
    (i["state"] == "running").then(|| i["pid"].as_i64()).flatten()
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A sandbox another user can use: its directory searchable by all, and
/// `out/` writable by all.
fn shared_sandbox() -> Sandbox {
    let sb = Sandbox::new();
    std::fs::set_permissions(sb.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(sb.path("out")).unwrap();
    std::fs::set_permissions(sb.path("out"), std::fs::Permissions::from_mode(0o777)).unwrap();
    sb
}

#[test]
fn umask_limits_nice_oom_score_and_no_new_privs_reach_a_worker_and_a_job() {
    let sb = shared_sandbox();
    // Raising nice and oom_score_adj and lowering limits need no privilege.
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\n\n[defaults]\numask = \"027\"\nnice = 7\noom_score_adj = 300\n\
             no_new_privs = true\nlimits = {{ nofile = {{ soft = 1000, hard = 2000 }} }}\n\n\
             [workers.w]\ncommand = {}\n\n[jobs.j]\ncommand = {}\numask = \"077\"\nnice = 9\n\
             limits = {{ nofile = 500 }}\n",
            report("w", "", "exec sleep 1000"),
            report("j", "", "true"),
        ),
    );
    // drover started with its soft limit on open files below the hard
    // one raises it and gives the old one back to its children: the
    // configured limit must win over that give-back.
    let sup = Supervisor::start_with(&sb, |cmd| {
        // SAFETY: setrlimit is a plain system call.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::resource::{Resource, getrlimit, setrlimit};
                let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
                setrlimit(Resource::RLIMIT_NOFILE, 900.min(hard), hard)?;
                Ok(())
            });
        }
    });
    let w = read_report(&sb, "w");
    assert_eq!(w["umask"], "0027", "{w:?}");
    // The configured limit wins over drover's give-back of its own.
    assert_eq!(w["nofile"], "1000/2000", "{w:?}");
    assert_eq!(w["nice"], "7", "{w:?}");
    assert_eq!(w["oom"], "300", "{w:?}");
    assert_eq!(w["nnp"], "1", "{w:?}");

    let id = trigger(&sb, "j");
    wait_state(&sb, id, "succeeded");
    let j = read_report(&sb, "j");
    assert_eq!(j["umask"], "0077", "{j:?}");
    assert_eq!(j["nofile"], "500/500", "{j:?}");
    assert_eq!(j["nice"], "9", "{j:?}");
    // Inherited from [defaults].
    assert_eq!((j["oom"].as_str(), j["nnp"].as_str()), ("300", "1"), "{j:?}");
    drop(sup);
}

#[test]
fn a_worker_and_a_job_run_as_the_configured_user_and_groups() {
    if !is_root() {
        eprintln!("skipping: switching users needs drover to run as root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a user named nobody");
    let sb = shared_sandbox();
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\n\n[workers.w]\ncommand = {}\nuser = \"nobody\"\n\
             env = {{ LOGNAME = \"set-by-env\" }}\n\n\
             [jobs.j]\ncommand = {}\nuser = \"nobody\"\ngroup = \"root\"\n",
            report("w", "", "exec sleep 1000"),
            report("j", "", "true"),
        ),
    );
    let sup = Supervisor::start(&sb);
    let w = read_report(&sb, "w");
    let gid = nobody.gid.as_raw();
    assert_eq!((w["uid"].clone(), w["gid"].clone()), (nobody.uid.to_string(), gid.to_string()), "{w:?}");
    // Its supplementary groups are the user's, not root's.
    let name = std::ffi::CString::new("nobody").unwrap();
    let mut want: Vec<u32> =
        nix::unistd::getgrouplist(&name, nobody.gid).unwrap().into_iter().map(|g| g.as_raw()).collect();
    want.sort_unstable();
    want.dedup();
    let mut got: Vec<u32> = w["groups"].split_whitespace().map(|g| g.parse().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, want, "{w:?}");
    assert_eq!(w["home"], nobody.dir.to_string_lossy(), "{w:?}");
    assert_eq!(w["user"], "nobody", "{w:?}");
    assert_eq!(w["logname"], "set-by-env", "the worker's env is over the login variables: {w:?}");
    let pid = running_pid(&sup.status(), "w").expect("w runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains(&nobody.uid.to_string())), "{status}");

    let id = trigger(&sb, "j");
    wait_state(&sb, id, "succeeded");
    let j = read_report(&sb, "j");
    assert_eq!((j["uid"].as_str(), j["gid"].as_str()), (nobody.uid.to_string().as_str(), "0"), "{j:?}");
    let mut got: Vec<u32> = j["groups"].split_whitespace().map(|g| g.parse().unwrap()).collect();
    got.sort_unstable();
    let mut want: Vec<u32> = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(0))
        .unwrap()
        .iter()
        .map(|g| g.as_raw())
        .collect();
    want.sort_unstable();
    want.dedup();
    assert_eq!(got, want, "group = \"root\" with the user's own groups: {j:?}");
    drop(sup);
}

#[test]
fn an_env_file_with_comments_and_quotes_is_under_env() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.path("out")).unwrap();
    sb.write(
        "app.env",
        "# the app's settings\n; also a comment\nPLAIN = value with spaces  \nSINGLE='a # b $HOME'\n\
         DOUBLE=\"say \\\"hi\\\" \\$x\"\nHASH=x # kept\nMULTI=\"one\ntwo\"\nOVER=from-file\n",
    );
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\n\n[workers.w]\ncommand = {}\nenv_file = [\"app.env\", \"-absent.env\"]\n\
             env = {{ OVER = \"from-env\" }}\n",
            report(
                "w",
                "echo \"plain=$PLAIN\"; echo \"single=$SINGLE\"; echo \"double=$DOUBLE\"; echo \"hash=$HASH\"; \
                 echo \"multi=$(printf %s \"$MULTI\" | tr '\\n' '|')\"; echo \"over=$OVER\";",
                "exec sleep 1000"
            ),
        ),
    );
    let sup = Supervisor::start(&sb);
    let r = read_report(&sb, "w");
    assert_eq!(r["plain"], "value with spaces", "{r:?}");
    assert_eq!(r["single"], "a # b $HOME", "{r:?}");
    assert_eq!(r["double"], "say \"hi\" $x", "{r:?}");
    assert_eq!(r["hash"], "x # kept", "{r:?}");
    assert_eq!(r["multi"], "one|two", "{r:?}");
    assert_eq!(r["over"], "from-env", "{r:?}");
    drop(sup);
}

#[test]
fn a_changed_env_file_restarts_only_the_worker_that_reads_it() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.path("out")).unwrap();
    sb.write("a.env", "MODE=one\n");
    sb.write("b.env", "MODE=other\n");
    let body = |name: &str| {
        format!(
            "[workers.{name}]\ncommand = {}\nenv_file = [\"{name}.env\"]\n",
            sh(&format!("echo $MODE >> out/{name}.modes; exec sleep 1000"))
        )
    };
    sb.write("daemon.toml", format!("[supervisor]\nreload = true\n\n{}{}", body("a"), body("b")));
    let sup = Supervisor::start(&sb);
    let v = sup
        .wait_for("both running", LIMIT, |v| running_pid(v, "a").is_some() && running_pid(v, "b").is_some());
    let (a0, b0) = (running_pid(&v, "a"), running_pid(&v, "b"));
    sb.wait_lines("out/a.modes", 1, LIMIT);

    // An editor's atomic save of a.env.
    sb.write("a.env.tmp", "# changed\nMODE=two\n");
    std::fs::rename(sb.path("a.env.tmp"), sb.path("a.env")).unwrap();
    let v = sup.wait_for("a restarted with the new file", LIMIT, |v| {
        v["supervisor"]["generation"] == 2 && running_pid(v, "a").is_some_and(|p| Some(p) != a0)
    });
    assert_eq!(running_pid(&v, "b"), b0, "b reads another file and keeps its process");
    assert_eq!(sb.wait_lines("out/a.modes", 2, LIMIT), ["one", "two"]);
    assert_eq!(sb.lines("out/b.modes"), ["other"]);
    drop(sup);
}

#[test]
fn an_unknown_user_is_a_check_error_at_its_line_and_column() {
    let sb = Sandbox::new();
    let file = sb.write(
        "daemon.toml",
        "[workers.web]\ncommand = [\"sleep\", \"1\"]\nuser = \"no-such-user-drover\"\n\
         [jobs.j]\ncommand = [\"true\"]\ngroup = \"no-such-group-drover\"\n",
    );
    let out = run(sb.drover().arg("check").arg(&file));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let f = file.display();
    assert!(
        out.stderr.contains(&format!("{f}:3:8: workers.web.user: unknown user \"no-such-user-drover\"")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!("{f}:6:9: jobs.j.group: unknown group \"no-such-group-drover\"")),
        "{}",
        out.stderr
    );
    // And `start` refuses the config the same way, starting nothing.
    let out = run(sb.drover().args(["-c", "daemon.toml", "start"]));
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("unknown user \"no-such-user-drover\""), "{}", out.stderr);
}

#[test]
fn a_drover_that_is_not_root_cannot_name_another_user() {
    if !is_root() {
        eprintln!("skipping: running check as another user needs root");
        return;
    }
    let sb = shared_sandbox();
    let file = sb.write("daemon.toml", "[workers.web]\ncommand = [\"sleep\", \"1\"]\nuser = \"root\"\n");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a user named nobody");
    let out = run(sb.drover().arg("check").arg(&file).uid(nobody.uid.as_raw()).gid(nobody.gid.as_raw()));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "{}:3:8: workers.web.user: drover runs as uid {} (not root) and cannot start a process as user \"root\"",
            file.display(),
            nobody.uid
        )),
        "{}",
        out.stderr
    );
}

#[test]
fn a_limit_the_kernel_refuses_is_the_instances_start_error() {
    let sb = Sandbox::new();
    // Above fs.nr_open: refused even to root.
    sb.write(
        "daemon.toml",
        "[supervisor]\nreload = false\n\n[workers.bad]\ncommand = [\"sleep\", \"1000\"]\n\
         limits = { nofile = 1099511627776 }\n\n[workers.good]\ncommand = [\"sleep\", \"1000\"]\n",
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("bad's start error", LIMIT, |v| {
        instance(v, "bad", 0)["error"].as_str().is_some() && running_pid(v, "good").is_some()
    });
    let err = instance(&v, "bad", 0)["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("cannot start \"sleep\"") && err.contains("Operation not permitted"), "{err}");
    assert!(
        err.ends_with("; the kernel refused limits.nofile (soft 1099511627776, hard 1099511627776)"),
        "{err}"
    );
    assert_eq!(worker(&v, "good")["instances"][0]["state"], "running");
    drop(sup);
}
