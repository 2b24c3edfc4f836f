//! `spawn_mode = "worktree"`: each instance in its own `git worktree`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, instance, run, sh};

const SECS_10: Duration = Duration::from_secs(10);

/// `git ARGS` in the sandbox, which must succeed; no user or system git
/// config is read.
fn git(sb: &Sandbox, args: &[&str]) -> String {
    let out = run(Command::new("git")
        .current_dir(sb.dir.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args(["-c", "user.email=test@example.com", "-c", "user.name=Test", "-c", "init.defaultBranch=main"])
        .args(args));
    assert_eq!(out.code, Some(0), "git {args:?}: {}", out.stderr);
    out.stdout
}

fn config(sb: &Sandbox) -> String {
    let script = format!("pwd >> {}; exec sleep 1000", sb.path("cwd.log").display());
    format!(
        "{SUPERVISOR}\n[workers.tree]\ncapacity = 2\nspawn_mode = \"worktree\"\nstop_grace = \"300ms\"\ncommand = {}\n",
        sh(&script)
    )
}

#[test]
fn each_instance_runs_in_its_own_worktree_removed_after_the_stop() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config(&sb));
    sb.write("tracked.txt", "hello\n");
    sb.write(".gitignore", ".drover/\n*.log\n");
    git(&sb, &["init", "-q"]);
    git(&sb, &["add", "daemon.toml", "tracked.txt", ".gitignore"]);
    git(&sb, &["commit", "-q", "-m", "init"]);

    let mut sup = Supervisor::start_with(&sb, |c| {
        c.env("GIT_CONFIG_NOSYSTEM", "1").env("GIT_CONFIG_GLOBAL", "/dev/null");
    });
    let cwds: Vec<PathBuf> = sb.wait_lines("cwd.log", 2, SECS_10).iter().map(PathBuf::from).collect();
    let worktrees = sb.state_dir().join("worktrees");
    assert_ne!(cwds[0], cwds[1], "the instances share a directory");
    for c in &cwds {
        assert!(c.starts_with(&worktrees), "{} is not under {}", c.display(), worktrees.display());
        assert_eq!(std::fs::read_to_string(c.join("tracked.txt")).unwrap(), "hello\n", "{}", c.display());
    }
    let listed = git(&sb, &["worktree", "list", "--porcelain"]);
    for c in &cwds {
        assert!(listed.contains(&c.display().to_string()), "{listed}");
    }

    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(sup.wait_exit(Duration::from_secs(5)).is_some());
    for c in &cwds {
        assert!(!c.exists(), "{} is left after the stop", c.display());
    }
    let listed = git(&sb, &["worktree", "list", "--porcelain"]);
    assert!(!listed.contains(".drover"), "git still lists a worktree: {listed}");
}

#[test]
fn a_dir_outside_git_is_an_error_in_status() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config(&sb));
    let ceiling = sb.root.parent().unwrap().to_path_buf();
    let sup = Supervisor::start_with(&sb, |c| {
        c.env("GIT_CEILING_DIRECTORIES", &ceiling);
    });
    let v = sup.wait_for("an error", SECS_10, |v| instance(v, "tree", 0)["error"].is_string());
    let i = instance(&v, "tree", 0);
    let error = i["error"].as_str().unwrap();
    assert!(error.contains("git repository"), "{i}");
    assert!(["backoff", "parked"].contains(&i["state"].as_str().unwrap()), "{i}");
    assert!(sb.lines("cwd.log").is_empty(), "a worker ran without its worktree");
    assert_eq!(v["supervisor"]["state"], "running");
}
