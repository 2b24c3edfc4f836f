//! Cost of a reload with N = 1000 workers where one worker changed: read
//! and validate the file (TOML parse, JSON-schema validation, resolve),
//! then plan. Run with `cargo bench --bench reconcile`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use drover::config::load::{Overrides, load_text};
use drover::supervisor::reconcile::plan;

fn config(n: usize, changed: Option<usize>) -> String {
    let mut s = String::new();
    for i in 0..n {
        let arg = if Some(i) == changed { "3601" } else { "3600" };
        s.push_str(&format!("[workers.w{i}]\ncommand = [\"sleep\", \"{arg}\"]\ncapacity = 1\n\n"));
    }
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let n = 1000;
    let dir = std::env::temp_dir();
    let path = dir.join("drover-bench-daemon.toml");
    let overrides = Overrides::default();
    let old = load_text(&path, config(n, None), &overrides).expect("valid").config;
    let text = config(n, Some(n / 2));
    let (mut loads, mut plans) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let t = Instant::now();
        let new = load_text(&path, text.clone(), &overrides).expect("valid").config;
        loads.push(t.elapsed());
        let actual: BTreeMap<&str, _> = old.workers.iter().map(|(k, w)| (k.as_str(), w)).collect();
        let t = Instant::now();
        let changes = plan(&new.workers, &actual);
        plans.push(t.elapsed());
        assert_eq!(changes.len(), 1);
    }
    let (l, p) = (median(loads), median(plans));
    println!("reconcile of a {n}-worker config with one change (median of 50):");
    println!("  load + validate: {:.2} ms", l.as_secs_f64() * 1e3);
    println!("  plan:            {:.3} ms", p.as_secs_f64() * 1e3);
    println!("  total:           {:.2} ms", (l + p).as_secs_f64() * 1e3);
}
