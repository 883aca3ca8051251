"""Run a command as this process's child and write the child's peak resident memory (bytes) to a file:

    python -S bench/rss_wrapper.py OUT_FILE COMMAND [ARG ...]

Measured through this small process (no site imports) because a child of a big process inherits that
process's RSS high-water mark into its ru_maxrss (Linux carries it through fork and exec). SIGTERM and SIGINT
are passed on to the child; the exit status is the child's. Used by bench/footprint.py, bench/arm64/job.py
and tests/edge/test_memory_limit.py.
"""

import os
import signal
import sys

pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
