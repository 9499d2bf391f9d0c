#!/usr/bin/env python3
"""A server holding three connections that do different things, for the
per-connection activity test (tests/activity.rs).

    activity.py HOST:PORT

The server (this process) accepts three connections from a client process
it forks; each client names its role in its first line:

- `busy`: the client sends 10 bytes every 100 ms; the server reads
  everything at once (a thread blocked in recv), so nothing waits unread;
- `idle`: the client sends one request, the server answers `ok` and both
  stay quiet (an idle keep-alive);
- `stuck`: the client, with a 4 KiB receive buffer, asks for a response
  and never reads it; the server writes 16 MiB, which backs up in its
  send queue once the client's window is full (the writing thread stays
  blocked).

stdout (CLOCK_MONOTONIC nanoseconds, see lineproto.py):
`conn ROLE CLIENT_PORT` per connection (from the client), `busy_sent T`
after each busy send (from the client), `idle_reply T` once the server
sent `ok`, `stuck_write T` when it starts writing the response, then
`ready SERVER_PID` once all three are in place.
"""

import os
import socket
import sys
import threading
import time

from lineproto import emit, parse_addr

STUCK_BYTES = 16 << 20


def now():
    return time.monotonic_ns()


def read_line(conn):
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            raise SystemExit("client hung up early")
        line += chunk
    return line.decode().strip()


def serve(conn, done):
    role = read_line(conn)
    if role == "idle":
        conn.sendall(b"ok\n")
        emit(f"idle_reply {now()}")
        done.release()
    elif role == "stuck":
        emit(f"stuck_write {now()}")
        done.release()
        conn.sendall(b"x" * STUCK_BYTES)  # blocks: the client never reads
        emit("error stuck response was read")
        return
    else:
        done.release()
    while conn.recv(65536):
        pass


def client(family, host, port, server_pid):
    conns = {}
    for role in ("busy", "idle", "stuck"):
        s = socket.socket(family, socket.SOCK_STREAM)
        if role == "stuck":
            # Before connecting, so the window is small from the handshake on.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        emit(f"conn {role} {s.getsockname()[1]}")
        s.sendall(f"{role}\n".encode())
        conns[role] = s
    if conns["idle"].recv(3) != b"ok\n":
        emit("error bad idle reply")
    busy = conns["busy"]
    # Ends with the server (when the test kills it).
    while os.getppid() == server_pid:
        time.sleep(0.1)
        busy.sendall(b"0123456789")
        emit(f"busy_sent {now()}")


def main():
    family, host, port = parse_addr(sys.argv[1])
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    server_pid = os.getpid()
    if os.fork() == 0:
        listener.close()
        try:
            client(family, host, port, server_pid)
        finally:
            os._exit(0)
    done = threading.Semaphore(0)
    for _ in range(3):
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, done), daemon=True).start()
    for _ in range(3):
        done.acquire()
    emit(f"ready {server_pid}")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
