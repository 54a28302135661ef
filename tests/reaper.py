"""Run a program as a child subreaper: ``python3 tests/reaper.py PROGRAM ARGS...``.

Where PID 1 does not reap orphans (as on some container hosts), the processes a daemon
double-forks (libvirtd's QEMU probes and guests) stay zombies and the daemon, which waits
for them to go, stalls. This wrapper adopts them (``PR_SET_CHILD_SUBREAPER``), reaps every
child, and exits with the program's status once the program has ended.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    program = os.fork()
    if program == 0:
        os.execvp(argv[0], argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: os.kill(program, number))
    status = 0
    while True:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            return status
        except InterruptedError:
            continue
        if pid == program:
            status = os.waitstatus_to_exitcode(code)
            return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
