#!/usr/bin/env python3
"""What `max_memory` sampling costs drover, measured on the release binary.

drover's CPU (utime + stime from /proc/PID/stat) over --secs seconds
(default 20) while it supervises --workers workers (default 100, `sleep
3600`) that each set `max_memory` (their group's RSS read every 2 s, in one
pass over /proc for all of them), against the same workers without it
(nothing is read). Reported as milliseconds of CPU per 10 s and as % of one
core, the median of --runs runs (default 3) each.

    cargo build --release && python3 benches/max_memory.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (subreaper, clean-up)
import readiness  # noqa: E402  (supervise: drover's CPU over a window)


def config(n: int, max_memory: str | None) -> str:
    text = "[supervisor]\nreload = false\n"
    for i in range(n):
        text += f"[workers.w{i}]\ncommand = [\"sleep\", \"3600\"]\n"
        if max_memory:
            text += f"max_memory = \"{max_memory}\"\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--secs", type=float, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "max_memory.md")
    o = ap.parse_args()
    compare.set_subreaper()
    procs = sum(1 for p in os.listdir("/proc") if p.isdigit())
    rows = []
    for label, cap in [("without max_memory", None), ("every one with max_memory = \"1GiB\"", "1GiB")]:
        pcts = sorted(readiness.supervise(config(o.workers, cap), o.workers, o.secs) for _ in range(o.runs))
        rows.append((label, pcts))
    med = [p[len(p) // 2] for _, p in rows]
    text = (
        f"Measured {_dt.date.today()} on {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, {procs} processes on the machine before the runs), "
        "release build.\n\n"
        f"    python3 benches/max_memory.py --workers {o.workers} --secs {o.secs:g} --runs {o.runs}\n\n"
        f"| {o.workers} workers (`sleep 3600`) | drover CPU, ms per 10 s | % of one core | runs (%) |\n"
        "| --- | ---: | ---: | --- |\n"
        + "".join(
            f"| {label} | {p[len(p) // 2] * 100:.0f} | {p[len(p) // 2]:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in p)} |\n"
            for label, p in rows
        )
        + f"| difference: the sampling | {(med[1] - med[0]) * 100:.0f} | {med[1] - med[0]:.2f} | |\n"
    )
    o.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
