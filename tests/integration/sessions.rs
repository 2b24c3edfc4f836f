//! Background sessions with real processes: `bg` prints an id, `attach`
//! replays and follows the output and exits with the session's code,
//! `logs` prints it, `kill` stops it; sessions show in `status`; and the
//! commands that act need a running supervisor while the ledger stays
//! readable without one.

use serde_json::Value;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor};
use crate::jobs::{SECS_10, is_terminal, printed_id, process_of, runs, show, wait_gone, wait_run};

/// `drover bg ARGS…`, which must succeed; the session's id.
fn bg(sb: &Sandbox, args: &[&str]) -> i64 {
    let args: Vec<&str> = ["bg"].iter().chain(args).copied().collect();
    printed_id(&args, &sb.cli(&args))
}

fn config(sb: &Sandbox) {
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}\n[defaults]\nstop_grace = \"2s\"\n[jobs.j]\ncommand = [\"true\"]\n"),
    );
}

#[test]
fn attach_replays_and_follows_a_session_and_exits_with_its_code() {
    let sb = Sandbox::new();
    config(&sb);
    let _sup = Supervisor::start(&sb);
    let id = bg(&sb, &["--name", "s", "--", "sh", "-c", "echo hi; sleep 0.2; echo bye; exit 3"]);
    let out = sb.cli(&["attach", "s"]);
    assert_eq!(out.code, Some(3), "attach exits with the session's code: {}\n{}", out.stdout, out.stderr);
    let hi = out.stdout.find("hi").unwrap_or_else(|| panic!("no hi in {:?}", out.stdout));
    let bye = out.stdout.find("bye").unwrap_or_else(|| panic!("no bye in {:?}", out.stdout));
    assert!(hi < bye, "{}", out.stdout);

    let r = show(&sb, id);
    assert_eq!(r["kind"], "session", "{r:#}");
    assert_eq!(r["source"], "bg", "{r:#}");
    assert_eq!(r["state"], "failed", "{r:#}");
    assert_eq!(r["exit_code"], 3, "{r:#}");
    assert_eq!(r["job"], Value::Null, "{r:#}");
    assert_eq!(r["name"], "s", "{r:#}");

    // Once it has ended, attach (by id this time) replays it all.
    let again = sb.cli(&["attach", &id.to_string()]);
    assert_eq!(again.code, Some(3), "{}", again.stderr);
    assert!(again.stdout.contains("hi") && again.stdout.contains("bye"), "{}", again.stdout);

    // logs prints the same output.
    for key in ["s".to_string(), id.to_string()] {
        let logs = sb.cli(&["logs", &key]);
        assert_eq!(logs.code, Some(0), "{}", logs.stderr);
        let lines: Vec<&str> = logs.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{}", logs.stdout);
        assert!(lines[0].ends_with("hi") && lines[1].ends_with("bye"), "{}", logs.stdout);
    }
}

#[test]
fn a_successful_session_attaches_with_exit_zero() {
    let sb = Sandbox::new();
    config(&sb);
    let _sup = Supervisor::start(&sb);
    let id = bg(&sb, &["--", "sh", "-c", "sleep 0.1; echo done"]);
    let out = sb.cli(&["attach", &id.to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("done"), "{}", out.stdout);
    assert_eq!(show(&sb, id)["state"], "succeeded");
}

#[test]
fn kill_stops_a_session_which_status_lists_while_it_runs() {
    let sb = Sandbox::new();
    config(&sb);
    let sup = Supervisor::start(&sb);
    let id = bg(&sb, &["--name", "sleeper", "--", "sleep", "30"]);
    let p = process_of(&sb, id);
    let v = sup.status();
    let sessions = v["sessions"].as_array().expect("sessions in status");
    assert_eq!(sessions.len(), 1, "{v:#}");
    assert_eq!(sessions[0]["id"], id, "{v:#}");
    assert_eq!(sessions[0]["state"], "running", "{v:#}");
    assert_eq!(sessions[0]["name"], "sleeper", "{v:#}");
    assert!(v["runs"].as_array().unwrap().iter().all(|r| r["id"] != id), "a session is not a job run: {v:#}");

    let out = sb.cli(&["kill", &id.to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let r = wait_run(&sb, id, "the session to end", is_terminal);
    assert_eq!(r["state"], "cancelled", "{r:#}");
    wait_gone(p, "the killed session's process to be gone");
    sup.wait_for("no session in status", SECS_10, |v| v["sessions"].as_array().is_some_and(|s| s.is_empty()));

    // Killing it again, or something unknown, fails.
    let out = sb.cli(&["kill", &id.to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let out = sb.cli(&["kill", "nosuch"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    // kill is for sessions: a job run is cancelled with `runs cancel`.
    let job = crate::jobs::trigger(&sb, "j");
    wait_run(&sb, job, "the job run to end", is_terminal);
    let out = sb.cli(&["kill", &job.to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
}

#[test]
fn attach_and_logs_on_an_unknown_session_exit_1() {
    let sb = Sandbox::new();
    config(&sb);
    let _sup = Supervisor::start(&sb);
    for key in ["4242", "nosuch"] {
        let out = sb.cli(&["attach", key]);
        assert_eq!(out.code, Some(1), "attach {key}: {}", out.stdout);
        assert!(out.stderr.contains(key), "{}", out.stderr);
        let out = sb.cli(&["logs", key]);
        assert_eq!(out.code, Some(1), "logs {key}: {}", out.stdout);
        assert!(out.stderr.contains(key), "{}", out.stderr);
    }
    let out = sb.cli(&["bg", "--", ""]);
    assert_eq!(out.code, Some(1), "an empty command: {} {}", out.stdout, out.stderr);
}

#[test]
fn without_a_supervisor_acting_exits_3_and_reading_the_ledger_works() {
    let sb = Sandbox::new();
    config(&sb);
    let sup = Supervisor::start(&sb);
    let id = bg(&sb, &["--name", "old", "--", "sh", "-c", "echo old"]);
    wait_run(&sb, id, "the session to end", is_terminal);
    let out = sb.cli(&["stop"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    drop(sup);

    for args in [
        &["bg", "--", "true"][..],
        &["trigger", "j"],
        &["runs", "cancel", "1"],
        &["runs", "resume", "1"],
        &["kill", "old"],
        &["attach", "old"],
    ] {
        let out = sb.cli(args);
        assert_eq!(out.code, Some(3), "drover {args:?} with no supervisor: {} {}", out.stdout, out.stderr);
        assert!(out.stdout.is_empty(), "drover {args:?} printed {:?}", out.stdout);
    }
    // Reading needs no supervisor.
    let all = runs(&sb, &[]);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["id"], id);
    assert_eq!(all[0]["state"], "succeeded");
    let r = show(&sb, id);
    assert_eq!(r["name"], "old", "{r:#}");
    let out = sb.cli(&["runs"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("old"), "{}", out.stdout);
    let out = sb.cli(&["runs", "show", &id.to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);
    assert!(sb.processes().is_empty(), "a read-only command started something: {:?}", sb.processes());
}

#[test]
fn bg_runs_the_session_in_the_callers_directory() {
    let sb = Sandbox::new();
    config(&sb);
    let _sup = Supervisor::start(&sb);
    std::fs::create_dir(sb.path("sub")).unwrap();
    let args = ["-c", "../daemon.toml", "bg", "--", "sh", "-c", "pwd > where"];
    let out = crate::harness::run_within(sb.drover().current_dir(sb.path("sub")).args(args), SECS_10);
    let id = printed_id(&args, &out);
    wait_run(&sb, id, "the session to end", is_terminal);
    assert_eq!(sb.lines("sub/where"), [sb.root.join("sub").display().to_string()]);
}

#[test]
fn a_session_left_by_a_sigkilled_drover_is_failed_and_stopped_by_the_next() {
    let sb = Sandbox::new();
    config(&sb);
    let mut sup = Supervisor::start(&sb);
    let id = bg(&sb, &["--name", "orphan", "--", "sleep", "30"]);
    let p = process_of(&sb, id);
    sup.sigkill();
    drop(sup);
    assert!(p.running());
    let sup = Supervisor::start(&sb);
    let r = wait_run(&sb, id, "the session to be finalized", is_terminal);
    assert_eq!(r["state"], "failed", "{r:#}");
    assert_eq!(r["error"], "supervisor exited while the run was active", "{r:#}");
    wait_gone(p, "the orphaned session's process to be gone");
    assert!(sup.status()["sessions"].as_array().unwrap().is_empty());
}

#[test]
fn attach_prints_all_of_a_sessions_output() {
    let sb = Sandbox::new();
    config(&sb);
    let _sup = Supervisor::start(&sb);
    // The race is narrow: a few sessions that end right after much output.
    for round in 0..8 {
        let id = bg(&sb, &["--", "sh", "-c", "seq 1 3000; exit 3"]);
        let out = sb.cli(&["attach", &id.to_string()]);
        assert_eq!(out.code, Some(3), "{}", out.stderr);
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 3000, "round {round}: attach printed {} of 3000 lines", lines.len());
        assert!(lines[2999].ends_with(" 3000"), "round {round}: last line {:?}", lines[2999]);
    }
}

#[test]
fn a_session_name_held_by_a_running_session_is_refused_and_kill_finds_the_running_one() {
    let sb = Sandbox::new();
    config(&sb);
    let _sup = Supervisor::start(&sb);
    let first = bg(&sb, &["--name", "dup", "--", "sleep", "30"]);
    let out = sb.cli(&["bg", "--name", "dup", "--", "sleep", "30"]);
    assert_eq!(out.code, Some(1), "a second running dup is refused: {}", out.stdout);
    let want = format!("a session named dup is already running: id {first}");
    assert!(out.stderr.contains(&want), "{}", out.stderr);

    let out = sb.cli(&["kill", "dup"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(wait_run(&sb, first, "the first dup to end", is_terminal)["state"], "cancelled");
    // Once it has ended the name is free; the name finds the running one,
    // not the cancelled one.
    let second = bg(&sb, &["--name", "dup", "--", "sleep", "30"]);
    let out = sb.cli(&["kill", "dup"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains(&second.to_string()), "{}", out.stdout);
    assert_eq!(wait_run(&sb, second, "the second dup to end", is_terminal)["state"], "cancelled");
}

#[test]
fn a_session_gets_the_callers_environment_over_defaults_env() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}\n[defaults]\nenv = {{ FROM_DEFAULTS = \"d\", BOTH = \"defaults\" }}\n"),
    );
    let _sup = Supervisor::start_with(&sb, |c| {
        c.env("ONLY_DROVER", "drover's own");
    });
    let args =
        ["bg", "--", "sh", "-c", "echo \"$FROM_DEFAULTS/$BOTH/$FROM_CALLER/${ONLY_DROVER-unset}\" > envout"];
    let mut cmd = sb.drover();
    cmd.args(["-c", "daemon.toml"]).args(args).env("FROM_CALLER", "c").env("BOTH", "caller");
    let id = printed_id(&args, &crate::harness::run_within(&mut cmd, SECS_10));
    let r = wait_run(&sb, id, "the session to end", is_terminal);
    assert_eq!(r["state"], "succeeded", "{r:#}");
    assert_eq!(sb.lines("envout"), ["d/caller/c/unset"]);
}

#[test]
fn a_session_whose_directory_is_missing_names_the_directory() {
    let sb = Sandbox::new();
    config(&sb);
    let _sup = Supervisor::start(&sb);
    // The supervisor cannot find the directory the request names.
    let gone = sb.path("gone");
    let req = serde_json::json!({"cmd": "bg", "name": null, "command": ["true"], "dir": gone});
    let mut sock =
        std::os::unix::net::UnixStream::connect(sb.state_dir().join("drover.sock")).expect("connect");
    use std::io::{BufRead, Write};
    writeln!(sock, "{req}").expect("send");
    let mut line = String::new();
    std::io::BufReader::new(&sock).read_line(&mut line).expect("answer");
    let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let id = answer["id"].as_i64().unwrap_or_else(|| panic!("no run id: {answer}"));
    let r = wait_run(&sb, id, "the session to fail", is_terminal);
    assert_eq!(r["state"], "failed", "{r:#}");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(err.contains(&*gone.to_string_lossy()) && err.contains("does not exist"), "{r:#}");

    // `bg` from a directory deleted under the caller's shell names it too.
    let script = "mkdir doomed && cd doomed && rmdir ../doomed && \"$DROVER\" -c \"$CFG\" bg -- true";
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", script])
        .current_dir(sb.dir.path())
        .env("DROVER", crate::harness::DROVER)
        .env("CFG", sb.path("daemon.toml"));
    let out = crate::harness::run_within(&mut cmd, SECS_10);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(out.stderr.contains("doomed") && out.stderr.contains("current directory"), "{}", out.stderr);
}
