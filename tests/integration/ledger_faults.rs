//! Faults of the run ledger, injected for real: another process holding
//! its write lock, a file that is not a database or fails its integrity
//! check, an empty file, a file from a newer drover, and the WAL deleted
//! while drover runs. Supervision goes on and the fault is named.

use std::path::PathBuf;

use rusqlite::{Connection, TransactionBehavior};
use serde_json::Value;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, sh, wait_until};
use crate::jobs::{SECS_10, is_terminal, printed_id, runs_of, trigger, wait_run};

fn ledger_path(sb: &Sandbox) -> PathBuf {
    sb.state_dir().join("ledger.sqlite")
}

/// A manual job `t` that records its run, plus `extra` TOML.
fn config(sb: &Sandbox, extra: &str) {
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[jobs.t]\ncommand = {}\nretain = 1000\ncapacity = 50\n{extra}",
            sh("echo $DROVER_RUN >> marks")
        ),
    );
}

fn job_names(status: &Value) -> Vec<String> {
    status["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["name"].as_str().map(String::from))
        .collect()
}

/// The moved-aside ledger in state_dir (`suffix` ""), or its "-wal".
fn moved_aside(sb: &Sandbox, suffix: &str) -> Option<PathBuf> {
    std::fs::read_dir(sb.state_dir()).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ledger.sqlite.corrupt-") else { return false };
        match suffix {
            "" => !rest.ends_with("-wal") && !rest.ends_with("-shm"),
            s => rest.ends_with(s),
        }
    })
}

/// A ledger written by drover (one succeeded run), then drover stopped
/// cleanly, so the file holds everything (no WAL left).
fn ledger_with_one_run(sb: &Sandbox) {
    let sup = Supervisor::start(sb);
    let id = trigger(sb, "t");
    wait_run(sb, id, "the run to end", is_terminal);
    drop(sup);
    assert!(!sb.state_dir().join("ledger.sqlite-wal").exists(), "a clean stop leaves no WAL");
}

#[test]
fn a_write_lock_held_by_another_process_delays_jobs_only_and_status_says_why() {
    let sb = Sandbox::new();
    config(
        &sb,
        &format!(
            "[jobs.tick]\nevery = \"100ms\"\ncommand = [\"true\"]\nretain = 1000\n\
             [workers.crash]\ncommand = {}\n\
             backoff = {{ initial = \"50ms\", multiplier = 1.0, max = \"50ms\" }}\n\
             crash_loop = {{ min_uptime = \"10s\", max_failures = 100000 }}\n",
            sh("echo x >> crashes; exit 1")
        ),
    );
    let sup = Supervisor::start(&sb);
    wait_until("a tick to have run", SECS_10, || (!runs_of(&sb, "tick").is_empty()).then_some(()));

    let mut other = Connection::open(ledger_path(&sb)).expect("open the ledger from the test");
    let lock = other.transaction_with_behavior(TransactionBehavior::Exclusive).expect("BEGIN EXCLUSIVE");

    // Everything below happens while the lock is held: it is released
    // only at the end of this block.
    let status = sup.wait_for("status to name the locked ledger", SECS_10, |v| {
        v["ledger_error"].as_str().is_some_and(|e| e.starts_with("ledger busy: database is locked"))
    });
    let text = sb.cli(&["status"]);
    assert!(text.stdout.contains("ledger: ledger busy: database is locked"), "{}", text.stdout);
    let restarts = status["workers"][0]["instances"][0]["restarts"].as_u64().unwrap_or(0);
    sup.wait_for("the crashing worker to be restarted again", SECS_10, |v| {
        v["workers"][0]["instances"][0]["restarts"].as_u64().unwrap_or(0) >= restarts + 3
    });
    let out = sb.cli(&["trigger", "t"]);
    assert_eq!(out.code, Some(1), "a trigger during the lock fails fast: {}", out.stdout);
    assert!(out.stderr.contains("the run ledger is locked by another process"), "{}", out.stderr);
    assert!(out.stderr.contains("database is locked"), "{}", out.stderr);
    let ticks_during = runs_of(&sb, "tick").len();
    assert!(sb.lines("marks").is_empty(), "no process of t started without its claim");

    lock.rollback().expect("release the lock");
    drop(other);

    // Afterwards the delayed work goes on and the note goes away.
    sup.wait_for("the ledger note to clear", SECS_10, |v| v["ledger_error"].is_null());
    let id = trigger(&sb, "t");
    let r = wait_run(&sb, id, "the run after the lock", is_terminal);
    assert_eq!(r["state"], "succeeded", "{r:#}");
    wait_until("ticks to run again", SECS_10, || (runs_of(&sb, "tick").len() > ticks_during).then_some(()));
}

#[test]
fn a_ledger_that_is_not_a_database_is_moved_aside_and_a_new_one_started() {
    let sb = Sandbox::new();
    config(&sb, "");
    sb.write(".drover/ledger.sqlite", "this is not a database, but it is long enough to have a header page");
    let sup = Supervisor::start(&sb);
    let moved = moved_aside(&sb, "").expect("the damaged file moved aside");
    let kept = std::fs::read_to_string(&moved).unwrap_or_default();
    assert_eq!(kept, "this is not a database, but it is long enough to have a header page");
    let err = sup.stderr();
    assert!(err.contains("damaged") && err.contains(&*moved.to_string_lossy()), "{err}");
    assert_eq!(job_names(&sup.status()), ["t"]);
    let id = trigger(&sb, "t");
    assert_eq!(wait_run(&sb, id, "the run", is_terminal)["state"], "succeeded");
}

#[test]
fn a_ledger_failing_its_integrity_check_is_moved_aside_with_its_wal() {
    let sb = Sandbox::new();
    config(&sb, "");
    ledger_with_one_run(&sb);
    // Damage every page after the first (the header stays readable).
    let path = ledger_path(&sb);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 4096 * 2, "{} bytes", bytes.len());
    for b in &mut bytes[4096..] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    std::fs::write(sb.state_dir().join("ledger.sqlite-wal"), b"").unwrap();

    let sup = Supervisor::start(&sb);
    let moved = moved_aside(&sb, "").expect("the damaged file moved aside");
    assert!(std::fs::read(&moved).unwrap() == bytes, "{} is not the damaged file", moved.display());
    assert!(moved_aside(&sb, "-wal").is_some(), "its WAL went with it");
    let err = sup.stderr();
    assert!(err.contains("integrity check"), "{err}");
    assert_eq!(job_names(&sup.status()), ["t"]);
    assert!(runs_of(&sb, "t").is_empty(), "the new ledger starts empty");
    let id = trigger(&sb, "t");
    assert_eq!(wait_run(&sb, id, "the run", is_terminal)["state"], "succeeded");
}

#[test]
fn an_empty_ledger_file_is_started_anew_and_says_so() {
    let sb = Sandbox::new();
    config(&sb, "");
    sb.write(".drover/ledger.sqlite", "");
    let sup = Supervisor::start(&sb);
    let err = sup.stderr();
    assert!(err.contains("was empty (0 bytes)"), "{err}");
    assert!(moved_aside(&sb, "").is_none());
    let id = trigger(&sb, "t");
    assert_eq!(wait_run(&sb, id, "the run", is_terminal)["state"], "succeeded");
}

#[test]
fn a_ledger_from_a_newer_drover_is_refused_untouched_and_jobs_say_why() {
    let sb = Sandbox::new();
    config(&sb, "");
    std::fs::create_dir_all(sb.state_dir()).unwrap();
    {
        let c = Connection::open(ledger_path(&sb)).unwrap();
        c.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;").unwrap();
    }
    let before = std::fs::read(ledger_path(&sb)).unwrap();

    let sup = Supervisor::start(&sb);
    let status = sup.status();
    assert_eq!(job_names(&status), ["t"], "the job is listed: {status:#}");
    let why = status["ledger_error"].as_str().unwrap_or_else(|| panic!("no ledger_error: {status:#}"));
    assert!(why.starts_with("the run ledger is unavailable: "), "{why}");
    assert!(why.contains("schema version 99, newer than this drover's 1"), "{why}");
    let out = sb.cli(&["trigger", "t"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(out.stderr.contains("the run ledger is unavailable: "), "{}", out.stderr);
    assert!(out.stderr.contains("schema version 99"), "{}", out.stderr);
    drop(sup);
    assert!(std::fs::read(ledger_path(&sb)).unwrap() == before, "the file is untouched");
    assert!(moved_aside(&sb, "").is_none());
}

#[test]
fn a_deleted_wal_is_noticed_and_the_runs_written_since_are_kept() {
    let sb = Sandbox::new();
    config(&sb, "");
    let mut sup = Supervisor::start(&sb);
    let first = trigger(&sb, "t");
    wait_run(&sb, first, "the first run", is_terminal);
    let wal = sb.state_dir().join("ledger.sqlite-wal");
    std::fs::remove_file(&wal).expect("delete the WAL");
    // No ledger reads meanwhile: with the WAL gone they may fail.
    let ids: Vec<i64> = (0..20)
        .map(|_| {
            let args = ["trigger", "t"];
            printed_id(&args, &sb.cli(&args))
        })
        .collect();
    sb.wait_lines("marks", 21, SECS_10);
    wait_until("drover to name the deleted WAL", SECS_10, || {
        sup.stderr().contains("was deleted").then_some(())
    });
    // Recovered: the ledger reads again.
    let last = *ids.last().unwrap();
    wait_run(&sb, last, "the last run to end", is_terminal);
    // Killed, drover closes nothing: what it wrote must be on disk already
    // (before the fix, the unlinked WAL held all of it, even the schema).
    sup.sigkill();
    drop(sup);

    let runs = runs_of(&sb, "t");
    let ok: Vec<i64> =
        runs.iter().filter(|r| r["state"] == "succeeded").filter_map(|r| r["id"].as_i64()).collect();
    for id in std::iter::once(first).chain(ids) {
        assert!(ok.contains(&id), "run {id} is lost or not succeeded; the ledger has {runs:#?}");
    }
    let c = Connection::open(ledger_path(&sb)).unwrap();
    let check: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
}
