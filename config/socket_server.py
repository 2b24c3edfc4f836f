#!/usr/bin/env python3
"""A server that takes its listening socket from drover instead of binding
it: drover binds the worker's `sockets` once and passes them to every
instance from fd 3 on (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES: systemd's
socket activation). So a restart or a reload never leaves the port closed:
connections wait in the socket's backlog until an instance accepts them.

It answers each line it reads with "REPLY PID". On SIGTERM it finishes the
request in hand and exits; the next instance (already started beside it)
accepts on the same socket.

    python3 socket_server.py [--init SECONDS] [--reply TEXT] [--info FILE]

--init waits that long before serving (a slow start, for the ready probe),
--info writes what drover passed (pid, LISTEN_* and open descriptors).
"""
import argparse
import os
import select
import signal
import socket
import sys
import time


def passed_sockets():
    # sd_listen_fds(3): the variables are for this very process only.
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("no sockets passed: run me under drover with `sockets = [...]`")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=3 + i) for i in range(count)]


def open_fds():
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")  # the listing's own fd is gone by now
            fds.append(int(name))
        except OSError:
            pass
    return sorted(fds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", type=float, default=0.0)
    ap.add_argument("--reply", default="hello")
    ap.add_argument("--info")
    args = ap.parse_args()
    listeners = passed_sockets()
    if args.info:
        fds = open_fds()
        with open(args.info, "w") as f:
            f.write(f"pid={os.getpid()}\n")
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                f.write(f"{var}={os.environ.get(var, '')}\n")
            f.write("fds=" + ",".join(map(str, fds)) + "\n")
    time.sleep(args.init)
    # A signal wakes the select below instead of interrupting a request.
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.set_wakeup_fd(wake_w.fileno())
    for s in listeners:
        # Shared with the instance beside it: whichever wakes, one accepts.
        s.setblocking(False)
    print("serving", flush=True)
    while True:
        ready, _, _ = select.select(listeners + [wake_r], [], [])
        if wake_r in ready:
            return
        for s in ready:
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.setblocking(True)
                conn.settimeout(5)
                try:
                    conn.recv(1024)
                    conn.sendall(f"{args.reply} {os.getpid()}\n".encode())
                except OSError:
                    pass


if __name__ == "__main__":
    main()
