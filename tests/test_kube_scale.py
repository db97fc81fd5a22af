"""1000 pods through the kubernetes runtime against the API emulator (tests/kube_cluster.py):
creates stay within the runtime's concurrency and reach it, one watch serves every pod, and
the runtime asks the API about once per pod besides logs. The emulator counts what it served;
nothing here depends on how fast the machine is (the time to all running is bench/'s:
`python -m bench --only kube`)."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import kmock

from tricks_nats import env as E
from tricks_nats.runtimes import PodPlan
from tricks_nats.runtimes.kubernetes import KubernetesRuntime

from .kube_cluster import Cluster

NS = "scale"
EXP = "scale-20260101-000000-abcd"
PODS = 1000
CONCURRENCY = 20
#: A safety net against a hang, not a verdict on speed: one event is awaited this long at most.
EVENT_TIMEOUT = 120


def _plan(tmp_path: Path, pod_id: int) -> PodPlan:
    env = {E.TAG: "p", E.REPLICAS: str(PODS), E.POD_ID: str(pod_id), E.EXP_ID: EXP}
    return PodPlan(
        tag="p",
        pod_id=pod_id,
        replicas=PODS,
        command=("python", "pod.py"),
        image="example/pod:latest",
        env=env,
        log_path=tmp_path / "logs" / f"p-{pod_id}.log",
    )


def _kind(request: kmock.Request) -> str:
    if request.subresource == "log":
        return "log"
    if request.params.get("watch"):
        return "watch"
    return str(request.method.value)


async def test_a_thousand_pods_run_on_one_watch_with_bounded_creates(
    cluster: Cluster, kubecfg: Path, tmp_path: Path
) -> None:
    cluster.hold_creates = CONCURRENCY  # the first creates wait until CONCURRENCY are in flight
    rt = KubernetesRuntime(
        experiment=EXP,
        kubeconfig=str(kubecfg),
        context="emulator",
        namespace=NS,
        concurrency=CONCURRENCY,
    )
    await rt.prepare()
    try:
        for i in range(PODS):
            await rt.launch(_plan(tmp_path, i))
        ips: dict[int, str | None] = {}
        while len(ips) < PODS:  # every pod runs its program until it is deleted
            ev = await asyncio.wait_for(rt.events.get(), EVENT_TIMEOUT)
            assert ev.kind == "running" and ev.pod_id not in ips, ev
            ips[ev.pod_id] = ev.ip
        assert len(set(ips.values())) == PODS and None not in ips.values()
        assert len(cluster.pods(NS)) == PODS
        await rt.aclose(1.0)  # 1000 pods deleted at once, their logs kept
    finally:
        await rt.aclose(0.0)
    ends = [rt.events.get_nowait() for _ in range(PODS)]
    assert rt.events.empty()
    assert sorted(e.pod_id for e in ends) == list(range(PODS))
    assert {(e.kind, e.exit_code, e.reason, e.log_incomplete) for e in ends} == {
        ("exited", 143, None, None)
    }
    assert cluster.pods(NS) == {}
    # More pods than log streams (100 by default): the rest are attached before the deletion.
    for i in range(PODS):
        name = f"{EXP}-p-{i}"
        log = (tmp_path / "logs" / f"p-{i}.log").read_text()
        assert log == f"{name} waiting to be stopped\n{name} got SIGTERM\n", log

    mine = cluster.runtime_requests()
    kinds = collections.Counter(_kind(r) for r in mine)
    assert kinds["POST"] == PODS, kinds
    assert kinds["watch"] == 1 and cluster.max_watching == 1, kinds
    assert kinds["DELETE"] == 1, kinds  # one deletecollection by label
    besides_logs = len(mine) - kinds["log"]
    assert besides_logs <= 1.1 * PODS, kinds
    assert cluster.max_creating == CONCURRENCY
    print(
        f"{PODS} pods: {besides_logs / PODS:.3f} API requests per pod besides logs "
        f"{dict(kinds)}; at most {cluster.max_creating} creates in flight"
    )
