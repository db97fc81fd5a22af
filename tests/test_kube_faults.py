"""Faults on the kubernetes runtime, over real HTTP against the API emulator
(tests/kube_cluster.py): kill and restart through the pods API, pause and network faults as
Chaos Mesh objects checked against Chaos Mesh's own CRD schemas (tests/data/chaos-mesh/)."""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import pytest
import yaml

from tricks_nats.errors import UsageError
from tricks_nats.faults import Fault, FaultAction, Selector
from tricks_nats.runtimes import kube_chaos as kc
from tricks_nats.runtimes import kube_objects as ko
from tricks_nats.runtimes.kubernetes import KubernetesRuntime

from .kube_cluster import Cluster, emulator_runtime, kubeconfig
from .test_kubernetes import EXP, NS, name_of, next_event, plan

CRDS = Path(__file__).parent / "data" / "chaos-mesh"
#: Go durations as Chaos Mesh's webhook parses them (time.ParseDuration, unsigned).
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")


def fault(kind: str, name: str = "f", **extra: Any) -> Fault:
    fields: dict[str, Any] = {
        "index": 0,
        "name": name,
        "kind": kind,
        "event": "started",
        "value": 1,
        "after": 0.0,
        "every": None,
        "times": 1,
        "seed": 1,
        "pods": Selector("a"),
    }
    return Fault(**(fields | extra))


def schema_of(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"chaos-mesh.org_{kind.lower()}.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == kc.VERSION]
    schema: dict[str, Any] = _nullable(version["schema"]["openAPIV3Schema"])
    return schema


def _nullable(node: Any) -> Any:
    """OpenAPI's `nullable: true` as JSON Schema's null type; other `x-kubernetes-*` keywords
    are unknown to JSON Schema, so a validator ignores them."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def valid(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` checked against its kind's CRD schema (every error listed), and returned."""
    validator = jsonschema.Draft202012Validator(schema_of(obj["kind"]))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    assert not errors, errors
    assert obj["apiVersion"] == "chaos-mesh.org/v1alpha1"
    meta = obj["metadata"]
    assert len(meta["name"]) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"])
    assert meta["namespace"] == NS
    assert meta["labels"][ko.EXPERIMENT] == EXP
    assert meta["labels"][ko.MANAGED_BY] == ko.MANAGER
    assert ko.is_ours(obj, EXP)
    return obj


def make_runtime(kubecfg: Path, faults: tuple[Fault, ...], **kw: Any) -> KubernetesRuntime:
    options = {"schedule_timeout": 0.0, "faults": faults}
    return emulator_runtime(kubecfg, EXP, NS, **(options | kw))


NETWORK = (
    fault("delay", name="slow", to=Selector("b"), delay_ms=100.0, jitter_ms=10.0),
    fault("loss", name="lossy", to=Selector("b"), loss_percent=12.5),
    fault("partition", name="cut", to=Selector("b")),
)
ALL = (fault("kill"), fault("pause", name="nap", duration=2.5), *NETWORK)


@pytest.fixture
async def runtime(kubecfg: Path) -> AsyncIterator[KubernetesRuntime]:
    rt = make_runtime(kubecfg, ALL)
    await rt.prepare()
    try:
        yield rt
    finally:
        await rt.aclose(0.0)


async def running(rt: KubernetesRuntime, tmp_path: Path, *pods: tuple[str, int]) -> None:
    for tag, i in pods:
        await rt.launch(plan(tmp_path, tag, i, replicas=2))
    for _ in pods:
        assert (await next_event(rt)).kind == "running"


def deletes(cluster: Cluster, path_part: str) -> list[kmock.Request]:
    return [
        r
        for r in cluster.runtime_requests()
        if r.method == kmock.method.DELETE and path_part in r.url.path
    ]


# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.1, "100ms"), (2.5, "2500ms"), (30.0, "30s"), (0.0015, "1500us"), (0.0, "0s")],
)
def test_durations_are_go_durations(seconds: float, text: str) -> None:
    assert kc.go_duration(seconds) == text
    assert GO_DURATION.match(text)


@pytest.mark.parametrize("action", ["nap#0", "slow#12", "A Fault/with spaces#3", "x" * 80 + "#1"])
def test_object_names_are_dns_labels_and_stay_distinct(action: str) -> None:
    name = kc.object_name(EXP, action)
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert name == kc.object_name(EXP, action)  # deterministic
    assert name != kc.object_name(EXP, action.replace("#", "-"))


def test_a_signal_other_than_sigkill_or_sigterm_is_refused_before_the_run(kubecfg: Path) -> None:
    rt = make_runtime(kubecfg, ())
    bad = fault("kill", name="usr1", signal=int(signal.SIGUSR1))
    assert rt.fault_problems([fault("kill"), fault("kill", signal=int(signal.SIGTERM))]) == []
    assert rt.fault_problems(ALL) == []
    (problem,) = rt.fault_problems([fault("kill"), bad])
    assert "'usr1'" in problem and "SIGUSR1" in problem and "SIGKILL or SIGTERM" in problem
    assert "\n" not in problem


# -- kill and restart -------------------------------------------------------------------------


async def test_kill_with_sigkill_deletes_the_pod_at_once_and_it_exits_137(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    await running(runtime, tmp_path, ("a", 0), ("a", 1))
    await runtime.inject(FaultAction("f#0", "kill", pods=(("a", 0),)))
    ev = await next_event(runtime)
    assert (ev.kind, ev.tag, ev.pod_id, ev.exit_code) == ("exited", "a", 0, ko.KILLED)
    assert ev.reason == f"pod {name_of('a', 0)} killed by fault f#0 (SIGKILL)"
    (delete,) = deletes(cluster, "/pods/")
    assert name_of("a", 0) in delete.url.path
    assert delete.params.get("gracePeriodSeconds") == "0"
    assert runtime.events.empty()  # the other pod runs on
    assert name_of("a", 1) in cluster.pods(NS)
    await runtime.heal(FaultAction("f#0", "kill", pods=(("a", 0),)))  # nothing to undo


async def test_kill_with_sigterm_leaves_the_pod_its_grace_period(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    await running(runtime, tmp_path, ("a", 0))
    await runtime.inject(FaultAction("t#0", "kill", pods=(("a", 0),), signal=signal.SIGTERM))
    ev = await next_event(runtime)
    assert (ev.kind, ev.exit_code) == ("exited", 143)  # what the program said on SIGTERM
    assert ev.reason == f"pod {name_of('a', 0)} killed by fault t#0 (SIGTERM)"
    (delete,) = deletes(cluster, "/pods/")
    assert "gracePeriodSeconds" not in delete.params  # the pod's own


async def test_restart_launches_the_same_plan_once_the_previous_pod_is_gone(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    again = plan(tmp_path, "a", 0)
    await runtime.launch(again)
    assert (await next_event(runtime)).kind == "running"
    await runtime.terminate("a", 0, 0.0)
    ev = runtime.events.get_nowait()
    assert (ev.kind, ev.exit_code, ev.reason) == ("exited", 143, None)
    await runtime.launch(again)
    ev = await next_event(runtime)
    assert (ev.kind, ev.tag, ev.pod_id) == ("running", "a", 0)
    answers = [cluster.create_answers.get_nowait() for _ in range(2)]
    assert all(200 <= a < 300 for a in answers), answers  # no 409: the first pod was gone
    assert name_of("a", 0) in cluster.pods(NS)
    await runtime.terminate("a", 0, 0.0)
    ev = runtime.events.get_nowait()
    assert (ev.kind, ev.exit_code, ev.reason) == ("exited", 143, None)
    # One log file for the pod's two lives: the second is appended to the first.
    text = again.log_path.read_text()
    assert text.count("waiting to be stopped") == 2 and text.count("got SIGTERM") == 2


async def test_restart_of_a_pod_that_stays_terminating_fails_clearly(
    cluster: Cluster, kubecfg: Path, tmp_path: Path
) -> None:
    cluster.node_down.add("a")
    rt = make_runtime(kubecfg, (), settle_timeout=0.3)
    try:
        await rt.launch(plan(tmp_path, "a"))
        assert (await next_event(rt)).kind == "running"
        await rt.terminate("a", 0, 0.0)
        assert "still Terminating" in (rt.events.get_nowait().reason or "")
        await rt.launch(plan(tmp_path, "a"))
        ev = await next_event(rt)
        assert (ev.kind, ev.exit_code) == ("exited", ko.NEVER_RAN)
        assert ev.reason and "cannot start again" in ev.reason and "Terminating" in ev.reason
        assert cluster.create_answers.get_nowait() < 300 and cluster.create_answers.empty()
    finally:
        await rt.aclose(0.0)


# -- Chaos Mesh ---------------------------------------------------------------------------------


async def test_pause_is_a_valid_podchaos_and_heal_deletes_it(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    await running(runtime, tmp_path, ("a", 0), ("a", 1))
    action = FaultAction("nap#0", "pause", pods=(("a", 1), ("a", 0)), duration=2.5)
    await runtime.inject(action)
    ((key, obj),) = cluster.chaos_objects().items()
    assert key == ("podchaos", kc.object_name(EXP, "nap#0"))
    valid(obj)
    assert obj["kind"] == "PodChaos"
    assert obj["metadata"]["annotations"][kc.FAULT] == "nap#0"
    assert obj["spec"] == {
        "action": "pod-failure",
        "mode": "all",
        "selector": {"pods": {NS: [name_of("a", 0), name_of("a", 1)]}},
        "duration": "2500ms",
    }
    await runtime.heal(action)
    assert cluster.chaos_objects() == {}
    await runtime.heal(action)  # healed already: nothing to do
    assert len(deletes(cluster, "/podchaos/")) == 1
    assert runtime.events.empty()


@pytest.mark.parametrize("direction", ["both", "one"])
@pytest.mark.parametrize(
    ("kind", "extra", "spec"),
    [
        (
            "delay",
            {"delay_ms": 100.0, "jitter_ms": 10.0},
            {"delay": {"latency": "100ms", "jitter": "10ms"}},
        ),
        ("delay", {"delay_ms": 0.5}, {"delay": {"latency": "500us"}}),
        ("loss", {"loss_percent": 12.5}, {"loss": {"loss": "12.5"}}),
        ("partition", {}, {}),
    ],
)
async def test_network_faults_are_valid_networkchaos_between_the_two_ends(
    runtime: KubernetesRuntime,
    cluster: Cluster,
    tmp_path: Path,
    kind: str,
    extra: dict[str, Any],
    spec: dict[str, Any],
    direction: str,
) -> None:
    await running(runtime, tmp_path, ("a", 0), ("b", 0), ("b", 1))
    action = FaultAction(
        f"{kind}#0",
        kind,  # type: ignore[arg-type]
        pods=(("a", 0),),
        peers=(("b", 0), ("b", 1)),
        direction=direction,  # type: ignore[arg-type]
        duration=30.0,
        **extra,
    )
    await runtime.inject(action)
    ((key, obj),) = cluster.chaos_objects().items()
    assert key == ("networkchaos", kc.object_name(EXP, action.id))
    valid(obj)
    assert obj["kind"] == "NetworkChaos"
    assert obj["spec"] == {
        "action": kind,
        "mode": "all",
        "selector": {"pods": {NS: [name_of("a", 0)]}},
        "direction": "both" if direction == "both" else "to",
        "target": {"mode": "all", "selector": {"pods": {NS: [name_of("b", 0), name_of("b", 1)]}}},
        "duration": "30s",
        **spec,
    }
    for value in (*spec.get("delay", {}).values(), obj["spec"]["duration"]):
        assert GO_DURATION.match(value)
    if kind == "loss":
        assert 0 < float(obj["spec"]["loss"]["loss"]) <= 100
    await runtime.heal(action)
    assert cluster.chaos_objects() == {}


async def test_aclose_deletes_every_chaos_object_of_the_experiment_and_only_those(
    cluster: Cluster, kubecfg: Path, tmp_path: Path
) -> None:
    rt = make_runtime(kubecfg, ALL)
    await rt.prepare()
    try:
        await running(rt, tmp_path, ("a", 0), ("b", 0))
        await rt.inject(FaultAction("nap#0", "pause", pods=(("a", 0),), duration=5.0))
        await rt.inject(FaultAction("cut#0", "partition", pods=(("a", 0),), peers=(("b", 0),)))
        # One the experiment's label finds (a create whose reply was lost, say), and one of
        # another experiment, which stays.
        labels = {ko.EXPERIMENT: EXP, ko.MANAGED_BY: ko.MANAGER}
        ours: dict[str, Any] = {"metadata": {"name": "stray", "labels": labels}}
        theirs: dict[str, Any] = {"metadata": {"name": "theirs", "labels": {ko.EXPERIMENT: "x"}}}
        for body in (ours, theirs):
            body |= {"apiVersion": kc.API_VERSION, "kind": "NetworkChaos", "spec": {}}
            url = f"/apis/chaos-mesh.org/v1alpha1/namespaces/{NS}/networkchaos"
            async with cluster.post(url, json=body) as resp:
                assert resp.status < 300
        assert len(cluster.chaos_objects()) == 4
    finally:
        await rt.aclose(0.0)
    assert list(cluster.chaos_objects()) == [("networkchaos", "theirs")]
    await rt.aclose(0.0)  # again: nothing left to do, no error


async def test_a_paused_pods_container_restart_is_not_its_end(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.manual.update({"m", "n"})
    await runtime.launch(plan(tmp_path, "m"))
    name = await cluster.created.get()
    ip = await cluster.set_running(NS, name)
    assert (await next_event(runtime)).kind == "running"
    await runtime.inject(FaultAction("nap#0", "pause", pods=(("m", 0),), duration=1.0))
    # Chaos Mesh swapped the image: the container was killed and runs (the pause image).
    await cluster.set_status(
        NS,
        name,
        {
            "phase": "Running",
            "podIP": ip,
            "containerStatuses": [
                {
                    "name": ko.CONTAINER,
                    "restartCount": 1,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}},
                    "lastState": {"terminated": {"exitCode": 137, "reason": "Error"}},
                }
            ],
        },
    )
    # The watch is ordered: once another pod's `running` arrives, that status was seen.
    await runtime.launch(plan(tmp_path, "n"))
    await cluster.set_running(NS, await cluster.created.get())
    ev = await next_event(runtime)
    assert (ev.kind, ev.tag) == ("running", "n")
    assert name in cluster.pods(NS)  # not deleted as a crash-looping pod
    await cluster.set_terminated(NS, name, 3)  # the program, healed, ends on its own
    ev = await next_event(runtime)
    assert (ev.kind, ev.tag, ev.exit_code) == ("exited", "m", 3)


# -- a cluster without Chaos Mesh -------------------------------------------------------------


@pytest.fixture
async def bare(tmp_path: Path) -> AsyncIterator[Path]:
    """A kubeconfig for a cluster without Chaos Mesh."""
    async with Cluster(chaos_mesh=False) as emulator, kmock.Server(emulator):
        try:
            yield kubeconfig(tmp_path / "bare-kubeconfig", str(emulator.url).rstrip("/"))
        finally:
            await emulator.stop_lives()


async def test_faults_that_need_chaos_mesh_fail_prepare_without_it(bare: Path) -> None:
    rt = make_runtime(bare, (fault("kill"), fault("pause", name="nap"), *NETWORK))
    with pytest.raises(UsageError) as err:
        await rt.prepare()
    text = str(err.value)
    assert "\n" not in text
    for name in (
        "'nap'",
        "'slow'",
        "'lossy'",
        "'cut'",
        "Chaos Mesh",
        "https://chaos-mesh.org/docs/",
    ):
        assert name in text
    assert "'f'" not in text  # a kill needs no Chaos Mesh
    await make_runtime(bare, (fault("kill"), fault("restart"))).prepare()


def test_the_schema_check_catches_a_bad_object() -> None:
    """The vendored schemas are strict enough to matter: what Chaos Mesh would refuse fails."""
    action = FaultAction("slow#0", "delay", pods=(("a", 0),), peers=(("b", 0),), delay_ms=100)
    good = kc.manifest(action, exp_id=EXP, namespace=NS, pod_name=lambda t, i: name_of(t, i))
    valid(good)
    for spec in (
        good["spec"] | {"delay": {"latency": "100"}},  # no unit
        good["spec"] | {"direction": "one"},
        good["spec"] | {"mode": "every"},
        {k: v for k, v in good["spec"].items() if k != "selector"},
    ):
        with pytest.raises(AssertionError):
            valid(good | {"spec": spec})
