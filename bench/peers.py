"""The peers the benchmark compares against: a real ZooKeeper and a real Redis, on loopback.

Each one is started by the benchmark in its own temporary directory on a free port, and always
stopped (SIGTERM, then SIGKILL), Ctrl-C included; the processes also die with the benchmark if
it is killed outright (PR_SET_PDEATHSIG). When a peer is not installed or does not start,
`Unavailable` says why, and the benchmark prints that in the peer's rows.

Durability is set alike for all three systems: none of them fsyncs each write (JetStream's
default; Redis without AOF or snapshots; ZooKeeper with `forceSync=no`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ZK_JAR = Path("/usr/share/java/zookeeper.jar")
ZK_CONF = Path("/etc/zookeeper/conf")
READY_TIMEOUT_S = 30.0


class Unavailable(Exception):
    """A peer that cannot be installed or started here; the message says why."""


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-3:])[-300:]


def _ask(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


@contextlib.contextmanager
def zookeeper() -> Iterator[tuple[str, int]]:
    """A standalone ZooKeeper (Debian's `zookeeper` package); yields (`host:port`, pid)."""
    java = shutil.which("java")
    if not ZK_JAR.exists():
        raise Unavailable("ZooKeeper is not installed (bench/setup.sh: apt-get install zookeeper)")
    if not java:
        raise Unavailable("ZooKeeper needs java, which is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-zk-") as tmp:
        work = Path(tmp)
        port = free_port()
        (work / "data").mkdir()
        (work / "zoo.cfg").write_text(
            "\n".join(
                [
                    "tickTime=2000",
                    f"dataDir={work / 'data'}",
                    f"clientPort={port}",
                    "clientPortAddress=127.0.0.1",
                    "maxClientCnxns=0",
                    "forceSync=no",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=ruok,srvr,wchs",
                    "",
                ]
            )
        )
        classpath = f"{ZK_CONF}:{ZK_JAR}"
        cmd = [java, "-Xmx1g", "-cp", classpath, f"-Dzookeeper.log.dir={work}"]
        cmd += ["org.apache.zookeeper.server.ZooKeeperServerMain", str(work / "zoo.cfg")]
        log = work / "zookeeper.log"
        proc = _start(cmd, log, work)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise Unavailable(f"ZooKeeper exited at start: {_tail(log)}")
                with contextlib.suppress(OSError):
                    if _ask(port, b"ruok") == b"imok":
                        break
                if time.monotonic() > deadline:
                    raise Unavailable(f"ZooKeeper not ready after {READY_TIMEOUT_S:g}s")
                time.sleep(0.1)
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            _stop(proc)


def zk_watches(port: int) -> int:
    """Watches the server holds now (`wchs`: "... Total watches:N")."""
    text = _ask(port, b"wchs").decode(errors="replace")
    for line in text.splitlines():
        if "Total watches:" in line:
            return int(line.rsplit(":", 1)[1])
    return 0


def zookeeper_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "zookeeper"], capture_output=True, text=True
        )
        return out.stdout.strip()
    return "?"


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[int, int]]:
    """A redis-server (Debian's `redis-server` package), no persistence; yields (port, pid)."""
    binary = shutil.which("redis-server")
    if not binary:
        raise Unavailable("redis-server is not installed (bench/setup.sh: apt-get install)")
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        work = Path(tmp)
        port = free_port()
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work)]
        cmd += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--maxclients", "10000"]
        log = work / "redis.log"
        proc = _start(cmd, log, work)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise Unavailable(f"redis-server exited at start: {_tail(log)}")
                with contextlib.suppress(OSError):
                    if _ask(port, b"PING\r\n").startswith(b"+PONG"):
                        break
                if time.monotonic() > deadline:
                    raise Unavailable(f"redis-server not ready after {READY_TIMEOUT_S:g}s")
                time.sleep(0.05)
            yield port, proc.pid
        finally:
            _stop(proc)


def redis_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        for word in out.stdout.split():
            if word.startswith("v="):
                return word[2:]
    return "?"
