#!/usr/bin/env python3
"""Zero-downtime restarts: one TCP service at capacity 1 under a steady client.

The service is a small Python server that takes --startup seconds (default
0.2) before it serves, as a real one loading its state does, and answers
each line with its pid. Under drover it takes its listening socket from
drover (`sockets`, fd 3, LISTEN_FDS); under every other system it binds the
port itself (SO_REUSEADDR), as it must there. A client thread asks every
5 ms (connect, one line, the answer; 2 s timeout). Each system restarts the
service --restarts times (default 20) with its own restart command, each
time waiting until a new pid answers; drover also applies --reloads config
edits (default 20) that change its command (an argument the server ignores). Reported side by
side in one run: requests, failed requests, the longest time with no
answer, and the p99 latency of the requests during the run.

  drover       sockets = ["tcp://…"], ready = { log = "serving" };  `drover restart web`,
               and `drover reload` after an edit
  floor        benches/floor.rs running the server;                SIGTERM to the server
  supervisord  [program:web];                                      `supervisorctl restart web`
  pm2          one fork-mode app;                                  `pm2 reload web`
  horust       one service, restart always;                        SIGTERM to the server (no restart command)
  runit        a service directory;                                `sv restart DIR`
  s6           a service directory;                                `s6-svc -r DIR`

    cargo build --release && bash benches/setup.sh && python3 benches/sockets.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (subreaper, clean-up, tools, the floor)
from rollout import script  # noqa: E402

ROOT = HERE.parent
PORT = 18500

SERVER = """\
import os, select, signal, socket, sys, time
if os.environ.get("LISTEN_PID") == str(os.getpid()):
    ls = socket.socket(fileno=3)
else:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", int(sys.argv[1])))
    ls.listen(128)
time.sleep(float(sys.argv[2]))
wake_r, wake_w = socket.socketpair()
wake_w.setblocking(False)
signal.signal(signal.SIGTERM, lambda *_: None)
signal.set_wakeup_fd(wake_w.fileno())
ls.setblocking(False)
print("serving", flush=True)
while True:
    ready, _, _ = select.select([ls, wake_r], [], [])
    if wake_r in ready:
        sys.exit(0)
    try:
        c, _ = ls.accept()
    except BlockingIOError:
        continue
    with c:
        c.setblocking(True)
        c.settimeout(5)
        try:
            c.recv(64)
            c.sendall(b"%d\\n" % os.getpid())
        except OSError:
            pass
"""


def ask(timeout: float = 2.0) -> int:
    """One request: the pid that answered."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"hi\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                raise OSError("closed without an answer")
            data += chunk
        return int(data)


class Client(threading.Thread):
    """Asks every 5 ms; records failures, latencies and the longest gap."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.requests = 0
        self.failed = 0
        self.latencies: list[float] = []
        self.longest_gap = 0.0
        self.last_pid = 0

    def run(self):
        last_ok = time.monotonic()
        while not self.stop.is_set():
            t = time.monotonic()
            self.requests += 1
            try:
                self.last_pid = ask()
                done = time.monotonic()
                self.latencies.append(done - t)
                self.longest_gap = max(self.longest_gap, done - last_ok)
                last_ok = done
            except (OSError, ValueError):
                self.failed += 1
            time.sleep(0.005)


class System:
    name = ""
    how = ""

    def __init__(self, tmp: Path, startup: float):
        self.tmp = tmp
        self.startup = startup
        self.server = tmp / "server.py"
        self.server.write_text(SERVER)
        self.argv = ["python3", str(self.server), str(PORT), str(startup)]

    def spawn(self, argv, **kw):
        return subprocess.Popen(argv, cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kw)

    def run(self, argv, **kw):
        return subprocess.run(argv, cwd=self.tmp, capture_output=True, text=True, timeout=120, **kw)

    def available(self) -> str | None:
        return None

    def start(self):
        raise NotImplementedError

    def restart(self, pid: int):
        raise NotImplementedError

    def stop(self):
        pass


class Drover(System):
    name = "drover"
    how = "`drover restart web`; `drover reload` after an edit"

    def available(self):
        return None if Path(self.bin()).exists() else "no target/release/drover (cargo build --release)"

    def bin(self):
        return str(ROOT / "target" / "release" / "drover")

    def write(self, token: int):
        (self.tmp / "daemon.toml").write_text(f"""
[supervisor]
reload = false
[workers.web]
command = {json.dumps(self.argv + [f"gen{token}"])}
sockets = ["tcp://127.0.0.1:{PORT}"]
ready = {{ log = "serving" }}
stop_grace = "5s"
""")

    def start(self):
        self.write(0)
        self.proc = self.spawn([self.bin(), "-c", "daemon.toml", "start"])

    def restart(self, pid):
        self.run([self.bin(), "-c", "daemon.toml", "restart", "web"])

    def reload(self, token: int):
        self.write(token)
        self.run([self.bin(), "-c", "daemon.toml", "reload"])

    def stop(self):
        self.run([self.bin(), "-c", "daemon.toml", "stop"])


class Floor(System):
    name = "floor"
    how = "SIGTERM to the server; the floor respawns it at once"

    def available(self):
        compare.Floor.build(self.tmp)
        return compare.Floor._err

    def start(self):
        self.proc = self.spawn([str(compare.Floor._bin), "1", *self.argv])

    def restart(self, pid):
        os.kill(pid, signal.SIGTERM)

    def stop(self):
        self.proc.terminate()


class Supervisord(System):
    name = "supervisord"
    how = "`supervisorctl restart web`"

    def available(self):
        return None if script("supervisord") else "supervisord not installed (bash benches/setup.sh)"

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
command={" ".join(self.argv)}
directory={self.tmp}
autorestart=true
startsecs=0
stopwaitsecs=5
""")
        self.proc = self.spawn([script("supervisord"), "-n", "-c", str(self.conf)])

    def restart(self, pid):
        self.run([script("supervisorctl"), "-c", str(self.conf), "restart", "web"])

    def stop(self):
        self.run([script("supervisorctl"), "-c", str(self.conf), "shutdown"])


class Pm2(System):
    name = "pm2"
    how = "`pm2 reload web` (fork mode)"
    PM2 = compare.TOOLS / "node_modules" / ".bin" / "pm2"

    def available(self):
        return None if self.PM2.exists() else "pm2 not installed (bash benches/setup.sh)"

    def env(self):
        return dict(os.environ, PM2_HOME=str(self.tmp / "pm2home"))

    def start(self):
        app = {"name": "web", "script": str(self.server), "args": self.argv[2:], "interpreter": "python3",
               "exec_mode": "fork", "autorestart": True, "kill_timeout": 5000,
               "out_file": "/dev/null", "error_file": "/dev/null"}
        self.eco = self.tmp / "ecosystem.config.json"
        self.eco.write_text(json.dumps({"apps": [app]}))
        self.run([str(self.PM2), "start", str(self.eco)], env=self.env())

    def restart(self, pid):
        self.run([str(self.PM2), "reload", "web"], env=self.env())

    def stop(self):
        self.run([str(self.PM2), "kill"], env=self.env())


class Horust(System):
    name = "horust"
    how = "SIGTERM to the server (horustctl has no restart); restart strategy always"

    def available(self):
        return None if compare.Horust.BIN.exists() else "horust not installed (bash benches/setup.sh)"

    def start(self):
        sdir, udir = self.tmp / "services", self.tmp / "uds"
        sdir.mkdir()
        udir.mkdir()
        (sdir / "web.toml").write_text(
            f'command = "{" ".join(self.argv)}"\n[restart]\nstrategy = "always"\nbackoff = "0s"\nattempts = 0\n'
            '[termination]\nsignal = "TERM"\nwait = "5s"\n')
        self.proc = self.spawn([str(compare.Horust.BIN), "--config-path", str(self.tmp / "horust.toml"),
                                "--services-path", str(sdir), "--uds-folder-path", str(udir)])

    def restart(self, pid):
        os.kill(pid, signal.SIGTERM)

    def stop(self):
        self.proc.terminate()


class Runit(System):
    name = "runit"
    how = "`sv restart DIR`"

    def available(self):
        return None if shutil.which("runsvdir") else "runit not installed (bash benches/setup.sh)"

    def start(self):
        self.svdir = self.tmp / "service"
        d = self.svdir / "web"
        d.mkdir(parents=True)
        (d / "run").write_text("#!/bin/sh\nexec " + " ".join(self.argv) + "\n")
        (d / "run").chmod(0o755)
        # runsvdir skips a directory modified within the current second.
        time.sleep(1.1)
        self.proc = self.spawn(["runsvdir", str(self.svdir)])

    def restart(self, pid):
        self.run(["sv", "restart", str(self.svdir / "web")])

    def stop(self):
        os.kill(self.proc.pid, signal.SIGHUP)


class S6(System):
    name = "s6"
    how = "`s6-svc -r DIR`"

    def available(self):
        return None if shutil.which("s6-svscan") else "s6 not installed (bash benches/setup.sh)"

    def start(self):
        self.scan = self.tmp / "scan"
        d = self.scan / "web"
        d.mkdir(parents=True)
        (d / "run").write_text("#!/bin/sh\nexec " + " ".join(self.argv) + "\n")
        (d / "run").chmod(0o755)
        self.proc = self.spawn(["s6-svscan", str(self.scan)])

    def restart(self, pid):
        self.run(["s6-svc", "-r", str(self.scan / "web")])

    def stop(self):
        self.run(["s6-svscanctl", "-t", str(self.scan)])


SYSTEMS = [Drover, Floor, Supervisord, Pm2, Horust, Runit, S6]


def wait_new(client: Client, old: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while client.last_pid in (0, old):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no new pid answered within {limit:.0f}s")
        time.sleep(0.002)


def measure(cls, restarts: int, reloads: int, startup: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"sockets-{cls.name}-"))
    s = cls(tmp, startup)
    try:
        why = s.available()
        if why:
            return {"system": cls.name, "error": why}
        s.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                ask(0.5)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError("never answered")
                time.sleep(0.02)
        client = Client()
        client.start()
        wait_new(client, 0)
        for _ in range(restarts):
            old = client.last_pid
            s.restart(old)
            wait_new(client, old)
            # Past the 1 s under which runsv and s6-supervise delay a restart.
            time.sleep(1.2)
        done_reloads = 0
        if isinstance(s, Drover):
            for i in range(reloads):
                old = client.last_pid
                s.reload(i + 1)
                wait_new(client, old)
                done_reloads += 1
                time.sleep(1.2)
        client.stop.set()
        client.join()
        lat = sorted(client.latencies)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        return {"system": cls.name, "how": cls.how, "restarts": restarts, "reloads": done_reloads,
                "requests": client.requests, "failed": client.failed,
                "longest_gap_ms": round(client.longest_gap * 1000, 1), "p99_ms": round(p99 * 1000, 1)}
    except Exception as e:  # noqa: BLE001 - one system's failure is its row
        return {"system": cls.name, "error": str(e)[:200]}
    finally:
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - the clean-up below kills what is left
            pass
        compare.kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--startup", type=float, default=0.2)
    ap.add_argument("--systems", default=",".join(c.name for c in SYSTEMS))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sockets.md")
    opts = ap.parse_args(argv)
    compare.set_subreaper()
    wanted = opts.systems.split(",")
    rows = []
    for cls in SYSTEMS:
        if cls.name in wanted:
            r = measure(cls, opts.restarts, opts.reloads, opts.startup)
            print(r, file=sys.stderr)
            rows.append(r)
    head = (
        f"One TCP service at capacity 1 ({opts.startup:g} s to start serving) under a client asking every "
        f"5 ms, restarted {opts.restarts} times by each system (drover also applies {opts.reloads} config "
        f"edits). Measured {_dt.date.today()} on {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}), release build.\n\n"
        f"    python3 benches/sockets.py --restarts {opts.restarts} --reloads {opts.reloads} "
        f"--startup {opts.startup:g}\n\n"
    )
    text = head + table(rows)
    opts.out.write_text(text)
    # The raw figures, for benches/report.py.
    meta = {"date": str(_dt.date.today()), "argv": list(argv if argv is not None else sys.argv[1:]),
            "restarts": opts.restarts, "reloads": opts.reloads, "startup": opts.startup}
    opts.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(text)
    return 0


def table(rows: list[dict]) -> str:
    """The side-by-side table of `rows` (as main prints it)."""
    out = "| system | how | requests | failed | longest gap with no answer | p99 latency |\n"
    out += "| --- | --- | ---: | ---: | ---: | ---: |\n"
    for r in rows:
        if "error" in r:
            out += f"| {r['system']} | error: {r['error']} | | | | |\n"
            continue
        out += (f"| {r['system']} | {r['how']} | {r['requests']} | {r['failed']} | "
                f"{r['longest_gap_ms']:.0f} ms | {r['p99_ms']:.1f} ms |\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
