#!/usr/bin/env python3
"""One run, one table: drover against its peers on every figure at once.

Runs compare.py (start, RSS, status, idle CPU, restart, stop), reload.py
(add one worker to a running config) and sockets.py (restarts and reloads
of a capacity-1 TCP service under a steady client) back to back, on the same
machine, in one sitting, and merges them into the tables the README's
"Performance" section shows: benches/results/report.md. The full reports of
the parts are written beside it (supervisor.md, reload.md, sockets.md, with
raw JSON).

    cargo build --release && bash benches/setup.sh && python3 benches/report.py

`--from-json` measures nothing and renders the tables again from
results/supervisor.json, results/reload.json and results/sockets.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import reload  # noqa: E402
import sockets  # noqa: E402

RESULTS = HERE / "results"
# The order of the table's columns.
SYSTEMS = ["floor", "drover", "drover-pg", "supervisord", "pm2", "horust", "runit", "s6"]


def compare_cell(results: list[dict], system: str, n: int, row: str) -> tuple[float | None, str]:
    for r in results:
        if r["system"] == system and r["n"] == n:
            return compare.cell_value(r, row)
    return None, "—"


def reload_cell(results: list[dict], system: str) -> tuple[float | None, str]:
    """Median latency of adding one worker, as text."""
    if system == "floor":
        return None, "n/a"
    by = {r["system"]: r for r in results}
    if system == "horust":
        return None, "cannot reload"
    if system == "pm2":
        parts = []
        for name, how in [("pm2", "startOrReload"), ("pm2-only", "start --only")]:
            lat = by.get(name, {}).get("metrics", {}).get("latency")
            if lat:
                parts.append(f"{reload.fmt_ms(lat['median_ms'])} ({how})")
        return None, " / ".join(parts) or "—"
    lat = by.get(system, {}).get("metrics", {}).get("latency")
    if not lat:
        err = by.get(system, {}).get("errors")
        return None, f"error: {compare.short(str(err))}" if err else "—"
    return lat["median_ms"], reload.fmt_ms(lat["median_ms"])


ROWS = [
    ("start", "start N workers"),
    ("rss", "RSS with N running"),
    ("rss_after", "RSS after status and restarts"),
    ("rss_anon", "… of which anonymous"),
    ("status", "`status` (JSON), median"),
    ("status_over", "… over a bare spawn of `true`"),
    ("idle_cpu", "CPU while idle, 10 s"),
    ("stop", "stop all"),
    ("restart", "restart after kill -9, median"),
    ("reload", "reload: add one worker, median"),
]


def table(sup: dict, rel: dict, n: int) -> list[str]:
    """The side-by-side table at N = n, as markdown lines."""
    results = sup["results"]
    systems = [s for s in SYSTEMS if any(r["system"] == s and r["n"] == n for r in results)]
    ratios = [d for d in ("drover", "drover-pg") if d in systems]
    head = ["", *systems, *[f"{d}/floor" for d in ratios]]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row, label in ROWS:
        if row == "reload" and n != rel["results"][0].get("n", n):
            continue  # reload.py ran at one N only
        nums, cells = {}, []
        for s in systems:
            num, text = reload_cell(rel["results"], s) if row == "reload" else compare_cell(results, s, n, row)
            nums[s] = num
            cells.append(compare.md_escape(text))
        f = nums.get("floor")
        shown = [f"{nums[d] / f:.2f}x" if nums.get(d) is not None and f else "—" for d in ratios]
        out.append("| " + " | ".join([compare.md_escape(label), *cells, *shown]) + " |")
    return out


def render(sup: dict, rel: dict, ns: list[int], sock: dict | None = None) -> str:
    meta = sup["meta"]
    out = ["# drover vs peers", ""]
    out.append(f"Measured {meta['date']} on {meta['machine']} in one run of `python3 benches/report.py`: "
               f"compare.py ({' '.join(meta['argv'])}), then reload.py ({' '.join(rel['meta']['argv'])}), "
               f"then sockets.py.")
    out.append("")
    out.append("`drover` runs with its default containment, which as root on cgroup2 puts each instance in "
               "a cgroup of its own; `drover-pg` is the same build with `containment = \"process-group\"`, "
               "the containment every peer here uses.")
    out.append("")
    for n in ns:
        out.append(f"## N = {n}")
        out.append("")
        out.extend(table(sup, rel, n))
        out.append("")
    debounce = rel["meta"].get("debounce") or "50ms (default)"
    out.append(f"Reload: the time from writing the file to the new worker's first instruction, with "
               f"N = {rel['meta'].get('n', ns[0])} running and drover's debounce at {debounce}; supervisord's "
               f"includes `supervisorctl reread` and `update`; runit rescans its directory every 5 s; horust "
               f"has no reload (SIGHUP ends it). The floor is a loop over waitpid that respawns at once and "
               f"reads no config.")
    out.append("")
    if sock:
        m = sock["meta"]
        out.append(f"## Zero-downtime restarts ({' '.join(m['argv'])})")
        out.append("")
        out.append(f"One TCP service at capacity 1 ({m['startup']:g} s to start serving) under a client asking "
                   f"every 5 ms, restarted {m['restarts']} times by each system with its own command (drover "
                   f"also applies {m['reloads']} config edits that change the command).")
        out.append("")
        out.append(sockets.table(sock["results"]).rstrip("\n"))
        out.append("")
    out.append("Full reports: benches/results/supervisor.md, benches/results/reload.md, "
               "benches/results/sockets.md.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="workers in the table")
    ap.add_argument("--also-n", type=int, default=1000, help="a second N for supervisor.md (0: none)")
    ap.add_argument("--edits", type=int, default=30, help="timed reload edits per system")
    ap.add_argument("--drover", default=str(compare.REPO / "target" / "release" / "drover"))
    ap.add_argument("--out", default=str(RESULTS / "report.md"))
    ap.add_argument("--from-json", action="store_true", help="render from the last run's JSON")
    opts = ap.parse_args(argv)
    if not opts.from_json:
        ns = ["--n", str(opts.n)] + (["--n", str(opts.also_n)] if opts.also_n else [])
        systems = ",".join(s for s in compare.ALL_SYSTEMS)
        rc = compare.main([*ns, "--systems", systems, "--drover", opts.drover,
                           "--out", str(RESULTS / "supervisor.md")])
        if rc != 0:
            return rc
        rc = reload.main(["--n", str(opts.n), "--edits", str(opts.edits), "--drover", opts.drover,
                          "--out", str(RESULTS / "reload.md")])
        if rc != 0:
            return rc
        rc = sockets.main(["--out", str(RESULTS / "sockets.md")])
        if rc != 0:
            return rc
    sup = json.loads((RESULTS / "supervisor.json").read_text())
    rel = json.loads((RESULTS / "reload.json").read_text())
    sock_json = RESULTS / "sockets.json"
    sock = json.loads(sock_json.read_text()) if sock_json.exists() else None
    md = render(sup, rel, [opts.n] + ([opts.also_n] if opts.also_n else []), sock)
    sys.stdout.write(md)
    Path(opts.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
