//! The supervisor's own heap: glibc's malloc keeps an arena per thread
//! that ever allocated (each spawn on a blocking thread adds one) and keeps
//! freed memory at the top of the heap. Both are tuned here; elsewhere
//! these are no-ops.

/// At most two malloc arenas, whatever the number of threads: the
/// supervisor's threads allocate little, and each arena costs its pages.
/// Call before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable; called before other threads run.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
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

/// Drops this process's mappings of its own machine code, so that only
/// the code that runs afterwards is faulted back in (from the page cache,
/// a minor fault). Start-up, config loading and the schema run code the
/// steady state never touches again; it is most of the binary's resident
/// pages. Only executable, unwritten mappings of the binary are touched:
/// never data, and never the read-only pages of relocations (RELRO), whose
/// private copies would be lost.
pub fn release_code() {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else { return };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
        for (start, end) in code_ranges(&maps, &exe.to_string_lossy()) {
            // SAFETY: the range is a private, read-only, executable file
            // mapping that was never written; dropping its pages only makes
            // the next access fault them in again from the file.
            unsafe {
                nix::libc::madvise(start as *mut _, end.saturating_sub(start), nix::libc::MADV_DONTNEED);
            }
        }
    }
}

/// The `r-xp` ranges of `path` in a /proc/PID/maps text.
fn code_ranges(maps: &str, path: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let file = fields.nth(3)?;
            if perms != "r-xp" || file != path {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_binarys_executable_private_mappings_are_code() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 123 /usr/bin/drover
55d0a0100000-55d0a0700000 r-xp 00100000 fd:01 123 /usr/bin/drover
55d0a0700000-55d0a0800000 r--p 00700000 fd:01 123 /usr/bin/drover
55d0a0800000-55d0a0810000 rw-p 00800000 fd:01 123 /usr/bin/drover
7f0000000000-7f0000100000 r-xp 00000000 fd:01 456 /usr/lib/libc.so.6
7f0000200000-7f0000300000 r-xs 00000000 fd:01 789 /usr/bin/drover
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(code_ranges(maps, "/usr/bin/drover"), vec![(0x55d0a0100000, 0x55d0a0700000)]);
        assert!(code_ranges(maps, "/usr/bin/other").is_empty());
    }
}
