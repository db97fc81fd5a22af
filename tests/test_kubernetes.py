"""The kubernetes runtime over real HTTP against kmock's API emulator with a fake kubelet
(tests/kube_cluster.py), the real coordinator and a real nats-server; `--k8s` adds a run on a
real cluster."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from tricks_nats import env as E
from tricks_nats.driver import Config, Driver
from tricks_nats.entries import Entry, PodEntry
from tricks_nats.errors import UsageError
from tricks_nats.natsserver import EmbeddedServer
from tricks_nats.running import UpOptions, up
from tricks_nats.runtimes import PodEvent, PodPlan
from tricks_nats.runtimes import kube_objects as ko
from tricks_nats.runtimes.kube_options import KubeOptions
from tricks_nats.runtimes.kubernetes import KubernetesRuntime
from tricks_nats.spec import parse

from .conftest import BIN, ROOT, cli_env
from .kube_cluster import Cluster, PodContext, emulator_runtime, processes

NS = "trials"
EXP = "kexp-20260101-000000-abcd"


@pytest.fixture
async def runtime(kubecfg: Path) -> AsyncIterator[KubernetesRuntime]:
    rt = emulator_runtime(kubecfg, EXP, NS, schedule_timeout=0.0)
    await rt.prepare()
    try:
        yield rt
    finally:
        await rt.aclose(0.0)


def plan(tmp_path: Path, tag: str, pod_id: int = 0, replicas: int = 1) -> PodPlan:
    env = {
        "MODE": "fast",
        E.TAG: tag,
        E.REPLICAS: str(replicas),
        E.POD_ID: str(pod_id),
        E.EXP_ID: EXP,
        E.NATS_URL: "nats://nats.tricks-nats.svc:4222",
    }
    return PodPlan(
        tag=tag,
        pod_id=pod_id,
        replicas=replicas,
        command=("python", "server.py"),
        image="example/ring:latest",
        env=env,
        log_path=tmp_path / "logs" / f"{tag}-{pod_id}.log",
    )


async def next_event(rt: KubernetesRuntime) -> PodEvent:
    return await asyncio.wait_for(rt.events.get(), 30)


def name_of(tag: str, pod_id: int = 0, exp: str = EXP) -> str:
    return ko.pod_name(exp, tag, pod_id)


# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exp", "tag", "pod_id"),
    [
        ("ring-20261122-031444-35d1", "server", 3),
        ("ring-20261122-031444-35d1", "Big_Server", 0),
        ("a" * 51, "t" * 100, 999),
    ],
)
def test_pod_names_are_dns_labels(exp: str, tag: str, pod_id: int) -> None:
    name = ko.pod_name(exp, tag, pod_id)
    assert len(name) <= 63
    assert name == name.lower()
    assert name.endswith(f"-{pod_id}")
    assert all(c.isalnum() or c == "-" for c in name) and name[0].isalnum()


def test_plain_names_stay_readable_and_case_variants_stay_apart() -> None:
    assert ko.pod_name("ring-1", "server", 2) == "ring-1-server-2"
    assert ko.pod_name("ring-1", "Server", 0) != ko.pod_name("ring-1", "server", 0)


def _pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"image": "x:1"}]}, "status": status}


def _state(**state: Any) -> list[dict[str, Any]]:
    return [{"name": ko.CONTAINER, "state": state}]


@pytest.mark.parametrize(
    ("pod", "kind", "code", "words"),
    [
        (_pod(), "pending", None, []),
        (_pod(phase="Pending"), "pending", None, []),
        (_pod(phase="Running"), "pending", None, []),  # no IP yet
        (_pod(phase="Running", podIP="10.0.0.1"), "running", None, []),
        (
            _pod(phase="Succeeded", containerStatuses=_state(terminated={"exitCode": 0})),
            "exited",
            0,
            [],
        ),
        (
            _pod(
                phase="Failed",
                containerStatuses=_state(terminated={"exitCode": 3, "reason": "Error"}),
            ),
            "exited",
            3,
            ["pod p exited with 3", "Error"],
        ),
        (
            _pod(phase="Failed", reason="Evicted", message="low on memory"),
            "exited",
            137,
            ["pod p failed", "Evicted", "low on memory"],
        ),
        (
            _pod(
                phase="Pending",
                containerStatuses=_state(waiting={"reason": "ImagePullBackOff", "message": "no"}),
            ),
            "exited",
            127,
            ["pod p cannot start", "image x:1", "ImagePullBackOff"],
        ),
        (
            _pod(containerStatuses=_state(waiting={"reason": "CreateContainerConfigError"})),
            "exited",
            127,
            ["CreateContainerConfigError"],
        ),
        (
            _pod(containerStatuses=_state(waiting={"reason": "ContainerCreating"})),
            "pending",
            None,
            [],
        ),
        (
            _pod(
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes",
                    }
                ]
            ),
            "unschedulable",
            None,
            ["0/1 nodes"],
        ),
    ],
)
def test_pod_status_interpretation(
    pod: dict[str, Any], kind: str, code: int | None, words: list[str]
) -> None:
    seen = ko.interpret(pod)
    assert (seen.kind, seen.exit_code) == (kind, code)
    for word in words:
        assert word in (seen.reason or "")


def test_the_pod_manifest_is_a_valid_pod(tmp_path: Path) -> None:
    import kubernetes_validate

    body = ko.pod_manifest(
        plan(tmp_path, "server"),
        namespace=NS,
        resources={"requests": {"cpu": "100m"}, "limits": {"memory": "64Mi"}},
    )
    kubernetes_validate.validate(body, kubernetes_validate.latest_version(), strict=True)
    env = {e["name"]: e for e in body["spec"]["containers"][0]["env"]}
    assert env[E.POD_IP] == {
        "name": E.POD_IP,
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    assert body["spec"]["containers"][0]["resources"]["limits"] == {"memory": "64Mi"}


# -- the runtime against the emulator -----------------------------------------------------


async def test_pods_get_labels_env_command_and_restart_policy(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    for i in range(2):
        await runtime.launch(plan(tmp_path, "server", i, replicas=2))
    events = [await next_event(runtime) for _ in range(2)]
    assert {(e.kind, e.pod_id) for e in events} == {("running", 0), ("running", 1)}
    assert all(e.ip and e.ip.startswith("10.244.") for e in events)

    pod = cluster.pods(NS)[name_of("server", 1)]
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "tricks-nats",
        "tricks-nats/experiment": EXP,
        "tricks-nats/tag": "server",
        "tricks-nats/pod-id": "1",
    }
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["image"] == "example/ring:latest"
    assert container["command"] == ["python", "server.py"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env[E.POD_ID] == "1" and env[E.EXP_ID] == EXP and env["MODE"] == "fast"
    assert env[E.POD_IP] == {"fieldRef": {"fieldPath": "status.podIP"}}

    await runtime.aclose(1.0)
    ends = [await next_event(runtime) for _ in range(2)]
    assert {(e.kind, e.exit_code) for e in ends} == {("exited", 143)}
    assert cluster.pods(NS) == {}
    log = (tmp_path / "logs" / "server-0.log").read_text()
    assert "server-0 waiting to be stopped" in log and "got SIGTERM" in log


async def test_exit_codes_and_logs_come_from_the_container(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    async def ok(ctx: PodContext) -> int:
        ctx.print(f"hello from {ctx.env[E.TAG]}-{ctx.env[E.POD_ID]} at {ctx.env[E.POD_IP]}")
        return 0

    async def crash(ctx: PodContext) -> int:
        ctx.print("about to crash")
        return 3

    cluster.programs.update(ok=ok, crash=crash)
    await runtime.launch(plan(tmp_path, "ok"))
    await runtime.launch(plan(tmp_path, "crash"))
    got: dict[str, list[PodEvent]] = collections.defaultdict(list)
    for _ in range(4):
        ev = await next_event(runtime)
        got[ev.tag].append(ev)
    assert [e.kind for e in got["ok"]] == ["running", "exited"]
    assert (got["ok"][1].exit_code, got["ok"][1].reason) == (0, None)
    crashed = got["crash"][1]
    assert crashed.exit_code == 3 and not crashed.preempted  # its own failure, no preemption
    assert crashed.reason and f"pod {name_of('crash')} exited with 3" in crashed.reason
    await runtime.aclose(0.0)
    assert "hello from ok-0 at 10.244." in (tmp_path / "logs" / "ok-0.log").read_text()
    assert (tmp_path / "logs" / "crash-0.log").read_text() == "about to crash\n"


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("ErrImagePull", "pull access denied for nope, repository does not exist"),
        ("ImagePullBackOff", 'Back-off pulling image "nope"'),
        ("CreateContainerConfigError", 'secret "missing" not found'),
    ],
)
async def test_a_pod_that_cannot_start_exits_with_its_cause_and_is_deleted(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path, reason: str, message: str
) -> None:
    cluster.failures["bad"] = (reason, message)
    await runtime.launch(plan(tmp_path, "bad"))
    ev = await next_event(runtime)
    assert (ev.kind, ev.exit_code) == ("exited", ko.NEVER_RAN)
    assert ev.reason and name_of("bad") in ev.reason
    assert reason in ev.reason and message in ev.reason
    await asyncio.wait_for(cluster.stops[name_of("bad")].wait(), 30)  # deleted at once
    assert reason in (tmp_path / "logs" / "bad-0.log").read_text()


async def test_an_unschedulable_pod_exits_after_the_deadline(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.failures["huge"] = ("Unschedulable", "0/3 nodes are available: 3 Insufficient cpu.")
    await runtime.launch(plan(tmp_path, "huge"))
    ev = await next_event(runtime)
    assert (ev.kind, ev.exit_code) == ("exited", ko.NEVER_RAN)
    assert ev.reason and "could not be scheduled" in ev.reason and "Insufficient cpu" in ev.reason
    await asyncio.wait_for(cluster.stops[name_of("huge")].wait(), 30)


async def test_an_evicted_pod_counts_as_failed(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.manual.add("m")
    await runtime.launch(plan(tmp_path, "m"))
    name = await cluster.created.get()
    await cluster.set_running(NS, name)
    assert (await next_event(runtime)).kind == "running"
    await cluster.set_status(
        NS, name, {"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."}
    )
    ev = await next_event(runtime)
    assert (ev.kind, ev.exit_code) == ("exited", ko.KILLED)
    assert ev.reason and "Evicted" in ev.reason and "low on memory" in ev.reason
    assert ev.preempted  # a restart policy `on: preemption` starts it again


async def test_a_pod_deleted_by_someone_else_fails(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    await runtime.launch(plan(tmp_path, "victim"))
    assert (await next_event(runtime)).kind == "running"
    async with cluster.delete(f"/api/v1/namespaces/{NS}/pods/{name_of('victim')}") as resp:
        assert resp.status == 200
    ev = await next_event(runtime)
    assert (ev.kind, ev.exit_code) == ("exited", 143)
    assert ev.reason and "deleted by someone else" in ev.reason
    assert ev.preempted  # what a drained node does


async def test_terminate_deletes_the_pod_and_returns_once_it_ended(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    await runtime.launch(plan(tmp_path, "s"))
    assert (await next_event(runtime)).kind == "running"
    await runtime.terminate("s", 0, 2.0)
    ev = runtime.events.get_nowait()
    assert (ev.kind, ev.exit_code, ev.reason) == ("exited", 143, None)
    deletes = [r for r in cluster.runtime_requests() if r.method == "DELETE"]
    assert [r.params.get("gracePeriodSeconds") for r in deletes] == ["2"]


async def test_the_watch_resumes_after_a_dropped_connection(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.manual.add("m")
    await runtime.launch(plan(tmp_path, "m"))
    assert await cluster.watches.get() == 1
    name = await cluster.created.get()
    cluster.watch_gate.clear()
    cluster.drop_watches()
    ip = await cluster.set_running(NS, name)  # happens while nobody watches
    assert await cluster.watches.get() == 2
    cluster.watch_gate.set()
    ev = await next_event(runtime)
    assert (ev.kind, ev.ip) == ("running", ip)
    watches = [r for r in cluster.runtime_requests() if r.params.get("watch") == "true"]
    assert len(watches) == 2
    assert all(w.params.get("labelSelector") == ko.selector(EXP) for w in watches)
    assert "resourceVersion" in watches[1].params


async def test_an_expired_watch_relists_and_notices_pods_that_vanished(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.manual.add("m")
    for i in range(2):
        await runtime.launch(plan(tmp_path, "m", i, replicas=2))
    assert await cluster.watches.get() == 1
    names = [await cluster.created.get() for _ in range(2)]
    for name in names:
        await cluster.set_running(NS, name)
    assert {(await next_event(runtime)).kind for _ in range(2)} == {"running"}
    lists_before = len([r for r in cluster.runtime_requests() if r.action == kmock.action.LIST])
    cluster.watch_gate.clear()
    cluster.expire_next_watch()
    cluster.drop_watches()
    gone = name_of("m", 1)
    del cluster.objects[kmock.resource("v1/pods"), NS, gone]  # vanished without an event
    cluster.finished[gone].set()  # and its container with it (its log stream ends)
    await cluster.set_terminated(NS, name_of("m", 0), 0)
    cluster.watch_gate.set()
    got = {(ev := await next_event(runtime)).pod_id: ev for _ in range(2)}
    assert (got[0].kind, got[0].exit_code) == ("exited", 0)
    assert (got[1].kind, got[1].exit_code) == ("exited", ko.KILLED)
    assert got[1].reason and gone in got[1].reason and "deleted" in got[1].reason
    lists = [r for r in cluster.runtime_requests() if r.action == kmock.action.LIST]
    assert len(lists) == lists_before + 1


async def test_down_deletes_only_that_experiments_pods(
    cluster: Cluster, kubecfg: Path, tmp_path: Path
) -> None:
    cluster.manual.update({"s", "other"})

    def pod(exp: str, tag: str) -> dict[str, Any]:
        return ko.pod_manifest(
            plan(tmp_path, tag) if exp == EXP else _foreign(tmp_path, exp, tag), namespace=NS
        )

    for body in (pod(EXP, "s"), pod("other-20260101-000000-0000", "other")):
        async with cluster.post(f"/api/v1/namespaces/{NS}/pods", json=body) as resp:
            assert resp.status < 300
    # a fault's Chaos Mesh object a killed `up` left behind, and another experiment's
    for name, exp in (("left", EXP), ("theirs", "other-20260101-000000-0000")):
        labels = {ko.EXPERIMENT: exp, ko.MANAGED_BY: ko.MANAGER}
        chaos = {"apiVersion": "chaos-mesh.org/v1alpha1", "kind": "PodChaos", "spec": {}}
        url = f"/apis/chaos-mesh.org/v1alpha1/namespaces/{NS}/podchaos"
        async with cluster.post(url, json={**chaos, "metadata": {"name": name, "labels": labels}}):
            pass
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "tricks-nats"),
        "down",
        EXP,
        "--kubeconfig",
        str(kubecfg),
        "--context",
        "emulator",
        "-n",
        NS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert f"deleted pod {name_of('s')}" in out.decode()
    assert "deleted podchaos/left" in out.decode() and "1 pod(s) deleted" in out.decode()
    assert list(cluster.chaos_objects()) == [("podchaos", "theirs")]
    await asyncio.wait_for(cluster.stops[name_of("s")].wait(), 30)
    assert list(cluster.pods(NS)) == [ko.pod_name("other-20260101-000000-0000", "other", 0)]


async def test_without_deletecollection_the_pods_are_deleted_one_by_one(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.delete_collection = False  # an API server, or RBAC, without it: 405
    for i in range(2):
        await runtime.launch(plan(tmp_path, "s", i, replicas=2))
    assert {(await next_event(runtime)).kind for _ in range(2)} == {"running"}
    await runtime.aclose(1.0)
    ends = [runtime.events.get_nowait() for _ in range(2)]
    assert {(e.kind, e.exit_code) for e in ends} == {("exited", 143)}
    assert cluster.pods(NS) == {}
    deletes = [r.name for r in cluster.runtime_requests() if r.method == "DELETE"]
    assert sorted(deletes, key=str) == [None, name_of("s", 0), name_of("s", 1)]


def _foreign(tmp_path: Path, exp: str, tag: str) -> PodPlan:
    base = plan(tmp_path, tag)
    return PodPlan(
        tag=tag,
        pod_id=0,
        replicas=1,
        command=base.command,
        image=base.image,
        env={**base.env, E.EXP_ID: exp},
        log_path=base.log_path,
    )


# -- the coordinator on the emulator --------------------------------------------------------

SPEC = """
name: kring
timeout: 120
experiment:
- tag: server
  image: example/ring:latest
  command: [python, server.py]
  replicas: 3
  resources: {requests: {cpu: 10m}, limits: {memory: 64Mi}}
  workflow:
    stop: {name: client_stop, value: 2}
- tag: client
  image: example/ring:latest
  command: [python, client.py]
  replicas: 2
  workflow:
    start: {name: server-ready, value: 3}
"""


async def _server(ctx: PodContext) -> int:
    async with Driver(Config.from_env(ctx.env)) as tricks:
        await tricks.register_event("server-ready")
        ctx.print(f"server {tricks.config.pod_id} ready")
    await ctx.stop.wait()
    ctx.print("server stopping")
    return 143


async def _client(ctx: PodContext) -> int:
    async with Driver(Config.from_env(ctx.env)) as tricks:
        servers = await tricks.discover("server", 3, timeout=30)
        ctx.print(f"client sees {len(servers)} servers")
    return 0


def _options(tmp_path: Path, kubecfg: Path, server: EmbeddedServer, **more: Any) -> UpOptions:
    kube: dict[str, Any] = {
        "kubeconfig": str(kubecfg),
        "context": "emulator",
        "namespace": NS,
        "pod_nats_url": server.url,
        "concurrency": 3,
    }
    kube.update({k: more.pop(k) for k in list(more) if k in KubeOptions.__dataclass_fields__})
    return UpOptions(
        runs_dir=tmp_path / "runs",
        nats_url=server.url,
        runtime="kubernetes",
        grace=1.0,
        runtime_options={"kubernetes": KubeOptions(**kube)},
        **more,
    )


async def test_a_workflow_runs_on_the_emulator_with_bounded_requests(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    cluster.programs.update(server=_server, client=_client)
    exp = parse(SPEC, "kring.yaml", runtime="kubernetes")
    outcome = await up(exp, _options(tmp_path, kubecfg, nats_server))
    assert outcome.verdict == "succeeded", outcome.reason
    summary = outcome.summary
    by = {(p.tag, p.pod_id): p for p in summary.pods}
    assert all(by[("server", i)].stopped_by_workflow for i in range(3))
    assert all(by[("client", i)].exit_code == 0 for i in range(2))
    assert summary.events["server-ready"] == 3 and summary.events["client_stop"] == 2
    assert cluster.pods() == {}, "every pod is deleted at the end"

    root = tmp_path / "runs" / summary.experiment / "logs"
    assert "server 0 ready" in (root / "server-0.log").read_text()
    assert "server stopping" in (root / "server-0.log").read_text()
    assert "client sees 3 servers" in (root / "client-1.log").read_text()

    created = [r for r in cluster if r.action == kmock.action.CREATE]
    assert len(created) == 5
    body = next(r.data for r in created if r.data["metadata"]["labels"][ko.TAG] == "server")
    assert body["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "10m"}

    mine = cluster.runtime_requests()
    kinds = collections.Counter(
        "log" if r.subresource == "log" else "watch" if r.params.get("watch") else r.method.value
        for r in mine
    )
    pods = 5
    assert kinds["POST"] == pods
    assert kinds["log"] == pods
    assert kinds["watch"] == 1
    assert kinds["DELETE"] <= pods + 1  # workflow stops + one deletecollection at the end
    assert len(mine) <= 4 * pods + 4, kinds
    print(f"API requests: {len(mine)} for {pods} pods: {dict(kinds)}")


async def test_an_unpullable_image_fails_the_run_with_its_reason(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    cluster.failures["server"] = ("ErrImagePull", "pull access denied for example/ring")
    exp = parse(SPEC, "kring.yaml", runtime="kubernetes")
    outcome = await up(exp, _options(tmp_path, kubecfg, nats_server))
    assert outcome.verdict == "failed"
    pods = {(p.tag, p.pod_id): p for p in outcome.summary.pods}
    server = pods[("server", 0)]
    assert server.exit_code == ko.NEVER_RAN and server.state == "failed"
    assert server.reason and "ErrImagePull" in server.reason
    assert f"{outcome.summary.experiment}-server-0" in server.reason
    assert "never started" in (outcome.reason or "") or "127" in (outcome.reason or "")
    assert cluster.pods() == {}


async def _up_ring_on_the_emulator(
    cluster: Cluster, kubecfg: Path, server: EmbeddedServer, tmp_path: Path
) -> tuple[int, str, str]:
    """`tricks-nats up examples/ring/ring.yaml` on kubernetes, typed as a user would, against
    an API whose kubelet runs each container's command as a real process in the image's
    WORKDIR (examples/ring) on its own loopback pod IP."""
    cluster.pod_ips = f"127.0.{random.randint(100, 250)}.{{}}"
    program = processes(ROOT / "examples" / "ring")
    cluster.programs.update(server=program, client=program)
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "tricks-nats"),
        "up",
        "examples/ring/ring.yaml",
        "--runtime",
        "kubernetes",
        "--kubeconfig",
        str(kubecfg),
        "--context",
        "emulator",
        "--namespace",
        NS,
        "--nats-url",
        server.url,
        "--pod-nats-url",
        server.url,
        "--runs-dir",
        str(tmp_path / "runs"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 180)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _only_run(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    (run,) = (tmp_path / "runs").iterdir()
    return json.loads((run / "summary.json").read_text()), run


async def test_the_ring_example_runs_on_the_emulator_through_the_cli(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    code, out, err = await _up_ring_on_the_emulator(cluster, kubecfg, nats_server, tmp_path)
    assert code == 0, out[-3000:] + err
    summary, run = _only_run(tmp_path)
    assert summary["verdict"] == "succeeded"
    assert summary["events"]["server-connected"] == 6
    assert summary["events"]["client_stop"] == 6
    pods = {(p["tag"], p["pod_id"]): p for p in summary["pods"]}
    assert len(pods) == 12
    assert all(pods[("client", i)]["exit_code"] == 0 for i in range(6))
    assert all(pods[("server", i)]["stopped_by_workflow"] for i in range(6))
    server_log = (run / "logs" / "server-0.log").read_text()
    assert "token went round the ring of 6" in server_log  # the container's own output
    assert "median round trip" in (run / "logs" / "client-5.log").read_text()
    # metrics: the clients' records (through NATS) and the servers' log lines (a pattern
    # applied to the log streams the runtime copies)
    metrics = {(m["name"], m["tag"]): m["count"] for m in summary["metrics"]}
    assert metrics == {("request_ms", "client"): 6 * 200, ("token_ms", "server"): 6}
    assert summary["metrics_dropped"] == {} and summary["metrics_rejected"] == 0
    assert f"succeeded: {summary['experiment']}" in out
    assert cluster.pods() == {}, "every pod is deleted at the end"


async def test_the_ring_on_the_emulator_with_an_unpullable_image_fails_clearly(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    cluster.failures["server"] = ("ErrImagePull", "pull access denied for tricks-nats/ring")
    code, out, err = await _up_ring_on_the_emulator(cluster, kubecfg, nats_server, tmp_path)
    assert code == 1, out[-3000:] + err
    assert "Traceback" not in out + err
    summary, _ = _only_run(tmp_path)
    assert summary["verdict"] == "failed"
    # The cause reaches the user in the verdict line, not just an exit code.
    (verdict,) = [line for line in (out + err).splitlines() if line.startswith("failed: ")]
    assert re.search(r"server-\d failed \(exit 127\): .*ErrImagePull", verdict), verdict
    assert not any(p["tag"] == "client" and p["exit_code"] is not None for p in summary["pods"])
    assert cluster.pods() == {}


async def test_ctrl_c_deletes_every_pod(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    running = 0

    def on_journal(entry: Entry) -> None:
        nonlocal running
        if isinstance(entry, PodEntry) and entry.state == "running":
            running += 1
            if running == 3:  # every server runs; clients wait for an event nobody sends
                os.kill(os.getpid(), signal.SIGINT)

    exp = parse(SPEC, "kring.yaml", runtime="kubernetes")
    outcome = await up(exp, _options(tmp_path, kubecfg, nats_server, on_journal=on_journal))
    assert outcome.verdict == "interrupted"
    assert cluster.pods() == {}
    assert {p.state for p in outcome.summary.pods if p.tag == "server"} == {"stopped"}


async def test_a_bad_context_is_bad_input(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    exp = parse(SPEC, "kring.yaml", runtime="kubernetes")
    opts = _options(tmp_path, kubecfg, nats_server, context="nope")
    with pytest.raises(UsageError, match=r"context 'nope' not found .*known: emulator, dead"):
        await up(exp, opts)
    opts = _options(tmp_path, kubecfg, nats_server, context=None)  # current: a closed port
    with pytest.raises(UsageError, match=r"cannot use the Kubernetes cluster: .*cannot reach"):
        await up(exp, opts)
    assert not [r for r in cluster if r.action == kmock.action.CREATE]


def test_up_on_kubernetes_needs_a_nats_url(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    proc = subprocess.run(
        [
            str(BIN / "tricks-nats"),
            "up",
            str(spec),
            "--runtime",
            "kubernetes",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs --nats-url" in proc.stderr and "port-forward" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_the_cli_does_not_import_kubernetes_until_needed() -> None:
    code = (
        "import sys; from tricks_nats.cli import app; "
        "assert 'kubernetes_asyncio' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), timeout=60)


# -- manifests ------------------------------------------------------------------------------

MANIFESTS = ROOT / "manifests"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def test_every_manifest_validates() -> None:
    import kubernetes_validate

    docs = _documents()
    kinds = {d["kind"] for _, d in docs}
    assert {
        "Namespace",
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Job",
        "ConfigMap",
    } <= kinds
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata'].get('name')}: {exc.message}")


def test_the_kustomization_lists_every_manifest_and_the_role_is_least() -> None:
    kustom = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustom["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    role = next(d for _, d in _documents() if d["kind"] == "Role")
    rules = {tuple(r["resources"]): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        ("pods",): {"create", "get", "list", "watch", "delete", "deletecollection"},
        ("pods/log",): {"get"},
    }
    nats = next(d for _, d in _documents() if d["kind"] == "StatefulSet")
    args = " ".join(nats["spec"]["template"]["spec"]["containers"][0].get("args", []))
    assert "--jetstream" in args or "-js" in args
    assert nats["spec"]["volumeClaimTemplates"], "JetStream keeps its store on a volume"


def test_the_ring_dockerfile_matches_the_spec() -> None:
    dockerfile = (ROOT / "examples" / "ring" / "Dockerfile").read_text()
    ring = yaml.safe_load((ROOT / "examples" / "ring" / "ring.yaml").read_text())
    assert {t["image"] for t in ring["experiment"]} == {"tricks-nats/ring:latest"}
    assert "server.py" in dockerfile and "client.py" in dockerfile
    assert "WORKDIR" in dockerfile


# -- a real cluster (opt-in: pytest --k8s) ---------------------------------------------------


@pytest.mark.k8s
def test_the_ring_runs_on_a_real_cluster(tmp_path: Path) -> None:
    """Needs kubectl's current context, manifests/ applied, the ring image loaded, and NATS
    reachable from here: TRICKS_K8S_NATS_URL (default nats://127.0.0.1:4222, a port-forward)."""
    url = os.environ.get("TRICKS_K8S_NATS_URL", "nats://127.0.0.1:4222")
    proc = subprocess.run(
        [
            str(BIN / "tricks-nats"),
            "up",
            str(ROOT / "examples" / "ring" / "ring.yaml"),
            "--runtime",
            "kubernetes",
            "--nats-url",
            url,
            "--runs-dir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in proc.stdout.splitlines() if '"verdict"' in line]
    assert verdicts and verdicts[-1]["verdict"] == "succeeded"


@pytest.mark.parametrize(
    "args",
    [
        ["up", "examples/ring/ring.yaml", "--runtime", "kubernetes", "--nats-url", "nats://x:1"],
        ["down", "ring-20261123-000000-abcd"],
    ],
)
def test_without_the_kubernetes_extra_the_runtime_names_it(args: list[str]) -> None:
    """kubernetes-asyncio is an extra (`tricks-nats[kubernetes]`): without it, the kubernetes
    runtime and `down` are one line naming the extra, exit 2, nothing started."""
    without = (
        "import sys; sys.modules['kubernetes_asyncio'] = None; "
        "from tricks_nats.cli.app import main; sys.argv[0] = 'tricks-nats'; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", without, *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "tricks-nats: error: the kubernetes runtime needs kubernetes-asyncio, which is not "
        "installed: pip install 'tricks-nats[kubernetes]'\n"
    )
