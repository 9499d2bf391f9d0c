#!/usr/bin/env python3
"""A TCP client that opens connections and holds them until told otherwise.

Used by the privileged end-to-end tests (the harness in testkit/). Line-oriented:

stdout:
  ready PID             started
  connected N           reply to startup and `open K`: N = connections now open
  closed K              reply to `close K` / `closeall`
  reset K               reply to `reset K`
  bye                   reply to `exit`
  error MESSAGE         a command failed

stdin commands:
  open K        open K more connections (one after the other: each connect()
                returns before the next starts, so the server accepts them in
                this order)
  close K       close the K oldest open connections (FIN: the server side goes
                to CLOSE_WAIT until the server closes it)
  reset K       abort the K oldest open connections (SO_LINGER 0 then close:
                RST, the server side goes to CLOSE)
  closeall | exit

Connections are opened from `--source ADDR` when given (distinct source
addresses), else from whatever the kernel picks; `--send TEXT` writes TEXT
on each connection once it is open (the first bytes a server may wait for);
`--comm NAME` sets the process's command name (`/proc/PID/comm`, at most
15 bytes) before it connects, so that tests can tell clients apart.
EOF on stdin exits.
"""

import argparse
import ctypes
import os
import socket
import struct

from lineproto import commands, emit, exit_now, parse_addr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, metavar="ADDR:PORT")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--source", metavar="ADDR", help="local address to bind before connecting")
    parser.add_argument("--send", metavar="TEXT", help="send TEXT on each connection once it is open")
    parser.add_argument("--comm", metavar="NAME", help="set the command name (prctl PR_SET_NAME)")
    args = parser.parse_args()
    if args.comm:
        PR_SET_NAME = 15
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NAME, args.comm.encode()[:15], 0, 0, 0) != 0:
            raise SystemExit(f"prctl(PR_SET_NAME) failed: {os.strerror(ctypes.get_errno())}")
    family, host, port = parse_addr(args.connect)
    conns = []

    def open_conns(k):
        for _ in range(k):
            sock = socket.socket(family, socket.SOCK_STREAM)
            if args.source:
                sock.bind((args.source.strip("[]"), 0))
            sock.connect((host, port))
            if args.send:
                sock.sendall(args.send.encode())
            conns.append(sock)
        emit(f"connected {len(conns)}")

    def take(k, what):
        if k > len(conns):
            emit(f"error {what} {k}: only {len(conns)} open")
            return None
        victims = conns[:k]
        del conns[:k]
        return victims

    emit(f"ready {os.getpid()}")
    try:
        open_conns(args.n)
    except OSError as exc:
        emit(f"error connect {args.connect}: {exc!r}")
        exit_now(1)

    for cmd, rest, line in commands():
        try:
            if cmd == "open" and len(rest) == 1:
                open_conns(int(rest[0]))
            elif cmd == "close" and len(rest) == 1:
                victims = take(int(rest[0]), "close")
                if victims is not None:
                    for sock in victims:
                        sock.close()
                    emit(f"closed {len(victims)}")
            elif cmd == "reset" and len(rest) == 1:
                victims = take(int(rest[0]), "reset")
                if victims is not None:
                    for sock in victims:
                        # l_onoff=1, l_linger=0: close() sends RST, not FIN.
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        sock.close()
                    emit(f"reset {len(victims)}")
            elif cmd == "closeall":
                n = len(conns)
                for sock in conns:
                    sock.close()
                conns.clear()
                emit(f"closed {n}")
            elif cmd == "exit":
                emit("bye")
                break
            else:
                emit(f"error unknown command {line!r}")
        except Exception as exc:
            emit(f"error {cmd}: {exc!r}")
    exit_now()


if __name__ == "__main__":
    main()
