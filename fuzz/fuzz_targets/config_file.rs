//! Arbitrary bytes as daemon.toml: loading gives a config or diagnostics,
//! never a panic, a hang or an unbounded allocation.
#![no_main]

use std::path::Path;

use drover::config::{Overrides, load::load_text, load::text_from_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/nonexistent/fuzz/daemon.toml");
    let Ok(text) = text_from_bytes(path, data.to_vec(), data.len() as u64) else { return };
    let overrides = Overrides::new(std::iter::empty(), &[]).expect("no overrides");
    if let Err(diags) = load_text(path, text, &overrides) {
        assert!(!diags.is_empty(), "a failed load names at least one error");
        for d in &diags {
            // Every diagnostic renders: this is what the user sees.
            let _ = d.to_string();
        }
    }
});
