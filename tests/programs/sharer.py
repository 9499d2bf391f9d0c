#!/usr/bin/env python3
"""A server whose accepted connections end up shared with other processes.

For the fault suite: a connection's fd may outlive the accepting process's
copy, by fork inheritance or by SCM_RIGHTS passing to another process.

  sharer.py --listen 127.0.0.1:PORT --accept N

stdout: `ready PID` once listening; `accepted N` when all N are accepted;
replies below; `signal TERM T open=N from=0` if SIGTERM arrives, with T its
CLOCK_MONOTONIC time in ns and N the accepted connections this process
still held then (the sender is unknown to a Python handler: 0); then it
exits.
stdin:
  fork       fork a child that inherits every accepted fd and holds them
             (reply `child PID`)
  pass       spawn a receiver, pass every accepted fd to it over a unix
             socket (SCM_RIGHTS); reply `passed PID` once it holds them
  closeall   close this process's own copies (reply `closed K`)
  ping       reply `pong` (proves the process is alive and unsignalled)
  exit       exit at once (os._exit), holding whatever it holds
"""

import argparse
import os
import signal
import socket
import sys
import time

from lineproto import emit

# This process's own copies of the accepted connections (for the signal report).
_conns = []


def on_term(*_):
    t = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    emit(f"signal TERM {t} open={len(_conns)} from=0")
    os._exit(0)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--accept", type=int, required=True)
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    signal.signal(signal.SIGTERM, on_term)
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, int(port)))
    lst.listen(128)
    emit(f"ready {os.getpid()}")
    conns = _conns
    for _ in range(args.accept):
        conns.append(lst.accept()[0])
    emit(f"accepted {len(conns)}")
    children = []
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "fork":
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                while True:
                    time.sleep(3600)
            children.append(pid)
            emit(f"child {pid}")
        elif cmd == "pass":
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                parent_end.close()
                for c in conns:
                    c.close()
                lst.close()
                _, fds, _, _ = socket.recv_fds(child_end, 16, 1024)
                child_end.sendall(f"{len(fds)}\n".encode())
                while True:
                    time.sleep(3600)
            child_end.close()
            socket.send_fds(parent_end, [b"x"], [c.fileno() for c in conns])
            n = parent_end.recv(16).decode().strip()
            children.append(pid)
            emit(f"passed {pid} {n}")
        elif cmd == "closeall":
            # Close first, forget after: while a signal reports open=N, N
            # counts every connection not yet closed.
            n = len(conns)
            while conns:
                conns[0].close()
                conns.pop(0)
            emit(f"closed {n}")
        elif cmd == "ping":
            emit("pong")
        elif cmd == "exit":
            os._exit(0)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

if __name__ == "__main__":
    main()
