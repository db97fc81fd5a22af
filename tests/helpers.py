"""Test helpers: an experiment's NATS side (buckets, the coordinator's count watcher, registrar
and rosters) without a full coordinator, so the driver can be tested against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.coordinator import Coordinator, Outcome
from tricks_nats.counting import CountKeeper
from tricks_nats.driver import Config, Driver
from tricks_nats.natsserver import EmbeddedServer
from tricks_nats.records import RunRecords
from tricks_nats.registrar import Registrar, Rosters
from tricks_nats.runtimes.fake import FakeRuntime, Program
from tricks_nats.spec import parse


@dataclass
class Experiment:
    exp: str
    bus: Bus
    watcher: CountKeeper
    url: str
    rosters: Rosters
    changes: list[tuple[str, int, str | None]] = field(default_factory=list)

    def config(self, tag: str = "t", pod_id: int = 0, replicas: int = 1) -> Config:
        return Config(
            tag=tag,
            replicas=replicas,
            pod_id=pod_id,
            experiment=self.exp,
            pod_ip=f"127.0.0.{pod_id + 2}",
            nats_url=self.url,
        )

    async def run_pod(self, tag: str, pod_id: int, ip: str) -> None:
        await self.rosters.started(tag, pod_id, ip)

    async def stop_pod(self, tag: str, pod_id: int) -> None:
        await self.rosters.stopped(tag, pod_id)


@contextlib.asynccontextmanager
async def experiment(server: EmbeddedServer, name: str = "test") -> AsyncIterator[Experiment]:
    exp = p.new_experiment_id(name)
    bus = await Bus.open(Endpoint(server.url), exp, name="test-coordinator")
    changes: list[tuple[str, int, str | None]] = []
    watcher = CountKeeper(bus, lambda e, v, pod: changes.append((e, v, pod)))
    try:
        await bus.create_buckets()
        await watcher.start()
        await Registrar(bus, watcher).start()
        yield Experiment(exp, bus, watcher, server.url, Rosters(bus, watcher), changes)
    finally:
        await watcher.stop()
        await bus.close()


@dataclass
class TwoExperiments:
    """Two experiments on one server (registrars answering in both) and a pod's config whose
    credentials reach only the first: its permissions (PROTOCOL.md 9)."""

    buses: list[Bus]
    own: Config  # a pod of the first experiment, with its credentials
    other: Config  # the same credentials, pointed at the second experiment


@contextlib.asynccontextmanager
async def two_experiments(store: Path) -> AsyncIterator[TwoExperiments]:
    from tricks_nats.natsserver import User

    exp_a, exp_b = p.new_experiment_id("a"), p.new_experiment_id("b")
    admin = User.random("admin")
    pod_a = User.random("pod-a", p.pod_permissions(exp_a))
    async with EmbeddedServer(users=[admin, pod_a], store_dir=store) as server:
        buses = [
            await Bus.open(Endpoint(server.url, admin.name, admin.password), e, name="adm")
            for e in (exp_a, exp_b)
        ]
        try:
            for b in buses:
                await b.create_buckets()
                await Registrar(b, CountKeeper(b, lambda *_: None)).start()
            own = Config(
                tag="t",
                replicas=1,
                pod_id=0,
                experiment=exp_a,
                pod_ip="",
                nats_url=server.url,
                nats_user=pod_a.name,
                nats_password=pod_a.password,
            )
            yield TwoExperiments(buses, own, dataclasses.replace(own, experiment=exp_b))
        finally:
            for b in buses:
                await b.delete_buckets()
                await b.close()


#: Python that a pod runs first to hand its environment (its credentials) to a test, which
#: then acts as that pod would: `pod.env` in the spec's directory, written atomically (each
#: pod through its own temporary file: pods of one tag run this at the same moment).
DUMP_ENV = (
    "import json, os; t = 'pod.env.%d.tmp' % os.getpid(); "
    "json.dump(dict(os.environ), open(t, 'w')); os.replace(t, 'pod.env'); "
)


async def as_a_pod(spec_dir: Path, timeout: float = 60) -> Driver:
    """A driver with the credentials of a pod that ran DUMP_ENV (waits for its file)."""
    path = spec_dir / "pod.env"
    await wait_until(path.exists, timeout)
    return await Driver.connect(Config.from_env(json.loads(path.read_text())))


def kill_embedded_server(up_pid: int) -> None:
    """SIGKILL the nats-server that `tricks-nats up` (process `up_pid`) started: its supervisor
    must bring it back."""
    import os
    import signal

    import psutil

    (server,) = [
        c for c in psutil.Process(up_pid).children(recursive=True) if c.name() == "nats-server"
    ]
    os.kill(server.pid, signal.SIGKILL)


async def wait_until(condition: Callable[[], object], timeout: float = 30) -> None:
    """Check `condition` until it holds (a file, a process gone, an error the client reports
    from its own task: things with no event to wait on); fail after `timeout`."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@dataclass
class Run:
    coordinator: Coordinator
    runtime: FakeRuntime
    records: RunRecords

    async def outcome(self) -> Outcome:
        return await self.coordinator.run()

    def journal(self) -> list[dict[str, Any]]:
        lines = (self.records.root / "journal.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def pod(self, outcome: Outcome, tag: str, pod_id: int) -> Any:
        return next(x for x in outcome.summary.pods if (x.tag, x.pod_id) == (tag, pod_id))


@pytest.fixture
async def make_run(
    nats_server: EmbeddedServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    buses: list[Bus] = []
    records: list[RunRecords] = []

    async def make(spec: str, programs: dict[str, Program], **kw: Any) -> Run:
        exp = parse(spec, "test.yaml")
        exp_id = p.new_experiment_id("t")
        bus = await Bus.open(Endpoint(nats_server.url), exp_id, name="coordinator")
        buses.append(bus)
        await bus.create_buckets()
        rec = RunRecords.create(tmp_path, exp_id, spec)
        records.append(rec)
        runtime = FakeRuntime(programs, refuse=kw.pop("refuse", ()))
        coord = Coordinator(exp, exp_id, bus, runtime, rec, Endpoint(nats_server.url), **kw)
        return Run(coord, runtime, rec)

    yield make
    for bus in buses:
        await bus.close()
    for rec in records:
        rec.close()
