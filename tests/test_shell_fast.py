"""The shell commands' fast path (`tricks_nats.cli.fastpath` over `tricks_nats.syncwire`): a
plain `tricks-nats event/wait/discover/record` imports nothing heavy, other forms fall back to
the full command, and the small blocking client keeps the protocol's promises against a real
nats-server: a wait cut off while its notification goes by still ends at the count, a frozen
server or a stranger on the port never hangs a call, wrong credentials are said at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from tricks_nats import env as E
from tricks_nats.driver import Driver
from tricks_nats.natsserver import EmbeddedServer, User

from .conftest import cli_env
from .helpers import experiment
from .test_shell_driver import one_error_line, pod_env, tricks
from .test_trust_driver import HANG_GUARD_S, finish, spawn_shell

HEAVY = {"asyncio", "nats", "typer", "click", "rich", "msgspec", "dataclasses"}
LAUNCH = "import sys; from tricks_nats.cli.launch import main; sys.argv[0] = 'tricks-nats'; main()"


async def run(env: dict[str, str], *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    return await finish(proc)


def stranger_env(port: int) -> dict[str, str]:
    """A pod's environment pointing at whatever listens on `port` (no experiment there)."""
    return {
        **cli_env(),
        E.TAG: "sh",
        E.REPLICAS: "1",
        E.POD_ID: "0",
        E.EXP_ID: "e-20260101-000000-beef",
        E.NATS_URL: f"nats://127.0.0.1:{port}",
    }


async def imported(env: dict[str, str], *args: str) -> tuple[int, str, set[str]]:
    """Exit code, output and every module a `tricks-nats ARGS` imported."""
    code, out, err = await run(env, sys.executable, "-X", "importtime", "-c", LAUNCH, *args)
    modules = {
        line.split("|")[-1].strip().split(".")[0]
        for line in err.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return code, out, modules


async def test_the_plain_calls_import_nothing_heavy(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = {**pod_env(ex), E.TAGS: "sh,server"}
        await ex.run_pod("server", 0, "127.0.0.10")
        calls = {
            ("event", "ready"): "1\n",
            ("event", "ready", "--id", "a-1"): "2\n",
            ("wait", "ready", "2", "--timeout", "30"): "2\n",
            ("barrier", "ready", "3", "--timeout", "30"): "3\n",
            ("discover", "server", "--count=1"): "0 127.0.0.10\n",
            ("discover", "server", "--json"): (
                '[{"tag": "server", "pod_id": 0, "ip": "127.0.0.10", "name": "server-0"}]\n'
            ),
            ("record", "took_ms", "1.5", "-l", "op=get", "--expected-interval-ms", "10"): "",
        }
        for args, expect in calls.items():
            code, out, modules = await imported(env, *args)
            assert (code, out) == (0, expect), args
            assert not modules & HEAVY, (args, modules & HEAVY)
        assert await ex.bus.count("ready") == 3


async def test_a_barrier_of_shell_pods_releases_all_on_either_path(nats_server) -> None:
    """`tricks-nats barrier NAME N` in N processes at once: each registers once and ends
    with the count N, on the fast path and on the full command alike."""
    async with experiment(nats_server) as ex:
        for fast, name in (("1", "fast"), ("0", "full")):
            env = {**pod_env(ex), "TRICKS_SHELL_FAST": fast}
            calls = [
                run(env, "tricks-nats", "barrier", name, "4", "--timeout", "60") for _ in "1234"
            ]
            assert await asyncio.gather(*calls) == [(0, "4\n", "")] * 4, name
            assert await ex.bus.count(name) == 4
        code, _, err = await run(env, "tricks-nats", "barrier", "lonely", "2", "--timeout", "0.5")
        assert code == 1 and "'lonely' to reach 2 (it is 1)" in err


async def test_a_shell_discover_of_a_whole_tag_ends_with_its_notification(nats_server) -> None:
    """PROTOCOL.md 6.4 on the fast path: once all the tag's pods run, the start notification
    carries the roster, and `discover --count` prints it without reading the roster again."""
    from tricks_nats import protocol as p
    from tricks_nats.registrar import Rosters

    async with experiment(nats_server) as ex:
        rosters = Rosters(ex.bus, ex.watcher, {"server": 2})
        stream = p.stream_of(p.pods_bucket(ex.exp))
        spy = await ex.bus.nc.subscribe("$JS.API.DIRECT.GET.>")  # every read
        await ex.bus.nc.flush()  # registered at the server before any read
        try:
            args = ("discover", "server", "--count", "2", "--timeout", "60")
            proc = await spawn_shell(pod_env(ex), *args)
            # It reads the count, then the roster (empty), then subscribes to the notification
            # and reads the count again: from then on it waits, and only a notification helps.
            first_look = await spy.next_msg(timeout=60)
            while stream not in first_look.subject:
                first_look = await spy.next_msg(timeout=60)
            shell = first_look.reply.rsplit(".", 1)[0]  # its inbox
            count = await spy.next_msg(timeout=60)
            while not count.reply.startswith(shell) or stream in count.subject:
                count = await spy.next_msg(timeout=60)
            await rosters.started("server", 0, "127.0.0.10")
            await rosters.started("server", 1, "127.0.0.11")
            assert await finish(proc) == (0, "0 127.0.0.10\n1 127.0.0.11\n", "")
            await ex.bus.roster("server")  # a read of ours, after the command ended
            after = await spy.next_msg(timeout=30)
            while stream not in after.subject:  # the coordinator's own count reads
                after = await spy.next_msg(timeout=30)
            assert not after.reply.startswith(shell)
        finally:
            await spy.unsubscribe()


async def test_other_forms_take_the_full_command(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        code, out, modules = await imported(env, "event", "--help")
        assert code == 0 and out.startswith("Usage: tricks-nats event") and "typer" in modules
        code, _, err = await run(env, "tricks-nats", "wait", "x", "-1")
        assert code == 2 and "Usage:" in err  # the full command's own usage error
        code, out, _ = await run(env, "tricks-nats", "event", "x", "--bogus")
        assert code == 2
        samples = b"took_ms 1\ntook_ms 2 op=put\n"
        assert await run(env, "tricks-nats", "record", "-", stdin=samples) == (0, "", "")
        slow = {**env, "TRICKS_SHELL_FAST": "0"}
        code, out, modules = await imported(slow, "event", "x")
        assert (code, out) == (0, "1\n") and "asyncio" in modules
        assert await run(env, "tricks-nats", "event", "x") == (0, "2\n", "")


class CutOff:
    """A TCP relay between one client and the server that, once the client has read a count
    after subscribing to a notification (a wait now waiting), drops the connection and
    refuses new ones until `reopen()`: what a server restart looks like to the client."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.waiting = asyncio.Event()
        self.open = asyncio.Event()
        self.open.set()
        self.refused = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open.is_set():
            self.refused += 1
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        subscribed = asyncio.Event()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, up: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    if up and b".reached." in data:
                        subscribed.set()
                    if not up and subscribed.is_set() and b'{"val":"1"}' in data:
                        self.waiting.set()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, up=True), pipe(up_reader, writer, up=False))

    def cut(self) -> None:
        self.open.clear()
        for w in self._writers:
            w.close()

    def reopen(self) -> None:
        self.open.set()


@contextlib.asynccontextmanager
async def relay(port: int) -> AsyncIterator[tuple[CutOff, int]]:
    cut = CutOff(port)
    listener = await asyncio.start_server(cut.handle, "127.0.0.1", 0)
    try:
        yield cut, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        cut.cut()
        await listener.wait_closed()


async def test_a_wait_cut_off_while_its_notification_goes_by_still_ends_at_the_count(
    nats_server,
) -> None:
    """PROTOCOL.md 6.3, step 5: the notification is published while the waiter is away (lost
    to it); once back, it subscribes again, reads the count and returns it."""
    async with experiment(nats_server) as ex, relay(nats_server.port) as (cut, port):
        env = {**pod_env(ex), E.NATS_URL: f"nats://127.0.0.1:{port}"}
        assert await tricks(pod_env(ex), "event", "x") == (0, "1\n", "")
        waiter = asyncio.create_task(run(env, "tricks-nats", "wait", "x", "2"))
        async with asyncio.timeout(HANG_GUARD_S):
            await cut.waiting.wait()  # it subscribed, read 1, and waits
        cut.cut()
        assert await tricks(pod_env(ex), "event", "x") == (0, "2\n", "")  # notified: nobody hears
        cut.reopen()
        assert await waiter == (0, "2\n", "")


async def test_a_frozen_server_never_hangs_a_call(tmp_path) -> None:
    """A server that accepts and never answers (SIGSTOP): a call with --timeout ends at it
    (exit 1); one without gives up after the 20 s NATS has to answer (exit 3). One line each.
    The test holds no NATS client of its own: a frozen server would leave its tasks behind."""
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    await server.start()
    try:
        env = {
            **cli_env(),
            E.TAG: "sh",
            E.REPLICAS: "1",
            E.POD_ID: "0",
            E.EXP_ID: "frozen-20260101-000000-beef",
            E.NATS_URL: server.url,
        }
        assert server._proc is not None
        os.kill(server._proc.pid, signal.SIGSTOP)
        try:
            timed, lost = await asyncio.gather(
                run(env, "tricks-nats", "wait", "x", "1", "--timeout", "1"),
                run(env, "tricks-nats", "event", "x"),
            )
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
        assert timed[:2] == (1, "")
        one_error_line(timed[2], "timed out after 1s")
        assert lost[:2] == (3, "")
        one_error_line(lost[2], "cannot reach NATS at")
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "says", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"INFO {not json\r\n", b"\x00\xff" * 40]
)
async def test_a_stranger_on_the_port_is_one_line_exit_3(says: bytes) -> None:
    async def stranger(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(says + b"\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(stranger, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        env = stranger_env(port)
        code, out, err = await run(env, "tricks-nats", "discover", "t")
    finally:
        listener.close()
        await listener.wait_closed()
    assert (code, out) == (3, "")
    one_error_line(err, "not a NATS server")


async def test_wrong_credentials_are_said_at_once_exit_3(tmp_path) -> None:
    pod = User("pod", "right")
    async with EmbeddedServer(store_dir=tmp_path / "js", users=[pod], supervise=False) as server:
        env = {
            **cli_env(),
            E.TAG: "sh",
            E.REPLICAS: "1",
            E.POD_ID: "0",
            E.EXP_ID: "e-20260101-000000-beef",
            E.NATS_URL: server.url,
            E.NATS_USER: "pod",
            E.NATS_PASSWORD: "wrong",
        }
        code, out, err = await run(env, "tricks-nats", "event", "x")
    assert (code, out) == (3, "")
    one_error_line(err, "credentials refused")
    assert "wrong" not in err


def test_urls_the_small_client_reads() -> None:
    from tricks_nats.syncwire import Unsupported, _address

    assert _address("nats://127.0.0.1:4222") == ("127.0.0.1", 4222, None, None)
    assert _address("nats://u:p%40x@h:1") == ("h", 1, "u", "p@x")
    assert _address("127.0.0.9") == ("127.0.0.9", 4222, None, None)
    assert _address("nats://[::1]:5") == ("::1", 5, None, None)
    for other in ("tls://h:1", "ws://h:1"):
        with pytest.raises(Unsupported):
            _address(other)


@pytest.mark.parametrize(
    "reply",
    [b"MSG {reply} 1 99999999999\r\n", b"MSG {reply} 1 -5\r\n", b"HMSG {reply} 1 x y\r\n"],
)
async def test_garbled_replies_never_crash_nor_hang_a_call(reply: bytes) -> None:
    """A server that speaks NATS until the first request, then answers with nonsense: the call
    drops the connection, tries again, and ends at its --timeout: one line, exit 1."""
    async with server_saying(reply + b"x" * 64) as port:
        code, out, err = await run(
            stranger_env(port), "tricks-nats", "wait", "x", "1", "--timeout", "2"
        )
    assert (code, out) == (1, "")
    one_error_line(err, "timed out after 2s")


@contextlib.asynccontextmanager
async def server_saying(after_request: bytes | None):
    """Speaks NATS until the first request, then sends `after_request` (None: hangs up;
    `{reply}` in it becomes the request's reply subject)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"x","headers":true,"max_payload":1048576}\r\n')
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                if line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                elif line.startswith((b"PUB ", b"HPUB ")):
                    if after_request is None:
                        break
                    inbox = line.split()[2]  # `{reply}`: the request's reply subject
                    writer.write(after_request.replace(b"{reply}", inbox))
                await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await listener.wait_closed()


async def test_a_server_that_hangs_up_on_every_request_ends_the_call_exit_3() -> None:
    """No --timeout: the 20 s budget of section 6 holds for dropped connections too (the
    call must not reconnect and resend forever). The three calls run at once."""
    async with server_saying(None) as port:
        calls = [("event", "x"), ("record", "m", "1"), ("wait", "x", "1")]
        ended = await asyncio.gather(
            *(run(stranger_env(port), "tricks-nats", *args) for args in calls)
        )
    for code, out, err in ended:
        assert (code, out) == (3, "")
        one_error_line(err, "NATS did not answer")


@pytest.mark.parametrize("says", [b"MSG\r\n", b"MSG 5\r\n", b"HMSG a b 9 5\r\nxxxxx\r\n"])
async def test_a_control_line_short_of_arguments_is_one_line(says: bytes) -> None:
    async with server_saying(says) as port:
        code, out, err = await run(
            stranger_env(port), "tricks-nats", "wait", "x", "1", "--timeout", "2"
        )
    assert (code, out) == (1, "")
    one_error_line(err, "timed out after 2s")


async def test_a_wait_with_a_timeout_of_years_waits(nats_server) -> None:
    """poll() cannot block for more than ~24 days: a longer --timeout must still wait."""
    async with experiment(nats_server) as ex, relay(nats_server.port) as (cut, port):
        env = {**pod_env(ex), E.NATS_URL: f"nats://127.0.0.1:{port}"}
        async with Driver(ex.config("other")) as d:
            await d.register_event("x")
            waiter = asyncio.create_task(
                run(env, "tricks-nats", "wait", "x", "2", "--timeout", "1e10")
            )
            done, _ = await asyncio.wait(
                [waiter, asyncio.create_task(cut.waiting.wait())],
                timeout=HANG_GUARD_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            assert waiter not in done, waiter.result()
            await d.register_event("x")
        assert await waiter == (0, "2\n", "")
