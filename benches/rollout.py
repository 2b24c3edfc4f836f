#!/usr/bin/env python3
"""Rolling restart of a capacity-2 HTTP worker under a steady client.

Each instance is a real HTTP server (Python's http.server) on its own port,
18400 + instance, that takes --startup seconds (default 1.0) before it
listens, as a real service loading its state does. A client thread asks
every 5 ms, trying instance 0 and then instance 1 (a load balancer that
fails over); a request fails when neither answers. While it runs, the
supervisor restarts the worker --rounds times (default 5), each time
waiting until both instances are new and serving again. Reported, side by
side in one run: seconds with no instance serving, failed requests, and how
long each restart took.

  drover       capacity = 2, ready = { http = ... } probe;  `drover restart web`
  supervisord  numprocs = 2;                                `supervisorctl restart web:*`
  pm2          two fork-mode apps;                           `pm2 reload ecosystem.config.json`

Every process it starts is killed at the end (compare.py's subreaper
clean-up).

    cargo build --release && bash benches/setup.sh && python3 benches/rollout.py
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
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (subreaper, clean-up, tools)

ROOT = HERE.parent
DROVER = ROOT / "target" / "release" / "drover"
PM2 = compare.TOOLS / "node_modules" / ".bin" / "pm2"
BASE_PORT = 18400

SERVER = """\
import http.server, socketserver, sys, time
time.sleep(float(sys.argv[2]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
socketserver.TCPServer.allow_reuse_address = True
with socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), H) as s:
    s.serve_forever()
"""


def script(name: str) -> str | None:
    p = Path(sysconfig.get_path("scripts")) / name
    return str(p) if p.exists() else shutil.which(name)


def serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.2) as r:
            return r.status == 200
    except OSError:
        return False


class Client(threading.Thread):
    """Asks every 5 ms; records failures and the time with nothing serving."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.requests = 0
        self.failed = 0
        self.down_s = 0.0
        self.longest_s = 0.0

    def run(self):
        down_since = None
        while not self.stop.is_set():
            t = time.monotonic()
            ok = serving(BASE_PORT) or serving(BASE_PORT + 1)
            self.requests += 1
            if ok:
                if down_since is not None:
                    span = t - down_since
                    self.down_s += span
                    self.longest_s = max(self.longest_s, span)
                    down_since = None
            else:
                self.failed += 1
                if down_since is None:
                    down_since = t
            time.sleep(0.005)
        if down_since is not None:
            self.down_s += time.monotonic() - down_since


class System:
    name = ""

    def __init__(self, tmp: Path, startup: float):
        self.tmp = tmp
        self.startup = startup
        self.server = tmp / "server.py"
        self.server.write_text(SERVER)
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv, **kw):
        p = subprocess.Popen(argv, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def run(self, argv, **kw):
        return subprocess.run(argv, cwd=self.tmp, capture_output=True, text=True, timeout=120, **kw)

    def pids(self) -> list[int]:
        raise NotImplementedError

    def wait_serving(self, old: list[int], limit: float = 60.0) -> None:
        """Until both instances are processes other than `old`, and serve."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            now = self.pids()
            if len(now) == 2 and not set(now) & set(old) and serving(BASE_PORT) and serving(BASE_PORT + 1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: not both new and serving after {limit}s")


class Drover(System):
    name = "drover"

    def start(self):
        (self.tmp / "daemon.toml").write_text(f"""
[supervisor]
reload = false
[workers.web]
command = ["/bin/sh", "-c", "exec python3 server.py $(({BASE_PORT} + DROVER_INSTANCE)) {self.startup}"]
capacity = 2
stop_grace = "5s"
ready = {{ http = "http://127.0.0.1:{BASE_PORT // 10}${{DROVER_INSTANCE}}/", interval = "100ms", timeout = "500ms" }}
""")
        self.spawn([str(DROVER), "-c", "daemon.toml", "start"])

    def status(self):
        r = self.run([str(DROVER), "-c", "daemon.toml", "status", "--json"])
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def pids(self):
        for w in self.status().get("workers", []):
            return [i["pid"] for i in w["instances"] if i.get("state") == "running" and i.get("pid")]
        return []

    def restart(self):
        self.run([str(DROVER), "-c", "daemon.toml", "restart", "web"])

    def stop(self):
        self.run([str(DROVER), "-c", "daemon.toml", "stop"])


class Supervisord(System):
    name = "supervisord"

    def start(self):
        self.conf = self.tmp / "supervisord.conf"
        self.conf.write_text(f"""
[unix_http_server]
file={self.tmp}/supervisor.sock
[supervisord]
logfile={self.tmp}/supervisord.log
pidfile={self.tmp}/supervisord.pid
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{self.tmp}/supervisor.sock
[program:web]
command=python3 {self.server} 1840%(process_num)d {self.startup}
numprocs=2
process_name=%(program_name)s_%(process_num)d
directory={self.tmp}
autorestart=true
startsecs=0
stopwaitsecs=5
""")
        self.spawn([script("supervisord"), "-n", "-c", str(self.conf)])

    def ctl(self, *args):
        return self.run([script("supervisorctl"), "-c", str(self.conf), *args])

    def pids(self):
        out = self.ctl("status").stdout
        return [int(line.split("pid ")[1].split(",")[0]) for line in out.splitlines() if " RUNNING " in line]

    def restart(self):
        self.ctl("restart", "web:*")

    def stop(self):
        self.ctl("shutdown")


class Pm2(System):
    name = "pm2"

    def env(self):
        return dict(os.environ, PM2_HOME=str(self.tmp / "pm2home"))

    def start(self):
        apps = [
            {
                "name": f"web{i}",
                "script": str(self.server),
                "args": [str(BASE_PORT + i), str(self.startup)],
                "interpreter": "python3",
                "exec_mode": "fork",
                "autorestart": True,
                "kill_timeout": 5000,
                "out_file": "/dev/null",
                "error_file": "/dev/null",
            }
            for i in range(2)
        ]
        self.eco = self.tmp / "ecosystem.config.json"
        self.eco.write_text(json.dumps({"apps": apps}))
        self.run([str(PM2), "start", str(self.eco)], env=self.env())

    def pids(self):
        out = self.run([str(PM2), "jlist"], env=self.env()).stdout
        try:
            doc = json.loads(out[out.index("["):])
        except ValueError:
            return []
        return [a["pid"] for a in doc if a.get("pm2_env", {}).get("status") == "online" and a.get("pid")]

    def restart(self):
        self.run([str(PM2), "reload", str(self.eco)], env=self.env())

    def stop(self):
        self.run([str(PM2), "kill"], env=self.env())


def measure(cls, rounds: int, startup: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"rollout-{cls.name}-"))
    s = cls(tmp, startup)
    try:
        s.start()
        s.wait_serving([])
        client = Client()
        client.start()
        took = []
        for _ in range(rounds):
            old = s.pids()
            t = time.monotonic()
            s.restart()
            s.wait_serving(old)
            took.append(time.monotonic() - t)
            time.sleep(0.5)
        client.stop.set()
        client.join()
        return {
            "system": cls.name,
            "rounds": rounds,
            "requests": client.requests,
            "failed": client.failed,
            "down_s": round(client.down_s, 3),
            "longest_down_s": round(client.longest_s, 3),
            "restart_s": round(sum(took) / len(took), 2),
        }
    finally:
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - the clean-up below kills what is left
            pass
        compare.kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--startup", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "rollout.md")
    opts = ap.parse_args()
    compare.set_subreaper()
    systems = [Drover]
    if script("supervisord") and script("supervisorctl"):
        systems.append(Supervisord)
    else:
        print("rollout: supervisord not installed (bash benches/setup.sh): skipped", file=sys.stderr)
    if PM2.exists():
        systems.append(Pm2)
    else:
        print("rollout: pm2 not installed (bash benches/setup.sh): skipped", file=sys.stderr)
    rows = []
    for cls in systems:
        r = measure(cls, opts.rounds, opts.startup)
        print(r, file=sys.stderr)
        rows.append(r)
    head = (
        f"Rolling restart of a capacity-2 HTTP worker (each instance on its own port, "
        f"{opts.startup:g} s to start listening) under a client asking every 5 ms with fail-over, "
        f"{opts.rounds} restarts each. Measured {_dt.date.today()} on {platform.node()} "
        f"({os.cpu_count()} cores, {platform.system()} {platform.release()}).\n\n"
        f"    python3 benches/rollout.py --rounds {opts.rounds} --startup {opts.startup:g}\n\n"
    )
    table = "| system | command | requests | failed | seconds with none serving | longest outage | one restart took |\n"
    table += "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n"
    cmds = {"drover": "`drover restart web`", "supervisord": "`supervisorctl restart web:*`",
            "pm2": "`pm2 reload` (fork mode)"}
    for r in rows:
        table += (f"| {r['system']} | {cmds[r['system']]} | {r['requests']} | {r['failed']} | "
                  f"{r['down_s']:.2f} | {r['longest_down_s']:.2f} | {r['restart_s']:.2f} s |\n")
    opts.out.write_text(head + table)
    print(head + table)


if __name__ == "__main__":
    main()
