"""Nothing outlives a run, even when `up` itself is killed with SIGKILL.

One tiny process per `up` (plain Python, no imports of ours: it starts in ~20 ms) reads a pipe
from its parent: `+PGID` registers a process group (a pod, the embedded nats-server), `-PGID`
forgets one that ended normally, and end-of-file without a goodbye means the parent died:
the watchdog then kills every group still registered. It lives in its own session, so a
Ctrl-C aimed at `up` does not reach it, and it ignores SIGINT and SIGTERM for the same reason.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

_SCRIPT = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    line = line.strip()
    if line == "bye":
        sys.exit(0)
    if line[:1] == "+":
        groups.add(int(line[1:]))
    elif line[:1] == "-":
        groups.discard(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class Watchdog:
    """Started on first use; `close()` says goodbye so nothing is killed after a clean run."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-S", "-c", _SCRIPT],
                    stdin=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                    close_fds=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            assert self._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ValueError):
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()

    def guard(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def release(self, pgid: int) -> None:
        if self._proc is not None:
            self._send(f"-{pgid}")

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            proc.stdin.write("bye\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
