#!/usr/bin/env python3
"""A server holding busy, idle and stuck connections whose activity the test
starts and stops on command, for `drain --until-idle` (tests/idle.rs).

    idle.py HOST:PORT ROLES

ROLES is a comma-separated subset of `busy,idle,stuck` (as in activity.py):

- `busy`: the client sends 10 bytes every 100 ms (until `stop_busy`); the
  server reads at once, so nothing waits unread;
- `idle`: the client sends one request, the server answers `ok`; both then
  stay quiet (an idle keep-alive) until `poke_idle`, which repeats that;
- `stuck`: the client, with a 4 KiB receive buffer, asks for a response
  and does not read it (until `read_stuck`); the server's 4 MiB answer
  backs up in its send queue.

Commands on stdin (the server passes them to the client, a process it
forks, by signal): `stop_busy`, `read_stuck`, `poke_idle`.

stdout (CLOCK_MONOTONIC ns): `conn ROLE CLIENT_PORT`, `ready SERVER_PID`,
then `busy_sent T` after each busy send, `busy_stopped T` (T: its last
send), `stuck_read T` once the client read the whole response (the last
data moved then), `idle_reply T` each time the server answered on the idle
connection, and `sigterm T` when the server gets SIGTERM (it then exits).
A dedicated thread waits for SIGTERM (blocked everywhere else), so T is
when it arrived, not when the main thread got round to it.
"""

import os
import signal
import socket
import sys
import threading
import time

from lineproto import commands, emit, exit_now, monotonic_ns, parse_addr

STUCK_BYTES = 4 << 20


def read_line(conn):
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            return None
        line += chunk
    return line.decode().strip()


def serve(conn, done):
    role = read_line(conn)
    if role == "idle":
        first = True
        while True:
            conn.sendall(b"ok\n")
            emit(f"idle_reply {monotonic_ns()}")
            if first:
                done.release()
                first = False
            if read_line(conn) is None:
                return
    elif role == "stuck":
        done.release()
        conn.sendall(b"x" * STUCK_BYTES)  # blocks until the client reads
    else:
        done.release()
    while conn.recv(65536):
        pass


def client(family, host, port, roles, server_pid):
    flags = {"stop_busy": False, "read_stuck": False, "poke_idle": 0}

    def on_signal(signum, _frame):
        if signum == signal.SIGUSR1:
            flags["stop_busy"] = True
        elif signum == signal.SIGUSR2:
            flags["read_stuck"] = True
        else:
            flags["poke_idle"] += 1

    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(s, on_signal)
    conns = {}
    for role in roles:
        s = socket.socket(family, socket.SOCK_STREAM)
        if role == "stuck":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        emit(f"conn {role} {s.getsockname()[1]}")
        s.sendall(f"{role}\n".encode())
        conns[role] = s
    if "idle" in conns and conns["idle"].recv(3) != b"ok\n":
        emit("error bad idle reply")
    busy = conns.get("busy")
    next_busy = time.monotonic() + 0.1
    last_busy = None
    poked = 0
    # Ends with the server.
    while os.getppid() == server_pid:
        if flags["read_stuck"] and "stuck" in conns:
            s = conns.pop("stuck")
            got = 0
            while got < STUCK_BYTES:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
            emit(f"stuck_read {monotonic_ns()}")
        if flags["poke_idle"] > poked and "idle" in conns:
            poked += 1
            conns["idle"].sendall(b"again\n")
            if conns["idle"].recv(3) != b"ok\n":
                emit("error bad idle reply")
        if busy is not None:
            if flags["stop_busy"]:
                emit(f"busy_stopped {last_busy or 0}")
                busy_done = busy
                busy = None
                del busy_done  # kept open in conns: an idle connection now
            elif time.monotonic() >= next_busy:
                busy.sendall(b"0123456789")
                last_busy = monotonic_ns()
                emit(f"busy_sent {last_busy}")
                next_busy += 0.1
        time.sleep(0.005)


def main():
    family, host, port = parse_addr(sys.argv[1])
    roles = [r for r in sys.argv[2].split(",") if r]
    # Only the waiting thread takes SIGTERM; the forked client inherits the
    # mask and never gets one.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    server_pid = os.getpid()
    child = os.fork()
    if child == 0:
        listener.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        try:
            client(family, host, port, roles, server_pid)
        finally:
            os._exit(0)

    def on_term():
        signal.sigwaitinfo({signal.SIGTERM})
        try:
            emit(f"sigterm {monotonic_ns()}")
        finally:
            exit_now()

    threading.Thread(target=on_term, daemon=True).start()
    done = threading.Semaphore(0)
    for _ in roles:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, done), daemon=True).start()
    for _ in roles:
        done.acquire()
    emit(f"ready {server_pid}")
    to_client = {
        "stop_busy": signal.SIGUSR1,
        "read_stuck": signal.SIGUSR2,
        "poke_idle": signal.SIGHUP,
    }
    for cmd, _args, line in commands():
        if cmd in to_client:
            os.kill(child, to_client[cmd])
            emit(f"ok {cmd}")
        else:
            emit(f"error unknown command {line}")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
