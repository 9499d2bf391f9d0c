#!/usr/bin/env python3
"""Runs a command as a process with an exact pid: `with_pid.py PID CMD ARGS…`.

Used by the recycled-pid test to reuse a dead target's pid deterministically:
clone3() with `set_tid` asks the kernel for exactly that pid in the caller's
pid namespace (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE) and fails with
EEXIST if it is taken, instead of hoping that cycling through the pid space
lands on it. The child execs CMD (keeping stdin/stdout/stderr, network
namespace and everything else, like fork+exec); this process waits for it
and exits with its status.

stdout (before CMD takes over):
  error MESSAGE   clone3 or exec failed (exit status 1)
"""

import ctypes
import os
import signal
import sys

SYS_CLONE3 = 435  # x86_64, aarch64 and every architecture with the generic table


class CloneArgs(ctypes.Structure):
    # struct clone_args (include/uapi/linux/sched.h), CLONE_ARGS_SIZE_VER2.
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


def main():
    if len(sys.argv) < 3:
        raise SystemExit("usage: with_pid.py PID CMD [ARGS…]")
    pid = int(sys.argv[1])
    cmd = sys.argv[2:]
    tids = (ctypes.c_int32 * 1)(pid)
    args = CloneArgs(
        exit_signal=signal.SIGCHLD,
        set_tid=ctypes.addressof(tids),
        set_tid_size=1,
    )
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    sys.stdout.flush()
    ret = libc.syscall(
        ctypes.c_long(SYS_CLONE3), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))
    )
    if ret < 0:
        err = ctypes.get_errno()
        print(f"error clone3 with set_tid {pid}: {os.strerror(err)}", flush=True)
        os._exit(1)
    if ret == 0:
        # The child: like the child of fork(), about to exec.
        try:
            os.execvp(cmd[0], cmd)
        except OSError as exc:
            print(f"error exec {cmd[0]}: {exc}", flush=True)
        os._exit(1)
    _, status = os.waitpid(ret, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
