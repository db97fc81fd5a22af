"""A run on a NATS cluster: its streams get 3 replicas, and it survives losing one server.

Three real nats-servers on 127.0.0.1 form a cluster (JetStream on file storage, each with its
own store); `tricks-nats up --nats-url` runs the experiment on it, as it would on
manifests/nats.yaml. The client port of each server is its own pick (-1); the route ports must
be known to every member beforehand, so they are taken free from the system (and the cluster
started again on other ports should one be taken meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.js.api import StreamInfo

from tricks_nats import protocol as p
from tricks_nats import replication
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.errors import TricksError, UsageError
from tricks_nats.natsserver import Cluster, EmbeddedServer, find_binary

from .conftest import ROOT, cli_env, exp_processes
from .helpers import DUMP_ENV, as_a_pod

TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]
PY = "from tricks_nats.driver import SyncDriver as D; d = D(); "


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NatsCluster:
    servers: list[EmbeddedServer]

    @property
    def url(self) -> str:
        """Where the coordinator and the pods connect: the first server."""
        return self.servers[0].url

    def healthy(self) -> bool:
        """Every server is in the cluster and current with its JetStream meta leader."""
        for server in self.servers:
            try:
                with urllib.request.urlopen(f"{server.monitor_url}/healthz", timeout=5) as r:
                    if json.load(r).get("status") != "ok":
                        return False
            except OSError:
                return False
        return True

    def by_name(self, name: str) -> EmbeddedServer:
        return next(s for s in self.servers if s.name == name)


@contextlib.asynccontextmanager
async def nats_cluster(tmp_path: Path, size: int = 3) -> AsyncIterator[NatsCluster]:
    """`size` servers, each routed to all; yielded once every one is healthy. A route port
    taken by someone else between our pick and the server's (it may say so just after it
    said it was ready) starts the cluster again on other ports."""
    cluster = NatsCluster([])
    try:
        for attempt in range(5):
            ports = free_ports(size)
            routes = tuple(f"nats-route://127.0.0.1:{port}" for port in ports)
            cluster.servers = [
                EmbeddedServer(
                    store_dir=tmp_path / f"n{i}-{attempt}",
                    log_path=tmp_path / f"n{i}-{attempt}.log",
                    monitor=True,
                    supervise=False,
                    name=f"n{i}",
                    cluster=Cluster("tricks-test", ports[i], routes),
                )
                for i in range(size)
            ]
            starts = [s.start() for s in cluster.servers]
            failed = [r for r in await asyncio.gather(*starts, return_exceptions=True) if r]
            if not failed and await formed(cluster):
                yield cluster
                return
            await asyncio.gather(*(s.stop() for s in cluster.servers))
            logs = "".join(s.log_path.read_text() for s in cluster.servers if s.log_path)
            if "address already in use" not in logs or attempt == 4:
                raise AssertionError(f"the cluster did not form: {failed or logs[-3000:]}")
    finally:
        await asyncio.gather(*(s.stop() for s in cluster.servers))


async def formed(cluster: NatsCluster, timeout: float = 120) -> bool:
    """True once every server is healthy; False as soon as one of them died."""
    async with asyncio.timeout(timeout):
        while all(s.running for s in cluster.servers):
            if await asyncio.to_thread(cluster.healthy):
                return True
            await asyncio.sleep(0.1)
    return False


async def experiment_streams(url: str, exp: str) -> list[StreamInfo]:
    nc = await nats.connect(url)
    try:
        return [s for s in await nc.jetstream().streams_info() if exp in (s.config.name or "")]
    finally:
        await nc.close()


async def start_up(spec: Path, url: str, runs: Path, *options: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *TRICKS,
        "up",
        str(spec),
        "--nats-url",
        url,
        "--runs-dir",
        str(runs),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )


async def finish(up: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    try:
        return await up.communicate()
    finally:
        if up.returncode is None:
            up.kill()
            await up.communicate()


# -- which replication ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "env", "tries"),
    [
        ({}, {}, (1,)),  # the embedded server: in no cluster
        ({"cluster": "c", "connect_urls": ["a:1", "b:1"]}, {}, (3, 1)),  # one of 3 away
        ({"cluster": "c"}, {"TRICKS_NATS_REPLICAS": "5"}, (5,)),
        ({}, {"TRICKS_NATS_REPLICAS": " 1 "}, (1,)),
    ],
)
def test_replicas_follow_the_server_and_the_override(
    info: dict[str, Any], env: dict[str, str], tries: tuple[int, ...]
) -> None:
    assert replication.choose(info, env).tries == tries


@pytest.mark.parametrize("value", ["0", "6", "three", "-1"])
def test_a_bad_override_is_a_usage_error(value: str) -> None:
    with pytest.raises(UsageError, match="TRICKS_NATS_REPLICAS"):
        replication.choose({}, {"TRICKS_NATS_REPLICAS": value})


def test_only_too_few_servers_lowers_the_replicas() -> None:
    plan = replication.choose({"cluster": "c"}, {})
    assert plan.lower(3, 10005) == 1  # no suitable peers for placement
    assert plan.lower(3, 10058) is None  # the stream exists with another configuration
    assert plan.lower(1, 10023) is None
    assert replication.choose({}, {"TRICKS_NATS_REPLICAS": "3"}).lower(3, 10023) is None


# -- a real cluster -------------------------------------------------------------------------

BARRIER = f"""\
experiment:
- tag: a
  replicas: 3
  command: python -c "{PY}d.barrier('met', 3, timeout=120); d.close()"
"""


@pytest.mark.slow
async def test_on_a_cluster_of_three_every_stream_has_three_replicas(tmp_path: Path) -> None:
    spec = tmp_path / "barrier.yaml"
    spec.write_text(BARRIER)
    async with nats_cluster(tmp_path) as cluster:
        up = await start_up(spec, cluster.url, tmp_path / "runs", "--keep", "--json")
        out, err = await finish(up)
        assert up.returncode == 0, err.decode()[-3000:]
        exp = json.loads(out.splitlines()[-1])["experiment"]
        streams = await experiment_streams(cluster.url, exp)
        names = {s.config.name for s in streams}
        assert {
            p.stream_of(p.counts_bucket(exp)),
            p.stream_of(p.pods_bucket(exp)),
            p.journal_stream(exp),
            p.metrics_stream(exp),
        } <= names
        for s in streams:
            assert s.config.num_replicas == 3, s.config.name
            assert s.cluster is not None and len(s.cluster.replicas or []) == 2, s.cluster
    summary = json.loads((tmp_path / "runs" / exp / "summary.json").read_text())
    assert summary["verdict"] == "succeeded"
    assert summary["events"] == {"met": 3, "a_start": 3, "a_stop": 3}


async def test_a_cluster_of_two_gets_one_replica_and_a_fixed_number_is_never_lowered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream refuses 3 replicas on 2 servers: the streams get 1 (said in a warning),
    unless TRICKS_NATS_REPLICAS asked for 3: then creating them fails, naming why."""
    async with nats_cluster(tmp_path, size=2) as cluster:
        bus = await Bus.open(Endpoint(cluster.url), p.new_experiment_id("two"), name="test")
        try:
            await bus.create_buckets()
            streams = await experiment_streams(cluster.url, bus.exp_id)
            assert len(streams) >= 4
            assert {s.config.num_replicas for s in streams} == {1}
        finally:
            await bus.close()
        monkeypatch.setenv(replication.ENV, "3")
        bus = await Bus.open(Endpoint(cluster.url), p.new_experiment_id("fixed"), name="test")
        try:
            refused = r"3 replicas: TRICKS_NATS_REPLICAS=3\).*no suitable peers"
            with pytest.raises(TricksError, match=refused):
                await bus.create_buckets()
        finally:
            await bus.close()


NODE_LOSS = f"""\
experiment:
- tag: worker
  replicas: 4
  command: >-
    python -c "{DUMP_ENV}{PY}d.barrier('gate', 5, timeout=240);
    d.register_event('done'); d.close()"
"""


async def counts_leader(url: str, exp: str, not_on: str) -> str:
    """The server that leads the experiment's counts stream, moved off `not_on` (where the
    coordinator and the pods are connected) if it was there."""
    stream = p.stream_of(p.counts_bucket(exp))
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        async with asyncio.timeout(60):
            while True:
                info = await js.stream_info(stream)
                leader = info.cluster.leader if info.cluster else None
                if leader not in (None, not_on):
                    return leader
                if leader == not_on:
                    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
                await asyncio.sleep(0.1)  # an election under way: look again
    finally:
        await nc.close()


@pytest.mark.slow
async def test_the_run_survives_losing_the_server_that_leads_its_counts(tmp_path: Path) -> None:
    """Four pods wait at a barrier of 5; the server leading the counts stream is SIGKILLed;
    the fifth arrival (registered as a pod would, after the kill) must be counted once on the
    two servers left, release the four, and the run end with exact counts."""
    spec = tmp_path / "node-loss.yaml"
    spec.write_text(NODE_LOSS)
    async with nats_cluster(tmp_path) as cluster:
        up = await start_up(spec, cluster.url, tmp_path / "runs", "--json")
        try:
            assert up.stdout is not None
            experiment = ""
            while True:  # the four workers registered `gate` and wait for the fifth
                line = await up.stdout.readline()
                if not line:
                    break
                entry: dict[str, Any] = json.loads(line)
                experiment = entry["experiment"]
                if entry["kind"] == "event" and (entry["name"], entry["count"]) == ("gate", 4):
                    break
            assert experiment and up.returncode is None, "up ended before the barrier"
            leader = cluster.by_name(await counts_leader(cluster.url, experiment, "n0"))
            assert leader.pid is not None
            os.kill(leader.pid, signal.SIGKILL)
            await leader.stop()
            pod = await as_a_pod(tmp_path)
            try:
                assert await pod.register_event("gate") == 5  # on the two servers left
            finally:
                await pod.close()
        finally:
            out, err = await finish(up)
        assert up.returncode == 0, (out.decode()[-3000:], err.decode()[-3000:])
    summary = json.loads((tmp_path / "runs" / experiment / "summary.json").read_text())
    assert summary["verdict"] == "succeeded"
    assert summary["events"] == {"gate": 5, "done": 4, "worker_start": 4, "worker_stop": 4}
    assert not exp_processes(experiment)


# -- the manifests ----------------------------------------------------------------------------


def test_the_manifests_nats_is_a_cluster_of_three_that_syncs_every_write(tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "nats.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    sts, pdb = kinds["StatefulSet"], kinds["PodDisruptionBudget"]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert pdb["spec"]["maxUnavailable"] == 1
    conf = kinds["ConfigMap"]["data"]["nats.conf"]
    assert "sync_interval: always" in conf
    for i in range(3):
        assert f"nats://nats-{i}.{sts['spec']['serviceName']}:6222" in conf
    (tmp_path / "nats.conf").write_text(conf)
    checked = subprocess.run(
        [find_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        env={**os.environ, "POD_NAME": "nats-0"},
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    headless = next(d for d in docs if d["metadata"]["name"] == "nats-headless")
    assert headless["spec"]["publishNotReadyAddresses"] is True
