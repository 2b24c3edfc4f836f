//! Arbitrary `--set` arguments and `DROVER_…` variables over a valid file.
//! Each input line is one override: `DROVER_A__B=value` lines are
//! environment variables, every other line a `--set` argument.
#![no_main]

use std::path::Path;

use drover::config::{Overrides, load::load_text};
use libfuzzer_sys::fuzz_target;

const BASE: &str = r#"
[supervisor]
reload = false
[defaults]
stop_grace = "2s"
env = { A = "1" }
[workers.web]
command = ["sleep", "1000"]
capacity = 2
[jobs.tick]
command = ["true"]
every = "10s"
[jobs.flow]
steps = [{ name = "a", command = ["true"] }, { name = "b", command = ["true"], approve = true }]
"#;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let mut env = Vec::new();
    let mut sets = Vec::new();
    for line in input.lines() {
        match line.split_once('=') {
            Some((k, v)) if k.starts_with("DROVER_") => env.push((k.to_string(), v.to_string())),
            _ => sets.push(line.to_string()),
        }
    }
    let overrides = match Overrides::new(env, &sets) {
        Ok(o) => o,
        Err(d) => {
            let _ = d.to_string();
            return;
        }
    };
    let path = Path::new("/nonexistent/fuzz/daemon.toml");
    if let Err(diags) = load_text(path, BASE.to_string(), &overrides) {
        assert!(!diags.is_empty(), "a failed load names at least one error");
        for d in &diags {
            let _ = d.to_string();
        }
    }
});
