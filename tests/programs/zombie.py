#!/usr/bin/env python3
"""A parent that does not reap its child: the child exits at once and stays
a zombie until told.

stdout: `zombie PID parent PPID` once the child has exited (it is a zombie then);
replies below.
stdin:
  reap   wait for the child (reply `reaped PID`): its pid is gone
  ping   reply `pong`
EOF closes stdin and exits the parent (its zombie child is reaped by init).
"""

import os
import sys

from lineproto import emit


def main():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    # Returns once the child has exited, without reaping it: a zombie.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    emit(f"zombie {pid} parent {os.getpid()}")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "reap":
            os.waitpid(pid, 0)
            emit(f"reaped {pid}")
        elif cmd == "ping":
            emit("pong")
        else:
            emit(f"error unknown command {cmd!r}")


if __name__ == "__main__":
    main()
