#!/usr/bin/env python3
"""The cost of cgroup containment: start and stop N workers with
`[supervisor] containment = "cgroup"` and with `"process-group"`.

Each run writes a config of N workers (`sleep 3600`), then times:

  start  from launching `drover -c daemon.toml start --detach` until it
         returns, which it does once every instance is up (drover's own
         "ready"); checked afterwards: N instances running, in the mode
         asked for
  stop   from launching `drover stop` until the supervisor process is gone
         (a pidfd, no polling), every instance stopped in parallel

and checks that nothing is left: no process of the run's directory and, in
cgroup mode, no cgroup of drover's. The median of --runs runs per mode is
reported; the modes alternate run by run, so a drift of the machine hits
both. Run as root on a host with cgroup2 (else cgroup mode cannot start).

    cargo build --release && sudo python3 benches/containment.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ["cgroup", "process-group"]


def config(n: int, mode: str) -> str:
    head = f'[supervisor]\nreload = false\ncontainment = "{mode}"\n'
    body = "".join(f'\n[workers.w{i}]\ncommand = ["sleep", "3600"]\nstop_grace = "5s"\n' for i in range(n))
    return head + body


def status(drover: str, root: Path) -> dict:
    out = subprocess.run([drover, "-c", "daemon.toml", "status", "--json"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.stdout.strip() else {}


def processes_of(root: Path) -> list[int]:
    """Live processes whose working directory is inside `root`."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{p}/cwd").startswith(str(root)):
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(p))
        except OSError:
            pass
    return found


def wait_gone(pid: int, limit: float) -> bool:
    """Waits for process `pid` (not our child) to exit, by its pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], limit)[0])
    finally:
        os.close(fd)


def one_run(drover: str, n: int, mode: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix="drover-containment-"))
    pid = None
    try:
        (root / "daemon.toml").write_text(config(n, mode))
        t0 = time.perf_counter()
        started = subprocess.run([drover, "-c", "daemon.toml", "start", "--detach"], cwd=root,
                                 capture_output=True, text=True, timeout=120)
        start_s = time.perf_counter() - t0
        if started.returncode != 0:
            raise RuntimeError(f"start --detach failed: {started.stderr}")
        v = status(drover, root)
        pid = v["supervisor"]["pid"]
        running = sum(i["state"] == "running" for w in v["workers"] for i in w["instances"])
        if running != n or v["supervisor"].get("containment") != mode:
            raise RuntimeError(f"{running}/{n} running, containment {v['supervisor'].get('containment')}")
        base = v["supervisor"].get("cgroup")
        cgroups = len([d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))]) if base else 0
        t1 = time.perf_counter()
        stopped = subprocess.run([drover, "-c", "daemon.toml", "stop"], cwd=root,
                                 capture_output=True, text=True, timeout=120)
        if stopped.returncode != 0 or not wait_gone(pid, 60):
            raise RuntimeError(f"stop failed: {stopped.stderr}")
        stop_s = time.perf_counter() - t1
        pid = None
        left = processes_of(root)
        if left or (base and os.path.exists(base)):
            raise RuntimeError(f"left behind: processes {left}, cgroup {base if base and os.path.exists(base) else None}")
        return {"start": start_s, "stop": stop_s, "cgroups": cgroups}
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in processes_of(root):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)


def ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drover", default=str(REPO / "target/release/drover"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benches/results/containment.md"))
    a = ap.parse_args()
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(a.runs):
        for mode in MODES:
            res = one_run(a.drover, a.n, mode)
            print(f"run {r + 1} {mode}: start {ms(res['start'])}, stop {ms(res['stop'])}, "
                  f"{res['cgroups']} cgroups", file=sys.stderr)
            results[mode].append(res)
    med = {m: {k: statistics.median(x[k] for x in results[m]) for k in ("start", "stop")} for m in MODES}
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join(["python3", "benches/containment.py", "--n", str(a.n), "--runs", str(a.runs)])
    lines = [
        "# Cost of cgroup containment: start and stop of workers",
        "",
        f"Run {when} on {os.cpu_count()} cores, Linux {platform.release()}: `{cmd}` (release build).",
        "",
        f"{a.n} workers (`sleep 3600`). Start: from launching `drover start --detach` until it returns "
        "(every instance up). Stop: from launching `drover stop` until the supervisor has exited "
        "(every instance stopped in parallel). Median of "
        f"{a.runs} runs per mode, the modes alternating.",
        "",
        "| containment | start, median | stop, median | start, each run | stop, each run | cgroups made |",
        "|---|---:|---:|---|---|---:|",
    ]
    for m in MODES:
        each = results[m]
        lines.append(
            f"| {m} | {ms(med[m]['start'])} | {ms(med[m]['stop'])} | "
            f"{', '.join(ms(x['start']) for x in each)} | {', '.join(ms(x['stop']) for x in each)} | "
            f"{each[0]['cgroups']} |"
        )
    d_start = med["cgroup"]["start"] - med["process-group"]["start"]
    d_stop = med["cgroup"]["stop"] - med["process-group"]["stop"]
    lines += [
        "",
        f"Cost of containment: start {d_start * 1000:+.0f} ms ({d_start / a.n * 1e6:+.0f} µs per instance), "
        f"stop {d_stop * 1000:+.0f} ms ({d_stop / a.n * 1e6:+.0f} µs per instance).",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
