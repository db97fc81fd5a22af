"""Test helpers: an experiment's NATS side (buckets + the coordinator's count watcher) without
a full coordinator, so the driver can be tested against a real server on its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.counting import CountWatcher
from tricks_nats.driver import Config
from tricks_nats.natsserver import EmbeddedServer


@dataclass
class Experiment:
    exp: str
    bus: Bus
    watcher: CountWatcher
    url: str
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
        await self.bus.put_pod(p.PodRecord(tag=tag, pod_id=pod_id, ip=ip, name=f"{tag}-{pod_id}"))


@contextlib.asynccontextmanager
async def experiment(server: EmbeddedServer, name: str = "test") -> AsyncIterator[Experiment]:
    exp = p.new_experiment_id(name)
    bus = await Bus.open(Endpoint(server.url), exp, name="test-coordinator")
    changes: list[tuple[str, int, str | None]] = []
    watcher = CountWatcher(bus, lambda e, v, pod: changes.append((e, v, pod)))
    try:
        await bus.create_buckets()
        await watcher.start()
        yield Experiment(exp, bus, watcher, server.url, changes)
    finally:
        await watcher.stop()
        await bus.close()
