#!/usr/bin/env python3
"""What readiness costs drover, measured on the release binary.

1. Probe cost: drover's CPU (utime + stime of its process, from
   /proc/PID/stat) over --secs seconds (default 20) while it supervises
   --workers workers (default 100, `sleep 3600`) that each have a tcp and an
   http probe every second (half with a tcp ready probe then an http health
   probe, half with a tcp health probe; a ready probe ends once it passes), against the same workers
   without probes. The listener is a separate process: its CPU is not
   counted. Goal: under 1% of one core.

2. Dependency chain: --chain workers (default 100) in 3 levels (a third
   each; level 2 depends on every worker of level 1, level 3 on level 2).
   Each worker prints "ready" after --delay seconds (default 0.2) and has a
   `log` ready probe on it. Time from `drover start` to every instance
   ready, against the sum of the probes' own latencies along the chain (3 x
   delay): what drover adds is the difference.

    cargo build --release && python3 benches/readiness.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (subreaper, clean-up)

DROVER = HERE.parent / "target" / "release" / "drover"
TICK = os.sysconf("SC_CLK_TCK")

LISTENER = """\
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
# The last run's closed probe connections may linger in TIME_WAIT.
socketserver.ThreadingTCPServer.allow_reuse_address = True
with socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), H) as s:
    s.serve_forever()
"""


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def status(tmp: Path) -> dict:
    r = subprocess.run([str(DROVER), "-c", "daemon.toml", "status", "--json"], cwd=tmp, capture_output=True,
                       text=True, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def all_running(tmp: Path, n: int) -> bool:
    v = status(tmp)
    insts = [i for w in v.get("workers", []) for i in w["instances"]]
    return len(insts) == n and all(i["state"] == "running" for i in insts)


def wait(what: str, cond, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def supervise(config: str, n: int, secs: float) -> float:
    """drover's CPU % of one core over `secs`, once all `n` instances run."""
    tmp = Path(tempfile.mkdtemp(prefix="readiness-"))
    try:
        (tmp / "daemon.toml").write_text(config)
        p = subprocess.Popen([str(DROVER), "-c", "daemon.toml", "start"], cwd=tmp, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        wait("all running", lambda: all_running(tmp, n))
        time.sleep(2)  # past start-up and the first probes
        c0, t0 = cpu_s(p.pid), time.monotonic()
        time.sleep(secs)
        c1, t1 = cpu_s(p.pid), time.monotonic()
        subprocess.run([str(DROVER), "-c", "daemon.toml", "stop"], cwd=tmp, capture_output=True, timeout=60)
        p.wait(timeout=60)
        return 100.0 * (c1 - c0) / (t1 - t0)
    finally:
        compare.kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)


def probe_cost(workers: int, secs: float) -> dict:
    port = 18500
    listener_dir = Path(tempfile.mkdtemp(prefix="listener-"))
    (listener_dir / "l.py").write_text(LISTENER)
    listener = subprocess.Popen([sys.executable, str(listener_dir / "l.py"), str(port)])
    try:
        wait("listener", lambda: _connects(port), 10)
        head = "[supervisor]\nreload = false\n"
        plain = head + "".join(f"[workers.w{i}]\ncommand = [\"sleep\", \"3600\"]\n" for i in range(2 * workers))
        probed = head
        for i in range(workers):
            probed += (f"[workers.h{i}]\ncommand = [\"sleep\", \"3600\"]\n"
                       f"ready = {{ tcp = \"127.0.0.1:{port}\" }}\n"
                       f"health = {{ http = \"http://127.0.0.1:{port}/\", interval = \"1s\" }}\n"
                       f"[workers.t{i}]\ncommand = [\"sleep\", \"3600\"]\n"
                       f"health = {{ tcp = \"127.0.0.1:{port}\", interval = \"1s\" }}\n")
        none = supervise(plain, 2 * workers, secs)
        # The clean-up after a run kills every child, the listener too.
        listener = subprocess.Popen([sys.executable, str(listener_dir / "l.py"), str(port)])
        wait("listener", lambda: _connects(port), 10)
        some = supervise(probed, 2 * workers, secs)
        return {"workers": 2 * workers, "probes": 2 * workers, "none_pct": none, "probed_pct": some}
    finally:
        listener.kill()
        listener.wait()
        shutil.rmtree(listener_dir, ignore_errors=True)


def _connects(port: int) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def chain(n: int, delay: float) -> dict:
    per = [n // 3, n // 3, n - 2 * (n // 3)]
    names = [[f"l{lvl}_{i}" for i in range(per[lvl])] for lvl in range(3)]
    cfg = "[supervisor]\nreload = false\n"
    cmd = f'["/bin/sh", "-c", "sleep {delay}; echo ready; exec sleep 3600"]'
    for lvl in range(3):
        for name in names[lvl]:
            cfg += f"[workers.{name}]\ncommand = {cmd}\nready = {{ log = \"ready\" }}\n"
            if lvl > 0:
                cfg += "depends_on = [" + ", ".join(f'"{d}"' for d in names[lvl - 1]) + "]\n"
    tmp = Path(tempfile.mkdtemp(prefix="chain-"))
    try:
        (tmp / "daemon.toml").write_text(cfg)
        t0 = time.monotonic()
        p = subprocess.Popen([str(DROVER), "-c", "daemon.toml", "start"], cwd=tmp, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        wait("the chain ready", lambda: all_running(tmp, n))
        took = time.monotonic() - t0
        subprocess.run([str(DROVER), "-c", "daemon.toml", "stop"], cwd=tmp, capture_output=True, timeout=60)
        p.wait(timeout=60)
        return {"workers": n, "levels": 3, "delay": delay, "took_s": took, "probe_sum_s": 3 * delay}
    finally:
        compare.kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--secs", type=float, default=20)
    ap.add_argument("--chain", type=int, default=100)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--runs", type=int, default=3, help="chain start-ups measured")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "readiness.md")
    o = ap.parse_args()
    compare.set_subreaper()
    cost = probe_cost(o.workers // 2, o.secs)
    runs = [chain(o.chain, o.delay) for _ in range(o.runs)]
    took = sorted(r["took_s"] for r in runs)
    text = (
        f"Measured {_dt.date.today()} on {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}), release build.\n\n"
        f"    python3 benches/readiness.py --workers {o.workers} --secs {o.secs:g} --chain {o.chain} "
        f"--delay {o.delay:g}\n\n"
        "| probe cost | drover CPU, % of one core |\n| --- | ---: |\n"
        f"| {cost['workers']} workers, no probes | {cost['none_pct']:.2f} |\n"
        f"| {cost['workers']} workers, {o.workers // 2} with an http health probe every 1 s, "
        f"{o.workers // 2} with a tcp one | {cost['probed_pct']:.2f} |\n"
        f"| difference: the probes | {cost['probed_pct'] - cost['none_pct']:.2f} |\n\n"
        "| dependency chain | seconds |\n| --- | ---: |\n"
        f"| {o.chain} workers in 3 levels, each ready {o.delay:g} s after its start: the probes' own latencies "
        f"along the chain | {3 * o.delay:.2f} |\n"
        f"| time to every instance ready (median of {o.runs}; min {took[0]:.2f}, max {took[-1]:.2f}) "
        f"| {took[len(took) // 2]:.2f} |\n"
        f"| what drover adds | {took[len(took) // 2] - 3 * o.delay:.2f} |\n"
    )
    o.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
