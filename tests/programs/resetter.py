#!/usr/bin/env python3
"""Connects to a server over and over and resets every connection at once.

Used by the privileged race test (tests/races.rs): each of `--workers`
processes opens a connection, sets SO_LINGER {1, 0} and closes it, so the
peer's RST reaches the server's socket while the server is accepting it on
another CPU. Bounded by `--count` connections in all and by `--seconds`.

stdout: `done N` once every worker finished, N = connections established
(and reset) in all; `error MESSAGE` if a worker failed.
"""

import argparse
import multiprocessing
import socket
import struct
import sys
import time

from lineproto import parse_addr

LINGER_RESET = struct.pack("ii", 1, 0)


def worker(family, host, port, count, deadline, results):
    done = 0
    try:
        while done < count and time.monotonic() < deadline:
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.connect((host, port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            finally:
                s.close()
            done += 1
    except OSError as e:
        results.put(("error", f"{e} after {done} connections"))
        return
    results.put(("done", done))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connect", required=True, metavar="ADDR:PORT")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    family, host, port = parse_addr(args.connect)
    deadline = time.monotonic() + args.seconds
    results = multiprocessing.Queue()
    share = [args.count // args.workers + (i < args.count % args.workers) for i in range(args.workers)]
    procs = [
        multiprocessing.Process(target=worker, args=(family, host, port, n, deadline, results))
        for n in share
    ]
    for p in procs:
        p.start()
    total, errors = 0, []
    for _ in procs:
        kind, value = results.get()
        if kind == "done":
            total += value
        else:
            errors.append(value)
    for p in procs:
        p.join()
    if errors:
        print(f"error {'; '.join(errors)}", flush=True)
        sys.exit(1)
    print(f"done {total}", flush=True)


if __name__ == "__main__":
    main()
