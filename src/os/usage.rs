//! What an instance uses: CPU time and resident memory, summed over its
//! processes. Read from /proc (or from its cgroup's own counters) when
//! someone asks; nothing here polls.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use super::fsutil::{Made, read_kernel_file};

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
/// one read. Groups without a process are absent. Over many processes the
/// pass is shared among a few threads: the kernel's formatting of each
/// `stat` is the whole cost, and `status` waits for it.
pub fn of_groups(pgids: &[i32]) -> HashMap<i32, Usage> {
    if pgids.is_empty() {
        return HashMap::new();
    }
    with_held(&LEADER_STATM, |held| of_groups_holding(pgids, held))
}

/// Runs `work` with the files held in `slot`, then puts them back. Two
/// requests at once: the second starts with none held (it opens what it
/// reads, as without holding), and whichever ends first puts its own back.
fn with_held<K, V, R>(slot: &Mutex<Option<HashMap<K, V>>>, work: impl FnOnce(&mut HashMap<K, V>) -> R) -> R {
    let mut held = slot.lock().map(|mut h| h.take()).ok().flatten().unwrap_or_default();
    let out = work(&mut held);
    if let Ok(mut slot) = slot.lock() {
        slot.get_or_insert(held);
    }
    out
}

/// [`of_groups`], reading the leaders through `held` (and keeping there
/// the descriptors of those still alive).
fn of_groups_holding(pgids: &[i32], held: &mut HashMap<i32, File>) -> HashMap<i32, Usage> {
    let wanted: HashSet<i32> = pgids.iter().copied().collect();
    let Ok(procs) = std::fs::read_dir("/proc") else { return HashMap::new() };
    let pids: Vec<i32> =
        procs.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).collect();
    hold_leaders(held, &wanted);
    let out = shared_pass(&pids, &wanted, held, share_size(pids.len(), PIDS_PER_THREAD));
    // A process no longer in /proc is gone for good: its descriptor goes.
    let alive: HashSet<i32> = pids.iter().copied().collect();
    held.retain(|pid, _| alive.contains(pid));
    out
}

/// /proc/PID/statm of group leaders, open from one request to the next: a
/// pread of an open one costs half of opening, reading and closing the
/// path (a lookup in /proc each time). A descriptor is of one process: a
/// reused pid is never read through one held for its earlier owner (see
/// [`read_held_leader`]).
static LEADER_STATM: Mutex<Option<HashMap<i32, File>>> = Mutex::new(None);

/// Opens the statm of each wanted group's leader (its pid is the group's)
/// not held yet, up to [`descriptor_cap`]: what spawns need comes first.
fn hold_leaders(held: &mut HashMap<i32, File>, wanted: &HashSet<i32>) {
    let cap = descriptor_cap();
    if held.len() > cap {
        held.clear();
    }
    let mut path = String::new();
    for &pgid in wanted {
        if held.len() >= cap {
            break;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = held.entry(pgid) {
            use std::fmt::Write as _;
            path.clear();
            let _ = write!(path, "/proc/{pgid}/statm");
            if let Ok(f) = File::open(&path) {
                slot.insert(f);
            }
        }
    }
}

/// How many of `len` items each thread takes: an even split among at most
/// MAX_THREADS, each share at least `least` long (a thread made for a
/// short remainder would cost more than it saves).
fn share_size(len: usize, least: usize) -> usize {
    // std reads the cgroup's CPU quota files on every call: once is enough.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    split(len, least, cores.min(MAX_THREADS))
}

/// The share size for `len` items among at most `threads`, each share at
/// least `least` long.
fn split(len: usize, least: usize, threads: usize) -> usize {
    let shares = (len / least.max(1)).clamp(1, threads.max(1));
    len.div_ceil(shares).max(1)
}

/// The pass over `pids`, `per` of them to a thread.
fn shared_pass(
    pids: &[i32],
    wanted: &HashSet<i32>,
    held: &HashMap<i32, File>,
    per: usize,
) -> HashMap<i32, Usage> {
    let parts = in_shares(pids, per, |chunk| {
        let mut part = HashMap::new();
        add_groups(chunk, wanted, held, &mut part);
        part
    });
    let mut out = HashMap::new();
    for (g, u) in parts.into_iter().flatten() {
        *out.entry(g).or_default() += u;
    }
    out
}

/// `work` on each share of `items`, `per` to a share, each share but the
/// first on a thread of its own; the results in the order of the shares.
/// A thread that cannot be made leaves its share to this one.
fn in_shares<T: Sync, R: Send + Default>(items: &[T], per: usize, work: impl Fn(&[T]) -> R + Sync) -> Vec<R> {
    let per = per.max(1);
    if items.len() <= per {
        return vec![work(items)];
    }
    let work = &work;
    std::thread::scope(|s| {
        let (first, rest) = items.split_at(per);
        let helpers: Vec<_> = rest
            .chunks(per)
            .map(|chunk| std::thread::Builder::new().spawn_scoped(s, move || work(chunk)).map_err(|_| chunk))
            .collect();
        let mut out = vec![work(first)];
        for h in helpers {
            out.push(match h {
                Ok(handle) => handle.join().unwrap_or_default(),
                Err(chunk) => work(chunk),
            });
        }
        out
    })
}

/// The counters of each of `dirs` (see [`Counters`]), in order, shared
/// among a few threads as [`of_groups`] does. Without the memory
/// controller, a cgroup's memory is what its members (`cgroup.procs`)
/// have resident: no pass over all of /proc is needed to find them.
pub fn counters_of_cgroups(dirs: &[&Path]) -> Vec<Counters> {
    let (mut counted, members): (Vec<Counters>, Vec<Option<Vec<i32>>>) = with_held(&CGROUP_FILES, |held| {
        let memory = hold_counter_files(held, dirs);
        let held = &*held;
        in_shares(dirs, share_size(dirs.len(), CGROUPS_PER_THREAD), |chunk| {
            let mut buf = Vec::new();
            chunk
                .iter()
                .map(|d| {
                    let c = Counters::read(d, held, &mut buf, memory);
                    (c, if memory { None } else { read_members(d, held, &mut buf) })
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .unzip()
    });
    if members.iter().any(Option::is_some) {
        let rss = with_held(&MEMBER_STATM, |held| resident_of_members(&members, held));
        for (c, r) in counted.iter_mut().zip(rss) {
            c.rss_bytes = c.rss_bytes.or(r);
        }
    }
    counted
}

/// The pids in cgroup `dir`, from its `cgroup.procs` (held open if it is
/// in `held`, read from its start, which lists them anew).
fn read_members(dir: &Path, held: &HeldFiles, buf: &mut Vec<u8>) -> Option<Vec<i32>> {
    let file = held.get(dir.as_os_str()).and_then(|f| f.members.as_ref());
    let text = read_counter(file, dir, "cgroup.procs", Made::ByRecords, buf)?;
    Some(text.split_ascii_whitespace().filter_map(|p| p.parse().ok()).collect())
}

/// A cgroup file `name` of `dir`: through `file`, held open, read from its
/// start (one that fills [`COUNTER_SPACE`] may be cut short, and is read
/// again whole), else by path.
fn read_counter(
    file: Option<&File>,
    dir: &Path,
    name: &str,
    made: Made,
    buf: &mut Vec<u8>,
) -> Option<String> {
    if let Some(f) = file {
        buf.resize(COUNTER_SPACE, 0);
        if let Ok(n) = f.read_at(buf, 0)
            && n < COUNTER_SPACE
        {
            return std::str::from_utf8(&buf[..n]).ok().map(str::to_owned);
        }
    }
    read_kernel_file(&dir.join(name), made, buf).ok().map(str::to_owned)
}

/// The resident memory of each set of `members` (none where the set is
/// unknown), each member's through its `statm` held in `held` (up to
/// [`descriptor_cap`]; only those of the members asked about now are
/// kept). A member gone since it was listed counts nothing.
fn resident_of_members(members: &[Option<Vec<i32>>], held: &mut HashMap<i32, File>) -> Vec<Option<u64>> {
    let asked: HashSet<i32> = members.iter().flatten().flatten().copied().collect();
    held.retain(|pid, _| asked.contains(pid));
    let cap = descriptor_cap();
    if held.len() > cap {
        held.clear();
    }
    let page = page_size();
    let mut buf = [0u8; STATM_SPACE];
    let mut path = String::new();
    let mut resident = |pid: i32| -> Option<u64> {
        use std::fmt::Write as _;
        path.clear();
        let _ = write!(path, "/proc/{pid}/statm");
        if !held.contains_key(&pid) && held.len() < cap {
            held.insert(pid, File::open(&path).ok()?);
        }
        let pages = match held.get(&pid) {
            Some(f) => read_statm(f, &mut buf),
            None => read_statm(&File::open(&path).ok()?, &mut buf),
        };
        if pages.is_none() {
            held.remove(&pid);
        }
        pages.map(|p| p.saturating_mul(page))
    };
    members
        .iter()
        .map(|set| {
            Some(set.as_ref()?.iter().filter_map(|&pid| resident(pid)).fold(0u64, u64::saturating_add))
        })
        .collect()
}

/// `statm` of cgroup members, open from one request to the next (as
/// [`LEADER_STATM`] for process groups).
static MEMBER_STATM: Mutex<Option<HashMap<i32, File>>> = Mutex::new(None);

/// The `cpu.stat` and `memory.current` (or, without the memory
/// controller, `cgroup.procs`) of the cgroups last asked about, open from
/// one request to the next: a pread of an open one costs a fifth of
/// opening, reading and closing the path. A removed cgroup's reads fail
/// (ENODEV), and it is no longer asked about: its files go.
static CGROUP_FILES: Mutex<Option<HeldFiles>> = Mutex::new(None);

/// Counter files held open, by cgroup directory.
type HeldFiles = HashMap<std::ffi::OsString, CgroupFiles>;

/// A cgroup's files held open (each where it was opened).
#[derive(Debug, Default)]
struct CgroupFiles {
    cpu: Option<File>,
    memory: Option<File>,
    members: Option<File>,
}

impl CgroupFiles {
    fn open(&self) -> usize {
        [&self.cpu, &self.memory, &self.members].into_iter().filter(|f| f.is_some()).count()
    }
}

/// Keeps in `held` the counter files of `dirs` only (and their
/// `cgroup.procs` where there is no `memory.current`), opening those not
/// held yet up to [`descriptor_cap`]. Whether `memory.current` is there (the
/// memory controller is on for drover's cgroups, siblings that all have
/// the same).
fn hold_counter_files(held: &mut HeldFiles, dirs: &[&Path]) -> bool {
    let wanted: HashSet<&std::ffi::OsStr> = dirs.iter().map(|d| d.as_os_str()).collect();
    held.retain(|d, _| wanted.contains(d.as_os_str()));
    // Two kinds a cgroup: its cpu.stat, and its memory.current or its
    // cgroup.procs.
    let cap = descriptor_cap().saturating_mul(2);
    let mut open: usize = held.values().map(CgroupFiles::open).sum();
    if open > cap {
        held.clear();
        open = 0;
    }
    let mut memory = true;
    for d in dirs {
        let mut files = held.remove(d.as_os_str()).unwrap_or_default();
        let mut hold = |slot: &mut Option<File>, name: &str| -> std::io::Result<()> {
            if slot.is_none() && open < cap {
                *slot = Some(File::open(d.join(name))?);
                open += 1;
            }
            Ok(())
        };
        let _ = hold(&mut files.cpu, "cpu.stat");
        if memory
            && let Err(e) = hold(&mut files.memory, "memory.current")
            && e.kind() == std::io::ErrorKind::NotFound
        {
            memory = false;
        }
        // The members are read only where there is no memory.current.
        if !memory {
            let _ = hold(&mut files.members, "cgroup.procs");
        }
        if files.open() > 0 {
            held.insert(d.as_os_str().to_owned(), files);
        }
    }
    memory
}

/// How many descriptors each kind of held file may take: none under a
/// limit of 1024 (a process that tight needs every one for its spawns),
/// else a sixteenth of the limit, at most 8192.
fn descriptor_cap() -> usize {
    let soft =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |(s, _)| s);
    if soft < 1024 {
        return 0;
    }
    usize::try_from(soft / 16).unwrap_or(usize::MAX).min(8192)
}

/// What a cgroup counts itself: CPU time (`cpu.stat` usage_usec, which
/// includes what exited members used) and, where the memory controller
/// is on, `memory.current`. Each is absent where the file is.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<u64>,
}

impl Counters {
    /// `memory` says whether to look for `memory.current`. A file held
    /// open is read from its start, any other by path.
    fn read(dir: &Path, held: &HeldFiles, buf: &mut Vec<u8>, memory: bool) -> Counters {
        let files = held.get(dir.as_os_str());
        let mut read = |file: Option<&File>, name: &str| {
            read_counter(file, dir, name, Made::InOnePiece, buf).filter(|t| !t.is_empty())
        };
        let cpu = read(files.and_then(|f| f.cpu.as_ref()), "cpu.stat").as_deref().and_then(parse_cpu_stat);
        let rss = if memory {
            read(files.and_then(|f| f.memory.as_ref()), "memory.current").and_then(|m| m.trim().parse().ok())
        } else {
            None
        };
        Counters { cpu_seconds: cpu.map(|usec| usec as f64 / 1e6), rss_bytes: rss }
    }
}

/// Room for a cgroup's `cpu.stat` (six lines) or `memory.current`.
const COUNTER_SPACE: usize = 4096;

/// Threads that read /proc for one status request, at most.
const MAX_THREADS: usize = 4;
/// Fewer processes than this are read by one thread.
const PIDS_PER_THREAD: usize = 256;
/// Fewer cgroups than this are read by one thread (each is two to four
/// files).
const CGROUPS_PER_THREAD: usize = 64;

/// Adds the usage of those of `pids` in a wanted group to `out`: a held
/// leader's through its descriptor, any other's by path.
fn add_groups(pids: &[i32], wanted: &HashSet<i32>, held: &HashMap<i32, File>, out: &mut HashMap<i32, Usage>) {
    let (tick, page) = (clock_ticks(), page_size());
    let mut reader = StatReader::default();
    let mut statm = [0u8; STATM_SPACE];
    for &pid in pids {
        // A failed read: that process is gone, and the pid may be
        // another's by now, looked at below as any other.
        if let Some(usage) = held.get(&pid).and_then(|f| read_held_leader(pid, f, &mut statm, page)) {
            if wanted.contains(&pid) {
                *out.entry(pid).or_default() += usage;
            }
            continue;
        }
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
}

/// The usage of the processes in cgroup `dir`: its own counters
/// (`cpu.stat` usage_usec, and `memory.current` where the memory
/// controller is on), else the sum over its `cgroup.procs`. Unlike a
/// process group's, a cgroup's CPU time includes what exited members used.
pub fn of_cgroup(dir: &Path) -> Option<Usage> {
    let mut buf = Vec::new();
    let Counters { cpu_seconds: cpu, rss_bytes: mem } = Counters::read(dir, &HashMap::new(), &mut buf, true);
    if let (Some(cpu_seconds), Some(rss_bytes)) = (cpu, mem) {
        return Some(Usage { cpu_seconds, rss_bytes });
    }
    let pids = read_kernel_file(&dir.join("cgroup.procs"), Made::ByRecords, &mut buf).ok()?;
    let (tick, page) = (clock_ticks(), page_size());
    let mut reader = StatReader::default();
    let mut summed = Usage::default();
    for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        if let Some(s) = reader.read(pid) {
            summed += s.usage(tick, page);
        }
    }
    Some(Usage { cpu_seconds: cpu.unwrap_or(summed.cpu_seconds), rss_bytes: mem.unwrap_or(summed.rss_bytes) })
}

/// Reads /proc/PID/stat files with one open and one read each (see
/// [`read_kernel_file`]), into one path and one buffer.
#[derive(Default)]
struct StatReader {
    path: String,
    buf: Vec<u8>,
}

impl StatReader {
    fn read(&mut self, pid: i32) -> Option<Stat> {
        use std::fmt::Write as _;
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/stat");
        parse_stat(read_kernel_file(Path::new(&self.path), Made::InOnePiece, &mut self.buf).ok()?)
    }
}

/// The usage of a leader whose `statm` is held: its CPU time from the
/// kernel's CPU clock of its pid (user and system time of all its threads,
/// to the nanosecond) and its resident pages from `statm`, read from its
/// start (the kernel makes it anew at each read from offset 0). Two system
/// calls, where its `stat` costs three and the kernel's formatting of fifty
/// fields. The clock is read first: the pid is the process's own
/// throughout, as its descriptor was open before and still reads after (a
/// process never comes back), so no other can have taken it. Its group is
/// not asked: a group leader leaves its group only by joining another
/// (setpgid(2)), and what an instance's own process uses is the instance's
/// wherever it went.
fn read_held_leader(pid: i32, statm: &File, buf: &mut [u8], page: u64) -> Option<Usage> {
    let cpu = nix::time::clock_gettime(process_cpu_clock(pid)).ok()?;
    let rss_pages = read_statm(statm, buf)?;
    let cpu_seconds = cpu.tv_sec() as f64 + cpu.tv_nsec() as f64 / 1e9;
    Some(Usage { cpu_seconds, rss_bytes: rss_pages.saturating_mul(page) })
}

/// The kernel's CPU clock of process `pid` (all its threads), made as
/// glibc's clock_getcpuclockid(3) makes it, without the clock_getres(2)
/// that call adds to check that the process exists: clock_gettime(2) on
/// the clock says so itself. The encoding is the kernel's ABI (the pid's
/// complement, shifted past the clock kind: CPUCLOCK_SCHED, per process).
fn process_cpu_clock(pid: i32) -> nix::time::ClockId {
    const CPUCLOCK_SCHED: nix::libc::clockid_t = 2;
    nix::time::ClockId::from_raw(((!pid) << 3) | CPUCLOCK_SCHED)
}

/// Resident pages, from a `statm` held open, read from its start.
fn read_statm(statm: &File, buf: &mut [u8]) -> Option<u64> {
    let n = statm.read_at(buf, 0).ok()?;
    // One that filled the space may be cut short: not taken.
    if n == 0 || n == buf.len() {
        return None;
    }
    parse_statm(std::str::from_utf8(&buf[..n]).ok()?)
}

/// Room for a /proc/PID/statm line (seven numbers).
const STATM_SPACE: usize = 256;

/// Resident pages, the second of /proc/PID/statm's numbers.
fn parse_statm(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
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
    fn statm_resident_pages() {
        assert_eq!(parse_statm("2710 412 380 5 0 120 0\n"), Some(412));
        assert_eq!(parse_statm("2710"), None);
    }

    #[test]
    fn this_process_stat_is_read_whole() {
        let s = StatReader::default().read(std::process::id() as i32).expect("own stat");
        assert_eq!(s.pgid, nix::unistd::getpgrp().as_raw());
        assert!(s.rss_pages > 0, "{s:?}");
    }

    #[test]
    fn a_leader_is_read_through_its_held_statm_until_it_is_gone() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep").arg("30").process_group(0).spawn().unwrap();
        let pid = child.id() as i32;
        // A process just started shows no resident pages for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut held = HashMap::new();
        let mut first = of_groups_holding(&[pid], &mut held);
        while first.get(&pid).is_none_or(|u| u.rss_bytes == 0) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            first = of_groups_holding(&[pid], &mut held);
        }
        assert!(held.contains_key(&pid), "the leader's statm is held");
        assert!(first[&pid].rss_bytes > 0, "read through the held descriptor: {first:?}");
        let fd_target = |h: &HashMap<i32, File>| {
            use std::os::fd::AsRawFd;
            std::fs::read_link(format!("/proc/self/fd/{}", h[&pid].as_raw_fd())).unwrap()
        };
        assert_eq!(fd_target(&held), Path::new(&format!("/proc/{pid}/statm")));
        child.kill().unwrap();
        child.wait().unwrap();
        let after = of_groups_holding(&[pid], &mut held);
        assert!(!after.contains_key(&pid), "a gone group has no usage: {after:?}");
        assert!(!held.contains_key(&pid), "and its statm is no longer held");
    }

    #[test]
    fn a_process_cpu_clock_is_the_one_glibc_makes_and_goes_with_the_process() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        for pid in [std::process::id() as i32, child.id() as i32] {
            let glibc = nix::time::clock_getcpuclockid(nix::unistd::Pid::from_raw(pid)).unwrap();
            assert_eq!(process_cpu_clock(pid), glibc, "pid {pid}");
        }
        let pid = child.id() as i32;
        assert!(nix::time::clock_gettime(process_cpu_clock(pid)).is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(nix::time::clock_gettime(process_cpu_clock(pid)).is_err(), "a reaped process has no clock");
    }

    /// A hierarchy of drover's own for a test and cgroup `name` in it;
    /// none (the test is skipped) where cgroups cannot be used, unless
    /// drover is root, who must be able to.
    fn test_cgroup(tag: &str, name: &str) -> Option<(crate::os::cgroup::Hierarchy, std::path::PathBuf)> {
        let dir = std::env::temp_dir().join(format!("drover-usage-{tag}-{}", std::process::id()));
        let (h, _) = match crate::os::cgroup::Hierarchy::set_up(&dir) {
            Ok(h) => h,
            Err(e) if !crate::os::identity::drover_is_root() => {
                eprintln!("skipped: {e}");
                return None;
            }
            Err(e) => panic!("as root, cgroups must be usable here: {e}"),
        };
        let cg = h.create(name, None).expect("create");
        Some((h, cg))
    }

    /// Real cgroups (root on a cgroup2 host): a cgroup's counters are read
    /// through held files, which go once it is removed and not asked
    /// about.
    #[test]
    fn a_cgroups_counter_files_are_held_until_it_is_removed() {
        let Some((h, cg)) = test_cgroup("unit", "t.0.1") else { return };
        let mut held = HeldFiles::default();
        let memory = hold_counter_files(&mut held, &[&cg]);
        assert!(held[cg.as_os_str()].cpu.is_some(), "cpu.stat is held");
        let mut buf = Vec::new();
        let c = Counters::read(&cg, &held, &mut buf, memory);
        assert_eq!(c.cpu_seconds, Some(0.0), "an empty cgroup used no CPU: {c:?}");
        assert_eq!(c, Counters::read(&cg, &HashMap::new(), &mut buf, memory), "as read by path");
        crate::os::cgroup::remove(&cg).expect("removed with its files open");
        let gone = Counters::read(&cg, &held, &mut buf, memory);
        assert_eq!(gone.cpu_seconds, None, "a removed cgroup counts nothing: {gone:?}");
        hold_counter_files(&mut held, &[]);
        assert!(held.is_empty(), "its files are let go");
        h.tear_down().expect("tear down");
    }

    /// Real cgroups, as above: without the memory controller, a cgroup's
    /// members are listed through its held `cgroup.procs` (anew at each
    /// read) and what they have resident is read through held `statm`s.
    #[test]
    fn a_cgroups_members_are_read_through_held_files() {
        let Some((h, cg)) = test_cgroup("members", "t.0.2") else { return };
        let mut held = HeldFiles::default();
        let memory = hold_counter_files(&mut held, &[&cg]);
        let files = &held[cg.as_os_str()];
        assert_eq!(files.members.is_some(), !memory, "held where there is no memory.current: {files:?}");
        assert_eq!(files.memory.is_some(), memory, "{files:?}");
        let enter = || {
            let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
            std::fs::write(cg.join("cgroup.procs"), child.id().to_string()).unwrap();
            child
        };
        let mut a = enter();
        let mut buf = Vec::new();
        let pa = a.id() as i32;
        assert_eq!(read_members(&cg, &held, &mut buf), Some(vec![pa]));
        let mut b = enter();
        let pb = b.id() as i32;
        let mut both = read_members(&cg, &held, &mut buf).unwrap();
        both.sort();
        assert_eq!(both, [pa.min(pb), pa.max(pb)], "listed anew through the same descriptor");
        let mut statm = HashMap::new();
        // A process just started shows no resident pages for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut rss = resident_of_members(&[Some(both.clone()), None], &mut statm);
        while rss[0].is_none_or(|r| r == 0) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            rss = resident_of_members(&[Some(both.clone()), None], &mut statm);
        }
        assert!(rss[0].is_some_and(|r| r > 0) && rss[1].is_none(), "{rss:?}");
        assert_eq!(statm.len(), 2, "each member's statm is held");
        a.kill().unwrap();
        a.wait().unwrap();
        let after = resident_of_members(&[Some(both)], &mut statm);
        assert!(after[0].is_some(), "the one left still counts: {after:?}");
        assert!(!statm.contains_key(&pa) && statm.contains_key(&pb), "the gone one's statm is let go");
        b.kill().unwrap();
        b.wait().unwrap();
        assert_eq!(read_members(&cg, &held, &mut buf), Some(vec![]));
        drop(held);
        crate::os::cgroup::remove(&cg).expect("remove");
        h.tear_down().expect("tear down");
    }

    #[test]
    fn shares_are_never_shorter_than_the_least() {
        // 270 processes on 2 cores with at least 256 a share: one share.
        assert_eq!(split(270, 256, 2), 270);
        assert_eq!(split(100, 64, 2), 100);
        // Enough for two: an even split.
        assert_eq!(split(600, 256, 2), 300);
        assert_eq!(split(1000, 64, 4), 250);
        assert_eq!(split(0, 64, 4), 1);
        assert_eq!(split(5, 0, 0), 5);
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

    #[test]
    fn a_pass_shared_among_threads_sums_as_one_thread_does() {
        use std::os::unix::process::CommandExt;
        // Three groups of two processes each (a shell and its sleep).
        let mut kids: Vec<std::process::Child> = (0..3)
            .map(|_| {
                std::process::Command::new("sh")
                    .args(["-c", "sleep 30 & wait"])
                    .process_group(0)
                    .spawn()
                    .unwrap()
            })
            .collect();
        let groups: HashSet<i32> = kids.iter().map(|k| k.id() as i32).collect();
        let members = |pids: &[i32]| {
            pids.iter()
                .filter(|p| {
                    nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(**p)))
                        .is_ok_and(|g| groups.contains(&g.as_raw()))
                })
                .count()
        };
        let all = || -> Vec<i32> {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while members(&all()) < 6 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let pids = all();
        let rss = |m: &HashMap<i32, Usage>| -> Vec<(i32, u64)> {
            let mut v: Vec<(i32, u64)> = m.iter().map(|(g, u)| (*g, u.rss_bytes)).collect();
            v.sort();
            v
        };
        // The threaded pass between two single ones that agree (a child
        // still exec'ing its sleep changes its memory meanwhile), all
        // reading the leaders through held descriptors (a leader's statm
        // counts exactly, where its stat's count is the kernel's per-CPU
        // estimate: the two ways may differ by a few pages).
        let (mut one, mut many) = (HashMap::new(), HashMap::new());
        let mut held = HashMap::new();
        hold_leaders(&mut held, &groups);
        while std::time::Instant::now() < deadline {
            one = shared_pass(&pids, &groups, &held, pids.len());
            many = shared_pass(&pids, &groups, &held, 1);
            if rss(&shared_pass(&pids, &groups, &held, pids.len())) == rss(&one) {
                break;
            }
        }
        let seen = members(&pids);
        for k in &mut kids {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(k.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = k.wait();
        }
        assert_eq!(seen, 6);
        assert_eq!(one.keys().collect::<HashSet<_>>(), groups.iter().collect::<HashSet<_>>());
        assert_eq!(rss(&one), rss(&many));
        assert!(one.values().all(|u| u.rss_bytes > 0), "{one:?}");
    }
}
