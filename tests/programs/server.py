#!/usr/bin/env python3
"""A TCP server that accepts connections and holds them until told otherwise.

Used by the privileged end-to-end tests (the harness in testkit/). Everything is
line-oriented so that tests wait for acknowledgements instead of sleeping:

stdout (one event per line, flushed at once):
  ready PID ADDR        listening (or inherited listener adopted); ADDR = bound address
  accepted N            one more connection accepted; N = total accepted by this process
  hungup N T            with --hangup: the N-th connection was closed right
                        after its accept, which returned at CLOCK_MONOTONIC T ns
  closed K              reply to `close K` / `closeall` / `closereset` (K = how
                        many were closed; `closereset` closes those the peer reset)
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
  pong                  reply to `ping`: the process is alive, reads its stdin,
                        and every signal delivered before was reported first
  now T                 reply to `now`: T = CLOCK_MONOTONIC in nanoseconds
  scheduled K           reply to `closeafter MS…` (K closes scheduled)
  closedat I T          the I-th scheduled close (1-based, oldest connection
                        first) returned at CLOCK_MONOTONIC T ns
  signal NAME T open=N from=PID
                        received signal NAME (HUP INT QUIT USR1 USR2 TERM
                        WINCH) at CLOCK_MONOTONIC T ns, holding N accepted
                        connections, sent by PID (si_pid). INT, QUIT and TERM
                        then exit the process at once (status 0)
  error MESSAGE         a command failed (the harness fails the test)

stdin commands:
  close K | closeall | closereset | count | stopaccept | handover | closelistener | exit
  ping | now
  closeafter MS…        close the oldest open connections one at a time, the
                        I-th MS milliseconds after the command (in-flight
                        requests of different lengths finishing), on a
                        background thread
  tochild CMD           forward CMD to the handover child's stdin

`--hangup` closes every connection as soon as it is accepted (a server of
short requests: its live count touches zero between them).

`--name-hex HEX` sets the process name (comm) to those bytes first (e.g.
`fffe67`, not UTF-8), as any user can with prctl(PR_SET_NAME).

`handover` is the classic graceful-restart hand-off: fork/exec a new
`server.py --inherit-fd N` with the listening fd passed (subprocess pass_fds),
both processes then accept from the same listener until the old one is told
to `stopaccept`. The accepted sockets are not inherited (Python creates them
close-on-exec), exactly like a real server's.

The child's stdio is relayed through this process so that one pipe carries
everything in a deterministic order. EOF on stdin exits the process.

Signals are blocked in every thread and taken by one thread in
sigwaitinfo(), which timestamps them as soon as they are delivered and knows
who sent them: that is what the drain tests compare with the time of the
last close.
"""

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from lineproto import commands, emit, exit_now, monotonic_ns, parse_addr

TCP_STATES = {1: "established", 8: "close_wait", 7: "reset"}

REPORTED_SIGNALS = {
    signal.SIGHUP: "HUP",
    signal.SIGINT: "INT",
    signal.SIGQUIT: "QUIT",
    signal.SIGUSR1: "USR1",
    signal.SIGUSR2: "USR2",
    signal.SIGTERM: "TERM",
    signal.SIGWINCH: "WINCH",
}
EXITING_SIGNALS = {signal.SIGINT, signal.SIGQUIT, signal.SIGTERM}

# The running Server, for the open count reported with a signal.
_server = None


def format_addr(sock):
    addr = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"


def report_signal(info):
    t = monotonic_ns()
    server = _server
    open_now = len(server.conns) if server is not None else 0
    emit(f"signal {REPORTED_SIGNALS[info.si_signo]} {t} open={open_now} from={info.si_pid}")
    if info.si_signo in EXITING_SIGNALS:
        exit_now()


def signal_loop():
    while True:
        report_signal(signal.sigwaitinfo(set(REPORTED_SIGNALS)))


def report_pending_signals():
    """Takes (and reports) any signal already delivered but not yet taken by
    signal_loop, so that a reply that follows says nothing was pending."""
    while True:
        info = signal.sigtimedwait(set(REPORTED_SIGNALS), 0)
        if info is None:
            return
        report_signal(info)


def tcp_state(conn):
    # struct tcp_info starts with `__u8 tcpi_state`.
    return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


class Server:
    def __init__(self, listener, hangup=False):
        self.listener = listener
        self.hangup = hangup
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
            if self.hangup:
                at = monotonic_ns()
                conn.close()
                with self.lock:
                    self.accepted += 1
                    n = self.accepted
                emit(f"accepted {n}")
                emit(f"hungup {n} {at}")
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

    def close_after(self, delays_ms):
        with self.lock:
            n = len(self.conns)
        if len(delays_ms) > n:
            emit(f"error closeafter: {len(delays_ms)} delays, only {n} open")
            return
        start = monotonic_ns()

        def run():
            for i, delay in enumerate(delays_ms, 1):
                wait = start + delay * 1_000_000 - monotonic_ns()
                if wait > 0:
                    time.sleep(wait / 1e9)
                with self.lock:
                    conn = self.conns[0]
                # Close first, forget after: while a signal reports open=N,
                # N counts every connection not yet fully closed.
                conn.close()
                t = monotonic_ns()
                with self.lock:
                    self.conns.remove(conn)
                emit(f"closedat {i} {t}")

        threading.Thread(target=run, daemon=True).start()
        emit(f"scheduled {len(delays_ms)}")

    def close_reset(self):
        with self.lock:
            victims = [c for c in self.conns if tcp_state(c) == 7]
            self.conns = [c for c in self.conns if tcp_state(c) != 7]
        for conn in victims:
            conn.close()
        emit(f"closed {len(victims)}")

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
    global _server
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--listen", metavar="ADDR:PORT")
    group.add_argument("--inherit-fd", type=int, metavar="N")
    parser.add_argument("--backlog", type=int, default=128)
    parser.add_argument("--hangup", action="store_true", help="close every connection once accepted")
    parser.add_argument(
        "--name-hex",
        metavar="HEX",
        help="set the process name (comm) to these bytes, e.g. fffe67 (not UTF-8)",
    )
    args = parser.parse_args()

    if args.name_hex:
        # PR_SET_NAME from the main thread names the process: any user can
        # give it bytes that are not UTF-8.
        import ctypes

        name = bytes.fromhex(args.name_hex)
        if ctypes.CDLL(None, use_errno=True).prctl(15, name, 0, 0, 0) != 0:
            raise SystemExit(f"prctl(PR_SET_NAME) failed: errno {ctypes.get_errno()}")

    # Before any other thread starts, so that every thread inherits the mask
    # and only signal_loop() takes these signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, set(REPORTED_SIGNALS))
    threading.Thread(target=signal_loop, daemon=True).start()

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

    server = Server(listener, hangup=args.hangup)
    _server = server
    server.start()

    for cmd, rest, line in commands():
        try:
            if cmd == "close" and len(rest) == 1:
                server.close(int(rest[0]))
            elif cmd == "closeall":
                with server.lock:
                    n = len(server.conns)
                server.close(n)
            elif cmd == "count":
                server.count()
            elif cmd == "closereset":
                server.close_reset()
            elif cmd == "stopaccept":
                server.stop_accepting()
                emit("stopped")
            elif cmd == "handover":
                server.handover(os.path.abspath(__file__))
            elif cmd == "tochild" and rest:
                server.to_child(line.split(None, 1)[1])
            elif cmd == "ping":
                report_pending_signals()
                emit("pong")
            elif cmd == "now":
                emit(f"now {monotonic_ns()}")
            elif cmd == "closeafter" and rest:
                server.close_after([int(ms) for ms in rest])
            elif cmd == "closelistener":
                server.stop_accepting()
                server.listener.close()
                emit("listener closed")
            elif cmd == "exit":
                emit("bye")
                break
            else:
                emit(f"error unknown command {line!r}")
        except Exception as exc:  # report, never die silently
            emit(f"error {cmd}: {exc!r}")
    # Skip interpreter teardown: the accept thread may sit in select().
    exit_now()


if __name__ == "__main__":
    main()
