#!/usr/bin/env python3
"""What watching drover live costs it, measured on the release binary.

1. Restart storm with subscribers: --workers workers (default 1000) run
   `sleep 3600`; --subs followers (default 10) of `drover events -f --json`
   connect, each writing to a file; then a reload swaps every command for
   `sh -c 'printf . >> starts; sleep CRASH; exit 1'` (--crash-after, default
   1 s) with no backoff and no parking, so each worker crashes and restarts
   again and again (the file counts the starts). drover's CPU (utime + stime
   from /proc/PID/stat) over --secs seconds (default 30) from the reload, against the same storm with no
   follower. Then `drover stop`. Every follower must either have kept every
   event, or end with a `lagged` line: the followers connected while
   nothing happened, so the streams of those not dropped must be the same
   line for line, and each must be complete JSON.

2. Idle with --idle-workers workers (default 100, `sleep 3600`) for
   --idle-secs seconds (default 10): drover's CPU with no `drover top`
   (goal: 0 ms), then with one `drover top` open in an 80x24 tmux pane
   (goal: under 1% of one core), and the CPU of that `drover top`.

    cargo build --release && python3 benches/live.py
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
import readiness  # noqa: E402
from readiness import all_running, cpu_s, wait  # noqa: E402

DROVER = HERE.parent / "target" / "release" / "drover"
HEAD = "[supervisor]\nreload = false\n"
STORM_DEFAULTS = (
    "[defaults]\nrestart = \"always\"\nstop_grace = \"2s\"\n"
    "backoff = { initial = \"0s\", max = \"0s\", multiplier = 1.0 }\n"
    "crash_loop = { min_uptime = \"0s\", max_failures = 1000000 }\n"
)


def drover(tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(DROVER), "-c", "daemon.toml", *args], cwd=tmp, capture_output=True, text=True,
                          timeout=timeout)


def workers(n: int, command: str) -> str:
    return "".join(f"[workers.w{i}]\ncommand = {command}\n" for i in range(n))


def start(tmp: Path, config: str, n: int) -> subprocess.Popen:
    (tmp / "daemon.toml").write_text(config)
    p = subprocess.Popen([str(DROVER), "-c", "daemon.toml", "start"], cwd=tmp, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "DROVER_LOG": "warn"})
    wait(f"{n} instances running", lambda: all_running(tmp, n))
    return p


def stop(tmp: Path, p: subprocess.Popen) -> None:
    drover(tmp, "stop", timeout=180)
    p.wait(timeout=180)


def storm(n: int, subs: int, secs: float, crash_after: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="live-storm-"))
    try:
        p = start(tmp, HEAD + STORM_DEFAULTS + workers(n, '["sleep", "3600"]'), n)
        followers = []
        for k in range(subs):
            out = open(tmp / f"sub{k}.jsonl", "wb")
            followers.append((subprocess.Popen([str(DROVER), "-c", "daemon.toml", "events", "-f", "--json"],
                                               cwd=tmp, stdout=out, stderr=subprocess.DEVNULL), out))
        # Every follower has its first lines (the recent events) before
        # the storm begins.
        wait("the followers connected",
             lambda: all((tmp / f"sub{k}.jsonl").stat().st_size > 0 for k in range(subs)), 30)
        # Each start appends one byte: the count of starts, whoever watches.
        crash = f'["/bin/sh", "-c", "printf . >> {tmp}/starts; sleep {crash_after:g}; exit 1"]'
        (tmp / "daemon.toml").write_text(HEAD + STORM_DEFAULTS + workers(n, crash))
        c0, t0 = cpu_s(p.pid), time.monotonic()
        r = drover(tmp, "reload")
        if r.returncode != 0:
            raise RuntimeError(f"reload failed: {r.stderr}")
        time.sleep(max(0.0, secs - (time.monotonic() - t0)))
        c1, t1 = cpu_s(p.pid), time.monotonic()
        starts = (tmp / "starts").stat().st_size if (tmp / "starts").exists() else 0
        stop(tmp, p)
        codes = []
        for f, out in followers:
            try:
                codes.append(f.wait(timeout=60))
            except subprocess.TimeoutExpired:
                f.kill()
                codes.append(f.wait())
            out.close()
        streams = [(tmp / f"sub{k}.jsonl").read_bytes().splitlines() for k in range(subs)]
        lagged, whole, events = 0, [], []
        for lines in streams:
            parsed = [json.loads(line) for line in lines]  # every line is whole JSON
            events.append(len(parsed))
            if parsed and parsed[-1].get("kind") == "lagged":
                lagged += 1
            else:
                whole.append(lines)
        same = all(s == whole[0] for s in whole)
        if not same:
            longest = max(whole, key=len)
            for k, w in enumerate(whole):
                at = next((i for i, (a, b) in enumerate(zip(w, longest)) if a != b), min(len(w), len(longest)))
                print(f"follower {k}: {len(w)} lines, same as the longest up to line {at}: "
                      f"{w[at] if at < len(w) else 'END'!r} vs {longest[at] if at < len(longest) else 'END'!r}",
                      file=sys.stderr)
            raise RuntimeError("two followers that were not dropped saw different events")
        return {"cpu_pct": 100.0 * (c1 - c0) / (t1 - t0), "cpu_ms": 1000.0 * (c1 - c0), "secs": t1 - t0,
                "starts": starts, "lagged": lagged, "kept_all": len(whole), "events": events,
                "codes": codes, "same": same}
    finally:
        compare.kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)


def tmux(sock: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR" and not k.startswith("DROVER_")}
    return subprocess.run(["tmux", "-S", str(sock), *args], capture_output=True, text=True, env=env, timeout=30)


def idle(n: int, secs: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="live-idle-"))
    sock = tmp / "tmux.sock"
    try:
        p = start(tmp, HEAD + workers(n, '["sleep", "3600"]'), n)
        time.sleep(2)  # past start-up
        c0, t0 = cpu_s(p.pid), time.monotonic()
        time.sleep(secs)
        c1, t1 = cpu_s(p.pid), time.monotonic()
        alone = 1000.0 * (c1 - c0)
        r = tmux(sock, "new-session", "-d", "-s", "top", "-x", "80", "-y", "24", "-c", str(tmp),
                 f"exec {DROVER} -c daemon.toml top")
        if r.returncode != 0:
            raise RuntimeError(f"tmux: {r.stderr}")
        top_pid = int(tmux(sock, "list-panes", "-t", "top", "-F", "#{pane_pid}").stdout.split()[0])
        wait("top showing the workers", lambda: "drover top  pid" in (
            screen := tmux(sock, "capture-pane", "-p", "-t", "top").stdout) and "running" in screen, 30)
        time.sleep(2)  # past its first reports
        c0, d0, t0 = cpu_s(p.pid), cpu_s(top_pid), time.monotonic()
        time.sleep(secs)
        c1, d1, t1 = cpu_s(p.pid), cpu_s(top_pid), time.monotonic()
        screen = tmux(sock, "capture-pane", "-p", "-t", "top").stdout
        tmux(sock, "kill-server")
        stop(tmp, p)
        return {"alone_ms": alone, "alone_secs": secs, "with_top_ms": 1000.0 * (c1 - c0),
                "with_top_pct": 100.0 * (c1 - c0) / (t1 - t0), "top_ms": 1000.0 * (d1 - d0),
                "top_pct": 100.0 * (d1 - d0) / (t1 - t0), "secs": t1 - t0, "screen": screen}
    finally:
        tmux(sock, "kill-server")
        compare.kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    global DROVER
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--subs", type=int, default=10)
    ap.add_argument("--secs", type=float, default=30)
    ap.add_argument("--crash-after", type=float, default=1.0)
    ap.add_argument("--idle-workers", type=int, default=100)
    ap.add_argument("--idle-secs", type=float, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "live.md")
    ap.add_argument("--drover", type=Path, default=DROVER, help="the binary (default: the release build)")
    o = ap.parse_args()
    DROVER = readiness.DROVER = o.drover.resolve()
    if not DROVER.exists():
        sys.exit(f"{DROVER} is missing: cargo build --release first")
    if shutil.which("tmux") is None:
        sys.exit("tmux is missing (apt-get install tmux): drover top is measured in it")
    compare.set_subreaper()
    load = os.getloadavg()[0]
    without = storm(o.workers, 0, o.secs, o.crash_after)
    with_subs = storm(o.workers, o.subs, o.secs, o.crash_after)
    calm = idle(o.idle_workers, o.idle_secs)
    (o.out.with_suffix(".json")).write_text(json.dumps({"storm": without, "storm_followed": with_subs,
                                                        "idle": calm}, indent=1))

    def per(r: dict) -> float:
        # The storm's pace is the machine's: CPU a start compares runs.
        return r["cpu_ms"] / max(1, r["starts"])

    per_sub = ", ".join(str(e) for e in with_subs["events"])
    text = (
        f"Measured {_dt.date.today()} on {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}), release build; load average {load:.1f} "
        f"at the start (other work on the machine slows the storm, not drover's own count).\n\n"
        f"    python3 benches/live.py --workers {o.workers} --subs {o.subs} --secs {o.secs:g} "
        f"--crash-after {o.crash_after:g} --idle-workers {o.idle_workers} --idle-secs {o.idle_secs:g}\n\n"
        f"| restart storm: {o.workers} workers crashing {o.crash_after:g} s after each start, "
        f"{o.secs:g} s from the reload | drover CPU, % of one core | processes started | drover CPU ms a start |\n"
        "| --- | ---: | ---: | ---: |\n"
        f"| no follower | {without['cpu_pct']:.1f} | {without['starts']} | {per(without):.2f} |\n"
        f"| {o.subs} `drover events -f --json` followers | {with_subs['cpu_pct']:.1f} | "
        f"{with_subs['starts']} | {per(with_subs):.2f} |\n"
        f"| difference: the followers | {with_subs['cpu_pct'] - without['cpu_pct']:.1f} | | "
        f"{per(with_subs) - per(without):.2f} |\n\n"
        f"Followers: {with_subs['kept_all']} kept every event (their streams identical line for line), "
        f"{with_subs['lagged']} were dropped with a `lagged` line; events (lines) each: {per_sub}; "
        f"exit codes {with_subs['codes']}.\n\n"
        f"| idle: {o.idle_workers} workers, {o.idle_secs:g} s | CPU ms | % of one core |\n"
        "| --- | ---: | ---: |\n"
        f"| drover, no `drover top` open | {calm['alone_ms']:.0f} | {calm['alone_ms'] / (10 * o.idle_secs):.2f} |\n"
        f"| drover, one `drover top` open (80x24 tmux pane) | {calm['with_top_ms']:.0f} | "
        f"{calm['with_top_pct']:.2f} |\n"
        f"| that `drover top` itself | {calm['top_ms']:.0f} | {calm['top_pct']:.2f} |\n\n"
        "The `drover top` screen at the end of the idle run:\n\n"
        + "".join(f"    {line}".rstrip() + "\n" for line in calm["screen"].rstrip("\n").splitlines())
    )
    o.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
