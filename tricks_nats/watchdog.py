"""Nothing outlives a run, even when `up` itself is killed with SIGKILL.

One tiny process per `up` (this very file, run as a script by a bare `python -I -S`: standard
library only) reads a pipe from its parent, one line per order:

- `+PGID` / `-PGID`: a process group to kill (a pod, the embedded nats-server) / forget it;
- `C+PATH` / `C-PATH`: a cgroup (v2) whose every process is killed, then the cgroup removed
  (a cgroup v1 tree is only removed, once its processes are gone);
- `E+NAME=VALUE` / `E-NAME=VALUE`: an environment entry; every process carrying it is killed
  (how pods are found where cgroups are not available);
- `F+PATH` / `F-PATH`: a file or directory to remove (a server's config, a run's state file);
- `R+ARGV` / `R-ARGV`: a command to run, ARGV a JSON list (`R+["nft","delete","table",...]`):
  what undoes a change to the machine (a firewall table, a qdisc, a mount). Commands run
  last, once processes are killed and cgroups removed, newest first, `COMMAND_S` each at
  most; their failures are ignored;
- `bye`: the parent cleaned up after itself; the watchdog exits and touches nothing.

End-of-file without a goodbye means the parent died: the watchdog then kills, and removes,
everything still registered. It lives in its own session, so a Ctrl-C aimed at `up` does not
reach it, and it ignores SIGINT and SIGTERM for the same reason.

The helpers below (kill a cgroup, find marked processes) are also what the local runtime uses
at the end of a normal run, so both paths clean up the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

#: How long the watchdog keeps retrying to kill marked processes and remove cgroups.
CLEANUP_S = 10.0
#: How long each command registered with `R+` may run at the parent's death.
COMMAND_S = 10.0


# -- shared helpers (standard library only: the watchdog runs them without our package) -------


def kill_cgroup(path: str) -> None:
    """SIGKILL every process of a cgroup v2 and its descendants, atomically (`cgroup.kill`,
    Linux 5.14+); a cgroup already gone is fine."""
    with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as f:
        f.write("1")


def rmdir_cgroup(path: str) -> bool:
    """One attempt to remove a cgroup tree, deepest first; True once it is gone. A cgroup
    whose killed processes are still exiting refuses (EBUSY): try again a little later."""
    if not os.path.isdir(path):
        return True
    dirs = [d for d, _, _ in os.walk(path, topdown=False)]
    for d in dirs:
        with contextlib.suppress(OSError):
            os.rmdir(d)
    return not os.path.isdir(path)


def marked_pids(entry: str) -> list[int]:
    """Processes (other than this one) whose environment holds `entry` (`NAME=VALUE`)."""
    needle = os.fsencode(entry)
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(name))
    return found


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def remove_path(path: str) -> None:
    """Remove a file, a symlink or a whole directory; one already gone is fine."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil  # only ever needed once, at the end

            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


# -- the watchdog process ---------------------------------------------------------------------


def _main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    sets: dict[str, set[str]] = {"C": set(), "E": set(), "F": set()}
    commands: list[str] = []  # in order of registration, each as sent (JSON)
    for raw in sys.stdin.buffer:
        line = os.fsdecode(raw.rstrip(b"\n"))
        if line == "bye":
            return
        with contextlib.suppress(ValueError):
            if line[:2] == "R+":
                commands.append(line[2:])
            elif line[:2] == "R-":
                if line[2:] in commands:  # the newest registration of the same command goes
                    del commands[len(commands) - 1 - commands[::-1].index(line[2:])]
            elif line[:1] == "+":
                groups.add(int(line[1:]))
            elif line[:1] == "-":
                groups.discard(int(line[1:]))
            elif line[:1] in sets and line[1:2] == "+":
                sets[line[:1]].add(line[2:])
            elif line[:1] in sets and line[1:2] == "-":
                sets[line[:1]].discard(line[2:])
    # The parent is gone without a goodbye: kill everything it left, then tidy up.
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for cgroup in sets["C"]:
        kill_cgroup(cgroup)
    # Files first (credentials, a server's store): the hunt for marked processes below may
    # take seconds, and nothing must stop their removal.
    for path in sets["F"]:
        remove_path(path)
    deadline = time.monotonic() + CLEANUP_S
    marks = sorted(sets["E"])
    while marks and time.monotonic() < deadline:
        pids = [pid for mark in marks for pid in marked_pids(mark)]
        if not pids:
            break
        kill_pids(pids)
        time.sleep(0.02)
    cgroups = sorted(sets["C"])
    while cgroups and time.monotonic() < deadline:
        cgroups = [c for c in cgroups if not rmdir_cgroup(c)]
        if cgroups:
            time.sleep(0.02)
    for command in reversed(commands):
        run_command(command)


def run_command(command: str) -> None:
    """Run one `R+` command (a JSON list of strings), `COMMAND_S` at most; errors ignored."""
    with contextlib.suppress(ValueError, TypeError, OSError, subprocess.SubprocessError):
        argv = json.loads(command)
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=COMMAND_S,
            check=False,
        )


# -- the parent's side --------------------------------------------------------------------------


class Watchdog:
    """Started on first use; `close()` says goodbye so nothing is killed after a clean run."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._broken = False

    def _send(self, line: str, *, start: bool = True) -> None:
        if "\n" in line:
            raise ValueError(f"the watchdog takes one line per order, not {line!r}")
        with self._lock:
            if self._proc is None:
                if not start or self._broken:
                    return
                try:
                    self._proc = subprocess.Popen(
                        [sys.executable, "-I", "-S", os.path.abspath(__file__)],
                        stdin=subprocess.PIPE,
                        start_new_session=True,
                        close_fds=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                except OSError as exc:  # no process to spare: run unguarded, do not fail
                    import logging

                    logging.getLogger(__name__).warning(
                        "cannot start the watchdog (%s): a SIGKILL of this process would "
                        "leave its children running",
                        exc,
                    )
                    self._broken = True
                    return
            assert self._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ValueError):
                self._proc.stdin.write(os.fsencode(line) + b"\n")
                self._proc.stdin.flush()

    def guard(self, pgid: int) -> None:
        """Kill process group `pgid` if the parent dies."""
        self._send(f"+{pgid}")

    def release(self, pgid: int) -> None:
        self._send(f"-{pgid}", start=False)

    def kill_cgroup_on_death(self, path: str | os.PathLike[str]) -> None:
        """Kill every process of this cgroup (v2) and remove it if the parent dies."""
        self._send(f"C+{os.path.abspath(path)}")

    def forget_cgroup(self, path: str | os.PathLike[str]) -> None:
        self._send(f"C-{os.path.abspath(path)}", start=False)

    def kill_marked_on_death(self, entry: str) -> None:
        """Kill every process whose environment holds `entry` (`NAME=VALUE`) if the parent dies."""
        if "=" not in entry:
            raise ValueError(f"an environment entry is NAME=VALUE, not {entry!r}")
        self._send(f"E+{entry}")

    def forget_marked(self, entry: str) -> None:
        self._send(f"E-{entry}", start=False)

    def remove_on_death(self, path: str | os.PathLike[str]) -> None:
        """Remove this file (or directory) if the parent dies without saying goodbye."""
        self._send(f"F+{os.path.abspath(path)}")

    def forget_file(self, path: str | os.PathLike[str]) -> None:
        self._send(f"F-{os.path.abspath(path)}", start=False)

    def run_on_death(self, argv: list[str]) -> None:
        """Run this command if the parent dies without saying goodbye: after processes are
        killed and cgroups removed, newest registration first (a command undoing a change is
        registered before the change is made)."""
        self._send(f"R+{_command(argv)}")

    def forget_command(self, argv: list[str]) -> None:
        """Withdraw one registration of this command (the change was undone)."""
        self._send(f"R-{_command(argv)}", start=False)

    @property
    def pid(self) -> int | None:
        """The watchdog process, once started."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            proc.stdin.write(b"bye\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _command(argv: list[str]) -> str:
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"a command is a non-empty list of strings, not {argv!r}")
    return json.dumps(argv, separators=(",", ":"))  # one line: json escapes newlines


if __name__ == "__main__":
    _main()
