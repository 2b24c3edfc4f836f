//! Arbitrary text as an env file: its variables or an error at a line of
//! it, never a panic; and what it says, written back with double quotes,
//! reads the same.
#![no_main]

use std::collections::BTreeMap;

use drover::config::env_file::parse;
use libfuzzer_sys::fuzz_target;

/// `vars` as an env file, every value double-quoted with its `"`, `\`,
/// `` ` `` and `$` escaped.
fn write(vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in vars {
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            if matches!(c, '"' | '\\' | '`' | '$') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push_str("\"\n");
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse(text) {
        Ok(vars) => {
            for (k, v) in &vars {
                assert!(!k.is_empty() && !k.starts_with(|c: char| c.is_ascii_digit()), "{k:?}");
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{k:?}");
                assert!(!v.contains('\0'));
            }
            assert_eq!(parse(&write(&vars)).as_ref(), Ok(&vars), "written back: {:?}", write(&vars));
        }
        Err((line, why)) => {
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(&line), "line {line} of {lines}: {why}");
            assert!(!why.is_empty());
        }
    }
});
