"""What the test programs share (each imports it from its own directory):
their line protocol on stdout, one line per event, flushed at once and never
interleaved across threads; the HOST:PORT addresses they take; the clock
they report times on (CLOCK_MONOTONIC, the one gracewatch and the tests use).
"""

import os
import socket
import sys
import threading
import time

# Reentrant: a signal handler may print while its own thread is printing.
_out_lock = threading.RLock()


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


def monotonic_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def commands():
    """The commands read from stdin, one a line, until it closes:
    (command, [arguments…], the line stripped); blank lines are skipped."""
    for raw in sys.stdin:
        words = raw.split()
        if words:
            yield words[0], words[1:], raw.strip()


def exit_now(code=0):
    """Ends the process at once, its output flushed: no interpreter
    teardown waiting on threads that still hold sockets."""
    sys.stdout.flush()
    os._exit(code)
