//! What an instance uses: CPU time and resident memory, summed over its
//! processes. Read from /proc (or from its cgroup's own counters) when
//! someone asks; nothing here polls.

use std::collections::{HashMap, HashSet};
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
/// request for many instances looks at each process once, not once per
/// instance, and reads the `stat` of those in the groups only, each with
/// one read. Groups without a process are absent.
pub fn of_groups(pgids: &[i32]) -> HashMap<i32, Usage> {
    let mut out = HashMap::new();
    if pgids.is_empty() {
        return out;
    }
    let wanted: HashSet<i32> = pgids.iter().copied().collect();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    let (tick, page) = (clock_ticks(), page_size());
    let mut reader = StatReader::default();
    for pid in procs.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
        // getpgid(2) first: one system call, where reading a stat file
        // takes three and the kernel's formatting of fifty fields. Only
        // the processes of the wanted groups are read.
        let Ok(pgid) = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) else { continue };
        if !wanted.contains(&pgid.as_raw()) {
            continue;
        }
        let Some(s) = reader.read(pid) else { continue };
        if wanted.contains(&s.pgid) {
            *out.entry(s.pgid).or_default() += s.usage(tick, page);
        }
    }
    out
}

/// The usage of the processes in cgroup `dir`: its own counters
/// (`cpu.stat` usage_usec, and `memory.current` where the memory
/// controller is on), else the sum over its `cgroup.procs`. Unlike a
/// process group's, a cgroup's CPU time includes what exited members used.
pub fn of_cgroup(dir: &Path) -> Option<Usage> {
    let cpu = std::fs::read_to_string(dir.join("cpu.stat")).ok().as_deref().and_then(parse_cpu_stat);
    let mem =
        std::fs::read_to_string(dir.join("memory.current")).ok().and_then(|m| m.trim().parse::<u64>().ok());
    if let (Some(usec), Some(bytes)) = (cpu, mem) {
        return Some(Usage { cpu_seconds: usec as f64 / 1e6, rss_bytes: bytes });
    }
    let pids = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let (tick, page) = (clock_ticks(), page_size());
    let mut reader = StatReader::default();
    let mut summed = Usage::default();
    for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        if let Some(s) = reader.read(pid) {
            summed += s.usage(tick, page);
        }
    }
    Some(Usage {
        cpu_seconds: cpu.map_or(summed.cpu_seconds, |usec| usec as f64 / 1e6),
        rss_bytes: mem.unwrap_or(summed.rss_bytes),
    })
}

/// Reads /proc/PID/stat files with one open and one read each, into one
/// buffer (a `stat` line is a few hundred bytes; the kernel hands it over
/// whole), where `read_to_string` would also stat the file and read again
/// to see its end.
#[derive(Default)]
struct StatReader {
    path: String,
    buf: Vec<u8>,
}

impl StatReader {
    fn read(&mut self, pid: i32) -> Option<Stat> {
        use std::fmt::Write as _;
        use std::io::Read as _;
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/stat");
        let mut file = std::fs::File::open(&self.path).ok()?;
        self.buf.resize(1024, 0);
        let n = file.read(&mut self.buf).ok()?;
        parse_stat(std::str::from_utf8(self.buf.get(..n)?).ok()?)
    }
}

/// What usage needs of /proc/PID/stat.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    pgid: i32,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Resident set size, in pages.
    rss_pages: u64,
}

impl Stat {
    fn usage(&self, tick: f64, page: u64) -> Usage {
        Usage { cpu_seconds: self.cpu_ticks as f64 / tick, rss_bytes: self.rss_pages.saturating_mul(page) }
    }
}

/// Parses /proc/PID/stat. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from after the last ')'.
fn parse_stat(stat: &str) -> Option<Stat> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // After the name: state(3) ppid(4) pgrp(5) … utime(14) stime(15) … rss(24).
    let mut f = rest.split_ascii_whitespace();
    let pgid = f.nth(2)?.parse().ok()?;
    let utime: u64 = f.nth(8)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let rss_pages = f.nth(8)?.parse().unwrap_or(0);
    Some(Stat { pgid, cpu_ticks: utime.saturating_add(stime), rss_pages })
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
        let line = "4242 (a (b) c) S 1 4240 4240 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 12345 1000 200 0";
        assert_eq!(parse_stat(line), Some(Stat { pgid: 4240, cpu_ticks: 300, rss_pages: 200 }));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_stat_is_read_whole() {
        let s = StatReader::default().read(std::process::id() as i32).expect("own stat");
        assert_eq!(s.pgid, nix::unistd::getpgrp().as_raw());
        assert!(s.rss_pages > 0, "{s:?}");
    }

    #[test]
    fn cpu_stat() {
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
