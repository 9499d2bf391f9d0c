#!/usr/bin/env python3
"""A pre-forking server sharing one listener, like nginx's master and workers.

  prefork.py --listen 127.0.0.1:PORT --workers N

The master binds and listens, then forks N workers that inherit the
listening socket; the master never accepts. Each worker accepts one
connection, holds it (unanswered) and accepts no more, so N clients give
each worker exactly one. On SIGUSR1 a worker closes its copy of the
listener, as an nginx worker does on reload, and keeps its connection: the
listener lives on in the master and the other workers, and no kernel event
tells that one process let go of it.

stdout:
  ready PID              the master listens (PID = the master)
  worker PID             a worker started
  accepted PID           worker PID accepted its connection
  closed PID T           worker PID closed its copy of the listener (on
                         SIGUSR1) at CLOCK_MONOTONIC T ns
EOF on stdin: the master kills its workers and exits.
"""

import argparse
import os
import signal
import socket
import sys
import time

from lineproto import emit, parse_addr


def worker(lst):
    me = os.getpid()

    def close_listener(*_):
        lst.close()
        emit(f"closed {me} {time.clock_gettime_ns(time.CLOCK_MONOTONIC)}")

    signal.signal(signal.SIGUSR1, close_listener)
    conn, _ = lst.accept()
    emit(f"accepted {me}")
    while True:
        signal.pause()
    del conn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--workers", type=int, required=True)
    args = ap.parse_args()
    family, host, port = parse_addr(args.listen)
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, port))
    lst.listen(128)
    emit(f"ready {os.getpid()}")
    workers = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                worker(lst)
            finally:
                os._exit(0)
        workers.append(pid)
        emit(f"worker {pid}")
    sys.stdin.read()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in workers:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


if __name__ == "__main__":
    main()
