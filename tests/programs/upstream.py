#!/usr/bin/env python3
"""A slow HTTP upstream: holds every request until the test says to answer it.

Used by the nginx end-to-end tests (tests/nginx.rs) behind `proxy_pass`, so
that requests stay in flight in an nginx worker for exactly as long as the
test wants. Requests are named by the last segment of their path
(`GET /slow/c1` is request `c1`). Line-oriented:

stdout:
  ready PID ADDR                    listening
  request NAME worker=W             request NAME arrived; W = its X-Worker
                                    header (nginx's `$pid`: the worker
                                    that proxies it)
  responded NAME T                  the answer to NAME is about to be written
                                    (T = CLOCK_MONOTONIC ns, taken before the
                                    write: no client can have it earlier)
  error MESSAGE                     a command failed

stdin commands:
  respond NAME    answer NAME: `200 OK`, body `done NAME\\n`, then close

EOF on stdin exits.
"""

import argparse
import os
import socket
import threading
import time

from lineproto import commands, emit, exit_now

class Upstream:
    def __init__(self, listener):
        self.listener = listener
        self.lock = threading.Lock()
        self.pending = {}  # name -> (conn, threading.Event)

    def serve(self):
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1] if len(head[0].split(" ")) > 1 else "/"
        name = path.rstrip("/").rsplit("/", 1)[-1] or "-"
        worker = "-"
        for line in head[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "x-worker":
                worker = value.strip()
        go = threading.Event()
        with self.lock:
            self.pending[name] = go
        emit(f"request {name} worker={worker}")
        go.wait()
        body = f"done {name}\n".encode()
        response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )
        emit(f"responded {name} {time.clock_gettime_ns(time.CLOCK_MONOTONIC)}")
        try:
            conn.sendall(response)
        finally:
            conn.close()

    def respond(self, name):
        with self.lock:
            go = self.pending.pop(name, None)
        if go is None:
            emit(f"error respond {name}: no such request waiting")
            return
        go.set()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    upstream = Upstream(listener)
    threading.Thread(target=upstream.serve, daemon=True).start()
    emit(f"ready {os.getpid()} {host}:{listener.getsockname()[1]}")
    for cmd, rest, line in commands():
        if cmd == "respond" and len(rest) == 1:
            upstream.respond(rest[0])
        else:
            emit(f"error unknown command {line!r}")
    exit_now()


if __name__ == "__main__":
    main()
