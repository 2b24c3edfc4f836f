//! The supervisor's own heap: glibc's malloc keeps an arena per thread
//! that ever allocated (each spawn on a blocking thread adds one) and keeps
//! freed memory at the top of the heap. Both are tuned here; elsewhere
//! these are no-ops.

/// One malloc arena, whatever the number of threads: the supervisor's
/// threads allocate little (a lock they rarely contend for), and a second
/// arena kept a third of a megabyte of its own after the spawn threads'
/// bursts.
/// Call before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable; called before other threads run.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free memory to the kernel: after start-up and
/// after a reload, which allocate a great deal (the config, its schema)
/// and free most of it. Under a millisecond for a heap of megabytes.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and touches only free chunks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Drops this process's page mappings of its machine code and read-only
/// data, its own and its libraries' (libc, libm, the loader), so that
/// only what runs afterwards is faulted back in (from the page cache, a
/// minor fault; the kernel maps 64 KiB around each). Start-up, config
/// loading and the schema run code the steady state never touches again;
/// it is most of the resident pages. Only private, unwritable file
/// mappings with no page of their own (`Anonymous: 0`, never written, so
/// every page equals the file's) are touched: never data, never the
/// relocated read-only pages (RELRO), whose private copies would be lost.
pub fn release_code() {
    #[cfg(target_os = "linux")]
    {
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return };
        for (start, end) in clean_file_ranges(&smaps) {
            // SAFETY: the range is a private, unwritable file mapping none
            // of whose pages was ever copied: dropping them only makes the
            // next access fault them in again from the file.
            unsafe {
                nix::libc::madvise(start as *mut _, end.saturating_sub(start), nix::libc::MADV_DONTNEED);
            }
        }
    }
}

/// The `r-xp` and `r--p` file mappings of a /proc/PID/smaps text that
/// hold no anonymous (copied) page.
fn clean_file_ranges(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The mapping being read: its range while it qualifies so far.
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some(value) = line.strip_prefix("Anonymous:") {
            let clean = value.trim().strip_suffix("kB").is_some_and(|n| n.trim() == "0");
            if let Some(range) = current.take().filter(|_| clean) {
                out.push(range);
            }
        } else if !first.ends_with(':') {
            // A mapping's header: range perms offset dev inode path.
            current = None;
            let perms = fields.next();
            let path = fields.nth(3);
            if !matches!(perms, Some("r-xp" | "r--p")) || !path.is_some_and(|p| p.starts_with('/')) {
                continue;
            }
            let Some((a, b)) = first.split_once('-') else { continue };
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                current = Some((a, b));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_read_only_file_mappings_are_released() {
        let smaps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 123 /usr/bin/drover
Rss:                 100 kB
Anonymous:             0 kB
55d0a0100000-55d0a0700000 r-xp 00100000 fd:01 123 /usr/bin/drover
Anonymous:             0 kB
55d0a0700000-55d0a0800000 r--p 00700000 fd:01 123 /usr/bin/drover
Anonymous:            12 kB
55d0a0800000-55d0a0810000 rw-p 00800000 fd:01 123 /usr/bin/drover
Anonymous:             4 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 456 /usr/lib/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 r-xs 00000000 fd:01 789 /dev/shm/x
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00000000 00:00 0 
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Anonymous:           132 kB
7ffd10000000-7ffd10002000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
";
        assert_eq!(
            clean_file_ranges(smaps),
            vec![
                (0x55d0a0000000, 0x55d0a0100000),
                (0x55d0a0100000, 0x55d0a0700000),
                (0x7f0000000000, 0x7f0000100000)
            ]
        );
    }

    /// Resident KiB of the clean read-only file mappings of an smaps text.
    fn clean_resident_kib(smaps: &str) -> u64 {
        let ranges = clean_file_ranges(smaps);
        let mut inside = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some(v) = line.strip_prefix("Rss:") {
                if inside {
                    kib += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
                }
            } else if let Some(first) = line.split_ascii_whitespace().next().filter(|f| !f.ends_with(':')) {
                // A mapping's header: is it one of the clean ranges?
                let start = first.split_once('-').and_then(|(a, _)| usize::from_str_radix(a, 16).ok());
                inside = start.is_some_and(|a| ranges.iter().any(|r| r.0 == a));
            }
        }
        kib
    }

    /// The real thing on this process: code and clean read-only data are
    /// found, dropping them gives pages back, and the process runs on.
    #[test]
    fn releasing_this_process_code_gives_pages_back_and_keeps_it_running() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        assert!(clean_file_ranges(&smaps).len() >= 2, "the test binary and libc at least");
        let before = clean_resident_kib(&smaps);
        release_code();
        let after = clean_resident_kib(&std::fs::read_to_string("/proc/self/smaps").expect("smaps"));
        assert!(after < before, "resident code and read-only data: {before} KiB before, {after} KiB after");
    }
}
