//! What instances use (status `cpu_seconds`, `rss_bytes`, the CPU% and MEM
//! columns), and how drover contains their processes.

use std::time::Duration;

use crate::harness::{Sandbox, Supervisor, instance};

const LIMIT: Duration = Duration::from_secs(20);

/// A worker that burns some CPU, keeps 60 MiB resident, then idles.
const HOG: &str = r#"["python3", "-c", "b = b'x' * (60 << 20)\nfor _ in range(2_000_000): pass\nimport time; time.sleep(1000)"]"#;

#[test]
fn status_shows_what_a_busy_worker_uses() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("[supervisor]\nreload = false\n\n[workers.hog]\ncommand = {HOG}\n"));
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("the hog to use CPU and 60 MiB", LIMIT, |v| {
        let i = instance(v, "hog", 0);
        i["cpu_seconds"].as_f64().is_some_and(|c| c > 0.0)
            && i["rss_bytes"].as_u64().is_some_and(|r| r >= 60 << 20)
    });
    assert_eq!(instance(&v, "hog", 0)["state"], "running", "{v}");
    // Read when asked: the state file never holds them.
    let state = std::fs::read_to_string(sb.state_dir().join("state.json")).unwrap();
    assert!(!state.contains("rss_bytes"), "{state}");
    let table = sb.cli(&["status"]);
    let head = table.stdout.lines().find(|l| l.starts_with("WORKER")).unwrap_or_default().to_string();
    assert!(head.contains("CPU%") && head.contains("MEM"), "{}", table.stdout);
    let row = table.stdout.lines().find(|l| l.starts_with("hog")).unwrap_or_default().to_string();
    assert!(row.contains('M'), "the MEM column of {row:?} in\n{}", table.stdout);
    drop(sup);
}
