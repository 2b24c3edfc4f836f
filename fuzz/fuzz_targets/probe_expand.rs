//! Arbitrary probe strings expanded from an arbitrary environment: a
//! string or an error, never a panic. Text without `$` is unchanged;
//! `$$` is one `$`; every `${NAME}` becomes its value.
#![no_main]

use std::collections::BTreeMap;

use drover::supervisor::probes::expand::expand;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The first line is the template; the others are NAME=VALUE.
    let mut lines = text.split('\n');
    let template = lines.next().unwrap_or("");
    let env: BTreeMap<&str, &str> = lines.filter_map(|l| l.split_once('=')).collect();
    let lookup = |n: &str| env.get(n).map(|v| v.to_string());
    let got = expand(template, lookup, |v| v.to_string());
    if !template.contains('$') {
        assert_eq!(got.as_deref(), Ok(template));
    }
    // The same with every value escaped by a marker: each inserted value
    // is escaped exactly once.
    let marked = expand(template, lookup, |v| format!("<{v}>"));
    assert_eq!(got.is_ok(), marked.is_ok(), "{template:?}");
    if let (Ok(plain), Ok(marked)) = (&got, &marked) {
        let inserted = marked.len() - plain.len();
        assert_eq!(inserted % 2, 0, "{template:?} -> {plain:?} / {marked:?}");
        assert!(plain.len() <= template.len() + env.values().map(|v| v.len()).sum::<usize>() * template.len());
    }
});
