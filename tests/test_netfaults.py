"""Network faults between local pods, with real processes, real traffic, real nftables rules
and cgroups: source NAT by cgroup, delay, partition, loss, and cleanup (normal and by the
watchdog after a SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tricks_nats.errors import UsageError
from tricks_nats.faults import FaultAction
from tricks_nats.netfaults import NetFaults
from tricks_nats.watchdog import Watchdog

from .conftest import ROOT, cli_env

#: What a pod runs here: `connect HOST PORT TIMEOUT` (one byte there and back, or `fail`),
#: `pingpong HOST PORT N` (the shortest of N round trips), `udp HOST PORT N` (sends, EPERMs).
CLIENT = """\
import socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "connect":
    try:
        s = socket.create_connection((host, port), timeout=float(n))
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    except OSError as exc:
        print("fail", type(exc).__name__)
    else:
        print("ok")
elif mode == "pingpong":
    s = socket.create_connection((host, port))
    best = float("inf")
    for _ in range(int(n)):
        start = time.monotonic()
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        best = min(best, time.monotonic() - start)
    print(best)
elif mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = refused = 0
    for _ in range(int(n)):
        try:
            s.sendto(b"x", (host, port))
            sent += 1
        except PermissionError:
            refused += 1
    print(sent, refused)
"""

CONNECT_TIMEOUT = "0.5"


def action(
    kind: str,
    direction: str = "both",
    *,
    delay_ms: float = 0.0,
    jitter_ms: float = 0.0,
    loss_percent: float = 0.0,
) -> FaultAction:
    return FaultAction(
        id=f"{kind}-{direction}#{secrets.token_hex(2)}",
        kind=kind,  # type: ignore[arg-type]
        pods=(("a", 0),),
        peers=(("b", 1),),
        direction=direction,  # type: ignore[arg-type]
        delay_ms=delay_ms,
        jitter_ms=jitter_ms,
        loss_percent=loss_percent,
    )


def machine_state(nf: NetFaults) -> dict[str, object]:
    """What must be back as it was once a run's faults are gone."""
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run(
        ["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True
    ).stdout
    mounts = Path("/proc/self/mountinfo").read_text()
    return {
        "table": nf.table in tables.split(),
        "qdiscs": qdiscs,
        "mounted": f" {nf._mountpoint} " in mounts,
        "mountpoint": os.path.exists(nf._mountpoint),
        "cgroups": [m for m in _net_cls_roots() if os.path.exists(f"{m}/tricks-nats-{nf.token}")],
    }


def _net_cls_roots() -> list[str]:
    from tricks_nats.netfaults import _net_cls_mounts

    return _net_cls_mounts()


@dataclass
class Pods:
    nf: NetFaults

    def ip(self, index: int) -> str:
        return self.nf.address(index)

    async def run(self, index: int | None, *args: str) -> str:
        """CLIENT with `args`, in pod `index`'s net_cls cgroup (None: outside any pod)."""
        argv = [sys.executable, "-c", CLIENT, *args]
        if index is not None:
            join = 'echo 0 > "$0/cgroup.procs" && exec "$@"'
            argv = ["sh", "-c", join, self.nf.join_path(index), *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        return out.decode().strip()

    async def connect(self, index: int | None, server: Server) -> str:
        return await self.run(index, "connect", server.host, str(server.port), CONNECT_TIMEOUT)


@dataclass
class Server:
    """A TCP echo server on a pod's address (in the test process: outside any cgroup; its
    answers are replies, of connections made by a pod) that records its peers."""

    host: str
    port: int
    peers: list[str]


@contextlib.asynccontextmanager
async def echo_server(host: str) -> AsyncIterator[Server]:
    peers: list[str] = []
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        peers.append(writer.get_extra_info("peername")[0])
        try:
            while data := await reader.read(1):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            writers.discard(writer)

    server = await asyncio.start_server(serve, host, 0)
    try:
        yield Server(host, server.sockets[0].getsockname()[1], peers)
    finally:
        server.close()
        for w in list(writers):
            w.close()
        await server.wait_closed()


@pytest.fixture
async def pods() -> AsyncIterator[Pods]:
    watchdog = Watchdog()
    nf = NetFaults(1 + secrets.randbelow(254), secrets.token_hex(4), watchdog)
    try:
        await nf.start(3)
        yield Pods(nf)
    finally:
        await nf.close()
        watchdog.close()


# -- 1. source NAT by cgroup ---------------------------------------------------------------------


async def test_a_pod_connecting_without_binding_is_seen_from_its_own_address(pods: Pods) -> None:
    async with echo_server(pods.ip(1)) as server:
        assert await pods.connect(0, server) == "ok"
        assert await pods.connect(None, server) == "ok"  # not a pod: untouched
    assert server.peers == [pods.ip(0), "127.0.0.1"]


# -- 2. delay ------------------------------------------------------------------------------------


async def test_delay_both_ways_adds_twice_the_delay_to_a_round_trip_and_nothing_else(
    pods: Pods,
) -> None:
    fault = action("delay", delay_ms=100)
    await pods.nf.apply(fault, [pods.ip(0)], [pods.ip(1)])
    async with echo_server(pods.ip(1)) as server:
        # Traffic that is not between pod 0 and pod 1 never meets the fault.
        reader, writer = await asyncio.open_connection(server.host, server.port)
        for _ in range(5):
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
        writer.close()
        await writer.wait_closed()
        assert float(await pods.run(2, "pingpong", server.host, str(server.port), "5")) >= 0
        assert await pods.nf.packets(fault.id) == 0
        assert pods.nf.delayed_packets(fault.id) == 0
        # Pod 0 to pod 1 and back: each way delayed.
        rtt = float(await pods.run(0, "pingpong", server.host, str(server.port), "3"))
    assert rtt >= 0.2
    assert await pods.nf.packets(fault.id) > 0
    assert pods.nf.delayed_packets(fault.id) > 0
    await pods.nf.remove(fault.id)
    assert await pods.nf.packets(fault.id) == 0
    assert _fault_chains(pods.nf) == []
    await pods.nf.remove(fault.id)  # healed already: nothing to do


async def test_delay_one_way_holds_only_packets_from_pods_to_peers(pods: Pods) -> None:
    fault = action("delay", "one", delay_ms=100, jitter_ms=10)
    await pods.nf.apply(fault, [pods.ip(0)], [pods.ip(1)])
    async with echo_server(pods.ip(1)) as server:
        rtt = float(await pods.run(0, "pingpong", server.host, str(server.port), "3"))
    assert rtt >= 0.09  # 100 ms - 10 ms of jitter, one way only
    delayed = pods.nf.delayed_packets(fault.id)
    assert delayed > 0
    async with echo_server(pods.ip(0)) as server:  # pod 1 calls pod 0: the replies are held
        rtt = float(await pods.run(1, "pingpong", server.host, str(server.port), "3"))
    assert rtt >= 0.09
    assert pods.nf.delayed_packets(fault.id) > delayed
    await pods.nf.remove(fault.id)


async def test_healing_another_fault_does_not_lose_what_a_delay_holds(pods: Pods) -> None:
    delay = action("delay", "one", delay_ms=2000)
    await pods.nf.apply(delay, [pods.ip(0)], [pods.ip(1)])
    with udp_sink(pods.ip(1)) as (port, received):
        assert await pods.run(0, "udp", pods.ip(1), str(port), "1") == "1 0"
        other = action("partition")
        await pods.nf.apply(other, [pods.ip(2)], [pods.ip(1)])
        await pods.nf.remove(other.id)
        await asyncio.to_thread(received, 1)
    assert pods.nf.delayed_packets(delay.id) == 1  # it was held (2 s: the heal came meanwhile)
    await pods.nf.remove(delay.id)


def _fault_chains(nf: NetFaults) -> list[str]:
    listing = subprocess.run(
        ["nft", "list", "table", "ip", nf.table], capture_output=True, text=True, check=True
    ).stdout
    return [
        line.split()[1]
        for line in listing.splitlines()
        if line.strip().startswith(("chain ", "set "))
        and line.split()[1] not in ("podnat", "faults")
    ]


# -- 3. partition --------------------------------------------------------------------------------


async def test_a_partition_both_ways_blocks_both_ways_until_healed(pods: Pods) -> None:
    fault = action("partition")
    await pods.nf.apply(fault, [pods.ip(0)], [pods.ip(1)])
    async with echo_server(pods.ip(1)) as one, echo_server(pods.ip(0)) as zero:
        assert (await pods.connect(0, one)).startswith("fail")
        assert (await pods.connect(1, zero)).startswith("fail")
        assert await pods.connect(2, one) == "ok"  # another pod: untouched
        assert await pods.connect(None, one) == "ok"  # not a pod: untouched
        assert await pods.run(0, "udp", one.host, str(one.port), "10") == "0 10"
        assert await pods.run(1, "udp", zero.host, str(zero.port), "10") == "0 10"
        await pods.nf.remove(fault.id)
        assert await pods.connect(0, one) == "ok"
        assert await pods.connect(1, zero) == "ok"
    assert _fault_chains(pods.nf) == []


async def test_a_partition_one_way_drops_from_pods_to_peers_only(pods: Pods) -> None:
    fault = action("partition", "one")
    await pods.nf.apply(fault, [pods.ip(0)], [pods.ip(1)])
    with udp_sink(pods.ip(0)) as (port, received):
        # Datagrams from 1 to 0 arrive; from 0 to 1 they are refused where they are sent.
        assert await pods.run(1, "udp", pods.ip(0), str(port), "20") == "20 0"
        await asyncio.to_thread(received, 20)
    assert await pods.run(0, "udp", pods.ip(1), str(port), "20") == "0 20"
    async with echo_server(pods.ip(1)) as one, echo_server(pods.ip(0)) as zero:
        assert (await pods.connect(0, one)).startswith("fail")  # its SYN is dropped
        # TCP needs both ways: from 1 to 0 the SYN passes, the SYN-ACK (0 to 1) does not.
        assert (await pods.connect(1, zero)).startswith("fail")
        await pods.nf.remove(fault.id)
        assert await pods.connect(0, one) == "ok"
        assert await pods.connect(1, zero) == "ok"


@contextlib.contextmanager
def udp_sink(host: str) -> Iterator[tuple[int, Callable[[int], None]]]:
    """A UDP socket on `host`; `received(n)` returns once n datagrams came (fails after 30 s)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(30)

    def received(n: int) -> None:
        for _ in range(n):
            sock.recv(16)

    try:
        yield sock.getsockname()[1], received
    finally:
        sock.close()


# -- 4. loss -------------------------------------------------------------------------------------


async def test_total_loss_is_a_partition_in_its_direction(pods: Pods) -> None:
    fault = action("loss", "one", loss_percent=100)
    await pods.nf.apply(fault, [pods.ip(0)], [pods.ip(1)])
    assert await pods.run(0, "udp", pods.ip(1), "9", "20") == "0 20"
    with udp_sink(pods.ip(0)) as (port, received):
        assert await pods.run(1, "udp", pods.ip(0), str(port), "20") == "20 0"
        await asyncio.to_thread(received, 20)
    async with echo_server(pods.ip(1)) as one:
        assert (await pods.connect(0, one)).startswith("fail")
        await pods.nf.remove(fault.id)
        assert await pods.connect(0, one) == "ok"


async def test_half_loss_drops_some_packets_and_lets_some_through(pods: Pods) -> None:
    fault = action("loss", loss_percent=50)
    await pods.nf.apply(fault, [pods.ip(0)], [pods.ip(1)])
    sent, refused = map(int, (await pods.run(1, "udp", pods.ip(0), "9", "400")).split())
    # All or none of 400 at 50% each: 2**-399.
    assert sent + refused == 400 and 0 < sent < 400
    await pods.nf.remove(fault.id)


async def test_addresses_outside_the_run_are_refused(pods: Pods) -> None:
    with pytest.raises(UsageError, match="not a pod address"):
        await pods.nf.apply(action("partition"), [pods.ip(0)], ["127.0.0.1"])
    assert _fault_chains(pods.nf) == []


# -- 5. close leaves nothing ---------------------------------------------------------------------


async def test_close_leaves_nothing_behind() -> None:
    watchdog = Watchdog()
    nf = NetFaults(1 + secrets.randbelow(254), secrets.token_hex(4), watchdog)
    before = machine_state(nf)
    try:
        await nf.start(2)
        during = machine_state(nf)
        assert during["table"] and during["mounted"] and during["cgroups"]
        await nf.apply(action("delay", delay_ms=10), [nf.address(0)], [nf.address(1)])
        await nf.apply(action("partition", "one"), [nf.address(1)], [nf.address(0)])
        await nf.apply(action("loss", loss_percent=5), [nf.address(1)], [nf.address(0)])
    finally:
        await nf.close()
        await nf.close()  # idempotent
        watchdog.close()
    assert machine_state(nf) == before
    assert not before["table"] and not before["mounted"] and not before["mountpoint"]


# -- 6. the watchdog cleans up after a SIGKILL ---------------------------------------------------

OWNER = """\
import asyncio, sys
from tricks_nats.faults import FaultAction
from tricks_nats.netfaults import NetFaults
from tricks_nats.watchdog import Watchdog

async def main():
    watchdog = Watchdog()
    nf = NetFaults(int(sys.argv[1]), sys.argv[2], watchdog)
    await nf.start(2)
    a, b = [nf.address(0)], [nf.address(1)]
    await nf.apply(FaultAction(id="p#1", kind="partition", pods=()), a, b)
    await nf.apply(FaultAction(id="d#1", kind="delay", pods=(), delay_ms=50), b, a)
    print("ready", watchdog.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_sigkilled_owner_leaves_nothing_behind() -> None:
    net, token = 1 + secrets.randbelow(254), secrets.token_hex(4)
    probe = NetFaults(net, token, Watchdog())  # never started: names what to look for
    before = machine_state(probe)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OWNER,
        str(net),
        token,
        stdout=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().split()
        assert line[:1] == ["ready"], line
        watchdog = psutil.Process(int(line[1]))
        during = machine_state(probe)
        assert during["table"] and during["mounted"] and during["cgroups"]
        assert {"f1a", "f1b", "f1x", "f2a", "f2b", "f2x"} <= set(_fault_chains(probe))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
    # The watchdog (no longer our descendant) cleans up, then exits.
    await asyncio.to_thread(watchdog.wait, 60)
    assert machine_state(probe) == before


# -- 7. what the machine lacks -------------------------------------------------------------------


def test_problems_names_the_package_of_a_missing_nft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert NetFaults.problems() == []  # this machine runs the tests above
    monkeypatch.setenv("PATH", str(tmp_path))
    problems = NetFaults.problems()
    assert any("nftables" in p for p in problems), problems


async def test_start_refuses_with_every_problem_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watchdog = Watchdog()
    nf = NetFaults(1 + secrets.randbelow(254), secrets.token_hex(4), watchdog)
    before = machine_state(nf)
    monkeypatch.setenv("PATH", str(tmp_path))
    try:
        with pytest.raises(UsageError, match="nftables"):
            await nf.start(2)
    finally:
        await nf.close()
        watchdog.close()
    monkeypatch.undo()
    assert machine_state(nf) == before
