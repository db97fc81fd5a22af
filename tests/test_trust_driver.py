"""The shell driver and the restart promise agree: what drivers/PROTOCOL.md promises a pod about
a restarting server, refused credentials, timeouts, closing and secrets holds for
`tricks-nats event/wait/discover` and for the Python driver alike.

Real nats-server processes and real `tricks-nats` processes throughout. No sleep is a
synchronisation: a test waits for what it needs (a connection attempt seen, a count read, the
supervisor's restart). Time never decides a verdict: the exit code, the error kind and the
counts do; the generous hang guards only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tricks_nats import env as E
from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.counting import CountKeeper
from tricks_nats.driver import Config, Driver, SyncDriver
from tricks_nats.errors import (
    ConfigError,
    NatsUnavailable,
    PermissionDenied,
    TricksError,
    WaitTimeout,
)
from tricks_nats.natsserver import EmbeddedServer, User
from tricks_nats.registrar import Registrar

from .conftest import cli_env
from .helpers import experiment

HANG_GUARD_S = 60  # far beyond any honest call here: only a hang reaches it
#: How long a pending call may take to end after its driver was closed (it should be at once).
CLOSE_GRACE_S = 5
DOCUMENTED = (ConfigError, NatsUnavailable, WaitTimeout, PermissionDenied, TricksError)


# -- helpers ---------------------------------------------------------------------------------------


def pod_env(
    exp: str,
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    tag: str = "sh",
    pod_id: int = 0,
) -> dict[str, str]:
    """The environment the coordinator gives a pod, for a `tricks-nats` subprocess."""
    env = cli_env()
    env.update(
        {
            E.TAG: tag,
            E.REPLICAS: "1",
            E.POD_ID: str(pod_id),
            E.EXP_ID: exp,
            E.POD_IP: f"127.0.0.{pod_id + 2}",
            E.NATS_URL: url,
        }
    )
    if user is not None:
        env[E.NATS_USER] = user
        env[E.NATS_PASSWORD] = password or ""
    return env


def pod_config(
    exp: str, url: str, *, user: str | None = None, password: str | None = None
) -> Config:
    return Config.from_env(pod_env(exp, url, user=user, password=password, tag="py"))


async def spawn_shell(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "tricks-nats",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """The exit code and output of a `tricks-nats` process; killed if the test gives up on it."""
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def shell(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return await finish(await spawn_shell(env, *args))


def one_error_line(err: str, expect: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tricks-nats: error: "), err
    assert expect in lines[0], err


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def coordinator(endpoint: Endpoint, exp: str, *, create: bool) -> AsyncIterator[Bus]:
    """The coordinator's NATS side of experiment `exp`: count watcher and registrar (and with
    `create`, its buckets; a restarted server keeps them in its store)."""
    bus = await Bus.open(endpoint, exp, name="test-coordinator")
    watcher = CountKeeper(bus, lambda *_: None)
    try:
        if create:
            await bus.create_buckets()
        await watcher.start()
        await Registrar(bus, watcher).start()
        yield bus
    finally:
        await watcher.stop()
        await bus.close()


def _has_socket(pid: int, local: tuple[str, int]) -> bool:
    """Whether process `pid` holds a TCP socket whose local address is `local`."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.laddr and (c.laddr.ip, c.laddr.port) == local for c in conns)


class Knocks:
    """Stands on a stopped server's port: accepts each connection and closes it at once (to a
    client NATS is unreachable), counting the attempts made by one process, the caller under
    test. Each connection is checked while it is still open, so its owner is known for sure."""

    def __init__(self) -> None:
        self.seen = 0
        self._pid: int | None = None
        self._pid_known = asyncio.Event()
        self._changed = asyncio.Condition()
        self._handlers: set[asyncio.Task[Any]] = set()

    def from_process(self, pid: int) -> None:
        self._pid = pid
        self._pid_known.set()

    async def on_connect(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._pid_known.wait()
            peer = writer.get_extra_info("peername")[:2]
            if self._pid is not None and _has_socket(self._pid, (peer[0], peer[1])):
                async with self._changed:
                    self.seen += 1
                    self._changed.notify_all()
        finally:
            writer.close()
            self._handlers.discard(task)

    async def at_least(self, n: int) -> None:
        async with asyncio.timeout(HANG_GUARD_S), self._changed:
            await self._changed.wait_for(lambda: self.seen >= n)

    async def settle(self) -> None:
        self._pid_known.set()  # no handler may wait for an owner that never comes
        await asyncio.gather(*self._handlers, return_exceptions=True)


@contextlib.asynccontextmanager
async def refusing(port: int) -> AsyncIterator[Knocks]:
    knocks = Knocks()
    listener = await asyncio.start_server(knocks.on_connect, "127.0.0.1", port)
    try:
        yield knocks
    finally:
        listener.close()
        await listener.wait_closed()
        await knocks.settle()


class Reads:
    """Counts a driver's reads of each event's count. A wait reads the count right after it
    subscribed to its notification, so its n-th read returning means it is now waiting for
    that notification: a test can act at exactly that point, without a sleep."""

    def __init__(self, bus: Bus) -> None:
        self.n: Counter[str] = Counter()
        self._changed = asyncio.Condition()
        original = bus.count

        async def count(event: str) -> int:
            value = await original(event)
            async with self._changed:
                self.n[event] += 1
                self._changed.notify_all()
            return value

        bus.count = count  # type: ignore[method-assign]

    async def at_least(self, event: str, n: int) -> None:
        async with asyncio.timeout(HANG_GUARD_S), self._changed:
            await self._changed.wait_for(lambda: self.n[event] >= n)


async def pending_wait_and_discover(
    driver: Driver,
) -> tuple[asyncio.Task[int], asyncio.Task[list[p.PodRecord]]]:
    """A `wait_event` and a `discover(tag, 5)`, both waiting for their notification."""
    reads = Reads(driver.bus)
    waiting = asyncio.create_task(driver.wait_event("never", 1))
    discovering = asyncio.create_task(driver.discover("nobody", 5))
    await reads.at_least("never", 1)  # its one read after subscribing
    await reads.at_least(p.start_event("nobody"), 2)  # the first look, then the wait's read
    assert not waiting.done() and not discovering.done()
    return waiting, discovering


async def raised(call: Awaitable[Any]) -> BaseException | None:
    """What awaiting `call` raised (None if it returned)."""
    try:
        await call
    except Exception as exc:
        return exc
    return None


def outcome(task: asyncio.Task[Any]) -> BaseException | None:
    """How a task ended: its exception, CancelledError, or None for a result."""
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()


def assert_documented(task: asyncio.Task[Any]) -> None:
    """Ended with one of our errors, or cancelled: never a ValueError or a nats-py error."""
    ended = outcome(task)
    assert isinstance(ended, (*DOCUMENTED, asyncio.CancelledError)), repr(ended)


async def end_by_cancelling(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def kill_and_reap(server: EmbeddedServer) -> None:
    """SIGKILL the (unsupervised) server, then let `stop` reap it; port and store are kept."""
    assert server.pid is not None and not server.supervise
    os.kill(server.pid, signal.SIGKILL)
    await server.stop()


# -- 1. a call made while the server is down completes once it is back -----------------------------


async def test_a_shell_event_made_while_the_server_is_down_completes_once_it_is_back(
    tmp_path: Path,
) -> None:
    """`tricks-nats event` started while NATS is away keeps trying (two attempts seen on the
    port), and once the server is back on the same port and store it registers: exit 0, the
    count printed and stored is 1 (counted once)."""
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    exp = p.new_experiment_id("down")
    await server.start()
    try:
        async with coordinator(Endpoint(server.url), exp, create=True):
            pass  # the buckets now live in the store
        await server.stop()
        proc: asyncio.subprocess.Process | None = None
        try:
            async with refusing(server.port) as knocks:
                proc = await spawn_shell(pod_env(exp, server.url), "event", "ready")
                knocks.from_process(proc.pid)
                await knocks.at_least(2)  # it is retrying, not failing
            assert proc.returncode is None
            await server.start()
            async with coordinator(Endpoint(server.url), exp, create=False) as bus:
                code, out, err = await finish(proc)
                assert (code, out, err) == (0, "1\n", "")
                assert await bus.count("ready") == 1
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await server.stop()


async def test_driver_connect_made_while_the_server_is_down_completes_once_it_is_back(
    tmp_path: Path,
) -> None:
    """`Driver.connect` rides out the outage the same way (RECOVERY_S), then counts once."""
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    exp = p.new_experiment_id("down")
    await server.start()
    try:
        async with coordinator(Endpoint(server.url), exp, create=True):
            pass
        await server.stop()
        connecting = None
        try:
            async with refusing(server.port) as knocks:
                knocks.from_process(os.getpid())
                connecting = asyncio.create_task(Driver.connect(pod_config(exp, server.url)))
                await knocks.at_least(2)
            assert not connecting.done()
            await server.start()
            async with coordinator(Endpoint(server.url), exp, create=False) as bus:
                async with asyncio.timeout(HANG_GUARD_S):
                    driver = await connecting
                try:
                    assert await driver.register_event("ready") == 1
                    assert await driver.count("ready") == 1
                finally:
                    await driver.close()
                assert await bus.count("ready") == 1
        finally:
            if connecting is not None and not connecting.done():
                await end_by_cancelling([connecting])
    finally:
        await server.stop()


# -- 2. a permissions violation is its own error, at once ------------------------------------------


@contextlib.asynccontextmanager
async def two_experiments(
    tmp_path: Path,
) -> AsyncIterator[tuple[EmbeddedServer, User, Bus, Bus]]:
    """Experiments A and B on one server with users; the pod user may reach A only."""
    exp_a, exp_b = p.new_experiment_id("a"), p.new_experiment_id("b")
    admin = User.random("admin")
    pod_a = User.random("pod-a", p.pod_permissions(exp_a))
    async with EmbeddedServer(users=[admin, pod_a], store_dir=tmp_path / "js") as server:
        endpoint = Endpoint(server.url, admin.name, admin.password)
        async with (
            coordinator(endpoint, exp_a, create=True) as bus_a,
            coordinator(endpoint, exp_b, create=True) as bus_b,
        ):
            yield server, pod_a, bus_a, bus_b


async def test_the_shell_reports_a_permissions_violation_at_once_with_exit_1(
    tmp_path: Path,
) -> None:
    """Valid credentials of A with the EXP_ID of B: exit 1 and "permissions violation", not
    exit 3 ("NATS unavailable") after retrying for 20 s."""
    async with two_experiments(tmp_path) as (server, pod_a, bus_a, bus_b):
        creds = {"user": pod_a.name, "password": pod_a.password}
        # The credentials are good: with their own experiment they work.
        assert await shell(pod_env(bus_a.exp_id, server.url, **creds), "event", "x") == (
            0,
            "1\n",
            "",
        )
        wrong = pod_env(bus_b.exp_id, server.url, **creds)
        for args in (("discover", "server", "--timeout", "60"), ("event", "x")):
            code, out, err = await shell(wrong, *args)
            assert (code, out) == (1, ""), (args, err)
            one_error_line(err, "permissions violation")
            assert "NATS refused" in err
        assert await bus_b.count("x") == 0
        assert await bus_a.count("x") == 1


async def test_the_python_driver_raises_permission_denied_for_every_call(tmp_path: Path) -> None:
    async with two_experiments(tmp_path) as (server, pod_a, bus_a, bus_b):
        creds = {"user": pod_a.name, "password": pod_a.password}
        async with Driver(pod_config(bus_a.exp_id, server.url, **creds)) as own:
            assert await own.register_event("x") == 1
        calls: list[tuple[str, Callable[[Driver], Any]]] = [
            ("register_event", lambda d: d.register_event("x")),
            ("count", lambda d: d.count("x")),
            ("wait_event", lambda d: d.wait_event("x", 1, timeout=60)),
            ("discover", lambda d: d.discover("server")),
            ("discover n", lambda d: d.discover("server", 2, timeout=60)),
        ]
        async with Driver(pod_config(bus_b.exp_id, server.url, **creds)) as d:
            together = {what: await raised(call(d)) for what, call in calls}
        # ... and each call on a connection of its own, where it is the first violation.
        alone = {}
        for what, call in calls:
            async with Driver(pod_config(bus_b.exp_id, server.url, **creds)) as fresh:
                alone[what] = await raised(call(fresh))
        for got in (together, alone):
            assert {what: type(exc).__name__ for what, exc in got.items()} == {
                what: "PermissionDenied" for what, _ in calls
            }
            assert all("permissions violation" in str(exc) for exc in got.values()), got
        assert await bus_b.count("x") == 0


# -- 3. --timeout bounds every shell call, connecting included -------------------------------------


@pytest.mark.parametrize(
    "args",
    [("wait", "x", "1", "--timeout", "1"), ("discover", "t", "--count", "2", "--timeout", "1")],
    ids=["wait", "discover"],
)
async def test_shell_timeout_bounds_connecting_to_a_nats_that_is_not_there(
    args: tuple[str, ...],
) -> None:
    """Nothing listens: the call times out (exit 1), it does not ride out the 20 s of
    connecting and report NATS unavailable (exit 3)."""
    env = pod_env("e-20260101-000000-beef", f"nats://127.0.0.1:{free_port()}")
    code, out, err = await shell(env, *args)
    assert (code, out) == (1, ""), err
    one_error_line(err, "timed out after 1s")


# -- 4. no driver call raises anything but the documented errors -----------------------------------


async def test_closing_a_driver_ends_its_pending_wait_and_discover(nats_server) -> None:
    async with experiment(nats_server) as ex:
        driver = await Driver.connect(ex.config())
        tasks: list[asyncio.Task[Any]] = []
        try:
            tasks = list(await pending_wait_and_discover(driver))
            await driver.close()
            _, still = await asyncio.wait(tasks, timeout=CLOSE_GRACE_S)
            assert not still, "a call still pending after its driver was closed"
            for task in tasks:
                assert_documented(task)
        finally:
            await end_by_cancelling(tasks)
            await driver.close()


async def test_closing_a_driver_whose_server_died_ends_its_pending_calls(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    await server.start()
    try:
        async with experiment(server) as ex:
            driver = await Driver.connect(ex.config())
            tasks: list[asyncio.Task[Any]] = []
            try:
                tasks = list(await pending_wait_and_discover(driver))
                await kill_and_reap(server)
                await driver.close()
                _, still = await asyncio.wait(tasks, timeout=CLOSE_GRACE_S)
                assert not still, "a call still pending after its driver was closed"
                for task in tasks:
                    assert_documented(task)
            finally:
                await end_by_cancelling(tasks)
                await driver.close()
    finally:
        await server.stop()


@pytest.mark.parametrize("server_dies", [False, True], ids=["server-up", "server-died"])
async def test_pending_calls_of_a_closed_driver_end_cleanly_when_cancelled(
    tmp_path: Path, server_dies: bool
) -> None:
    """What a program does with calls left pending at close: cancel them. They end cancelled
    (or with one of our errors), never `ValueError: list.remove(x)` from a reconnect hook
    that close() already dropped, nor a nats-py error from unsubscribing on a closed
    connection; and closing again is harmless."""
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    await server.start()
    try:
        async with experiment(server) as ex:
            driver = await Driver.connect(ex.config())
            tasks: list[asyncio.Task[Any]] = []
            try:
                tasks = list(await pending_wait_and_discover(driver))
                if server_dies:
                    await kill_and_reap(server)
                await driver.close()
                await end_by_cancelling(tasks)
                for task in tasks:
                    assert_documented(task)
                await driver.close()
                with pytest.raises(TricksError, match="the driver is closed"):
                    await driver.wait_event("never", 1)
            finally:
                await end_by_cancelling(tasks)
                await driver.close()
    finally:
        await server.stop()


async def test_sync_driver_close_twice_with_nothing_pending(nats_server) -> None:
    async with experiment(nats_server) as ex:

        def open_and_close_twice() -> tuple[bool, int]:
            driver = SyncDriver(ex.config())
            counted = driver.register_event("before-close")
            driver.close()
            driver.close()
            return driver._thread.is_alive(), counted

        alive, counted = await asyncio.to_thread(open_and_close_twice)
        assert (alive, counted) == (False, 1)


async def test_a_call_on_a_closed_sync_driver_is_a_tricks_error(nats_server) -> None:
    async with experiment(nats_server) as ex:

        def call_after_close() -> BaseException | None:
            driver = SyncDriver(ex.config())
            driver.close()
            ended: BaseException | None = None
            with warnings.catch_warnings():
                # The bug also leaves a coroutine never awaited: keep its warning in here.
                warnings.simplefilter("ignore", RuntimeWarning)
                try:
                    driver.count("x")
                except Exception as exc:
                    ended = exc.with_traceback(None)
                gc.collect()
            return ended

        ended = await asyncio.to_thread(call_after_close)
        assert isinstance(ended, TricksError), repr(ended)


# -- 5. no secret in any repr ----------------------------------------------------------------------

SECRET = "s3cret-" + "Zq8wX2v" * 3


def test_a_config_never_shows_its_password() -> None:
    config = Config(
        tag="t",
        replicas=1,
        pod_id=0,
        experiment="e-1",
        pod_ip="127.0.0.2",
        nats_url="nats://127.0.0.1:4222",
        nats_user="pod",
        nats_password=SECRET,
    )
    assert config.nats_password == SECRET  # it is there, only never shown
    for shown in (repr(config), str(config), f"{config}", f"{config!r}"):
        assert SECRET not in shown
        assert "pod" in shown  # the user is not a secret: the repr is a real one


async def server_with_a_pod_user(tmp_path: Path) -> tuple[EmbeddedServer, User]:
    user = User("pod", SECRET)
    server = EmbeddedServer(users=[user], store_dir=tmp_path / "js")
    await server.start()
    return server, user


async def test_a_connected_driver_never_shows_its_password(tmp_path: Path) -> None:
    server, user = await server_with_a_pod_user(tmp_path)
    try:
        config = pod_config("e-1", server.url, user=user.name, password=user.password)
        async with Driver(config) as driver:
            assert driver.bus.nc.is_connected  # the password was used
            for shown in (repr(driver.config), str(driver.config), repr(driver), repr(driver.bus)):
                assert SECRET not in shown
            assert SECRET not in repr(driver.bus.nc)
    finally:
        await server.stop()


async def test_the_drivers_nats_connection_options_never_show_the_password(tmp_path: Path) -> None:
    server, user = await server_with_a_pod_user(tmp_path)
    try:
        config = pod_config("e-1", server.url, user=user.name, password=user.password)
        async with Driver(config) as driver:
            options = driver.bus.nc.options
            assert options.get("user") == "pod"
            for shown in (str(options), repr(options), f"{options}"):
                assert SECRET not in shown
    finally:
        await server.stop()


def test_an_endpoint_never_shows_its_password() -> None:
    endpoint = Endpoint("nats://127.0.0.1:4222", "pod", SECRET)
    assert SECRET not in repr(endpoint)
    assert SECRET not in str(endpoint)


# -- 6. a wait pending across a server kill and restart --------------------------------------------
# tests/test_reliability.py covers a Bus-level call made while the server is stopped, and a whole
# `up` whose server is killed while its pods (probably) wait. Not covered: the Python driver's
# wait_event and discover(n), provably waiting for their notification BEFORE the kill, released
# by a registration and a pod start that both happen only AFTER the supervised restart.


async def test_a_wait_and_a_discover_pending_across_a_server_kill_resolve_after_it(
    nats_server,
) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config("w", 0)) as waiter:
        reads = Reads(waiter.bus)
        waiting = asyncio.create_task(waiter.wait_event("go", 1, timeout=HANG_GUARD_S))
        discovering = asyncio.create_task(waiter.discover("peer", 2, timeout=HANG_GUARD_S))
        try:
            await reads.at_least("go", 1)
            await reads.at_least(p.start_event("peer"), 2)
            assert nats_server.pid is not None
            nats_server.restarted.clear()
            os.kill(nats_server.pid, signal.SIGKILL)
            async with asyncio.timeout(HANG_GUARD_S):
                await nats_server.restarted.wait()  # the supervisor's restart, same port/store
            assert not waiting.done() and not discovering.done()  # nothing to release them yet
            async with Driver(ex.config("r", 0)) as other:
                assert await other.register_event("go") == 1
            await ex.run_pod("peer", 1, "127.0.0.11")
            await ex.run_pod("peer", 0, "127.0.0.10")
            assert await waiting == 1
            assert [(q.pod_id, q.ip) for q in await discovering] == [
                (0, "127.0.0.10"),
                (1, "127.0.0.11"),
            ]
            assert await waiter.count("go") == 1
        finally:
            await end_by_cancelling([waiting, discovering])
