//! `drover top` in a real terminal: tmux runs it in an 80x24 pane, keys go
//! in with send-keys and the screen comes out of capture-pane. Each test
//! has its own tmux server (a socket in its sandbox), killed by a guard,
//! and the sandbox kills whatever is left of drover. Skipped, saying so,
//! where tmux is not installed.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{DROVER, SUPERVISOR, Sandbox, Supervisor, instance, run_within, sh, wait_until};

const LIMIT: Duration = Duration::from_secs(20);

fn have_tmux() -> bool {
    let found = Command::new("tmux").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if found.is_ok_and(|s| s.success()) {
        return true;
    }
    eprintln!("skipped: tmux is not installed (apt-get install tmux); drover top is tested in tmux");
    false
}

/// A tmux server of the test's own with one 80x24 session; the server
/// and everything in its panes are killed when it is dropped.
struct Tmux<'a> {
    sb: &'a Sandbox,
    socket: std::path::PathBuf,
}

impl<'a> Tmux<'a> {
    /// A session running `command` (a shell command line) in the sandbox.
    fn start(sb: &'a Sandbox, command: &str) -> Self {
        // A socket each: a server being killed is never reused.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Tmux { sb, socket: sb.path(&format!("tmux-{n}.sock")) };
        let out = t
            .tmux(&["new-session", "-d", "-s", "top", "-x", "80", "-y", "24", "-c"])
            .arg(sb.path(""))
            .arg(command)
            .output()
            .expect("run tmux");
        assert!(out.status.success(), "tmux new-session failed: {}", String::from_utf8_lossy(&out.stderr));
        t
    }

    fn tmux(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&self.socket).args(args).current_dir(self.sb.path(""));
        // As the harness's drover: nothing of the test's own environment
        // steers drover, nor colour.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DROVER_") || k == "NO_COLOR" {
                cmd.env_remove(k);
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// The screen as text; with `escapes`, with its attributes as SGR codes.
    fn screen(&self, escapes: bool) -> String {
        let mut args = vec!["capture-pane", "-p", "-t", "top"];
        if escapes {
            args.push("-e");
        }
        let out = self.tmux(&args).output().expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the screen until `f` accepts it.
    fn wait(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(what, LIMIT, || {
                last = self.screen(false);
                f(&last).then(|| last.clone())
            })
        }));
        match found {
            Ok(s) => s,
            Err(_) => panic!("timed out after {LIMIT:?} waiting for {what}; the screen:\n{last}"),
        }
    }

    /// Types keys: tmux key names (`Enter`, `Escape`) or, `literal`, text.
    fn keys(&self, keys: &[&str], literal: bool) {
        let mut args = vec!["send-keys", "-t", "top"];
        if literal {
            args.push("-l");
        }
        args.extend(keys);
        assert!(self.tmux(&args).status().expect("tmux send-keys").success());
    }
}

impl Drop for Tmux<'_> {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// The shell command line that runs `drover top` on the sandbox's config.
fn top_command(env: &str) -> String {
    format!("{env} {DROVER} -c daemon.toml top")
}

/// A screen line that starts with `worker` and holds `word`.
fn row_has(screen: &str, worker: &str, word: &str) -> bool {
    screen.lines().any(|l| l.starts_with(&format!("{worker} ")) && l.split_whitespace().any(|w| w == word))
}

/// A sandbox with the tests' config, or none where tmux is missing.
fn sandbox() -> Option<Sandbox> {
    if !have_tmux() {
        return None;
    }
    let sb = Sandbox::new();
    config(&sb);
    Some(sb)
}

fn config(sb: &Sandbox) {
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.web]\ncommand = {}\n\n\
             [workers.crashy]\ncommand = {}\nbackoff = {{ initial = \"200ms\", max = \"200ms\" }}\n\n\
             [jobs.report]\ncommand = {}\n",
            sh("echo web-started; exec sleep 300"),
            sh("sleep 0.3; exit 3"),
            sh("echo report"),
        ),
    );
}

fn pid_of(status: &Value, worker: &str) -> Option<i64> {
    instance(status, worker, 0)["pid"].as_i64()
}

#[test]
fn top_shows_the_workers_a_crash_and_acts_on_keys() {
    let Some(sb) = sandbox() else { return };
    let sup = Supervisor::start(&sb);
    let t = Tmux::start(&sb, &top_command(""));
    t.wait("web running and crashy shown", |s| {
        s.starts_with("drover top")
            && row_has(s, "web", "running")
            && s.lines().any(|l| l.starts_with("crashy "))
    });
    // The crash loop shows as an exit in the events and a restart count.
    t.wait("crashy's exit in the events", |s| s.contains("crashy:0  exited with code 3"));
    t.wait("crashy's restart count", |s| {
        s.lines()
            .filter(|l| l.starts_with("crashy "))
            .any(|l| l.split_whitespace().nth(7).and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n >= 1))
    });

    // r on web (found with the filter) restarts it: a new pid.
    let before = pid_of(&sup.status(), "web").expect("web runs");
    t.keys(&["/"], false);
    t.keys(&["web"], true);
    t.keys(&["Enter"], false);
    t.wait("the filter keeping web alone", |s| row_has(s, "web", "running") && !s.contains("\ncrashy "));
    t.keys(&["r"], false);
    sup.wait_for("web restarted by r", LIMIT, |v| pid_of(v, "web").is_some_and(|p| p != before));
    t.wait("the restart said in the footer", |s| s.contains("restarting web"));
    // s stops it by hand, S starts it again.
    t.keys(&["s"], false);
    sup.wait_for("web stopped by s", LIMIT, |v| {
        let i = instance(v, "web", 0);
        i["state"] == "stopped" && i["held"] == true
    });
    t.wait("web stopped on the screen", |s| row_has(s, "web", "stopped"));
    t.keys(&["S"], false);
    sup.wait_for("web started by S", LIMIT, |v| instance(v, "web", 0)["state"] == "running");

    // The crash loop parks crashy; u gives it another start.
    t.keys(&["Escape"], false);
    t.wait("the filter cleared", |s| s.contains("\ncrashy "));
    t.keys(&["/"], false);
    t.keys(&["crashy"], true);
    t.keys(&["Enter"], false);
    t.wait("crashy parked on the screen", |s| row_has(s, "crashy", "parked") && !s.contains("\nweb "));
    t.keys(&["u"], false);
    sup.wait_for("crashy unparked by u", LIMIT, |v| instance(v, "crashy", 0)["state"] != "parked");

    // t on the job (the last row) queues a run. Esc alone, seen done
    // before the next key: an Esc with a key right after it is Alt+key.
    t.keys(&["Escape"], false);
    t.wait("the filter cleared", |s| s.contains("\nweb "));
    t.keys(&["G", "t"], false);
    wait_until("a run of report in drover runs", LIMIT, || {
        let out = sb.cli(&["runs", "--json"]);
        let runs: Value = serde_json::from_str(&out.stdout).ok()?;
        runs.as_array()?.iter().any(|r| r["job"] == "report").then_some(())
    });
    t.wait("the run in the events", |s| s.contains("report run 1"));

    // l shows web's log, as drover logs reads it, and follows it.
    t.keys(&["/"], false);
    t.keys(&["web"], true);
    t.keys(&["Enter"], false);
    t.wait("the filter keeping web alone", |s| !s.contains("\ncrashy "));
    t.keys(&["l"], false);
    let started = |s: &str| s.lines().filter(|l| l.ends_with(" 0 out web-started")).count();
    let before = started(&t.wait("web's log pane", |s| s.contains("── log of web") && started(s) >= 1));
    assert_eq!(sb.cli(&["restart", "web", "--wait"]).code, Some(0));
    t.wait("the new start's line in the open pane", |s| started(s) > before);
    t.keys(&["l"], false);
    t.wait("the events again", |s| s.contains("── events ─"));
}

#[test]
fn q_quits_and_gives_the_shell_its_terminal_back() {
    let Some(sb) = sandbox() else { return };
    let _sup = Supervisor::start(&sb);
    let t = Tmux::start(&sb, "env PS1='prompt$ ' sh");
    t.wait("the shell's prompt", |s| s.contains("prompt$"));
    t.keys(&[&top_command("")], true);
    t.keys(&["Enter"], false);
    t.wait("top on the screen", |s| s.starts_with("drover top") && row_has(s, "web", "running"));
    t.keys(&["q"], false);
    // The alternate screen is left: the shell's lines are back, a new
    // prompt below them, and nothing of top's.
    let s = t.wait("the prompt back after q", |s| {
        !s.contains("── workers") && s.lines().filter(|l| l.starts_with("prompt$")).count() >= 2
    });
    assert!(!s.contains("WORKER"), "{s}");
    // And the terminal is in cooked mode again: a command runs and echoes.
    t.keys(&["echo cooked-$((6*7))"], true);
    t.keys(&["Enter"], false);
    t.wait("the shell running a command", |s| s.contains("cooked-42"));

    // SIGTERM gives the terminal back too.
    t.keys(&["clear; ", &top_command("")], true);
    t.keys(&["Enter"], false);
    t.wait("top on the screen again", |s| s.starts_with("drover top") && row_has(s, "web", "running"));
    let top = wait_until("the top process", LIMIT, || {
        sb.processes().into_iter().find(|(_, cmd)| cmd.ends_with(" top")).map(|(pid, _)| pid)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(top), nix::sys::signal::Signal::SIGTERM).expect("kill");
    t.wait("the prompt back after SIGTERM", |s| !s.contains("── workers") && s.contains("prompt$"));
    t.keys(&["echo again-$((6*7))"], true);
    t.keys(&["Enter"], false);
    t.wait("the shell running a command", |s| s.contains("again-42"));
}

/// Any SGR code on the screen that sets a colour (the defaults, 39 and
/// 49, reset one: tmux writes them after every attribute).
fn colour_codes(screen: &str) -> Vec<String> {
    let mut found = Vec::new();
    for seq in screen.split("\x1b[").skip(1) {
        let Some(end) = seq.find('m') else { continue };
        let params = &seq[..end];
        if params.split(';').any(|p| {
            matches!(p.parse::<u32>(), Ok(n) if (30..=38).contains(&n) || (40..=48).contains(&n) || (90..=107).contains(&n))
        }) {
            found.push(params.to_string());
        }
    }
    found
}

#[test]
fn an_80x24_terminal_fits_and_no_color_has_no_colour() {
    let Some(sb) = sandbox() else { return };
    let _sup = Supervisor::start(&sb);
    for no_color in [false, true] {
        let t = Tmux::start(&sb, &top_command(if no_color { "NO_COLOR=1" } else { "" }));
        let s = t.wait("the view", |s| row_has(s, "web", "running") && s.contains("── jobs"));
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines[0].starts_with("drover top  pid "), "{s}");
        assert!(lines[2].starts_with("WORKER #   STATE    PID"), "{s}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{s}");
        let footer = s.trim_end().lines().last().unwrap_or_default();
        assert!(footer.contains("q quit"), "the keys are the last line: {s}");
        let colours = colour_codes(&t.screen(true));
        if no_color {
            assert!(colours.is_empty(), "NO_COLOR, yet colour codes {colours:?}");
        } else {
            assert!(!colours.is_empty(), "no colour codes without NO_COLOR");
            // A resize redraws at the new size.
            assert!(
                t.tmux(&["resize-window", "-t", "top", "-x", "100", "-y", "30"])
                    .status()
                    .is_ok_and(|s| s.success())
            );
            t.wait("the view redrawn 100 wide", |s| {
                s.lines().any(|l| l.starts_with("── workers") && l.chars().count() == 100)
            });
        }
    }
}

#[test]
fn top_says_when_drover_is_gone_and_comes_back_to_it() {
    let Some(sb) = sandbox() else { return };
    let sup = Supervisor::start(&sb);
    let t = Tmux::start(&sb, &top_command(""));
    t.wait("the view", |s| row_has(s, "web", "running"));
    assert_eq!(sb.cli(&["stop"]).code, Some(0));
    drop(sup);
    t.wait("no supervisor on the screen", |s| {
        s.lines().next().is_some_and(|l| l.contains("no supervisor is running"))
    });
    let sup = Supervisor::start(&sb);
    let pid = format!("pid {} ", sup.pid);
    t.wait("the new supervisor", |s| {
        s.starts_with("drover top") && s.contains(&pid) && row_has(s, "web", "running")
    });
}

#[test]
fn top_without_a_terminal_is_a_clear_error() {
    let sb = Sandbox::new();
    config(&sb);
    let out = run_within(sb.drover().args(["-c", "daemon.toml", "top"]), LIMIT);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("top needs a terminal") && out.stderr.contains("status --json"),
        "{}",
        out.stderr
    );
}
