#!/usr/bin/env python3
"""What `/metrics` costs: drover (release build) supervising --workers
workers (default 1000, `sleep 3600` each) with `[supervisor] metrics` on.

1. Idle: the supervisor's CPU (user + system, /proc/PID/stat) over --idle
   seconds (default 10) with no scrape, --settle seconds (default 15) after
   every instance is up: metrics on must not add polling.
2. Scrapes: --scrapes sequential GETs of /metrics over TCP (default 200),
   each timed from connect to the last byte; the supervisor's CPU over all
   of them, per scrape; the size of one response.
3. Parallel: --clients threads (default 8, twice the connection cap)
   scraping in a loop for --secs seconds (default 5): answered, refused
   (closed unanswered over the cap), latency of the answered ones.

    cargo build --release
    python3 benches/metrics.py --out benches/results/metrics.md
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def get(port):
    """One scrape: (seconds, its body) or None when refused."""
    t0 = time.perf_counter()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
    except OSError:
        return None
    if not data.startswith(b"HTTP/1.1 200"):
        return None
    return time.perf_counter() - t0, data.split(b"\r\n\r\n", 1)[1]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def ms(x):
    return f"{x * 1000:.1f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--idle", type=float, default=10)
    ap.add_argument("--settle", type=float, default=15)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--secs", type=float, default=5)
    ap.add_argument("--drover", default=os.path.join(REPO, "target/release/drover"))
    ap.add_argument("--out")
    a = ap.parse_args()

    d = tempfile.mkdtemp(prefix="drover-metrics-bench-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = ["[supervisor]", "reload = false", f'metrics = "127.0.0.1:{port}"', ""]
    for i in range(a.workers):
        lines += [f"[workers.w{i:04}]", 'command = ["sleep", "3600"]', 'stop_grace = "2s"', ""]
    with open(os.path.join(d, "daemon.toml"), "w") as f:
        f.write("\n".join(lines))
    conf = ["-c", os.path.join(d, "daemon.toml")]
    subprocess.run([a.drover, *conf, "start", "--detach"], check=True, stdout=subprocess.DEVNULL)
    try:
        with open(os.path.join(d, ".drover/drover.lock")) as f:
            pid = int(f.read().strip())
        # Up: every instance reports a process.
        deadline = time.monotonic() + 60
        while True:
            r = get(port)
            if r and sum(1 for l in r[1].splitlines() if l.startswith(b"drover_instance_up{") and l.endswith(b" 1")) == a.workers:
                break
            if time.monotonic() > deadline:
                sys.exit("the workers did not all come up within 60 s")
            time.sleep(0.2)
        # Let the start-up settle (the state file's last writes, the
        # allocator's release) before idle is measured.
        time.sleep(a.settle)

        c0 = cpu_ms(pid)
        time.sleep(a.idle)
        idle = cpu_ms(pid) - c0

        times, size = [], 0
        c0 = cpu_ms(pid)
        for _ in range(a.scrapes):
            r = get(port)
            if r:
                times.append(r[0])
                size = len(r[1])
        per_scrape = (cpu_ms(pid) - c0) / max(1, len(times))

        # The same for `status --json` over the control socket, which
        # reads the same /proc files: what a scrape costs beside it.
        sock = os.path.join(d, ".drover/drover.sock")
        c0 = cpu_ms(pid)
        for _ in range(a.scrapes):
            with socket.socket(socket.AF_UNIX) as u:
                u.connect(sock)
                u.sendall(b'{"cmd":"status","name":null}\n')
                while u.recv(65536):
                    pass
        per_status = (cpu_ms(pid) - c0) / a.scrapes

        answered, refused, lock = [], [0], threading.Lock()
        stop = time.monotonic() + a.secs

        def client():
            while time.monotonic() < stop:
                r = get(port)
                with lock:
                    if r:
                        answered.append(r[0])
                    else:
                        refused[0] += 1

        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        subprocess.run([a.drover, *conf, "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)

    cores = os.cpu_count()
    out = [
        f"## `/metrics` with {a.workers} workers ({cores}-core machine, {time.strftime('%Y-%m-%d')})",
        "",
        "| measure | value |",
        "|---|---|",
        f"| supervisor CPU idle over {a.idle:g} s, metrics on, no scrape | {idle:.0f} ms |",
        f"| response size | {size / 1024:.0f} KiB ({a.workers * 5 + 6} samples) |",
        f"| {len(times)} sequential scrapes: p50 / p99 / max | {ms(pct(times, 0.5))} / {ms(pct(times, 0.99))} / {ms(max(times))} |",
        f"| supervisor CPU per scrape | {per_scrape:.1f} ms |",
        f"| supervisor CPU per `status --json` request, for comparison | {per_status:.1f} ms |",
        f"| {a.clients} clients for {a.secs:g} s: answered / closed over the cap | {len(answered)} / {refused[0]} |",
        f"| their latency: p50 / p99 | {ms(pct(answered, 0.5))} / {ms(pct(answered, 0.99))} |",
        "",
    ]
    text = "\n".join(out)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
