//! What a local user could try against drover: permissions under a
//! permissive umask, state_dirs others can write or own, symlinks planted at
//! drover's paths, names that try to leave state_dir, shell injection, and
//! secrets in the output.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, instance, sh};

const SECS_10: Duration = Duration::from_secs(10);

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode()
        & 0o777
}

#[test]
fn every_file_drover_makes_is_owner_only_even_under_umask_000() {
    let sb = Sandbox::new();
    let umask_file = sb.path("worker-umask");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.web]\ncommand = {}\n[jobs.tick]\ncommand = [\"echo\", \"ran\"]\n",
            sh(&format!("umask > {}; echo up; exec sleep 1000", umask_file.display()))
        ),
    );
    let sup = Supervisor::start_with(&sb, |cmd| unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        });
    });
    let id = sb.cli(&["trigger", "tick"]).stdout.trim().to_string();
    crate::jobs::wait_state(&sb, id.parse().unwrap(), "succeeded");

    let sd = sb.state_dir();
    crate::harness::wait_until("the worker's log", SECS_10, || {
        sb.lines(".drover/logs/web.log").first().cloned()
    });
    for dir in [sd.clone(), sd.join("logs"), sd.join("runs")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let run_log = format!("runs/{id}.log");
    let mut files =
        vec!["drover.sock", "drover.lock", "state.json", "ledger.sqlite", "logs/web.log", &run_log];
    for extra in ["ledger.sqlite-wal", "ledger.sqlite-shm"] {
        if sd.join(extra).exists() {
            files.push(extra);
        }
    }
    for f in files {
        assert_eq!(mode(&sd.join(f)), 0o600, "{f}");
    }
    // drover tightens only its own files: its workers keep the user's umask.
    let worker_umask = crate::harness::wait_until("the worker's umask", SECS_10, || {
        std::fs::read_to_string(&umask_file).ok().filter(|s| !s.is_empty())
    });
    assert_eq!(worker_umask.trim(), "0000");
    assert_eq!(instance(&sup.status(), "web", 0)["state"], "running");
}

#[test]
fn a_state_dir_others_can_write_is_refused() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{SUPERVISOR}[workers.web]\ncommand = [\"sleep\", \"1000\"]\n"));
    let sd = sb.state_dir();
    std::fs::create_dir(&sd).unwrap();
    for (m, who) in [(0o777, "every user"), (0o1777, "every user"), (0o770, "its group")] {
        std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(m)).unwrap();
        for args in [&["start"][..], &["start", "--detach"]] {
            let r = sb.cli(args);
            assert_eq!(r.code, Some(1), "mode {m:o} {args:?}: {}", r.stderr);
            assert!(r.stderr.contains(&format!("writable by {who}")), "{}", r.stderr);
            assert!(r.stderr.contains("chmod go-w"), "{}", r.stderr);
            assert!(r.stderr.contains(&sd.display().to_string()), "names the directory: {}", r.stderr);
        }
        assert!(!sd.join("drover.sock").exists(), "nothing was made in it");
        assert!(!sd.join("drover.lock").exists(), "nothing was made in it");
    }
}

#[test]
fn a_state_dir_of_another_user_is_refused() {
    let sb = Sandbox::new();
    let me = nix::unistd::geteuid();
    // As root, give the directory away; as anyone else, "/" is root's.
    let (sd, owner) = if me.is_root() {
        let sd = sb.path("theirs");
        std::fs::create_dir(&sd).unwrap();
        std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&sd, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        (sd, 65534)
    } else {
        ("/".into(), 0)
    };
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\nstate_dir = {:?}\n[workers.web]\ncommand = [\"sleep\", \"1000\"]\n",
            sd.display().to_string()
        ),
    );
    let r = sb.cli(&["start"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("belongs to uid {owner}")), "{}", r.stderr);
    assert!(!sd.join("drover.sock").exists());
}

#[test]
fn symlinks_planted_at_drovers_paths_are_not_followed() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}[workers.web]\ncommand = {}\n", sh("echo hello from web; exec sleep 1000")),
    );
    let sd = sb.state_dir();
    std::fs::create_dir_all(sd.join("logs")).unwrap();
    for d in [&sd, &sd.join("logs")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let planted = ["drover.sock", "state.json", "ledger.sqlite", "logs/web.log"];
    for (i, p) in planted.iter().enumerate() {
        let victim = sb.write(&format!("victim{i}"), "precious\n");
        symlink(&victim, sd.join(p)).unwrap();
    }

    let sup = Supervisor::start(&sb);
    sup.wait_for("web to run", SECS_10, |v| instance(v, "web", 0)["state"] == "running");
    for (i, p) in planted.iter().enumerate() {
        let victim = std::fs::read_to_string(sb.path(&format!("victim{i}"))).unwrap();
        assert_eq!(victim, "precious\n", "{p}");
    }
    // The socket and the state file are drover's own again; the log and
    // the ledger are refused, and the reason is logged.
    for p in ["drover.sock", "state.json"] {
        assert!(!std::fs::symlink_metadata(sd.join(p)).unwrap().file_type().is_symlink(), "{p}");
    }
    let err = crate::harness::wait_until("the refusals to be logged", SECS_10, || {
        let e = sup.stderr();
        (e.matches("is a symbolic link").count() >= 2).then_some(e)
    });
    assert!(err.contains("web.log is a symbolic link"), "{err}");
    assert!(err.contains("ledger.sqlite is a symbolic link"), "{err}");
    drop(sup);

    // A planted lock stops the start with a clear error.
    std::fs::remove_file(sd.join("drover.lock")).unwrap();
    let victim = sb.write("victim-lock", "precious\n");
    symlink(&victim, sd.join("drover.lock")).unwrap();
    let r = sb.cli(&["start"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("drover.lock is a symbolic link"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}

#[test]
fn names_never_reach_outside_state_dir() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{SUPERVISOR}[workers.web]\ncommand = [\"sleep\", \"1000\"]\n"));
    let _sup = Supervisor::start(&sb);
    for bad in ["../escape", "/tmp/x", "a/b", "..", "x\ny", "UPPER"] {
        let r = sb.cli(&["bg", "--name", bad, "--", "true"]);
        assert_eq!(r.code, Some(1), "bg --name {bad:?}: {}", r.stdout);
        assert!(r.stderr.contains("is not allowed"), "{}", r.stderr);
        for cmd in ["logs", "restart", "unpark", "attach", "kill"] {
            let r = sb.cli(&[cmd, bad]);
            assert_eq!(r.code, Some(1), "{cmd} {bad:?}: {}", r.stdout);
            assert!(
                r.stderr.contains(&format!("{bad:?}")) || r.stderr.contains(bad),
                "{cmd} names {bad:?}: {}",
                r.stderr
            );
        }
    }
    // A worker or job whose name is a path is a config error.
    for table in ["workers", "jobs"] {
        sb.write("bad.toml", format!("[{table}.\"../../etc\"]\ncommand = [\"true\"]\n"));
        let r = sb.cli(&["check", "bad.toml"]);
        assert_eq!(r.code, Some(1));
        assert!(r.stderr.contains("invalid name \"../../etc\""), "{}", r.stderr);
    }
    let made: Vec<_> =
        std::fs::read_dir(sb.root.as_path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!made.iter().any(|n| n == "escape" || n == "etc"), "{made:?}");
}

#[test]
fn commands_are_never_passed_through_a_shell() {
    let sb = Sandbox::new();
    let tricks = ["$HOME", "`touch pwned1`", "$(touch pwned2)", "; touch pwned3", "| cat", "*"];
    let argv = serde_json::to_string(&[&["echo"][..], &tricks[..]].concat()).unwrap();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.web]\nrestart = \"never\"\ncommand = {argv}\n[jobs.j]\ncommand = {argv}\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let expected = tricks.join(" ");
    let line = crate::harness::wait_until("the worker's line", SECS_10, || {
        sb.lines(".drover/logs/web.log").into_iter().find(|l| l.contains("$HOME"))
    });
    assert!(line.ends_with(&expected), "the arguments arrive verbatim: {line}");
    let id = sb.cli(&["trigger", "j"]).stdout.trim().to_string();
    let out = sb.cli(&["attach", &id]);
    assert!(out.stdout.contains(&expected), "{}", out.stdout);
    let bg = sb.cli(&[&["bg", "--"][..], &["echo"], &tricks[..]].concat());
    let out = sb.cli(&["attach", bg.stdout.trim()]);
    assert!(out.stdout.contains(&expected), "{}", out.stdout);
    drop(sup);
    for p in ["pwned1", "pwned2", "pwned3"] {
        assert!(!sb.path(p).exists(), "{p} was created: a shell ran");
    }
}

#[test]
fn secret_env_values_are_never_printed() {
    let sb = Sandbox::new();
    let got = sb.path("got");
    let config = |token: &str| {
        format!(
            "{SUPERVISOR}[defaults]\nsecret_env = [\"DB_PASSWORD\"]\nenv = {{ DB_PASSWORD = \"pw-s3cr3t-db\" }}\n\
             [workers.web]\nsecret_env = [\"API_TOKEN\"]\nenv = {{ API_TOKEN = \"{token}\", PORT = \"8000\" }}\n\
             command = {}\n\
             [jobs.report]\nenv = {{ S3_KEY = \"s3cr3t-key\" }}\nsecret_env = [\"S3_KEY\"]\ncommand = {}\n",
            sh(&format!(
                "echo \"$API_TOKEN $DB_PASSWORD\" > {}; echo \"token=$API_TOKEN db=$DB_PASSWORD port=$PORT\"; \
                 exec sleep 1000",
                got.display()
            )),
            sh("echo \"key=$S3_KEY db=$DB_PASSWORD\"")
        )
    };
    sb.write("daemon.toml", config("tok-s3cr3t-1"));
    let secrets = ["s3cr3t"];
    let clean = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} prints a secret:\n{text}");
        }
    };
    for args in [&["config"][..], &["config", "--json"]] {
        let r = sb.cli(args);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        clean(&format!("{args:?}"), &r.stdout);
        assert!(r.stdout.contains("(secret)") && r.stdout.contains("8000"), "{}", r.stdout);
    }

    let sup = Supervisor::start(&sb);
    // The worker does get the real values.
    let seen = crate::harness::wait_until("the worker's env", SECS_10, || {
        std::fs::read_to_string(&got).ok().filter(|s| !s.is_empty())
    });
    assert_eq!(seen.trim(), "tok-s3cr3t-1 pw-s3cr3t-db");
    // What the worker prints of them is masked in its log.
    let line = crate::harness::wait_until("the worker's line", SECS_10, || {
        sb.lines(".drover/logs/web.log").into_iter().find(|l| l.contains("token="))
    });
    assert!(line.ends_with("token=(secret) db=(secret) port=8000"), "{line}");
    let id = sb.cli(&["trigger", "report"]).stdout.trim().to_string();
    let out = sb.cli(&["attach", &id]).stdout;
    assert!(out.contains("key=(secret) db=(secret)"), "a job's output is masked too: {out}");
    clean("attach", &out);

    sb.write("daemon.toml", config("tok-s3cr3t-2"));
    let plan = sb.cli(&["plan"]);
    assert_eq!(plan.code, Some(1), "a changed secret is a change: {}", plan.stdout);
    assert!(plan.stdout.contains("env"), "{}", plan.stdout);
    clean("plan", &plan.stdout);
    clean("plan --json", &sb.cli(&["plan", "--json"]).stdout);
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    sup.wait_for("generation 2", SECS_10, |v| v["supervisor"]["generation"] == 2);
    for args in [&["status"][..], &["status", "--json"], &["status", "web"]] {
        clean(&format!("{args:?}"), &sb.cli(args).stdout);
    }
    // After the reload, the new value is the one masked.
    sb.wait_lines(".drover/logs/web.log", 2, SECS_10);
    let logs = sb.cli(&["logs", "web"]);
    clean("logs", &logs.stdout);
    assert_eq!(logs.stdout.matches("token=(secret) db=(secret)").count(), 2, "{}", logs.stdout);

    drop(sup);
    clean("drover's own log", &std::fs::read_to_string(sb.path("drover.err")).unwrap());
    clean("the state file", &std::fs::read_to_string(sb.state_dir().join("state.json")).unwrap());
}

fn config_with_state_dir(sd: &str) -> String {
    format!(
        "[supervisor]\nreload = false\nstate_dir = {sd:?}\n[workers.web]\ncommand = [\"sleep\", \"1000\"]\n"
    )
}

const NOBODY: u32 = 65534;

fn give_away(p: &Path) {
    nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(NOBODY)), Some(nix::unistd::Gid::from_raw(NOBODY)))
        .unwrap();
}

/// Regression: only the state_dir itself was checked, so one under a
/// directory others can write (or own) could be swapped under drover.
#[test]
fn a_state_dir_under_a_directory_others_control_is_refused() {
    let sb = Sandbox::new();
    let shared = sb.path("shared");
    std::fs::create_dir_all(shared.join("proj")).unwrap();
    sb.write("daemon.toml", config_with_state_dir("shared/proj/.drover"));
    for (m, who) in [(0o777, "every user"), (0o775, "its group")] {
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(m)).unwrap();
        for args in [&["start"][..], &["start", "--detach"]] {
            let r = sb.cli(args);
            assert_eq!(r.code, Some(1), "mode {m:o} {args:?}: {}", r.stderr);
            assert!(
                r.stderr.contains(&format!("{}, which is writable by {who}", shared.display())),
                "{}",
                r.stderr
            );
            assert!(r.stderr.contains("chmod go-w"), "{}", r.stderr);
            assert!(!shared.join("proj/.drover").exists(), "nothing was made under it");
        }
    }
    // Sticky, as /tmp is: others cannot rename what is ours in it.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let sup = Supervisor::start(&sb);
    assert_eq!(sup.status()["supervisor"]["state"], "running");
    drop(sup);

    if !nix::unistd::geteuid().is_root() {
        println!("not root: the case of a parent owned by another user is not tested here");
        return;
    }
    // Root running drover in another user's project directory.
    let theirs = sb.path("home-u/proj");
    std::fs::create_dir_all(&theirs).unwrap();
    give_away(&theirs);
    sb.write("daemon.toml", config_with_state_dir("home-u/proj/.drover"));
    let r = sb.cli(&["start"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{}, which belongs to uid {NOBODY}", theirs.display())),
        "{}",
        r.stderr
    );
    assert!(!theirs.join(".drover").exists());
}

/// Regression: the CLI trusted whatever socket it found: another user who
/// could replace the state_dir answered root's `drover stop`.
#[test]
fn the_cli_talks_only_to_a_socket_and_state_dir_of_its_own_user() {
    if !nix::unistd::geteuid().is_root() {
        println!("not root: cannot give a socket to another user here; skipped");
        return;
    }
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{SUPERVISOR}[workers.web]\ncommand = [\"sleep\", \"1000\"]\n"));
    let mut sup = Supervisor::start(&sb);
    let sock = sb.state_dir().join("drover.sock");
    for (what, path) in [("control socket", sock.clone()), ("state_dir", sb.state_dir())] {
        give_away(&path);
        // `runs` reads the ledger in the state_dir, not the socket.
        let runs: &[&[&str]] = if what == "state_dir" { &[&["runs"]] } else { &[] };
        for args in [&["status"][..], &["stop"], &["reload"]].into_iter().chain(runs.iter().copied()) {
            let r = sb.cli(args);
            assert_eq!(r.code, Some(1), "{what} {args:?}: {}{}", r.stdout, r.stderr);
            assert!(
                r.stderr.contains(&format!("refusing to trust the {what} {}", path.display())),
                "{}",
                r.stderr
            );
            assert!(r.stderr.contains(&format!("belongs to uid {NOBODY}")), "{}", r.stderr);
        }
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(0)), Some(nix::unistd::Gid::from_raw(0)))
            .unwrap();
        assert!(sup.try_wait().is_none(), "drover was stopped through an untrusted path");
    }
    assert_eq!(sup.status()["supervisor"]["state"], "running");
}

/// Whoever accepted the connection must run as this user too: a socket
/// file that is ours proves nothing if another user's process listens on
/// it (the file was swapped after the look, or chowned).
#[test]
fn the_cli_refuses_a_supervisor_running_as_another_user() {
    if !nix::unistd::geteuid().is_root() {
        println!("not root: cannot run a supervisor as another user here; skipped");
        return;
    }
    let sb = Sandbox::new();
    std::fs::set_permissions(sb.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let nob = sb.path("nob");
    std::fs::create_dir(&nob).unwrap();
    give_away(&nob);
    sb.write("daemon.toml", "[supervisor]\nreload = false\nstate_dir = \"nob/.drover\"\n");
    std::fs::set_permissions(sb.path("daemon.toml"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let child = sb
        .drover()
        .args(["-c", "daemon.toml", "start"])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(sb.path("drover.err")).unwrap())
        .spawn()
        .unwrap();
    // Stopped whatever happens: SIGTERM, then SIGKILL (and the sandbox
    // kills anything of it left).
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + SECS_10;
            while self.0.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Stop(child);
    let sd = nob.join(".drover");
    let sock = sd.join("drover.sock");
    crate::harness::wait_until("the other user's supervisor", SECS_10, || {
        std::fs::read_to_string(sb.path("drover.err")).ok().filter(|e| e.contains("ready")).map(drop)
    });
    // Its files now look like ours: the process behind them does not.
    for p in [&sd, &sock] {
        nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    }
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(&format!("runs as uid {NOBODY}, not as this user (uid 0)")), "{}", r.stderr);
    drop(guard);
}

/// An existing state_dir that others may read or enter (0755) had its
/// file names (workers, runs, sessions) open to every user: it is now
/// made 0700, and the log says so.
#[test]
fn an_existing_state_dir_others_can_read_is_made_owner_only() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{SUPERVISOR}[workers.web]\ncommand = [\"sleep\", \"1000\"]\n"));
    let sd = sb.state_dir();
    std::fs::create_dir(&sd).unwrap();
    std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sup = Supervisor::start(&sb);
    assert_eq!(mode(&sd), 0o700);
    assert!(sup.stderr().contains("state_dir was mode 755: made it 0700"), "{}", sup.stderr());
    drop(sup);

    std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(0o750)).unwrap();
    let r = sb.cli(&["start", "--detach"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("state_dir {} was mode 750: made it 0700", sd.display())),
        "{}",
        r.stderr
    );
    assert_eq!(mode(&sd), 0o700);
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}
