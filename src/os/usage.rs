//! What an instance uses: CPU time and resident memory, summed over its
//! processes. Read from /proc (or from its cgroup's own counters) when
//! someone asks; nothing here polls.

use std::collections::HashMap;
use std::path::Path;

/// CPU time and resident memory of a set of processes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User plus system time, in seconds, of the processes alive now
    /// (what exited children used is counted once they are waited for).
    pub cpu_seconds: f64,
    /// Resident set size, summed (pages shared between them count twice).
    pub rss_bytes: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.cpu_seconds += o.cpu_seconds;
        self.rss_bytes = self.rss_bytes.saturating_add(o.rss_bytes);
    }
}

/// The usage of process group `pgid` (zero for an empty group).
pub fn of_group(pgid: i32) -> Usage {
    of_groups(&[pgid]).remove(&pgid).unwrap_or_default()
}

/// The usage of each of `pgids`, from one pass over /proc: a status
/// request for many instances reads each process once, not once per
/// instance. Groups without a process are absent.
pub fn of_groups(pgids: &[i32]) -> HashMap<i32, Usage> {
    let mut out = HashMap::new();
    if pgids.is_empty() {
        return out;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    let (tick, page) = (clock_ticks(), page_size());
    for pid in procs.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(s) = parse_stat(&stat) else { continue };
        if pgids.contains(&s.pgid) {
            *out.entry(s.pgid).or_default() += process_usage(pid, s, tick, page);
        }
    }
    out
}

/// The usage of the processes in cgroup `dir`: its own counters
/// (`cpu.stat` usage_usec, and `memory.current` where the memory
/// controller is on), else the sum over its `cgroup.procs`. Unlike a
/// process group's, a cgroup's CPU time includes what exited members used.
pub fn of_cgroup(dir: &Path) -> Option<Usage> {
    let pids = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let (tick, page) = (clock_ticks(), page_size());
    let mut summed = Usage::default();
    for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        if let Some(s) =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(parse_stat)
        {
            summed += process_usage(pid, s, tick, page);
        }
    }
    let cpu = std::fs::read_to_string(dir.join("cpu.stat")).ok().as_deref().and_then(parse_cpu_stat);
    let mem =
        std::fs::read_to_string(dir.join("memory.current")).ok().and_then(|m| m.trim().parse::<u64>().ok());
    Some(Usage {
        cpu_seconds: cpu.map_or(summed.cpu_seconds, |usec| usec as f64 / 1e6),
        rss_bytes: mem.unwrap_or(summed.rss_bytes),
    })
}

fn process_usage(pid: i32, s: Stat, tick: f64, page: u64) -> Usage {
    let resident =
        std::fs::read_to_string(format!("/proc/{pid}/statm")).ok().as_deref().and_then(parse_statm);
    Usage { cpu_seconds: s.cpu_ticks as f64 / tick, rss_bytes: resident.unwrap_or(0).saturating_mul(page) }
}

/// What usage needs of /proc/PID/stat.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    pgid: i32,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
}

/// Parses /proc/PID/stat. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from after the last ')'.
fn parse_stat(stat: &str) -> Option<Stat> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) … utime(14) stime(15).
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Some(Stat { pgid: f.get(2)?.parse().ok()?, cpu_ticks: num(11)?.saturating_add(num(12)?) })
}

/// The resident pages of /proc/PID/statm (its second field).
fn parse_statm(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// `usage_usec` of a cgroup's cpu.stat.
fn parse_cpu_stat(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => p as u64,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces_and_parens() {
        let line = "4242 (a (b) c) S 1 4240 4240 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 12345 1000 200";
        assert_eq!(parse_stat(line), Some(Stat { pgid: 4240, cpu_ticks: 300 }));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn statm_and_cpu_stat() {
        assert_eq!(parse_statm("2000 512 100 1 0 300 0\n"), Some(512));
        assert_eq!(parse_statm(""), None);
        let cpu = "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n";
        assert_eq!(parse_cpu_stat(cpu), Some(1_500_000));
        assert_eq!(parse_cpu_stat("user_usec 3\n"), None);
    }

    #[test]
    fn a_busy_group_uses_cpu_and_memory() {
        use std::os::unix::process::CommandExt;
        // A shell that spins for a while: its group is its own.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 30"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut u = of_group(pgid);
        while u.cpu_seconds == 0.0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            u = of_group(pgid);
        }
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        child.wait().unwrap();
        assert!(u.cpu_seconds > 0.0, "{u:?}");
        assert!(u.rss_bytes > 0, "{u:?}");
        assert_eq!(of_group(pgid), Usage::default());
    }
}
