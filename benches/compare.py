#!/usr/bin/env python3
"""Side-by-side benchmark of drover against its peers.

Systems: drover, floor (benches/floor.rs: spawn N children, respawn on exit,
nothing else), runit (runsvdir), horust, pm2, supervisord. For each system and
each N it measures, in one run:

  start     launch of the supervisor -> all N workers (`sleep 3600`) running,
            median of --start-runs starts
  rss, pss  the supervisor's own memory with N running (all its processes)
  status    latency of the tool's status command (JSON form where it has one),
            median of --status-runs
  idle_cpu  utime+stime (and schedstat run time) of the supervisor processes
            over --idle seconds idle
  wakeups   context switches of the supervisor processes over the same window
  restart   kill -9 of one worker -> its replacement runs (exec'd), median of
            --kills kills of distinct long-running workers, zero backoff
  stop      the stop command (or SIGTERM) -> every worker gone

Workers are counted in the process table (/proc): processes whose command is
`sleep`, not zombies, and whose parent is one of the supervisor's processes.

Stdlib only (Python 3.11). Everything the harness starts is killed on exit,
error or Ctrl-C: it makes itself a child subreaper, so even daemons that detach
(PM2's God daemon) stay its descendants, and it SIGKILLs every descendant at
the end of each system's run.

    bash benches/setup.sh && python3 benches/compare.py --n 100
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOLS = HERE / ".tools"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ME = os.getpid()
SLEEP = shutil.which("sleep") or "/bin/sleep"
WORKER_ARGS = ["3600"]

ALL_SYSTEMS = ["floor", "drover", "drover-pg", "runit", "s6", "horust", "pm2", "supervisord"]

# Popen children the harness waits for itself; the orphan reaper leaves them be.
OWN: set[int] = set()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def supervisord_header(tmp, n) -> str:
    """supervisord.conf up to its programs: socket, logs, limits for n workers."""
    return f"""\
[unix_http_server]
file={tmp}/supervisor.sock

[supervisord]
nodaemon=true
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}/logs
loglevel=warn
minfds={4 * n + 256}
minprocs={2 * n + 256}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock
"""


class Failed(Exception):
    """A measurement that could not be taken; its message goes in the cell."""


# --------------------------------------------------------------------------
# /proc


def read_stat(pid: int):
    """(comm, state, ppid, utime+stime ticks) or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    lp, rp = data.find(b"("), data.rfind(b")")
    comm = data[lp + 1 : rp].decode(errors="replace")
    rest = data[rp + 2 :].split()
    # rest[0] = state (field 3), rest[1] = ppid (4), rest[11] = utime (14), rest[12] = stime (15)
    return comm, rest[0].decode(), int(rest[1]), int(rest[11]) + int(rest[12])


def pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def table() -> dict[int, tuple]:
    t = {}
    for p in pids():
        s = read_stat(p)
        if s is not None:
            t[p] = s
    return t


def is_worker(st) -> bool:
    return st is not None and st[0] == "sleep" and st[1] not in ("Z", "X")


def workers_in(tab: dict, sups: set[int]) -> list[int]:
    return sorted(p for p, st in tab.items() if st[2] in sups and is_worker(st))


def descendants(root: int, tab: dict) -> list[int]:
    """Descendants of root in breadth-first order (parents before children)."""
    kids: dict[int, list[int]] = {}
    for p, st in tab.items():
        kids.setdefault(st[2], []).append(p)
    out, frontier = [], [root]
    while frontier:
        nxt = []
        for p in frontier:
            for c in kids.get(p, []):
                out.append(c)
                nxt.append(c)
        frontier = nxt
    return out


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def task_table(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread's (run time in ns from schedstat, context switches)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            switches = 0
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
            out[int(tid)] = (ns, switches)
        except (OSError, ValueError, IndexError):
            pass
    return out


def task_counters(pid: int) -> tuple[int, int]:
    """(run time in ns from schedstat, context switches) summed over threads."""
    t = task_table(pid).values()
    return sum(ns for ns, _ in t), sum(sw for _, sw in t)


def task_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """Run time and switches between two task tables. A thread that ended
    meanwhile (an idle pool thread retiring) takes its counters with it, so
    sums taken at both ends can go down: compare thread by thread, a new
    thread counting whole."""
    ns = sw = 0
    for tid, (ns1, sw1) in after.items():
        ns0, sw0 = before.get(tid, (0, 0))
        ns += max(0, ns1 - ns0)
        sw += max(0, sw1 - sw0)
    return ns, sw


def reap_orphans() -> None:
    """Reap zombies reparented to the harness (it is a subreaper)."""
    for p, st in table().items():
        if st[2] == ME and st[1] == "Z" and p not in OWN:
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass


def set_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log("warning: prctl(PR_SET_CHILD_SUBREAPER) failed; detached daemons may escape cleanup")
    except OSError:
        log("warning: no libc prctl; detached daemons may escape cleanup")


def cgroup2_mount() -> Path | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


CGROUP2 = cgroup2_mount()
# drover's cgroups that were there before the harness ran: never touched.
CGROUPS_BEFORE = {p.name for p in CGROUP2.glob("drover.*")} if CGROUP2 else set()


def remove_left_cgroups() -> None:
    """Remove the empty cgroups a drover killed by the harness left (a
    SIGKILLed supervisor cannot; its next start for the same state_dir
    would, but every run here has a state_dir of its own). Thousands of
    them would otherwise pile up over runs and slow every later cgroup."""
    if CGROUP2 is None:
        return
    for base in CGROUP2.glob("drover.*"):
        if base.name in CGROUPS_BEFORE:
            continue
        for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [base]:
            try:
                d.rmdir()
            except OSError:
                pass  # not empty (still running) or gone: left alone


def kill_everything(deadline_s: float = 15.0) -> list[str]:
    """SIGKILL every descendant of the harness until none is left; reap them.

    Returns the commands of what had to be killed (for the log)."""
    killed: list[str] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        tab = table()
        live = [p for p in descendants(ME, tab) if tab[p][1] not in ("Z", "X")]
        if not live:
            break
        for p in live:  # parents first: a dead supervisor respawns nothing
            try:
                os.kill(p, signal.SIGKILL)
                killed.append(tab[p][0])
            except ProcessLookupError:
                pass
        reap_orphans()
        time.sleep(0.02)
    reap_orphans()
    return killed


# --------------------------------------------------------------------------
# Adapters


def run_watched(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(argv) with its output captured, killed past `timeout`
    seconds, without subprocess's own timeout: given one, Python waits for
    the child by polling, sleeping 1 ms first, and a child that closed its
    output but was not yet reaped at that moment costs a whole millisecond
    more than one that was; a timed command would read 1 ms slower at
    random. Here the wait blocks, and a timer (SIGALRM) kills the child if
    it outlives the timeout. Main thread only, as the harness is."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, **kw)
    expired = []

    def expire(_signum, _frame):
        expired.append(True)
        p.kill()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        out, err = p.communicate()
    except BaseException:
        # Interrupted (^C): the child does not outlive the call, as with
        # subprocess.run.
        p.kill()
        p.wait()
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if expired:
        raise subprocess.TimeoutExpired(argv, timeout, out, err)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


class System:
    name = "?"
    status_label = "status"

    def __init__(self, opts):
        self.opts = opts
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.n = 0

    # -- to override
    def available(self) -> str | None:
        """None if usable, else why not."""
        return None

    def prepare(self, n: int, tmp: Path) -> None:
        self.n, self.tmp = n, tmp

    def launch(self) -> None:
        raise NotImplementedError

    def supervisors(self, tab: dict) -> set[int]:
        """Pids of the supervisor's own processes (RSS and CPU are summed over them)."""
        return {self.proc.pid} if self.proc else set()

    def status_cmd(self) -> list[str] | None:
        return None

    def check_status(self, out: str) -> None:
        """Raise Failed if the status output does not show N running."""

    def stop(self) -> subprocess.Popen | None:
        """Ask the supervisor to stop all; return the client Popen, if any."""
        os.kill(self.proc.pid, signal.SIGTERM)
        return None

    def versions(self) -> str:
        return ""

    def env(self) -> dict:
        return dict(os.environ)

    # -- helpers
    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        logf = open(self.tmp / f"{self.name}.log", "ab")
        kw.setdefault("stdout", logf)
        kw.setdefault("stderr", logf)
        p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, start_new_session=True, env=self.env(), **kw
        )
        logf.close()
        OWN.add(p.pid)
        return p

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.tmp / f"{self.name}.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        return " / ".join(text.splitlines()[-lines:])

    def run(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        return run_watched(argv, timeout, env=self.env())


class Drover(System):
    name = "drover"
    status_label = "`status --json`"

    def available(self):
        b = Path(self.opts.drover)
        if not (b.is_file() and os.access(b, os.X_OK)):
            return f"no drover binary at {b} (cargo build --release)"
        return None

    # drover's default: cgroups where it may make them (as root on cgroup2),
    # else process groups.
    containment = "auto"

    def prepare(self, n, tmp):
        super().prepare(n, tmp)
        # the copy main() froze, so that a rebuild during the run changes nothing
        self.bin = str(getattr(self.opts, "drover_frozen", None) or Path(self.opts.drover).resolve())
        self.cfg = tmp / "daemon.toml"
        self.cfg.write_text(
            "[supervisor]\n"
            f'state_dir = "{tmp / "state"}"\n'
            f'containment = "{self.containment}"\n'
            "\n"
            "[workers.w]\n"
            f'command = ["sleep", "{WORKER_ARGS[0]}"]\n'
            f"capacity = {n}\n"
            'backoff = { initial = "0s", max = "0s", multiplier = 1.0 }\n'
            # min_uptime > 0 so that a quick series of kills never parks it
            'crash_loop = { min_uptime = "1ms", max_failures = 1000000 }\n'
            'stop_grace = "5s"\n'
        )

    def launch(self):
        # Foreground mode, spawned by the harness; its echo of worker output is discarded.
        self.proc = self.spawn([self.bin, "-c", str(self.cfg), "start"], stdout=subprocess.DEVNULL)

    def status_cmd(self):
        return [self.bin, "-c", str(self.cfg), "status", "--json"]

    def check_status(self, out):
        try:
            doc = json.loads(out)
            inst = [i for w in doc["workers"] for i in w["instances"]]
            running = sum(1 for i in inst if i.get("state") == "running" and i.get("pid"))
        except (ValueError, KeyError, TypeError) as e:
            raise Failed(f"status --json unreadable: {e}")
        if running != self.n:
            raise Failed(f"status --json shows {running}/{self.n} running")

    def stop(self):
        return self.spawn([self.bin, "-c", str(self.cfg), "stop"])

    def versions(self):
        return getattr(self.opts, "drover_version", "drover")


class DroverProcessGroups(Drover):
    """drover contained the way every peer is: each worker in a process
    group of its own, no cgroup."""
    name = "drover-pg"
    containment = "process-group"


class Floor(System):
    name = "floor"
    _bin: Path | None = None
    _err: str | None = None

    @classmethod
    def build(cls, builddir: Path) -> None:
        rustc = shutil.which("rustc")
        if not rustc:
            cls._err = "rustc not found"
            return
        out = builddir / "floor"
        r = subprocess.run([rustc, "-O", "--edition", "2021", "-o", str(out), str(HERE / "floor.rs")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            lines = r.stderr.strip().splitlines()
            cls._err = "rustc failed: " + (lines[0] if lines else f"exit {r.returncode}")
            return
        cls._bin = out

    def available(self):
        return self._err if self._bin is None else None

    def launch(self):
        self.proc = self.spawn([str(self._bin), str(self.n), SLEEP, *WORKER_ARGS])

    def versions(self):
        return "floor (benches/floor.rs, rustc -O)"


class Supervisord(System):
    name = "supervisord"
    status_label = "`supervisorctl status`"

    def _script(self, name):
        p = Path(sysconfig.get_path("scripts")) / name
        return str(p) if p.exists() else shutil.which(name)

    def available(self):
        if not (self._script("supervisord") and self._script("supervisorctl")):
            return "supervisord not installed (bash benches/setup.sh)"
        return None

    def prepare(self, n, tmp):
        super().prepare(n, tmp)
        (tmp / "logs").mkdir()
        self.conf = tmp / "supervisord.conf"
        self.conf.write_text(supervisord_header(tmp, n) + f"""
[program:w]
command={SLEEP} {" ".join(WORKER_ARGS)}
numprocs={n}
process_name=%(program_name)s_%(process_num)d
autostart=true
autorestart=true
startsecs=0
startretries=1000000
stopwaitsecs=5
stdout_logfile=NONE
stderr_logfile=NONE
""")

    def launch(self):
        self.proc = self.spawn([self._script("supervisord"), "-n", "-c", str(self.conf)])

    def status_cmd(self):
        return [self._script("supervisorctl"), "-c", str(self.conf), "status"]

    def check_status(self, out):
        running = sum(1 for line in out.splitlines() if " RUNNING " in line)
        if running != self.n:
            raise Failed(f"supervisorctl status shows {running}/{self.n} RUNNING")

    def stop(self):
        return self.spawn([self._script("supervisorctl"), "-c", str(self.conf), "shutdown"])

    def versions(self):
        r = subprocess.run([self._script("supervisord"), "--version"], capture_output=True, text=True)
        return f"supervisord {r.stdout.strip()}"


class Pm2(System):
    name = "pm2"
    status_label = "`pm2 jlist`"
    PM2 = TOOLS / "node_modules" / ".bin" / "pm2"

    def available(self):
        if not self.PM2.exists():
            return "pm2 not installed (bash benches/setup.sh)"
        return None

    def env(self):
        e = dict(os.environ)
        if self.tmp is not None:
            e["PM2_HOME"] = str(self.tmp / "pm2home")
        return e

    def prepare(self, n, tmp):
        super().prepare(n, tmp)
        apps = [
            {
                "name": f"w{i}",
                "script": SLEEP,
                "args": WORKER_ARGS,
                "interpreter": "none",
                "exec_mode": "fork",
                "autorestart": True,
                "restart_delay": 0,
                "min_uptime": 100,  # PM2 refuses less than 100 ms
                "max_restarts": 1000000,
                "kill_timeout": 5000,
                "out_file": "/dev/null",
                "error_file": "/dev/null",
            }
            for i in range(n)
        ]
        self.eco = tmp / "ecosystem.config.json"
        self.eco.write_text(json.dumps({"apps": apps}))

    def launch(self):
        # The CLI spawns the God daemon (detached) and asks it to start the apps.
        self.proc = self.spawn([str(self.PM2), "start", str(self.eco)])

    def supervisors(self, tab):
        try:
            pid = int((self.tmp / "pm2home" / "pm2.pid").read_text().strip())
        except (OSError, ValueError):
            return set()
        return {pid} if pid in tab else set()

    def status_cmd(self):
        return [str(self.PM2), "jlist"]

    def check_status(self, out):
        try:
            doc = json.loads(out[out.index("["):])
            online = sum(1 for a in doc if a.get("pm2_env", {}).get("status") == "online")
        except ValueError as e:
            raise Failed(f"pm2 jlist unreadable: {e}")
        if online != self.n:
            raise Failed(f"pm2 jlist shows {online}/{self.n} online")

    def stop(self):
        return self.spawn([str(self.PM2), "kill"])

    def versions(self):
        try:
            v = json.loads((TOOLS / "node_modules" / "pm2" / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            v = "?"
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        return f"pm2 {v} (node {node})"


class Horust(System):
    name = "horust"
    status_label = "`horustctl status w0.toml` (one service)"
    BIN = TOOLS / "bin" / "horust"
    CTL = TOOLS / "bin" / "horustctl"

    def available(self):
        if not self.BIN.exists():
            return "horust not installed (bash benches/setup.sh)"
        return None

    def prepare(self, n, tmp):
        super().prepare(n, tmp)
        self.sdir = tmp / "services"
        self.udir = tmp / "uds"
        self.sdir.mkdir()
        self.udir.mkdir()
        for i in range(n):
            (self.sdir / f"w{i}.toml").write_text(
                f'command = "{SLEEP} {" ".join(WORKER_ARGS)}"\n'
                "[restart]\n"
                'strategy = "always"\n'
                'backoff = "0s"\n'
                "attempts = 0\n"
                "[failure]\n"
                'strategy = "ignore"\n'
                "[termination]\n"
                'signal = "TERM"\n'
                'wait = "5s"\n'
            )

    def launch(self):
        self.proc = self.spawn([
            str(self.BIN), "--config-path", str(self.tmp / "horust.toml"),
            "--services-path", str(self.sdir), "--uds-folder-path", str(self.udir),
        ])

    def status_cmd(self):
        # horustctl answers for one service per call; there is no JSON form.
        if not self.CTL.exists():
            return None
        return [str(self.CTL), "--socket-path", str(self.udir / f"horust-{self.proc.pid}.sock"),
                "status", "w0.toml"]

    def env(self):
        e = dict(os.environ)
        e["RUST_LOG"] = "warn"  # horustctl logs at debug by default
        return e

    def check_status(self, out):
        if "running" not in out.lower():
            raise Failed(f"horustctl: {out.strip()[:60]}")

    def versions(self):
        # horust has no --version; cargo install records what it installed
        try:
            for line in (TOOLS / ".crates.toml").read_text().splitlines():
                if line.startswith('"horust '):
                    return "horust " + line.split()[1]
        except OSError:
            pass
        return "horust"


class Runit(System):
    name = "runit"
    status_label = "`sv status` (all N)"

    def available(self):
        if not (shutil.which("runsvdir") and shutil.which("sv")):
            return "runit not installed (bash benches/setup.sh)"
        return None

    def prepare(self, n, tmp):
        super().prepare(n, tmp)
        self.svdir = tmp / "service"
        self.svdir.mkdir()
        for i in range(n):
            d = self.svdir / f"w{i}"
            d.mkdir()
            run = d / "run"
            run.write_text(f"#!/bin/sh\nexec {SLEEP} {' '.join(WORKER_ARGS)}\n")
            run.chmod(0o755)

    def launch(self):
        self.proc = self.spawn(["runsvdir", str(self.svdir)])

    def supervisors(self, tab):
        root = self.proc.pid
        return {root} | {p for p, st in tab.items() if st[2] == root and st[0] == "runsv"}

    def status_cmd(self):
        return ["sv", "status", *[str(self.svdir / f"w{i}") for i in range(self.n)]]

    def check_status(self, out):
        running = sum(1 for line in out.splitlines() if line.startswith("run:"))
        if running != self.n:
            raise Failed(f"sv status shows {running}/{self.n} run")

    def stop(self):
        # runsvdir's documented stop: on SIGHUP it sends TERM to every runsv,
        # each of which stops its service (TERM, CONT) and exits.
        os.kill(self.proc.pid, signal.SIGHUP)
        return None

    def versions(self):
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "runit"], capture_output=True, text=True)
        return f"runit {r.stdout.strip() or '?'}"


class S6(System):
    name = "s6"
    status_label = "`s6-svstat w0` (one service)"

    def available(self):
        if not all(shutil.which(t) for t in ("s6-svscan", "s6-svscanctl", "s6-svstat")):
            return "s6 not installed (bash benches/setup.sh)"
        return None

    def prepare(self, n, tmp):
        super().prepare(n, tmp)
        self.scandir = tmp / "scan"
        self.scandir.mkdir()
        for i in range(n):
            d = self.scandir / f"w{i}"
            d.mkdir()
            run = d / "run"
            run.write_text(f"#!/bin/sh\nexec {SLEEP} {' '.join(WORKER_ARGS)}\n")
            run.chmod(0o755)

    def launch(self):
        # -c: s6-svscan supervises at most 500 service directories unless told more.
        self.proc = self.spawn(["s6-svscan", "-c", str(max(500, self.n + 10)), str(self.scandir)])

    def supervisors(self, tab):
        root = self.proc.pid
        return {root} | {p for p, st in tab.items() if st[2] == root and st[0] == "s6-supervise"}

    def status_cmd(self):
        # s6-svstat answers for one service directory per call.
        return ["s6-svstat", str(self.scandir / "w0")]

    def check_status(self, out):
        if not out.startswith("up "):
            raise Failed(f"s6-svstat: {out.strip()[:60]}")

    def stop(self):
        # s6-svscanctl -t: s6-svscan sends SIGTERM to every s6-supervise,
        # each of which brings its service down and exits.
        return self.spawn(["s6-svscanctl", "-t", str(self.scandir)])

    def versions(self):
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "s6"], capture_output=True, text=True)
        return f"s6 {r.stdout.strip() or '?'}"


ADAPTERS = {c.name: c for c in (Floor, Drover, DroverProcessGroups, Runit, S6, Horust, Pm2, Supervisord)}


# --------------------------------------------------------------------------
# Measurements


def check_alive(sys_: System) -> None:
    if sys_.proc is not None and sys_.proc.poll() is not None and sys_.name != "pm2":
        raise Failed(f"{sys_.name} exited with {sys_.proc.returncode}: {sys_.log_tail()}"[:300])


def last_pid() -> int:
    """The most recently allocated pid (last field of /proc/loadavg)."""
    with open("/proc/loadavg", "rb") as f:
        return int(f.read().split()[-1])


def measure_start(s: System, n: int, deadline_s: float) -> float:
    """Launch, then poll until N workers run.

    The poll is incremental, to keep the harness off the CPU it shares with
    the supervisor: it reads only the pids allocated since the last poll
    (pids grow upwards; /proc/loadavg names the last one), and re-reads only
    the harness's new descendants that are neither workers nor supervisor
    processes yet (a forked child before its exec). Should the pid counter
    wrap, it falls back to scanning the whole table."""
    cursor = last_pid()
    family: dict[int, tuple] = {ME: ("harness", "S", 0, 0)}
    workers: set[int] = set()
    pending: set[int] = set()
    gaps: dict[int, float] = {}  # allocated pids not visible in /proc yet
    t0 = time.perf_counter()
    s.launch()
    deadline = time.monotonic() + deadline_s
    last_full = time.monotonic()

    def visit(p: int, st) -> None:
        if st[2] in family:
            family[p] = st
            pending.add(p)

    while True:
        now = time.monotonic()
        top = last_pid()
        if top < cursor or now - last_full > 0.5:
            # the pid counter wrapped, or a safety net now and then: a full scan
            tab = table()
            family = {p: tab[p] for p in [ME, *descendants(ME, tab)]}
            workers = set(workers_in(family, s.supervisors(family)))
            pending = set(family) - {ME} - workers
            gaps.clear()
            cursor, last_full = top, now
        else:
            # A pid is allocated (and named in /proc/loadavg) a moment before
            # its process shows in /proc: keep looking at such gaps a while.
            for p in list(gaps):
                st = read_stat(p)
                if st is not None:
                    del gaps[p]
                    visit(p, st)
                elif now - gaps[p] > 0.2:
                    del gaps[p]  # a process that came and went
            for p in range(cursor + 1, top + 1):
                st = read_stat(p)
                if st is None:
                    gaps[p] = now
                else:
                    visit(p, st)
            cursor = top
        for p in list(pending):
            st = read_stat(p)
            if st is None or st[1] in ("Z", "X"):
                pending.discard(p)
                workers.discard(p)
                family.pop(p, None)
            else:
                family[p] = st
        sups = s.supervisors(family)
        for p in list(pending):
            st = family.get(p)
            if st is None:
                continue
            if p in sups:
                pending.discard(p)
            elif st[2] in sups and is_worker(st):
                workers.add(p)
                pending.discard(p)
        if len(workers) >= n:
            elapsed = time.perf_counter() - t0
            # cross-check with a full scan (outside the timed part)
            tab = table()
            full = len(workers_in(tab, s.supervisors(tab)))
            if full >= n:
                return elapsed
            workers = set(workers_in(tab, s.supervisors(tab)))  # one died: go on
        check_alive(s)
        if time.monotonic() > deadline:
            raise Failed(f"only {len(workers)}/{n} workers running after {deadline_s:.0f}s")
        time.sleep(0.001)


def current(s: System):
    tab = table()
    sups = s.supervisors(tab)
    if not sups:
        raise Failed("supervisor process not found")
    return tab, sups


def measure_rss(s: System) -> float:
    _, sups = current(s)
    return sum(rss_kb(p) for p in sups) / 1024.0  # MB


def measure_rss_parts(s: System) -> dict:
    """RssAnon (heap, stacks: the supervisor's own memory) and RssFile (its
    binary's and libraries' resident pages), summed over its processes."""
    _, sups = current(s)
    parts = {"anon_mb": 0.0, "file_mb": 0.0}
    for p in sups:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        parts["anon_mb"] += int(line.split()[1]) / 1024.0
                    elif line.startswith("RssFile:"):
                        parts["file_mb"] += int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
    return parts


def measure_pss(s: System) -> float:
    """Proportional set size: shared pages split between the processes that map
    them, so a multi-process supervisor (runit) is not charged N times for libc."""
    _, sups = current(s)
    return sum(pss_kb(p) for p in sups) / 1024.0  # MB


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    total = sum(v[:8])  # up to steal; guest time is already in user
    return total - idle, total


def measure_idle(s: System, seconds: float) -> dict:
    _, sups = current(s)
    before = {p: (read_stat(p), task_table(p)) for p in sups}
    m0 = machine_busy()
    time.sleep(seconds)
    m1 = machine_busy()
    ticks = ns = sw = 0
    for p, (st0, tasks0) in before.items():
        st1 = read_stat(p)
        if st0 is None or st1 is None:
            raise Failed(f"supervisor process {p} went away while idle")
        dns, dsw = task_delta(tasks0, task_table(p))
        ticks += st1[3] - st0[3]
        ns += dns
        sw += dsw
    # How busy the whole machine was meanwhile (all cores): the background
    # load every other figure of this system was taken under, roughly.
    busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
    return {"cpu_ms": ticks * 1000.0 / CLK_TCK, "sched_ms": ns / 1e6, "switches": sw,
            "seconds": seconds, "machine_busy": busy}


def measure_status(s: System, runs: int, budget_s: float) -> dict:
    """Median latency of the status command, each call paired with a spawn
    of `true` right before it (the same spawn, capture and environment):
    the median of the differences is what the command costs over starting
    a process, and a slow stretch of the host weighs on both halves of a
    pair alike. At least 20 calls; past those, the calls stop once
    `budget_s` is spent (a status of a second a call would take minutes)."""
    argv = s.status_cmd()
    if argv is None:
        return {"na": True}
    r = s.run(argv)
    if r.returncode != 0:
        raise Failed(f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[:120]}")
    s.check_status(r.stdout)
    bare = [shutil.which("true") or "/bin/true"]
    times, spawns = [], []
    deadline = time.monotonic() + budget_s
    while len(times) < runs and (len(times) < 20 or time.monotonic() < deadline):
        t0 = time.perf_counter()
        s.run(bare)
        t1 = time.perf_counter()
        r = s.run(argv)
        t2 = time.perf_counter()
        if r.returncode != 0:
            raise Failed(f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[:120]}")
        spawns.append((t1 - t0) * 1000.0)
        times.append((t2 - t1) * 1000.0)
    over = [t - b for t, b in zip(times, spawns)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": len(times), "bytes": len(r.stdout),
            "spawn_median_ms": statistics.median(spawns), "over_spawn_ms": statistics.median(over)}


def wait_replacement(sups: set[int], known: set[int], base: int, deadline: float):
    """Poll /proc until a new `sleep` child of a supervisor process appears.

    New pids are allocated upwards, so read the pids allocated since `base`
    (up to the last one, from /proc/loadavg); fall back to a full scan now and
    then in case the pid counter wrapped."""
    last_full = time.monotonic()
    while True:
        for p in range(base + 1, last_pid() + 1):
            st = read_stat(p)
            if st is not None and p not in known and st[2] in sups and is_worker(st):
                return p
        now = time.monotonic()
        if now - last_full > 0.05:
            last_full = now
            for q, st in table().items():
                if q not in known and st[2] in sups and is_worker(st):
                    return q
        if now > deadline:
            return None
        time.sleep(0.0001)


def measure_restart(s: System, n: int, kills: int) -> dict:
    tab, sups = current(s)
    ws = workers_in(tab, sups)
    if len(ws) < n:
        raise Failed(f"only {len(ws)}/{n} workers running before the kills")
    # Distinct victims spread over the pool, all up for seconds by now (runsv
    # delays a restart by 1 s when the service ran less than 1 s).
    step = max(1, len(ws) // kills)
    victims = [ws[(i * step) % len(ws)] for i in range(kills)]
    lat, misses = [], 0
    known = set(ws)
    for v in victims:
        time.sleep(0.05)
        tab, sups = current(s)
        known |= set(workers_in(tab, sups))
        base = last_pid()
        t0 = time.perf_counter()
        os.kill(v, signal.SIGKILL)
        new = wait_replacement(sups, known, base, time.monotonic() + 10.0)
        dt = time.perf_counter() - t0
        if new is None:
            misses += 1
            if misses >= 3:
                raise Failed(f"no replacement within 10 s for {misses} kills")
            continue
        known.add(new)
        lat.append(dt * 1000.0)
    if not lat:
        raise Failed("no replacement seen")
    return {"median_ms": statistics.median(lat), "min_ms": min(lat), "max_ms": max(lat),
            "kills": len(lat), "misses": misses}


def measure_stop(s: System, deadline_s: float) -> dict:
    tab, sups = current(s)
    ws = workers_in(tab, sups)
    watch = sups | {ME}  # orphans of a supervisor that exited come to the harness
    t0 = time.perf_counter()
    client = s.stop()
    deadline = time.monotonic() + deadline_s
    remaining = list(ws)
    gone_at = None
    while True:
        remaining = [p for p in remaining if is_worker(read_stat(p))]
        if not remaining:
            # the originals are gone: make sure nothing was respawned or left behind
            t = table()
            left = workers_in(t, watch)
            if not left:
                gone_at = time.perf_counter() - t0
                break
            remaining = left
        if time.monotonic() > deadline:
            raise Failed(f"{len(remaining)} workers still running {deadline_s:.0f}s after stop")
        time.sleep(0.001)
    # the supervisor itself should exit too (recorded, not part of the figure)
    sup_exit = None
    while time.monotonic() < deadline:
        t = table()
        if all(p not in t or t[p][1] in ("Z", "X") for p in sups):
            sup_exit = time.perf_counter() - t0
            break
        time.sleep(0.005)
    client_rc = None
    if client is not None:
        try:
            client_rc = client.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return {"ms": gone_at * 1000.0, "supervisor_exit_ms": None if sup_exit is None else sup_exit * 1000.0,
            "client_rc": client_rc}


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def forget_own() -> None:
    """Reap the harness's own Popen children once everything is dead."""
    for p in list(OWN):
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass
        OWN.discard(p)


def busy_builders() -> list[str]:
    names = {"rustc", "cargo", "cc", "cc1", "ld", "clang", "gcc", "cc1plus", "lld", "rust-lld"}
    return sorted({st[0] for st in table().values() if st[0] in names})


def run_system(name: str, n: int, opts, results: list[dict]) -> None:
    """Measure one system at one N; its result is appended to results at once,
    so that an interrupted run still reports what it got."""
    s: System = ADAPTERS[name](opts)
    res: dict = {"system": name, "n": n, "metrics": {}, "errors": {}}
    results.append(res)
    why = s.available()
    if why:
        res["errors"]["*"] = why
        return
    res["version"] = s.versions()
    res["busy_builders"] = busy_builders()
    # Extra start-only runs, each on a fresh config and temp dir, for a median.
    starts: list[float] = []
    for _ in range(max(0, opts.start_runs - 1)):
        tmp = Path(tempfile.mkdtemp(prefix=f"drover-bench-{name}-"))
        try:
            s.prepare(n, tmp)
            time.sleep(1.1)  # see below
            starts.append(measure_start(s, n, opts.start_deadline + n * 0.1))
        except Failed as e:
            res["errors"]["*"] = str(e)
            return
        except Exception as e:
            res["errors"]["*"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return
        except KeyboardInterrupt:
            res["interrupted"] = True
            raise
        finally:
            kill_everything()
            remove_left_cgroups()
            forget_own()
            shutil.rmtree(tmp, ignore_errors=True)
        s = ADAPTERS[name](opts)
        time.sleep(0.5)
    tmp = Path(tempfile.mkdtemp(prefix=f"drover-bench-{name}-"))
    try:
        s.prepare(n, tmp)
        # Let the files written by prepare age past the current second:
        # runsvdir does not scan a directory modified within the current second
        # and looks again a second later, which is not what a boot looks like.
        time.sleep(1.1)
        try:
            starts.append(measure_start(s, n, opts.start_deadline + n * 0.1))
        except Failed as e:
            res["errors"]["*"] = str(e)
            return
        res["start_runs_s"] = starts
        start = statistics.median(starts)
        res["metrics"]["start_s"] = start
        log(f"  {name} N={n}: start {start:.3f} s (runs: {', '.join(f'{x:.3f}' for x in starts)})")
        time.sleep(opts.settle)

        def metric(key, fn):
            res["busy_builders"] = sorted(set(res["busy_builders"]) | set(busy_builders()))
            res.setdefault("loadavg_1m", []).append(loadavg())
            try:
                v = fn()
                res["metrics"][key] = v
                log(f"  {name} N={n}: {key} {json.dumps(v)}")
            except Failed as e:
                res["errors"][key] = str(e)
                log(f"  {name} N={n}: {key} error: {e}")
            except subprocess.TimeoutExpired as e:
                res["errors"][key] = f"timed out after {e.timeout:.0f}s"
                log(f"  {name} N={n}: {key} timed out")

        metric("rss_mb", lambda: measure_rss(s))
        metric("pss_mb", lambda: measure_pss(s))
        metric("idle", lambda: measure_idle(s, opts.idle))
        metric("status", lambda: measure_status(s, opts.status_runs, opts.status_budget))
        metric("restart", lambda: measure_restart(s, n, opts.kills))
        metric("rss_after_mb", lambda: measure_rss(s))
        metric("rss_parts", lambda: measure_rss_parts(s))
        metric("stop", lambda: measure_stop(s, opts.stop_deadline + n * 0.02))
        res["busy_builders"] = sorted(set(res["busy_builders"]) | set(busy_builders()))
    except Exception as e:  # an adapter bug: report it in the cells and carry on
        res["errors"]["*"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    except KeyboardInterrupt:
        res["interrupted"] = True
        raise
    finally:
        killed = kill_everything()
        if killed:
            res["killed_at_cleanup"] = len(killed)
        remove_left_cgroups()
        forget_own()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Report

ROWS = [
    ("start", "start: launch → N running (median)"),
    ("rss", "supervisor RSS with N running"),
    ("pss", "supervisor PSS with N running"),
    ("rss_after", "supervisor RSS after the status and restart runs"),
    ("rss_anon", "… of which anonymous (RssAnon)"),
    ("status", "status command latency (median)"),
    ("status_over", "… over a bare spawn of `true` (median of paired calls)"),
    ("idle_cpu", "CPU over idle window (utime+stime)"),
    ("idle_sched", "CPU over idle window (schedstat)"),
    ("wakeups", "context switches over idle window"),
    ("restart", "restart after kill -9 (median)"),
    ("stop", "stop: command → all N gone"),
]


def cell_value(r: dict, row: str):
    """(number or None, text) for one cell."""
    m, err = r["metrics"], r["errors"]
    if "*" in err:
        return None, "error: " + short(err["*"])
    key = {"start": "start_s", "rss": "rss_mb", "pss": "pss_mb", "rss_after": "rss_after_mb",
           "rss_anon": "rss_parts", "status": "status", "status_over": "status", "idle_cpu": "idle",
           "idle_sched": "idle", "wakeups": "idle", "restart": "restart", "stop": "stop"}[row]
    if key in err:
        return None, "error: " + short(err[key])
    if key not in m:
        return None, "—"
    v = m[key]
    if row == "start":
        return v, f"{v:.3f} s"
    if row in ("rss", "pss", "rss_after"):
        return v, f"{v:.1f} MB"
    if row == "rss_anon":
        return v["anon_mb"], f"{v['anon_mb']:.1f} MB"
    if row == "status":
        if v.get("na"):
            return None, "n/a"
        return v["median_ms"], f"{v['median_ms']:.1f} ms"
    if row == "status_over":
        if v.get("na") or "over_spawn_ms" not in v:
            return None, "n/a"
        return v["over_spawn_ms"], f"{v['over_spawn_ms']:.2f} ms"
    if row == "idle_cpu":
        return v["cpu_ms"], f"{v['cpu_ms']:.0f} ms"
    if row == "idle_sched":
        return v["sched_ms"], f"{v['sched_ms']:.2f} ms"
    if row == "wakeups":
        return v["switches"], f"{v['switches']}"
    if row == "restart":
        return v["median_ms"], f"{v['median_ms']:.1f} ms"
    if row == "stop":
        return v["ms"], f"{v['ms']:.0f} ms" if v["ms"] >= 10 else f"{v['ms']:.1f} ms"
    return None, "?"


def short(msg: str, width: int = 40) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= width else msg[: width - 1] + "…"


def md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render(results: list[dict], opts, meta: dict) -> str:
    out = ["# drover vs peers: supervisor benchmark", ""]
    cmd = " ".join(["python3 benches/compare.py", *meta["argv"]])
    out.append(f"Run {meta['date']} on {meta['machine']}: `{cmd}`.")
    out.append("")
    if meta.get("interrupted"):
        out.append("**Interrupted: partial results.**")
        out.append("")
    for n in opts.n:
        rs = {r["system"]: r for r in results if r["n"] == n}
        systems = [s for s in opts.systems if s in rs]
        out.append(f"## N = {n}")
        out.append("")
        ratios = [d for d in ("drover", "drover-pg") if d in systems]
        head = ["metric"] + systems + [f"{d}/floor" for d in ratios]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for row, label in ROWS:
            cells, nums = [], {}
            for s in systems:
                num, text = cell_value(rs[s], row)
                nums[s] = num
                cells.append(md_escape(text))
            f = nums.get("floor")
            shown = [f"{nums[d] / f:.2f}x" if nums.get(d) is not None and f else "—" for d in ratios]
            out.append("| " + " | ".join([label] + cells + shown) + " |")
        out.append("")
        errs = [(s_, k, e) for s_ in systems for k, e in rs[s_]["errors"].items()]
        if errs:
            out.append("Errors:")
            out.append("")
            for s_, k, e in errs:
                what = "all metrics" if k == "*" else k
                out.append(f"- {s_} ({what}): {md_escape(' '.join(e.split()))}")
            out.append("")
        busy = sorted({b for r in rs.values() for b in r.get("busy_builders", [])})
        # (the 1-min load averages are in the JSON only: the runs' own bursts of
        # N runnable processes inflate them)
        peak = ""
        bg = [r["metrics"]["idle"]["machine_busy"] for r in rs.values()
              if "machine_busy" in r["metrics"].get("idle", {})]
        if bg:
            peak += f"; machine busy during the idle windows: up to {max(bg) * 100:.0f}% of {os.cpu_count()} cores"
        if busy:
            out.append(f"Noisy: a build was running during this run ({', '.join(busy)} "
                       f"seen on the machine{peak}).")
        else:
            out.append(f"No compiler was seen running during these measurements{peak}.")
        out.append("")
    out.append("Status commands: " + "; ".join(
        f"{name}: {ADAPTERS[name].status_label}" for name in opts.systems
        if ADAPTERS[name].status_label != "status") + "; floor: none.")
    out.append("")
    out.append("Versions: " + "; ".join(sorted({r['version'] for r in results if r.get('version')})) + ".")
    out.append("")
    out.append("How each figure is taken: benches/README.md.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, action="append",
                    help="workers per system (repeatable; default 100 and 1000)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                    help=f"comma-separated, from {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--out", default=str(HERE / "results" / "supervisor.md"),
                    help="markdown report (raw JSON goes beside it, .json)")
    ap.add_argument("--drover", default=str(REPO / "target" / "release" / "drover"))
    ap.add_argument("--start-runs", type=int, default=3,
                    help="starts measured per system (median); the last one goes on to the other figures")
    ap.add_argument("--status-runs", type=int, default=200,
                    help="status calls per system, at most (at least 20, then until --status-budget)")
    ap.add_argument("--status-budget", type=float, default=5.0,
                    help="seconds of status calls per system past the first 20")
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--idle", type=float, default=10.0, help="idle window, seconds")
    ap.add_argument("--settle", type=float, default=1.0, help="pause after start, seconds")
    ap.add_argument("--start-deadline", type=float, default=30.0, help="plus 0.1 s per worker")
    ap.add_argument("--stop-deadline", type=float, default=30.0, help="plus 0.02 s per worker")
    ap.add_argument("--from-json", metavar="FILE",
                    help="measure nothing: render the table again from a raw JSON of an earlier run")
    opts = ap.parse_args(argv)
    opts.n = opts.n or [100, 1000]
    opts.systems = [s.strip() for s in opts.systems.split(",") if s.strip()]
    bad = [s for s in opts.systems if s not in ADAPTERS]
    if bad:
        ap.error(f"unknown system(s): {', '.join(bad)}")
    if opts.from_json:
        doc = json.loads(Path(opts.from_json).read_text())
        results = doc["results"]
        opts.n = sorted({r["n"] for r in results}, key=[r["n"] for r in results].index)
        opts.systems = [s for s in ALL_SYSTEMS if any(r["system"] == s for r in results)]
        sys.stdout.write(render(results, opts, doc["meta"]))
        return 0
    if sys.platform != "linux":
        ap.error("Linux only (reads /proc)")

    set_subreaper()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    results: list[dict] = []
    builddir = Path(tempfile.mkdtemp(prefix="drover-bench-build-"))
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "argv": sys.argv[1:] if argv is None else argv,
        "clk_tck": CLK_TCK,
    }
    interrupted = False
    try:
        if "floor" in opts.systems:
            Floor.build(builddir)
        drover = Path(opts.drover)
        if any(s.startswith("drover") for s in opts.systems) and drover.is_file():
            # Freeze the binary: the daemon and its clients (status, stop) must be
            # the same build even if target/ is rebuilt during the run.
            opts.drover_frozen = builddir / "drover"
            shutil.copy2(drover, opts.drover_frozen)
            built = _dt.datetime.fromtimestamp(drover.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
            r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True)
            opts.drover_version = (f"drover {drover} built {built} "
                                   f"(repo at {r.stdout.strip() or '?'})")
        for n in opts.n:
            for name in opts.systems:
                log(f"{name} N={n}")
                run_system(name, n, opts, results)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        kill_everything()
        shutil.rmtree(builddir, ignore_errors=True)

    meta["interrupted"] = interrupted
    md = render(results, opts, meta)
    sys.stdout.write(md)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
