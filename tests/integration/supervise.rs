//! Restart rules with real processes: backoff, crash-loop parking,
//! permanent exit codes, the three restart policies, spawn failures, the
//! environment of an instance and `drover restart`. Workers append what
//! they see to files in the sandbox; the tests assert on those files.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, instance, sh, worker};

const SECS_10: Duration = Duration::from_secs(10);

/// The start times (seconds since the epoch) recorded by a worker that
/// runs `echo $$ $(date +%s.%N) >> FILE`.
fn start_times(lines: &[String]) -> Vec<f64> {
    lines
        .iter()
        .map(|l| l.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{l:?}")))
        .collect()
}

fn state_of(v: &Value, name: &str) -> String {
    instance(v, name, 0)["state"].as_str().unwrap_or("").to_string()
}

#[test]
fn restarts_after_a_backoff_that_doubles_up_to_its_cap() {
    let sb = Sandbox::new();
    let out = sb.path("starts.log");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.crash]\ncommand = {}\n\
             backoff = {{ initial = \"100ms\", multiplier = 2.0, max = \"400ms\" }}\n\
             crash_loop = {{ min_uptime = \"10s\", max_failures = 100 }}\n",
            sh(&format!("echo $$ $(date +%s.%N) >> {}; exit 1", out.display()))
        ),
    );
    let sup = Supervisor::start(&sb);
    let lines = sb.wait_lines("starts.log", 6, SECS_10);
    let t = start_times(&lines[..6]);
    let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    let expected = [0.1, 0.2, 0.4, 0.4, 0.4];
    for (i, (gap, want)) in gaps.iter().zip(expected).enumerate() {
        assert!(
            *gap >= want * 0.9 && *gap < want + 0.3,
            "gap {i} is {gap:.3} s, expected about {want} s; all gaps: {gaps:?}"
        );
    }
    let v = sup.status();
    let i = instance(&v, "crash", 0);
    assert!(i["restarts"].as_u64().unwrap() >= 5, "{i}");
    assert_eq!(i["last_exit"]["code"], 1, "{i}");
}

#[test]
fn staying_up_min_uptime_resets_the_backoff_and_the_failure_count() {
    let sb = Sandbox::new();
    let (starts, long) = (sb.path("starts.log"), sb.path("long-exit.log"));
    // The third start stays up longer than min_uptime; the others exit at once.
    let script = format!(
        "echo $$ $(date +%s.%N) >> {s}\n\
         if [ \"$(wc -l < {s})\" -eq 3 ]; then sleep 0.8; echo x $(date +%s.%N) >> {l}; fi\n\
         exit 1",
        s = starts.display(),
        l = long.display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.flaky]\ncommand = {}\n\
             backoff = {{ initial = \"100ms\", multiplier = 2.0, max = \"2s\" }}\n\
             crash_loop = {{ min_uptime = \"400ms\", max_failures = 3 }}\n",
            sh(&script)
        ),
    );
    let sup = Supervisor::start(&sb);
    sup.wait_for("the worker to be parked", SECS_10, |v| state_of(v, "flaky") == "parked");
    // Two rapid exits, a long run (which clears the count), then three
    // rapid exits in a row: parked after the sixth start, not the third
    // rapid one overall.
    let t = start_times(&sb.lines("starts.log"));
    assert_eq!(t.len(), 6, "{t:?}");
    let long_exit = start_times(&sb.lines("long-exit.log"))[0];
    let gaps = [t[1] - t[0], t[3] - long_exit, t[4] - t[3], t[5] - t[4]];
    // After the long run the delay is back to `initial`, then doubles again.
    for (gap, want) in gaps.iter().zip([0.1, 0.1, 0.2, 0.4]) {
        assert!(*gap >= want * 0.9 && *gap < want + 0.3, "gap {gap:.3} s, expected about {want} s: {gaps:?}");
    }
}

#[test]
fn a_crash_loop_parks_after_exactly_max_failures_starts_and_unpark_starts_it_again() {
    let sb = Sandbox::new();
    let out = sb.path("starts.log");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.loop]\ncommand = {}\n\
             backoff = {{ initial = \"50ms\", multiplier = 1.0, max = \"50ms\" }}\n\
             crash_loop = {{ min_uptime = \"1s\", max_failures = 3 }}\n",
            sh(&format!("echo $$ $(date +%s.%N) >> {}; exit 1", out.display()))
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("the worker to be parked", SECS_10, |v| state_of(v, "loop") == "parked");
    assert_eq!(sb.lines("starts.log").len(), 3, "exactly max_failures starts");
    let i = instance(&v, "loop", 0);
    assert!(i["error"].as_str().unwrap().contains("crash loop"), "{i}");
    assert_eq!(i["pid"], Value::Null, "{i}");
    assert_eq!(worker(&v, "loop")["state"], "parked", "{v}");
    // Parked means no restart is pending: the count stays at 3.
    let v = sup.status();
    assert_eq!(state_of(&v, "loop"), "parked");
    assert_eq!(sb.lines("starts.log").len(), 3);

    let r = sb.cli(&["unpark", "loop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    sb.wait_lines("starts.log", 4, SECS_10);
    // It fails again and, being rapid, ends up parked again.
    sup.wait_for("the worker to be parked again", SECS_10, |v| {
        state_of(v, "loop") == "parked" && sb.lines("starts.log").len() >= 4
    });
    let r = sb.cli(&["unpark", "nosuch"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);

    // `restart` also gives a parked instance another start.
    let starts = sb.lines("starts.log").len();
    let r = sb.cli(&["restart", "loop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    sb.wait_lines("starts.log", starts + 1, SECS_10);
}

#[test]
fn a_permanent_exit_code_parks_after_one_start() {
    let sb = Sandbox::new();
    let out = sb.path("starts.log");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.config-error]\ncommand = {}\n\
             backoff = {{ initial = \"50ms\" }}\n\
             crash_loop = {{ min_uptime = \"1s\", max_failures = 100 }}\n",
            sh(&format!("echo $$ >> {}; exit 78", out.display()))
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("the worker to be parked", SECS_10, |v| state_of(v, "config-error") == "parked");
    let i = instance(&v, "config-error", 0);
    assert_eq!(i["last_exit"]["code"], 78, "{i}");
    assert!(i["error"].as_str().unwrap().contains("78"), "{i}");
    assert_eq!(sb.lines("starts.log").len(), 1);
}

#[test]
fn restart_policies_always_on_failure_and_never() {
    let sb = Sandbox::new();
    let mut cfg = format!(
        "{SUPERVISOR}\n[defaults]\nbackoff = {{ initial = \"50ms\", multiplier = 1.0, max = \"50ms\" }}\n\
         crash_loop = {{ min_uptime = \"10s\", max_failures = 1000 }}\n"
    );
    // name, policy, how the script ends
    let cases = [
        ("onfail-ok", "on-failure", "exit 0"),
        ("onfail-bad", "on-failure", "exit 1"),
        ("onfail-killed", "on-failure", "kill -9 $$"),
        ("never-ok", "never", "exit 0"),
        ("never-bad", "never", "exit 1"),
        ("never-killed", "never", "kill -9 $$"),
        ("always-ok", "always", "exit 0"),
    ];
    for (name, policy, end) in cases {
        let script = format!("echo $$ >> {}; {end}", sb.path(&format!("{name}.log")).display());
        cfg.push_str(&format!("\n[workers.{name}]\nrestart = \"{policy}\"\ncommand = {}\n", sh(&script)));
    }
    sb.write("daemon.toml", cfg);
    let sup = Supervisor::start(&sb);
    let restarted = ["onfail-bad", "onfail-killed", "always-ok"];
    let stopped = ["onfail-ok", "never-ok", "never-bad", "never-killed"];
    let v = sup.wait_for("every worker to be stopped or restarted", SECS_10, |v| {
        stopped.iter().all(|n| state_of(v, n) == "stopped" && instance(v, n, 0)["last_exit"] != Value::Null)
            && restarted.iter().all(|n| sb.lines(&format!("{n}.log")).len() >= 3)
    });
    for n in stopped {
        let i = instance(&v, n, 0);
        assert_eq!(i["restarts"], 0, "{n}: {i}");
        assert_eq!(i["error"], Value::Null, "{n} is stopped, not parked: {i}");
        assert_eq!(sb.lines(&format!("{n}.log")).len(), 1, "{n} started once");
    }
    assert_eq!(instance(&v, "never-killed", 0)["last_exit"]["signal"], "SIGKILL");
    // Still stopped a little later: no restart was pending.
    let v = sup.status();
    for n in stopped {
        assert_eq!(state_of(&v, n), "stopped", "{n}");
        assert_eq!(sb.lines(&format!("{n}.log")).len(), 1, "{n} started once");
    }
    // `restart` runs a stopped instance again.
    let r = sb.cli(&["restart", "onfail-ok"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    sb.wait_lines("onfail-ok.log", 2, SECS_10);
}

#[test]
fn a_command_that_cannot_be_spawned_backs_off_parks_and_shows_the_os_error() {
    let sb = Sandbox::new();
    sb.write("not-executable.sh", "#!/bin/sh\nexit 0\n");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[defaults]\nbackoff = {{ initial = \"100ms\", multiplier = 1.0, max = \"100ms\" }}\n\
             crash_loop = {{ min_uptime = \"1s\", max_failures = 3 }}\n\
             [workers.missing]\ncommand = [\"/nonexistent/drover-test-program\", \"x\"]\n\
             [workers.noexec]\ncommand = [\"./not-executable.sh\"]\n\
             [workers.fine]\ncommand = [\"sleep\", \"1000\"]\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    // First it backs off (or, if we look late, is already parked) with the OS error.
    let v = sup.wait_for("the error in status", SECS_10, |v| instance(v, "missing", 0)["error"].is_string());
    let i = instance(&v, "missing", 0);
    assert!(["backoff", "parked"].contains(&i["state"].as_str().unwrap()), "{i}");
    assert!(i["error"].as_str().unwrap().contains("No such file or directory"), "{i}");

    let v = sup.wait_for("both to be parked", SECS_10, |v| {
        state_of(v, "missing") == "parked" && state_of(v, "noexec") == "parked"
    });
    let missing = instance(&v, "missing", 0)["error"].as_str().unwrap();
    assert!(missing.contains("crash loop") && missing.contains("No such file or directory"), "{missing}");
    let noexec = instance(&v, "noexec", 0)["error"].as_str().unwrap();
    assert!(noexec.contains("Permission denied"), "{noexec}");
    // drover itself carries on, and so does the worker that could start.
    assert_eq!(state_of(&v, "fine"), "running");
    assert!(instance(&v, "fine", 0)["pid"].is_i64());
    assert_eq!(v["supervisor"]["state"], "running");
}

#[test]
fn each_instance_gets_its_environment() {
    let sb = Sandbox::new();
    let out = sb.path("env.log");
    let script = format!(
        "echo \"$DROVER_WORKER|$DROVER_INSTANCE|$DROVER_CAPACITY|$DROVER_STATE_DIR|$FROM_DEFAULTS|$FROM_WORKER|$BOTH|$INHERITED\" >> {}; exec sleep 1000",
        out.display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[defaults]\nenv = {{ FROM_DEFAULTS = \"d\", BOTH = \"from-defaults\" }}\n\
             [workers.envy]\ncapacity = 3\ncommand = {}\nenv = {{ FROM_WORKER = \"w\", BOTH = \"from-worker\" }}\n",
            sh(&script)
        ),
    );
    let _sup = Supervisor::start_with(&sb, |c| {
        c.env("INHERITED", "from-drover");
    });
    let mut lines = sb.wait_lines("env.log", 3, SECS_10);
    lines.sort();
    let state_dir = sb.state_dir();
    let want: Vec<String> =
        (0..3).map(|i| format!("envy|{i}|3|{}|d|w|from-worker|from-drover", state_dir.display())).collect();
    // DROVER_STATE_DIR may be spelled through a non-canonical temp path.
    let canon = |l: &String| {
        let f: Vec<&str> = l.split('|').collect();
        let dir = std::path::Path::new(f[3]).canonicalize().unwrap_or_else(|e| panic!("{l}: {e}"));
        [&f[..3], &[dir.to_str().unwrap()], &f[4..]].concat().join("|")
    };
    assert_eq!(lines.iter().map(canon).collect::<Vec<_>>(), want);
}

#[test]
fn restart_replaces_every_instance_one_at_a_time() {
    let sb = Sandbox::new();
    let out = sb.path("events.log");
    // Each instance takes a while to stop, so a restart that did not wait
    // for one replacement before stopping the next would show in the log.
    let script = format!(
        "log() {{ echo \"$1 $DROVER_INSTANCE $$\" >> {}; }}\n\
         trap 'log stopping; sleep 0.3; log stopped; exit 0' TERM\n\
         log started\n\
         while :; do sleep 0.05; done",
        out.display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.pair]\ncapacity = 2\nstop_grace = \"5s\"\ncommand = {}\n",
            sh(&script)
        ),
    );
    let sup = Supervisor::start(&sb);
    sb.wait_lines("events.log", 2, SECS_10);
    let before = sup.status();
    let old: Vec<i64> = (0..2).map(|i| instance(&before, "pair", i)["pid"].as_i64().unwrap()).collect();

    let r = sb.cli(&["restart", "pair"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let after = sup.wait_for("both instances replaced", SECS_10, |v| {
        (0..2).all(|i| {
            let inst = instance(v, "pair", i);
            inst["state"] == "running"
                && inst["deploys"] == 1
                && inst["restarts"] == 0
                && inst["pid"].as_i64() != Some(old[i as usize])
        })
    });
    let new: Vec<i64> = (0..2).map(|i| instance(&after, "pair", i)["pid"].as_i64().unwrap()).collect();
    assert!(new.iter().all(|p| !old.contains(p)), "old {old:?}, new {new:?}");

    // The order of events: an instance is asked to stop only once the one
    // before it has stopped (and been spawned again: drover has no
    // readiness signal, so a spawned instance counts as up, and its
    // "started" line may come a moment after the next one's "stopping").
    let events: Vec<(String, String)> = sb.wait_lines("events.log", 8, SECS_10)[2..]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string())
        })
        .collect();
    let pos = |what: &str, inst: &str| {
        events.iter().position(|(w, i)| w == what && i == inst).unwrap_or_else(|| panic!("{events:?}"))
    };
    let (first, second) = if pos("stopping", "0") < pos("stopping", "1") { ("0", "1") } else { ("1", "0") };
    assert!(
        pos("stopped", first) < pos("stopping", second),
        "the two instances were stopped at the same time: {events:?}"
    );
    assert!(pos("started", second) > pos("stopped", second), "{events:?}");
    let r = sb.cli(&["restart", "nosuch"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("nosuch"), "{}", r.stderr);
}
