#!/usr/bin/env python3
"""An HTTP/1.1 keep-alive client: one connection per request, held open after
the response until the server closes it.

Used by the nginx end-to-end tests (tests/nginx.rs). Line-oriented:

stdout:
  ready PID
  sent NAME                 the request NAME is written on its own connection
  done NAME STATUS BODY T   its response is complete: status code, body (spaces
                            as `_`), T = CLOCK_MONOTONIC ns when it was read
  eof NAME T                the server closed the connection afterwards
  error NAME MESSAGE        the request failed

stdin commands:
  get NAME PATH     connect, send `GET PATH` (keep-alive), read the response
                    and then wait for the server to close, in the background

EOF on stdin exits (closing whatever is still open).
"""

import argparse
import os
import socket
import threading
import time

from lineproto import commands, emit, exit_now

def now_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def read_response(sock):
    """Returns (status, body) of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the headers ({data!r})")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = None
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        raise ConnectionError(f"no Content-Length in {lines!r}")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of the body")
        body += chunk
    return status, body[:length].decode("latin-1")


def get(host, port, name, path):
    try:
        sock = socket.create_connection((host, port))
        request = f"GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: gracewatch-e2e\r\n\r\n"
        sock.sendall(request.encode())
        emit(f"sent {name}")
        status, body = read_response(sock)
        emit(f"done {name} {status} {body.strip().replace(' ', '_') or '-'} {now_ns()}")
        # Keep-alive: the connection stays open until the server ends it.
        while sock.recv(65536):
            pass
        emit(f"eof {name} {now_ns()}")
        sock.close()
    except Exception as exc:  # report, never die silently
        emit(f"error {name} {exc!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.connect.rpartition(":")
    emit(f"ready {os.getpid()}")
    for cmd, rest, line in commands():
        if cmd == "get" and len(rest) == 2:
            threading.Thread(
                target=get, args=(host, int(port), rest[0], rest[1]), daemon=True
            ).start()
        else:
            emit(f"error - unknown command {line!r}")
    exit_now()


if __name__ == "__main__":
    main()
