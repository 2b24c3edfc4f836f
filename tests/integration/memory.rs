//! `max_memory`: an instance whose processes hold more than it allows is
//! restarted gracefully, with the reason, as a failure; one within it is
//! left alone, and a reload that changes the limit applies it without a
//! restart.

use std::time::Duration;

use crate::harness::{Sandbox, Supervisor, instance};

const LIMIT: Duration = Duration::from_secs(30);

fn python3() -> bool {
    std::process::Command::new("python3").args(["-c", ""]).status().is_ok_and(|s| s.success())
}

/// A worker that keeps 80 MiB resident in a child (the group is what
/// counts, not the leader) and says when it has it.
const HOG: &str = r#"["sh", "-c", "python3 -c \"b = b'x' * (80 << 20); print('full', flush=True); import time; time.sleep(1000)\"; exit 0"]"#;

fn config(hog_max: &str) -> String {
    format!(
        "[supervisor]\nreload = false\n\n\
         [workers.hog]\ncommand = {HOG}\nmax_memory = \"{hog_max}\"\n\
         backoff = {{ initial = \"10s\" }}\n\n\
         [workers.lean]\ncommand = [\"sleep\", \"1000\"]\nmax_memory = \"32MiB\"\n"
    )
}

#[test]
fn an_instance_over_max_memory_is_restarted_with_the_reason_and_a_lean_one_is_not() {
    if !python3() {
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("1GiB"));
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("the hog to hold its 80 MiB", LIMIT, |v| {
        instance(v, "hog", 0)["rss_bytes"].as_u64().is_some_and(|r| r >= 80 << 20)
    });
    let (hog, lean) = (instance(&v, "hog", 0)["pid"].clone(), instance(&v, "lean", 0)["pid"].clone());
    assert!(hog.is_i64() && lean.is_i64(), "{v}");

    // The lower limit applies on reload, without a restart of its own.
    sb.write("daemon.toml", config("48MiB"));
    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(0), "{} {}", r.stdout, r.stderr);
    let v = sup.wait_for("the hog stopped for its memory", LIMIT, |v| {
        instance(v, "hog", 0)["error"].as_str().is_some_and(|e| e.starts_with("memory "))
    });
    let err = instance(&v, "hog", 0)["error"].as_str().unwrap_or_default().to_string();
    assert!(err.ends_with(" MiB over max_memory 48 MiB"), "{err}");
    let over: f64 = err["memory ".len()..].split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
    assert!(over >= 80.0, "the sample is the group's RSS, child included: {err}");
    // Counted as a failure: it backs off (10 s), then comes back as a new process.
    let v = sup.wait_for("the hog backing off", LIMIT, |v| instance(v, "hog", 0)["state"] == "backoff");
    assert!(instance(&v, "hog", 0)["pid"] != hog || instance(&v, "hog", 0)["pid"].is_null());
    // The lean one, sampled all along, kept its process.
    assert_eq!(instance(&v, "lean", 0)["pid"], lean, "{v}");
    assert_eq!(instance(&v, "lean", 0)["restarts"], 0, "{v}");
    assert!(instance(&v, "lean", 0)["error"].is_null(), "{v}");
    drop(sup);
}
