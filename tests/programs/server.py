#!/usr/bin/env python3
"""A TCP server that accepts connections and holds them until told otherwise.

Used by the privileged end-to-end tests (tests/harness). Everything is
line-oriented so that tests wait for acknowledgements instead of sleeping:

stdout (one event per line, flushed at once):
  ready PID ADDR        listening (or inherited listener adopted); ADDR = bound address
  accepted N            one more connection accepted; N = total accepted by this process
  closed K              reply to `close K` / `closeall` (K = how many were closed)
  count open=N established=E close_wait=W reset=R other=O
                        reply to `count`: open fds of accepted connections, by
                        kernel TCP state (TCP_INFO): close_wait = the peer sent
                        FIN and we still hold it; reset = the peer reset it
                        (state CLOSE) and we still hold the fd
  stopped               reply to `stopaccept`: no accept happens after this line
  child PID             reply to `handover`: the child is ready (its `ready` line
                        has already been relayed)
  child> LINE           a line printed by the handover child, relayed verbatim
  listener closed       reply to `closelistener`
  bye                   reply to `exit`
  error MESSAGE         a command failed (the harness fails the test)

stdin commands:
  close K | closeall | count | stopaccept | handover | closelistener | exit
  tochild CMD           forward CMD to the handover child's stdin

`handover` is the classic graceful-restart hand-off: fork/exec a new
`server.py --inherit-fd N` with the listening fd passed (subprocess pass_fds),
both processes then accept from the same listener until the old one is told
to `stopaccept`. The accepted sockets are not inherited (Python creates them
close-on-exec), exactly like a real server's.

The child's stdio is relayed through this process so that one pipe carries
everything in a deterministic order. EOF on stdin exits the process.
"""

import argparse
import os
import select
import socket
import subprocess
import sys
import threading

TCP_STATES = {1: "established", 8: "close_wait", 7: "reset"}

_out_lock = threading.Lock()


def emit(line):
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def parse_addr(text):
    """`127.0.0.1:P`, `[::1]:P` or `[::]:P` -> (family, host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise SystemExit(f"bad address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def format_addr(sock):
    addr = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"


def tcp_state(conn):
    # struct tcp_info starts with `__u8 tcpi_state`.
    return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


class Server:
    def __init__(self, listener):
        self.listener = listener
        # Non-blocking accept behind select(): the listener's file description
        # is shared with a handover child, and both must cope with losing the
        # race for a connection (EAGAIN) rather than block in accept().
        self.listener.setblocking(False)
        self.lock = threading.Lock()
        self.conns = []
        self.accepted = 0
        self.wake_r, self.wake_w = os.pipe()
        self.stop = False
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.child = None

    def start(self):
        emit(f"ready {os.getpid()} {format_addr(self.listener)}")
        self.thread.start()

    def accept_loop(self):
        while True:
            readable, _, _ = select.select([self.listener, self.wake_r], [], [])
            if self.stop:
                return
            if self.listener not in readable:
                continue
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the other holder of the listener won the race
            except ConnectionAbortedError:
                continue
            with self.lock:
                self.conns.append(conn)
                self.accepted += 1
                n = self.accepted
            emit(f"accepted {n}")

    def stop_accepting(self):
        if self.thread.is_alive():
            self.stop = True
            os.write(self.wake_w, b"x")
            self.thread.join()

    def close(self, k):
        with self.lock:
            if k > len(self.conns):
                emit(f"error close {k}: only {len(self.conns)} open")
                return
            victims, self.conns = self.conns[:k], self.conns[k:]
        for conn in victims:
            conn.close()
        emit(f"closed {k}")

    def count(self):
        counts = {"established": 0, "close_wait": 0, "reset": 0, "other": 0}
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            counts[TCP_STATES.get(tcp_state(conn), "other")] += 1
        emit(
            f"count open={len(conns)} established={counts['established']} "
            f"close_wait={counts['close_wait']} reset={counts['reset']} other={counts['other']}"
        )

    def handover(self, argv0):
        if self.child is not None:
            emit("error handover: already handed over once")
            return
        fd = self.listener.fileno()
        child = subprocess.Popen(
            [sys.executable, "-u", argv0, "--inherit-fd", str(fd)],
            pass_fds=[fd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        first = child.stdout.readline()
        if not first.startswith("ready "):
            emit(f"error handover: child said {first!r}")
            return
        emit("child> " + first.rstrip("\n"))
        self.child = child

        def relay():
            for line in child.stdout:
                emit("child> " + line.rstrip("\n"))

        threading.Thread(target=relay, daemon=True).start()
        emit(f"child {child.pid}")

    def to_child(self, cmd):
        if self.child is None:
            emit("error tochild: no child")
            return
        self.child.stdin.write(cmd + "\n")
        self.child.stdin.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--listen", metavar="ADDR:PORT")
    group.add_argument("--inherit-fd", type=int, metavar="N")
    parser.add_argument("--backlog", type=int, default=128)
    args = parser.parse_args()

    if args.listen:
        family, host, port = parse_addr(args.listen)
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # `[::]` is dual-stack (accepts IPv4 as ::ffff:a.b.c.d); a specific
            # IPv6 address is IPv6-only by nature.
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((host, port))
        listener.listen(args.backlog)
    else:
        listener = socket.socket(fileno=args.inherit_fd)

    server = Server(listener)
    server.start()

    for raw in sys.stdin:
        words = raw.split()
        if not words:
            continue
        cmd, rest = words[0], words[1:]
        try:
            if cmd == "close" and len(rest) == 1:
                server.close(int(rest[0]))
            elif cmd == "closeall":
                with server.lock:
                    n = len(server.conns)
                server.close(n)
            elif cmd == "count":
                server.count()
            elif cmd == "stopaccept":
                server.stop_accepting()
                emit("stopped")
            elif cmd == "handover":
                server.handover(os.path.abspath(__file__))
            elif cmd == "tochild" and rest:
                server.to_child(raw.strip().split(None, 1)[1])
            elif cmd == "closelistener":
                server.stop_accepting()
                server.listener.close()
                emit("listener closed")
            elif cmd == "exit":
                emit("bye")
                break
            else:
                emit(f"error unknown command {raw.strip()!r}")
        except Exception as exc:  # report, never die silently
            emit(f"error {cmd}: {exc!r}")
    # Skip interpreter teardown: the accept thread may sit in select().
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
