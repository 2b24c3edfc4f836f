#!/usr/bin/env python3
"""Hot reload benchmark: edit the config, time until the new worker runs.

With N workers (`sleep 3600`) running, each edit adds one worker whose command
first records the time it started (a marker file, written by a tiny static
program, `stamp`, that then execs `sleep 3600`); the latency of the edit is
that time minus the time taken just before the config file was written. The
worker is then removed again (an edit of its own, not timed), so every timed
edit is "add one worker with N running". Side by side, in one run:

  drover       [supervisor] reload = true, default debounce: the file's watcher
               applies the edit, no command is run. Edits alternate between a
               write in place and an atomic save (write a temp file, rename).
  supervisord  add a [program:newI] section, then `supervisorctl reread` and
               `supervisorctl update` (both part of the latency)
  pm2          add an app to ecosystem.config.json, then `pm2 startOrReload
               ecosystem.config.json` (part of the latency); it restarts
               every app, not only the new one
  pm2-only     the same edit, then `pm2 start ecosystem.config.json --only
               newI`: PM2's way to start one app and touch no other
  runit        create a service directory (by rename) in runsvdir's directory:
               runsvdir rescans it every 5 s; fewer edits (--runit-edits), kept
  s6           the same rename, then `s6-svscanctl -a` for an immediate scan
               (`-an` after renaming it out, to remove)
  horust       cannot reload: probed only (a service file added while it runs
               is not started; SIGHUP ends horust)

Also: whether the N existing workers kept their pids across all edits, and
the supervisor's CPU per edit (utime+stime from /proc/PID/stat, and the exact
run time from schedstat) from just before the write until it has gone quiet
after starting the new worker.

Reuses benches/compare.py (adapters, /proc helpers, subreaper cleanup): every
process the run starts is killed on exit, error, Ctrl-C or SIGTERM.

    bash benches/setup.sh && python3 benches/reload.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare as C  # noqa: E402  (benches/compare.py: adapters and /proc helpers)
from compare import Failed, log, read_stat, table, workers_in  # noqa: E402

REPO = HERE.parent
SLEEP = C.SLEEP
ALL_SYSTEMS = ["drover", "supervisord", "pm2", "pm2-only", "runit", "s6", "horust"]
STYLES = ["in-place", "rename"]

# The marker program: takes the time first thing, writes "SECONDS.NANOS PID"
# to MARKER (through a rename, so a reader never sees half of it), then execs
# the rest of its arguments. Built static (no dynamic loader at exec).
STAMP_RS = r"""
use std::os::unix::process::CommandExt;
use std::time::{SystemTime, UNIX_EPOCH};
fn main() {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut a = std::env::args_os().skip(1);
    let marker = a.next().expect("usage: stamp MARKER [CMD ARGS...]");
    let mut tmp = marker.clone();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{}.{:09} {}\n", t.as_secs(), t.subsec_nanos(), std::process::id())).unwrap();
    std::fs::rename(&tmp, &marker).unwrap();
    if let Some(cmd) = a.next() {
        let e = std::process::Command::new(cmd).args(a).exec();
        eprintln!("stamp: exec: {e}");
        std::process::exit(127);
    }
}
"""


def build_stamp(builddir: Path) -> Path:
    rustc = shutil.which("rustc")
    if not rustc:
        raise SystemExit("rustc not found: it builds the marker program (or use --marker sh)")
    src, out = builddir / "stamp.rs", builddir / "stamp"
    src.write_text(STAMP_RS)
    base = [rustc, "-O", "--edition", "2021", "-C", "panic=abort", "-C", "strip=symbols"]
    r = subprocess.run([*base, "-C", "target-feature=+crt-static", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:  # no static glibc: a dynamic one is fine, a little slower to exec
        log("stamp: static link failed, building it dynamic")
        r = subprocess.run([*base, "-o", str(out), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit("rustc failed on the marker program:\n" + r.stderr)
    return out


class Marker:
    """How a new worker records the moment it started."""

    def __init__(self, kind: str, stamp: Path | None):
        self.kind, self.stamp = kind, stamp

    def argv(self, marker: Path) -> list[str]:
        if self.kind == "stamp":
            return [str(self.stamp), str(marker), SLEEP, *C.WORKER_ARGS]
        return ["/bin/sh", "-c", f'echo "$(date +%s.%N) $$" > {marker}; exec {SLEEP} {" ".join(C.WORKER_ARGS)}']


def read_marker(path: Path):
    """(time in ns since the epoch, pid) or None if not (completely) written yet."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):
        return None
    try:
        ts, pid = text.split()
        sec, _, frac = ts.partition(".")
        return int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9]), int(pid)
    except ValueError:
        return None


def wait_marker(path: Path, deadline_s: float):
    deadline = time.monotonic() + deadline_s
    while True:
        m = read_marker(path)
        if m is not None:
            return m
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)


def write_file(path: Path, text: str, style: str) -> None:
    """A write in place (truncate and write the same inode) or an editor's
    atomic save (write a temp file beside it, rename it over the file)."""
    if style == "in-place":
        with open(path, "w") as f:
            f.write(text)
    else:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, path)


# --------------------------------------------------------------------------
# CPU of the supervisor's processes


def cpu(sups: set[int]) -> tuple[int, int]:
    """(utime+stime ticks, schedstat ns) summed over the supervisor processes."""
    ticks = ns = 0
    for p in sups:
        st = read_stat(p)
        if st is not None:
            ticks += st[3]
        ns += C.task_counters(p)[0]
    return ticks, ns


def wait_quiet(sups: set[int], quiet_s: float = 0.03, limit_s: float = 5.0) -> bool:
    """Wait until the supervisor has used no CPU for quiet_s (it has finished
    handling the edit and gone back to sleep). False if it never did."""
    deadline = time.monotonic() + limit_s
    last = sum(C.task_counters(p)[0] for p in sups)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.005)
        now = sum(C.task_counters(p)[0] for p in sups)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return True
    return False


def wait_workers(s, want: int, deadline_s: float, gone: int | None = None) -> list[int]:
    """Wait until exactly `want` workers run (and pid `gone` is not one of them)."""
    deadline = time.monotonic() + deadline_s
    while True:
        tab = table()
        ws = workers_in(tab, s.supervisors(tab))
        if len(ws) == want and (gone is None or gone not in ws):
            return ws
        if time.monotonic() > deadline:
            raise Failed(f"{len(ws)} workers running, {want} expected, after {deadline_s:.0f}s")
        time.sleep(0.005)


# --------------------------------------------------------------------------
# Adapters: compare.py's, with N distinct workers and an add/remove edit


class ReloadMixin:
    how = "?"
    removes = True  # False: each edit adds one more worker (runit)

    def pause(self, opts) -> float:
        """Seconds to wait before an edit."""
        return opts.gap

    def new_name(self, i: int) -> str:
        return f"new{i}"

    def marker_path(self, i: int) -> Path:
        return self.tmp / "markers" / f"new{i}"

    def setup(self, n: int, tmp: Path, marker: Marker) -> None:
        self.marker = marker
        (tmp / "markers").mkdir(parents=True)
        self.prepare(n, tmp)

    def add(self, i: int, style: str) -> dict:
        """Write the config with worker i added and do whatever the system
        needs to apply it; timing of any commands is returned."""
        raise NotImplementedError

    def remove(self, i: int, style: str) -> dict:
        raise NotImplementedError


def run_cmd(s, argv: list[str], timings: dict, key: str) -> None:
    """Run a client command; its wall time goes in timings[key], its CPU
    (from the rusage of the children the harness waited for) in client_cpu_ms."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = s.run(argv, timeout=120)
    timings[key] = (time.perf_counter() - t0) * 1000.0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    timings["client_cpu_ms"] = timings.get("client_cpu_ms", 0.0) + 1000.0 * (
        ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime)
    if r.returncode != 0:
        raise Failed(f"{Path(argv[0]).name} {' '.join(a for a in argv[1:] if not a.startswith('/'))}: "
                     f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}")
    timings.setdefault("_out", []).append(r.stdout.strip()[-300:])


class DroverR(ReloadMixin, C.Drover):
    how = "watcher (no command)"

    def prepare(self, n, tmp):
        C.System.prepare(self, n, tmp)
        self.bin = str(getattr(self.opts, "drover_frozen", None) or Path(self.opts.drover).resolve())
        self.cfg = tmp / "daemon.toml"
        self.extra: list[int] = []
        self.cfg.write_text(self.render())

    def render(self) -> str:
        deb = f'debounce = "{self.opts.debounce}"\n' if self.opts.debounce else ""
        out = [
            "[supervisor]\n"
            f'state_dir = "{self.tmp / "state"}"\n'
            "reload = true\n" + deb + "\n"
            "[defaults]\n"
            'stop_grace = "5s"\n'
        ]
        for i in range(self.n):
            out.append(f'\n[workers.w{i}]\ncommand = ["{SLEEP}", "{C.WORKER_ARGS[0]}"]\n')
        for i in self.extra:
            argv = ", ".join(json.dumps(a) for a in self.marker.argv(self.marker_path(i)))
            out.append(f"\n[workers.{self.new_name(i)}]\ncommand = [{argv}]\n")
        return "".join(out)

    def add(self, i, style):
        self.extra = [i]
        write_file(self.cfg, self.render(), style)
        return {}

    def remove(self, i, style):
        self.extra = []
        write_file(self.cfg, self.render(), style)
        return {}

    def status(self) -> dict:
        r = self.run([self.bin, "-c", str(self.cfg), "status", "--json"])
        if r.returncode != 0:
            raise Failed(f"status --json exit {r.returncode}: {r.stderr.strip()[:200]}")
        return json.loads(r.stdout)

    @staticmethod
    def pids_of(doc: dict) -> dict[str, list]:
        return {w["name"]: sorted((i["index"], i.get("pid"), i.get("state"), i.get("restarts"))
                                  for i in w["instances"]) for w in doc["workers"]}


class SupervisordR(ReloadMixin, C.Supervisord):
    how = "`supervisorctl reread` + `supervisorctl update`"

    def prepare(self, n, tmp):
        C.System.prepare(self, n, tmp)
        (tmp / "logs").mkdir()
        self.conf = tmp / "supervisord.conf"
        self.extra: list[int] = []
        self.conf.write_text(self.render())

    def program(self, name: str, argv: list[str]) -> str:
        return (f"\n[program:{name}]\ncommand={' '.join(argv)}\nautostart=true\nautorestart=true\n"
                "startsecs=0\nstartretries=1000000\nstopwaitsecs=5\n"
                "stdout_logfile=NONE\nstderr_logfile=NONE\n")

    def render(self) -> str:
        tmp, n = self.tmp, self.n
        out = [C.supervisord_header(tmp, n)]
        for i in range(n):
            out.append(self.program(f"w{i}", [SLEEP, *C.WORKER_ARGS]))
        for i in self.extra:
            if self.marker.kind != "stamp":
                raise Failed("supervisord needs --marker stamp (its command= is not a shell)")
            out.append(self.program(self.new_name(i), self.marker.argv(self.marker_path(i))))
        return "".join(out)

    def ctl(self, *args) -> list[str]:
        return [self._script("supervisorctl"), "-c", str(self.conf), *args]

    def add(self, i, style):
        self.extra = [i]
        write_file(self.conf, self.render(), style)
        t: dict = {}
        run_cmd(self, self.ctl("reread"), t, "reread_ms")
        run_cmd(self, self.ctl("update"), t, "update_ms")
        return t

    def remove(self, i, style):
        self.extra = []
        write_file(self.conf, self.render(), style)
        t: dict = {}
        run_cmd(self, self.ctl("reread"), t, "reread_ms")
        run_cmd(self, self.ctl("update"), t, "update_ms")
        return t


class Pm2R(ReloadMixin, C.Pm2):
    how = "`pm2 startOrReload ecosystem.config.json`"

    def prepare(self, n, tmp):
        C.System.prepare(self, n, tmp)
        self.eco = tmp / "ecosystem.config.json"
        self.extra: list[int] = []
        self.eco.write_text(self.render())

    @staticmethod
    def app(name: str, argv: list[str]) -> dict:
        return {
            "name": name,
            "script": argv[0],
            "args": argv[1:],
            "interpreter": "none",
            "exec_mode": "fork",
            "autorestart": True,
            "restart_delay": 0,
            "min_uptime": 100,
            "max_restarts": 1000000,
            "kill_timeout": 5000,
            "out_file": "/dev/null",
            "error_file": "/dev/null",
        }

    def render(self) -> str:
        apps = [self.app(f"w{i}", [SLEEP, *C.WORKER_ARGS]) for i in range(self.n)]
        apps += [self.app(self.new_name(i), self.marker.argv(self.marker_path(i))) for i in self.extra]
        return json.dumps({"apps": apps}, indent=1)

    def add(self, i, style):
        self.extra = [i]
        write_file(self.eco, self.render(), style)
        t: dict = {}
        run_cmd(self, [str(self.PM2), "startOrReload", str(self.eco)], t, "startOrReload_ms")
        return t

    def remove(self, i, style):
        # startOrReload never deletes an app that left the file: `pm2 delete` does
        self.extra = []
        write_file(self.eco, self.render(), style)
        t: dict = {}
        run_cmd(self, [str(self.PM2), "delete", self.new_name(i)], t, "delete_ms")
        return t


class Pm2OnlyR(Pm2R):
    # name stays "pm2": compare.py's check_alive lets the `pm2 start` client exit
    how = "`pm2 start ecosystem.config.json --only newI`"

    def add(self, i, style):
        self.extra = [i]
        write_file(self.eco, self.render(), style)
        t: dict = {}
        run_cmd(self, [str(self.PM2), "start", str(self.eco), "--only", self.new_name(i)], t, "start_only_ms")
        return t


class RunitR(ReloadMixin, C.Runit):
    how = "service dir renamed into runsvdir's directory (rescanned every 5 s)"
    removes = False
    rng = random.Random(5)  # seeded: the same pauses in every run

    def pause(self, opts):
        # Edits in quick succession find runsvdir rescanning every second;
        # after 5 s without one it is back to its 5 s period. 5 s plus a random
        # part puts each edit at a random point of that period.
        return 5.0 + self.rng.uniform(0.0, 5.0)

    def setup(self, n, tmp, marker):
        super().setup(n, tmp, marker)
        (tmp / "staging").mkdir()

    def add(self, i, style):
        # runit's convention: build the service directory elsewhere, then
        # rename it into the scanned directory in one step
        d = self.tmp / "staging" / self.new_name(i)
        d.mkdir()
        argv = self.marker.argv(self.marker_path(i))
        run = d / "run"
        run.write_text("#!/bin/sh\nexec " + shlex.join(argv) + "\n")
        run.chmod(0o755)
        os.rename(d, self.svdir / self.new_name(i))
        return {}


class S6R(ReloadMixin, C.S6):
    how = "service dir renamed into the scan directory, then `s6-svscanctl -a` (`-an` to remove)"

    def setup(self, n, tmp, marker):
        super().setup(n, tmp, marker)
        (tmp / "staging").mkdir()
        (tmp / "removed").mkdir()

    def add(self, i, style):
        # s6's convention, as runit's: the service directory is built
        # elsewhere and renamed in; -a makes s6-svscan scan at once.
        d = self.tmp / "staging" / self.new_name(i)
        d.mkdir()
        run = d / "run"
        run.write_text("#!/bin/sh\nexec " + shlex.join(self.marker.argv(self.marker_path(i))) + "\n")
        run.chmod(0o755)
        os.rename(d, self.scandir / self.new_name(i))
        t: dict = {}
        run_cmd(self, ["s6-svscanctl", "-a", str(self.scandir)], t, "svscanctl_ms")
        return t

    def remove(self, i, style):
        # -n: the s6-supervise of a directory that is gone brings its service down and exits.
        os.rename(self.scandir / self.new_name(i), self.tmp / "removed" / self.new_name(i))
        t: dict = {}
        run_cmd(self, ["s6-svscanctl", "-an", str(self.scandir)], t, "svscanctl_ms")
        return t


ADAPTERS = {"drover": DroverR, "supervisord": SupervisordR, "pm2": Pm2R, "pm2-only": Pm2OnlyR, "runit": RunitR, "s6": S6R}


# --------------------------------------------------------------------------
# Measurement


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def summary(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {"n": len(xs), "median_ms": statistics.median(xs), "p99_ms": pct(xs, 99),
            "max_ms": max(xs), "min_ms": min(xs), "mean_ms": statistics.fmean(xs)}


def background_busy(seconds: float) -> float:
    """Share of all cores busy over `seconds` (the measured system idle)."""
    m0 = C.machine_busy()
    time.sleep(seconds)
    m1 = C.machine_busy()
    return (m1[0] - m0[0]) / max(1, m1[1] - m0[1])


def run_edits(s, n: int, edits: int, opts, res: dict) -> None:
    tab, sups = C.current(s)
    base = set(workers_in(tab, sups))
    if len(base) != n:
        raise Failed(f"{len(base)}/{n} workers running before the edits")
    res["pids_before"] = len(base)
    rows = res["edits"]
    total0 = cpu(sups)
    for i in range(edits):
        style = STYLES[i % 2] if s.removes else "dir"
        time.sleep(s.pause(opts))
        tab, sups = C.current(s)
        before = set(workers_in(tab, sups))
        marker = s.marker_path(i)
        c0 = cpu(sups)
        b0 = C.machine_busy()
        t0 = time.time_ns()
        timings = s.add(i, style)
        m = wait_marker(marker, opts.deadline)
        if m is None:
            raise Failed(f"edit {i} ({style}): the new worker did not start within {opts.deadline:.0f}s")
        lat = (m[0] - t0) / 1e6
        b1 = C.machine_busy()
        want = n + 1 if s.removes else n + i + 1
        ws = wait_workers(s, want, opts.deadline)
        quiet = wait_quiet(sups)
        c1 = cpu(C.current(s)[1])  # with any process the edit added (runit: its runsv)
        changed = len(before - set(ws))
        row = {"i": i, "style": style, "ms": lat, "cpu_ticks": c1[0] - c0[0], "cpu_ns": c1[1] - c0[1],
               "quiet": quiet, "existing_changed": changed,
               # all cores, from the write until the harness saw the marker
               "machine_busy": (b1[0] - b0[0]) / max(1, b1[1] - b0[1]),
               **{k: v for k, v in timings.items() if not k.startswith("_")}}
        rows.append(row)
        extra = "".join(f" {k[:-3]} {v:.0f} ms" for k, v in timings.items() if k.endswith("_ms"))
        log(f"  {res['system']} edit {i:3d} {style:8s} {lat:8.1f} ms  cpu {row['cpu_ns'] / 1e6:6.2f} ms"
            f"  existing pids changed: {changed}{extra}")
        if i % 10 == 0:
            res["busy_builders"] = sorted(set(res["busy_builders"]) | set(C.busy_builders()))
        if s.removes:
            r0 = cpu(sups)
            rt = s.remove(i, style)
            wait_workers(s, n, opts.deadline, gone=m[1])
            wait_quiet(sups)
            r1 = cpu(sups)
            row["remove_cpu_ns"] = r1[1] - r0[1]
            row.update({f"remove_{k}": v for k, v in rt.items() if not k.startswith("_")})
    tab, sups = C.current(s)
    total1 = cpu(sups)
    after = set(workers_in(tab, sups))
    res["pids_kept"] = len(base & after)
    # the whole loop, adds and removals (and the gaps between them)
    res["cpu_total"] = {"ticks": total1[0] - total0[0], "ns": total1[1] - total0[1],
                        "edits": len(rows), "reloads": len(rows) * (2 if s.removes else 1)}


def probe_horust(opts, res: dict, n: int) -> None:
    """horust reads its services once, at start: show it rather than say it."""
    s = C.Horust(opts)
    why = s.available()
    if why:
        res["errors"]["*"] = why
        return
    res["version"] = s.versions()
    tmp = Path(tempfile.mkdtemp(prefix="drover-reload-horust-"))
    try:
        s.prepare(n, tmp)
        (tmp / "markers").mkdir()
        time.sleep(0.2)
        C.measure_start(s, n, 30 + n * 0.1)
        marker = tmp / "markers" / "new0"
        argv = Marker(opts.marker, opts.stamp).argv(marker)
        (s.sdir / "new0.toml").write_text("command = " + json.dumps(shlex.join(argv)) + "\n")
        found = wait_marker(marker, opts.horust_wait)
        res["metrics"]["new_service_started"] = found is not None
        res["metrics"]["waited_s"] = opts.horust_wait
        log(f"  horust: service file added, started within {opts.horust_wait:.0f}s: {found is not None}")
        os.kill(s.proc.pid, signal.SIGHUP)
        try:
            s.proc.wait(timeout=3)
            rc = s.proc.returncode
            res["metrics"]["sighup"] = (f"horust is killed by it (signal {-rc}, no handler)" if rc < 0
                                        else f"horust exits ({rc})")
        except subprocess.TimeoutExpired:
            found = wait_marker(marker, 3)
            res["metrics"]["sighup"] = "horust kept running" + (", started the new service" if found else "")
        tab = table()
        orphans = [p for p, st in tab.items() if st[2] == C.ME and C.is_worker(st)]
        res["metrics"]["orphans_after_sighup"] = len(orphans)
        log(f"  horust: SIGHUP: {res['metrics']['sighup']}; workers left orphaned: {len(orphans)}")
    except Failed as e:
        res["errors"]["*"] = str(e)
    finally:
        killed = C.kill_everything()
        if killed:
            res["killed_at_cleanup"] = len(killed)
        C.forget_own()
        shutil.rmtree(tmp, ignore_errors=True)


def run_system(name: str, n: int, opts, results: list[dict]) -> None:
    res: dict = {"system": name, "n": n, "metrics": {}, "errors": {}, "edits": [], "busy_builders": []}
    results.append(res)
    if name == "horust":
        probe_horust(opts, res, n)
        return
    s = ADAPTERS[name](opts)
    res["how"] = s.how
    why = s.available()
    if why:
        res["errors"]["*"] = why
        return
    res["version"] = s.versions()
    res["busy_builders"] = C.busy_builders()
    edits = opts.runit_edits if name == "runit" else opts.edits
    tmp = Path(tempfile.mkdtemp(prefix=f"drover-reload-{name}-"))
    try:
        s.setup(n, tmp, Marker(opts.marker, opts.stamp))
        time.sleep(1.1)  # runsvdir ignores a directory modified within the current second
        start = C.measure_start(s, n, 30 + n * 0.1)
        log(f"  {name}: {n} workers running after {start:.3f} s")
        if s.proc is not None and name.startswith("pm2"):
            s.proc.wait(timeout=60)  # the `pm2 start` client
        time.sleep(opts.settle)
        res["background_busy"] = background_busy(2.0)
        res["loadavg_1m"] = [C.loadavg()]
        doc0 = s.status() if name == "drover" else None
        t_start = time.monotonic()
        try:
            run_edits(s, n, edits, opts, res)
        except Failed as e:
            res["errors"]["*"] = str(e)
            log(f"  {name}: error: {e}")
        res["seconds"] = time.monotonic() - t_start
        res["loadavg_1m"].append(C.loadavg())
        if name == "drover" and "*" not in res["errors"]:
            doc1 = s.status()
            p0, p1 = s.pids_of(doc0), s.pids_of(doc1)
            same = sum(1 for w, v in p0.items() if p1.get(w) == v)
            res["status_check"] = {
                "workers_before": len(p0), "unchanged_after": same,
                "generation_before": doc0["supervisor"]["generation"],
                "generation_after": doc1["supervisor"]["generation"],
                "last_reload": doc1["supervisor"].get("last_reload"),
            }
            log(f"  drover: status --json: {same}/{len(p0)} workers with the same pid, state and restarts; "
                f"generation {doc0['supervisor']['generation']} -> {doc1['supervisor']['generation']}")
        res["busy_builders"] = sorted(set(res["busy_builders"]) | set(C.busy_builders()))
    except Failed as e:
        res["errors"]["*"] = str(e)
    except Exception as e:
        res["errors"]["*"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    except KeyboardInterrupt:
        res["interrupted"] = True
        raise
    finally:
        if "*" in res["errors"] and s.log_tail():
            res["log_tail"] = s.log_tail(5)
        killed = C.kill_everything()
        if killed:
            res["killed_at_cleanup"] = len(killed)
        C.forget_own()
        shutil.rmtree(tmp, ignore_errors=True)
    lat = [e["ms"] for e in res["edits"]]
    res["metrics"]["latency"] = summary(lat)
    for st in STYLES:
        res["metrics"][f"latency_{st}"] = summary([e["ms"] for e in res["edits"] if e["style"] == st])
    if res["edits"]:
        k = len(res["edits"])
        res["metrics"]["cpu_ticks_ms_per_edit"] = sum(e["cpu_ticks"] for e in res["edits"]) * 1000.0 / C.CLK_TCK / k
        res["metrics"]["cpu_sched_ms_per_edit"] = sum(e["cpu_ns"] for e in res["edits"]) / 1e6 / k
        mb = [e["machine_busy"] for e in res["edits"]]
        res["metrics"]["machine_busy_median"] = statistics.median(mb)
        res["metrics"]["machine_busy_max"] = max(mb)
        res["metrics"]["edits_not_quiet"] = sum(1 for e in res["edits"] if not e["quiet"])
        res["metrics"]["edits_changing_existing"] = sum(1 for e in res["edits"] if e["existing_changed"])
        res["metrics"]["max_existing_changed"] = max(e["existing_changed"] for e in res["edits"])
        rm = [e["remove_cpu_ns"] for e in res["edits"] if "remove_cpu_ns" in e]
        if rm:
            res["metrics"]["remove_cpu_sched_ms_per_edit"] = sum(rm) / 1e6 / len(rm)
        cl = [e["client_cpu_ms"] for e in res["edits"] if "client_cpu_ms" in e]
        if cl:
            res["metrics"]["client_cpu_ms_per_edit"] = sum(cl) / len(cl)
        for key in ("reread_ms", "update_ms", "startOrReload_ms", "start_only_ms"):
            xs = [e[key] for e in res["edits"] if key in e]
            if xs:
                res["metrics"][key] = statistics.median(xs)


def marker_overhead(opts, runs: int = 50) -> dict:
    """Spawn→timestamp of the marker commands themselves, spawned from here
    (posix_spawn, then the program takes the time): the part of every
    latency figure that is the marker's own start-up, not the supervisor's."""
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="drover-reload-marker-"))
    try:
        m = tmp / "m"
        cases = {"sh -c 'date +%s.%N'": ["/bin/sh", "-c", f'echo "$(date +%s.%N) $$" > {m}']}
        if opts.stamp:
            cases = {"stamp (static)": [str(opts.stamp), str(m)], **cases}
        xs: dict[str, list[float]] = {label: [] for label in cases}
        for _ in range(runs):  # interleaved, so that background noise hits both alike
            for label, argv in cases.items():
                m.unlink(missing_ok=True)
                t0 = time.time_ns()
                pid = os.posix_spawn(argv[0], argv, os.environ)
                os.waitpid(pid, 0)
                r = read_marker(m)
                if r is not None:
                    xs[label].append((r[0] - t0) / 1e6)
        out = {label: summary(v) for label, v in xs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------
# Report


def fmt_ms(v) -> str:
    if v is None:
        return "—"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render(results: list[dict], meta: dict) -> str:
    rs = {r["system"]: r for r in results}
    systems = [s for s in ALL_SYSTEMS if s in rs]
    n = results[0]["n"] if results else "?"
    out = ["# drover vs peers: hot reload benchmark", ""]
    cmd = " ".join(["python3 benches/reload.py", *meta["argv"]])
    out.append(f"Run {meta['date']} on {meta['machine']}: `{cmd}`.")
    out.append("")
    if meta.get("interrupted"):
        out += ["**Interrupted: partial results.**", ""]
    out.append(f"Adding one worker with N = {n} running: latency from just before the config file is "
               "written until the new worker's first instruction (its marker), including any command "
               "the system needs to apply the change.")
    out.append("")

    def lat(r, key, field):
        return r["metrics"].get(key, {}).get(field)

    def cell(r, row):
        if "*" in r["errors"] and not r["edits"]:
            return "error: " + C.short(r["errors"]["*"])
        m = r["metrics"]
        if r["system"] == "horust":
            return {"how": "cannot reload", "edits": "—"}.get(row, "—")
        if row == "how":
            return r.get("how", "?")
        if row == "edits":
            return str(len(r["edits"]))
        if row in ("median", "p99", "max", "min"):
            return fmt_ms(lat(r, "latency", f"{row}_ms"))
        if row == "kept":
            if "pids_kept" not in r:
                return "—"
            ch = m.get("edits_changing_existing", 0)
            txt = f"{r['pids_kept']}/{r['pids_before']}"
            if ch:
                txt += f" (changed by {ch} edits, up to {m['max_existing_changed']} each)"
            return txt
        if row == "cpu_ticks":
            v = m.get("cpu_ticks_ms_per_edit")
            return "—" if v is None else f"{v:.1f} ms"
        if row == "cpu_sched":
            v = m.get("cpu_sched_ms_per_edit")
            return "—" if v is None else f"{v:.2f} ms"
        if row == "cmd":
            names = {"reread_ms": "reread", "update_ms": "update", "startOrReload_ms": "startOrReload",
                     "start_only_ms": "start --only"}
            parts = [f"{names[k]} {fmt_ms(m[k])}" for k in names if k in m]
            return ", ".join(parts) if parts else "none"
        if row == "busy":
            if "machine_busy_median" not in m:
                return "—"
            return f"{m['machine_busy_median'] * 100:.0f}% / {m['machine_busy_max'] * 100:.0f}%"
        if row == "cpu_client":
            v = m.get("client_cpu_ms_per_edit")
            return "none" if v is None else f"{v:.0f} ms"
        return "?"

    rows = [
        ("how", "how the change is applied"),
        ("edits", "edits measured"),
        ("median", "latency, median"),
        ("p99", "latency, p99"),
        ("max", "latency, max"),
        ("min", "latency, min"),
        ("cmd", "of which the commands (median)"),
        ("kept", "existing workers with the same pid after all edits"),
        ("cpu_ticks", "supervisor CPU per edit (utime+stime)"),
        ("cpu_sched", "supervisor CPU per edit (schedstat)"),
        ("cpu_client", "CPU of the commands per edit"),
        ("busy", "machine busy during an edit, median / max"),
    ]
    peers = [p for p in ("supervisord", "pm2", "pm2-only") if p in rs]
    head = ["", *systems, *(f"drover/{p}" for p in peers)]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for row, label in rows:
        cells = [md_escape(cell(rs[s], row)) for s in systems]
        ratios = []
        for peer in peers:
            txt = "—"
            if row in ("median", "p99", "max") and "drover" in rs and peer in rs:
                d, p = lat(rs["drover"], "latency", f"{row}_ms"), lat(rs[peer], "latency", f"{row}_ms")
                if d is not None and p:
                    txt = f"{d / p:.2f}x"
            ratios.append(txt)
        out.append("| " + " | ".join([label, *cells, *ratios]) + " |")
    out.append("")

    d = rs.get("drover")
    if d and d["edits"]:
        out.append("### drover by edit style")
        out.append("")
        out.append("| edit | edits | median | p99 | max | min |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for label, key in (("both", "latency"), ("write in place", "latency_in-place"),
                           ("atomic rename", "latency_rename")):
            v = d["metrics"].get(key, {})
            out.append(f"| {label} | {v.get('n', 0)} | {fmt_ms(v.get('median_ms'))} | {fmt_ms(v.get('p99_ms'))} "
                       f"| {fmt_ms(v.get('max_ms'))} | {fmt_ms(v.get('min_ms'))} |")
        out.append("")
        m = d["metrics"]
        deb = meta.get("debounce") or "50ms (default)"
        p50, p99 = lat(d, "latency", "median_ms"), lat(d, "latency", "p99_ms")
        ok = lambda v, lim: "met" if v is not None and v < lim else "NOT met"  # noqa: E731
        out.append(f"Targets (issue 4, debounce {deb}): p50 under 60 ms: {ok(p50, 60)} ({fmt_ms(p50)}); "
                   f"p99 under 100 ms: {ok(p99, 100)} ({fmt_ms(p99)}).")
        out.append("")
        sc = d.get("status_check")
        if sc:
            out.append(f"`drover status --json` before and after the edits: {sc['unchanged_after']} of "
                       f"{sc['workers_before']} workers with the same pid, state and restart count; generation "
                       f"{sc['generation_before']} → {sc['generation_after']} (one per applied edit: "
                       f"{len(d['edits'])} adds + {len(d['edits'])} removals); last reload ok: "
                       f"{(sc.get('last_reload') or {}).get('ok')}.")
        tot = d.get("cpu_total")
        if tot and tot["reloads"]:
            ms = tot["ticks"] * 1000.0 / meta.get("clk_tck", 100)
            out.append(f"drover CPU across the whole edit loop ({tot['edits']} adds and {tot['edits']} removals, "
                       f"{tot['reloads']} reloads): {ms:.0f} ms utime+stime, {ms / tot['reloads']:.2f} ms per "
                       f"reload ({tot['ns'] / 1e6 / tot['reloads']:.2f} ms by schedstat); per add alone, in "
                       f"its own window: {m.get('cpu_sched_ms_per_edit', 0):.2f} ms, per removal "
                       f"{m.get('remove_cpu_sched_ms_per_edit', 0):.2f} ms (schedstat).")
        if m.get("edits_not_quiet"):
            out.append(f"{m['edits_not_quiet']} edits did not go quiet within 5 s (their CPU window is cut there).")
        out.append("")

    mo = meta.get("marker_overhead")
    if mo:
        out.append(f"Marker: `{meta.get('marker')}`. Its own start-up, spawned from the harness "
                   "(spawn → its timestamp, 50 runs; part of every latency above):")
        out.append("")
        out.append("| marker | median | min | max |")
        out.append("|---|---:|---:|---:|")
        for label, v in mo.items():
            out.append(f"| {label} | {fmt_ms(v.get('median_ms'))} | {fmt_ms(v.get('min_ms'))} "
                       f"| {fmt_ms(v.get('max_ms'))} |")
        out.append("")

    h = rs.get("horust")
    if h and h["metrics"]:
        hm = h["metrics"]
        out.append(f"horust: a service file added to its services directory with N running was "
                   f"{'started' if hm.get('new_service_started') else 'not started'} within "
                   f"{hm.get('waited_s', 0):.0f} s; it has no reload command, and on SIGHUP: "
                   f"{hm.get('sighup')} ({hm.get('orphans_after_sighup', 0)} workers left orphaned).")
        out.append("")

    errs = [(s_, k, e) for s_ in systems for k, e in rs[s_]["errors"].items()]
    if errs:
        out.append("Errors:")
        out.append("")
        for s_, k, e in errs:
            out.append(f"- {s_}: {md_escape(' '.join(e.split()))}")
        out.append("")
    noisy = [(r["system"], r["busy_builders"]) for r in results if r.get("busy_builders")]
    bg = [r["background_busy"] for r in results if "background_busy" in r]
    note = f"Machine busy in a 2 s idle window before each system's edits: up to {max(bg) * 100:.0f}% of " \
           f"{os.cpu_count()} cores." if bg else ""
    if noisy:
        quiet = [r["system"] for r in results if r["edits"] and not r.get("busy_builders")]
        out.append("Noisy: a build was running during part of this run (" + "; ".join(
            f"{', '.join(b)} seen during {name}'s edits" for name, b in noisy) +
            (f"; none seen during {', '.join(quiet)}'s" if quiet else "") +
            "; the machine-busy row shows how much of the CPU was taken). " + note)
    else:
        out.append(f"No compiler was seen running during these measurements. {note}")
    out.append("")
    out.append("Versions: " + "; ".join(sorted({r["version"] for r in results if r.get("version")})) + ".")
    out.append("")
    out.append("How each figure is taken: benches/README.md, \"Hot reload\".")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="workers running while the edits are made")
    ap.add_argument("--edits", type=int, default=100, help="timed edits per system")
    ap.add_argument("--runit-edits", type=int, default=10, help="timed edits for runit (each waits for its 5 s scan)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated, from {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--out", default=str(HERE / "results" / "reload.md"),
                    help="markdown report (raw JSON goes beside it, .json)")
    ap.add_argument("--drover", default=str(REPO / "target" / "release" / "drover"))
    ap.add_argument("--debounce", help="set drover's debounce (default: leave it unset, i.e. 50ms)")
    ap.add_argument("--marker", choices=["stamp", "sh"], default="stamp",
                    help="stamp: a static program built with rustc; sh: sh -c 'date +%%s.%%N …' (drover, pm2 only)")
    ap.add_argument("--gap", type=float, default=0.1, help="pause between edits, seconds")
    ap.add_argument("--settle", type=float, default=1.0, help="pause after start, seconds")
    ap.add_argument("--deadline", type=float, default=30.0, help="per edit, seconds")
    ap.add_argument("--horust-wait", type=float, default=10.0, help="how long to wait for horust to pick up a new file")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: render the report of an earlier run's JSON")
    opts = ap.parse_args(argv)
    opts.systems = [s.strip() for s in opts.systems.split(",") if s.strip()]
    bad = [s for s in opts.systems if s not in ALL_SYSTEMS]
    if bad:
        ap.error(f"unknown system(s): {', '.join(bad)}")
    if opts.from_json:
        doc = json.loads(Path(opts.from_json).read_text())
        sys.stdout.write(render(doc["results"], doc["meta"]))
        return 0
    if sys.platform != "linux":
        ap.error("Linux only (reads /proc)")

    C.set_subreaper()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    results: list[dict] = []
    builddir = Path(tempfile.mkdtemp(prefix="drover-reload-build-"))
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "argv": sys.argv[1:] if argv is None else argv,
        "clk_tck": C.CLK_TCK,
        "debounce": opts.debounce,
        "marker": "stamp MARKER sleep 3600 (static Rust, embedded in reload.py)" if opts.marker == "stamp"
        else "sh -c 'echo \"$(date +%s.%N) $$\" > MARKER; exec sleep 3600'",
    }
    interrupted = False
    try:
        opts.stamp = build_stamp(builddir) if opts.marker == "stamp" else None
        drover = Path(opts.drover)
        if "drover" in opts.systems and drover.is_file():
            # the daemon and its status client must be the same build even if
            # target/ is rebuilt during the run
            opts.drover_frozen = builddir / "drover"
            shutil.copy2(drover, opts.drover_frozen)
            built = _dt.datetime.fromtimestamp(drover.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
            r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True)
            opts.drover_version = f"drover {drover} built {built} (repo at {r.stdout.strip() or '?'})"
        meta["marker_overhead"] = marker_overhead(opts)
        for label, v in meta["marker_overhead"].items():
            log(f"marker {label}: spawn -> timestamp median {v.get('median_ms', 0):.2f} ms")
        for name in opts.systems:
            log(f"{name} N={opts.n}")
            run_system(name, opts.n, opts, results)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        C.kill_everything()
        C.forget_own()
        shutil.rmtree(builddir, ignore_errors=True)

    meta["interrupted"] = interrupted
    md = render(results, meta)
    sys.stdout.write(md)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
