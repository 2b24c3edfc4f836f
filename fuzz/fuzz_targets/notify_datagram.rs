//! Arbitrary bytes as a datagram on the notify socket: what it says, never
//! a panic, and line by line (a datagram is read as its lines, in order).
#![no_main]

use drover::supervisor::probes::notify::{MAX_STATUS, Notice, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let notices = parse(data);
    let lines = data.split(|&b| b == b'\n').count();
    assert!(notices.len() <= lines, "at most one notice a line");
    for n in &notices {
        match n {
            // A status is cut: a sender cannot make drover hold a large one.
            // (Cut at MAX_STATUS bytes, each at most one replacement char.)
            Notice::Status(s) => assert!(s.chars().count() <= MAX_STATUS, "status of {} chars", s.chars().count()),
            Notice::MainPid(pid) => assert!(*pid > 0),
            _ => {}
        }
    }
    // Split anywhere at a line break: the halves say what the whole says.
    if let Some(cut) = data.iter().position(|&b| b == b'\n') {
        let mut halves = parse(&data[..cut]);
        halves.extend(parse(&data[cut + 1..]));
        assert_eq!(notices, halves);
    }
});
