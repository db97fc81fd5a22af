"""Kubernetes as a real cluster behaves: pods deleted by someone else, log streams and API
connections that break, creates whose reply is lost, throttled deletes, containers an admission
webhook made restartable, pods the scheduler cannot place. Real HTTP against kmock's emulator
with the fake kubelet of tests/kube_cluster.py; the real coordinator and nats-server for `up`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest

from tricks_nats import env as E
from tricks_nats.natsserver import EmbeddedServer
from tricks_nats.running import up
from tricks_nats.runtimes import PodEvent, PodPlan
from tricks_nats.runtimes import kube_objects as ko
from tricks_nats.runtimes.kubernetes import KubernetesRuntime
from tricks_nats.spec import parse

from .kube_cluster import Cluster, PodContext, emulator_runtime
from .test_kubernetes import _options

NS = "trials"
EXP = "trust-20260101-000000-abcd"
NOTE = "tricks-nats: log may be incomplete: "


def _runtime(kubecfg: Path, **more: Any) -> KubernetesRuntime:
    return emulator_runtime(kubecfg, EXP, NS, **more)


@pytest.fixture
async def runtime(kubecfg: Path) -> AsyncIterator[KubernetesRuntime]:
    rt = _runtime(kubecfg)
    await rt.prepare()
    try:
        yield rt
    finally:
        await rt.aclose(0.0)


def plan(tmp_path: Path, tag: str, pod_id: int = 0) -> PodPlan:
    env = {E.TAG: tag, E.REPLICAS: "1", E.POD_ID: str(pod_id), E.EXP_ID: EXP}
    return PodPlan(
        tag=tag,
        pod_id=pod_id,
        replicas=1,
        command=("python", "prog.py"),
        image="example/prog:latest",
        env=env,
        log_path=tmp_path / "logs" / f"{tag}-{pod_id}.log",
    )


async def next_event(rt: KubernetesRuntime) -> PodEvent:
    return await asyncio.wait_for(rt.events.get(), 30)


def name_of(tag: str, pod_id: int = 0) -> str:
    return ko.pod_name(EXP, tag, pod_id)


async def _sent(cluster: Cluster, name: str, lines: int) -> None:
    """Until a log stream has sent the pod's first `lines` lines."""
    while True:
        got, count = await asyncio.wait_for(cluster.log_sent.get(), 30)
        if got == name and count >= lines:
            return


def _requests(cluster: Cluster, method: str) -> list[kmock.Request]:
    return [r for r in cluster.runtime_requests() if r.method == method]


# -- 1. a deletion tricks-nats did not ask for ------------------------------------------------


async def _polite(ctx: PodContext) -> int:
    """A program that exits 0 on SIGTERM, as a well-behaved server does."""
    ctx.print("serving")
    await ctx.stop.wait()
    ctx.print("SIGTERM: bye")
    return 0


async def test_a_pod_deleted_by_someone_else_fails_even_if_its_program_exits_0(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.programs["polite"] = _polite
    await runtime.launch(plan(tmp_path, "polite"))
    assert (await next_event(runtime)).kind == "running"
    async with cluster.delete(f"/api/v1/namespaces/{NS}/pods/{name_of('polite')}") as resp:
        assert resp.status == 200
    ev = await next_event(runtime)
    assert ev.kind == "exited"
    assert ev.exit_code not in (0, None)
    assert ev.reason and name_of("polite") in ev.reason
    assert "deleted by someone else" in ev.reason and "exited 0" in ev.reason


ONE = """
name: alone
timeout: 120
experiment:
- tag: {tag}
  image: example/prog:latest
  command: [python, prog.py]
"""


async def test_a_run_whose_pod_someone_else_deleted_fails(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    started = asyncio.Event()

    async def polite(ctx: PodContext) -> int:
        started.set()
        return await _polite(ctx)

    cluster.programs["polite"] = polite
    exp = parse(ONE.format(tag="polite"), "alone.yaml", runtime="kubernetes")
    run = asyncio.create_task(up(exp, _options(tmp_path, kubecfg, nats_server)))
    name = await asyncio.wait_for(cluster.created.get(), 30)
    await asyncio.wait_for(started.wait(), 30)
    async with cluster.delete(f"/api/v1/namespaces/{NS}/pods/{name}") as resp:
        assert resp.status == 200
    outcome = await asyncio.wait_for(run, 60)
    assert outcome.verdict == "failed", outcome.reason
    (pod,) = outcome.summary.pods
    assert pod.state == "failed" and pod.exit_code not in (0, None)
    assert pod.reason and name in pod.reason and "deleted by someone else" in pod.reason
    assert cluster.pods() == {}


# -- 2. log streams that break ----------------------------------------------------------------


def _talker(proceed: asyncio.Event) -> Any:
    async def talk(ctx: PodContext) -> int:
        ctx.print("before the break")
        await proceed.wait()
        ctx.print("during the outage")
        await ctx.stop.wait()
        ctx.print("got SIGTERM")
        return 0

    return talk


async def _break_the_log_stream(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path, tag: str
) -> str:
    """A pod printed a line that its log stream carried; then log reads fail (503) and the
    stream breaks, like an API server restart; the runtime notices (it asks again and is
    refused); then the pod prints another line."""
    proceed = asyncio.Event()
    cluster.programs[tag] = _talker(proceed)
    await runtime.launch(plan(tmp_path, tag))
    assert (await next_event(runtime)).kind == "running"
    name = name_of(tag)
    await _sent(cluster, name, 1)
    cluster.logs_down = True
    cluster.drop_logs()
    assert await asyncio.wait_for(cluster.log_refusals.get(), 30) == name
    proceed.set()
    return name


async def test_a_broken_log_stream_is_attached_again_before_the_pod_is_deleted(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    await _break_the_log_stream(runtime, cluster, tmp_path, "talker")
    cluster.logs_down = False  # the API server is back; then tricks-nats stops the pod
    await runtime.terminate("talker", 0, 2.0)
    ev = runtime.events.get_nowait()
    assert (ev.kind, ev.exit_code, ev.reason, ev.log_incomplete) == ("exited", 0, None, None)
    text = (tmp_path / "logs" / "talker-0.log").read_text()
    assert text == "before the break\nduring the outage\ngot SIGTERM\n"  # nothing twice


async def test_a_log_that_could_not_be_read_again_says_it_may_be_incomplete(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    name = await _break_the_log_stream(runtime, cluster, tmp_path, "talker")
    await runtime.terminate("talker", 0, 2.0)  # the API server is still restarting
    ev = runtime.events.get_nowait()
    assert (ev.kind, ev.exit_code) == ("exited", 0)
    assert ev.log_incomplete and name in ev.log_incomplete and "broke" in ev.log_incomplete
    lines = (tmp_path / "logs" / "talker-0.log").read_text().splitlines()
    assert lines[0] == "before the break"
    assert lines[-1] == NOTE + ev.log_incomplete
    assert len(lines) == 2
    assert cluster.pods() == {}, "the pod was deleted all the same"


async def test_a_pod_without_a_log_stream_has_its_log_read_before_it_is_deleted(
    cluster: Cluster, kubecfg: Path, tmp_path: Path
) -> None:
    rt = _runtime(kubecfg, log_streams=0)  # more pods than streams: no stream for this one
    await rt.prepare()
    try:
        proceed = asyncio.Event()
        proceed.set()
        cluster.programs["quiet"] = _talker(proceed)
        await rt.launch(plan(tmp_path, "quiet"))
        assert (await next_event(rt)).kind == "running"
        await rt.terminate("quiet", 0, 2.0)
        ev = rt.events.get_nowait()
        assert (ev.exit_code, ev.log_incomplete) == (0, None)
        text = (tmp_path / "logs" / "quiet-0.log").read_text()
        assert text == "before the break\nduring the outage\ngot SIGTERM\n"
    finally:
        await rt.aclose(0.0)


# -- 3. an API outage while pods are created --------------------------------------------------


async def test_pod_creation_rides_out_an_api_outage(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.lose_creates(3)  # three connections drop before the API server sees them
    await runtime.launch(plan(tmp_path, "s"))
    ev = await next_event(runtime)
    assert ev.kind == "running", ev
    answers = [cluster.create_answers.get_nowait() for _ in range(4)]
    assert answers == [0, 0, 0, 200]
    assert list(cluster.pods(NS)) == [name_of("s")]


async def test_a_create_whose_reply_was_lost_counts_as_created(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.lose_creates(1, after=True)  # the pod exists, its reply is lost: the retry gets 409
    await runtime.launch(plan(tmp_path, "s"))
    answers = [await asyncio.wait_for(cluster.create_answers.get(), 30) for _ in range(2)]
    assert answers == [0, 409]
    ev = await next_event(runtime)
    assert ev.kind == "running", ev
    assert list(cluster.pods(NS)) == [name_of("s")]
    await runtime.terminate("s", 0, 1.0)
    assert runtime.events.get_nowait().exit_code == 143


async def test_creation_gives_up_after_its_budget_with_a_clear_reason(
    cluster: Cluster, kubecfg: Path, tmp_path: Path
) -> None:
    rt = _runtime(kubecfg, api_retry_budget=0.5)
    await rt.prepare()
    try:
        cluster.lose_creates(10_000)  # the API server does not come back
        await rt.launch(plan(tmp_path, "s"))
        ev = await next_event(rt)
        assert (ev.kind, ev.exit_code) == ("exited", ko.NEVER_RAN)
        assert ev.reason and f"creating pod {name_of('s')}" in ev.reason
        assert "cannot reach the Kubernetes API" in ev.reason and "gave up after" in ev.reason
        assert len(_requests(cluster, "POST")) > 1
        assert ev.reason in (tmp_path / "logs" / "s-0.log").read_text()
    finally:
        await rt.aclose(0.0)


async def test_a_run_rides_out_an_api_outage_while_its_pods_launch(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async def done(ctx: PodContext) -> int:
        ctx.print("done")
        return 0

    cluster.programs["job"] = done
    cluster.lose_creates(2)
    exp = parse(ONE.format(tag="job"), "alone.yaml", runtime="kubernetes")
    outcome = await up(exp, _options(tmp_path, kubecfg, nats_server))
    assert outcome.verdict == "succeeded", outcome.reason
    assert len([r for r in cluster if r.action == kmock.action.CREATE]) == 3


# -- 4. a restartPolicy an admission webhook changed -----------------------------------------


@pytest.mark.parametrize("policy", ["Always", "OnFailure"])
async def test_a_crash_looping_pod_reports_its_exit_code_and_is_deleted(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path, policy: str
) -> None:
    async def crash(ctx: PodContext) -> int:
        ctx.print("about to crash")
        return 3

    cluster.programs["crash"] = crash
    cluster.restart_policy["crash"] = policy
    await runtime.launch(plan(tmp_path, "crash"))
    assert (await next_event(runtime)).kind == "running"
    ev = await next_event(runtime)
    assert (ev.kind, ev.exit_code, ev.log_incomplete) == ("exited", 3, None)
    assert ev.reason and f"pod {name_of('crash')} exited with 3" in ev.reason
    assert "CrashLoopBackOff" in ev.reason and f"restartPolicy is {policy}" in ev.reason
    await asyncio.wait_for(cluster.stops[name_of("crash")].wait(), 30)  # deleted at once
    assert (tmp_path / "logs" / "crash-0.log").read_text() == "about to crash\n"


def _restarted(**container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "spec": {"restartPolicy": "Always", "containers": [{"image": "x:1"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "containerStatuses": [{"name": ko.CONTAINER, **container}],
        },
    }


@pytest.mark.parametrize(
    ("pod", "code"),
    [
        (
            _restarted(
                restartCount=4,
                state={"waiting": {"reason": "CrashLoopBackOff"}},
                lastState={"terminated": {"exitCode": 2, "reason": "Error"}},
            ),
            2,
        ),
        (  # restarted at once: running again, the first end in lastState
            _restarted(
                restartCount=1,
                state={"running": {"startedAt": "2026-01-01T00:00:01Z"}},
                lastState={"terminated": {"exitCode": 0, "reason": "Completed"}},
            ),
            0,
        ),
    ],
)
def test_a_restarted_container_reads_as_its_first_exit(pod: dict[str, Any], code: int) -> None:
    seen = ko.interpret(pod)
    assert (seen.kind, seen.exit_code, seen.restarted) == ("exited", code, True)
    assert seen.reason and "restartPolicy is Always" in seen.reason


# -- 5. pods the scheduler cannot place -------------------------------------------------------

WAITING = """
name: big
timeout: 120
experiment:
- tag: huge
  image: example/prog:latest
  command: [python, prog.py]
  resources: {requests: {cpu: "64"}}
- tag: small
  image: example/prog:latest
  command: [python, prog.py]
  workflow:
    start: {name: huge-ready, value: 1}
"""


async def test_the_schedule_timeout_is_an_option_and_the_verdict_shows_the_scheduler(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    message = "0/3 nodes are available: insufficient cpu"
    cluster.failures["huge"] = ("Unschedulable", message)
    exp = parse(WAITING, "big.yaml", runtime="kubernetes")
    outcome = await up(exp, _options(tmp_path, kubecfg, nats_server, schedule_timeout=0.0))
    assert outcome.verdict == "failed"
    assert outcome.reason and message in outcome.reason, outcome.reason
    assert "could not be scheduled within 0s" in outcome.reason
    (huge,) = [p for p in outcome.summary.pods if p.tag == "huge"]
    assert huge.exit_code == ko.NEVER_RAN and huge.reason and message in huge.reason
    assert cluster.pods() == {}


# -- the same class: deletes that are throttled or fail --------------------------------------


async def test_a_throttled_or_failing_delete_is_retried(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    await runtime.launch(plan(tmp_path, "s"))
    assert (await next_event(runtime)).kind == "running"
    cluster.delete_errors.extend([429, 500])
    await runtime.terminate("s", 0, 1.0)
    ev = runtime.events.get_nowait()
    assert (ev.exit_code, ev.reason) == (143, None)
    assert len(_requests(cluster, "DELETE")) == 3
    assert cluster.pods(NS) == {}


async def test_pods_are_deleted_at_the_end_through_a_throttled_api(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    for i in range(2):
        await runtime.launch(plan(tmp_path, "s", i))
    assert [(await next_event(runtime)).kind for _ in range(2)] == ["running", "running"]
    cluster.delete_errors.extend([503, 429])
    await runtime.aclose(1.0)
    ends = [runtime.events.get_nowait() for _ in range(2)]
    assert {e.exit_code for e in ends} == {143}
    assert cluster.pods(NS) == {}


# -- the same class: a watch answered 410 Gone, a pod stuck Terminating ----------------------


async def test_a_watch_answered_410_gone_relists(
    runtime: KubernetesRuntime, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.manual.add("m")
    await runtime.launch(plan(tmp_path, "m"))
    assert await cluster.watches.get() == 1
    name = await cluster.created.get()
    await cluster.set_running(NS, name)
    assert (await next_event(runtime)).kind == "running"
    lists = len([r for r in cluster.runtime_requests() if r.action == kmock.action.LIST])
    cluster.watch_gate.clear()
    cluster.expire_next_watch(http=True)
    cluster.drop_watches()
    await cluster.set_terminated(NS, name, 4)  # while nobody watches
    assert await cluster.watches.get() == 2
    cluster.watch_gate.set()
    ev = await next_event(runtime)
    assert (ev.kind, ev.exit_code) == ("exited", 4)
    after = [r for r in cluster.runtime_requests() if r.action == kmock.action.LIST]
    assert len(after) == lists + 1


async def test_a_pod_stuck_terminating_is_reported_as_such(
    cluster: Cluster, kubecfg: Path, tmp_path: Path
) -> None:
    rt = _runtime(kubecfg, settle_timeout=0.5)  # its node is down for good: a bound, no race
    await rt.prepare()
    try:
        cluster.node_down.add("lost")
        await rt.launch(plan(tmp_path, "lost"))
        assert (await next_event(rt)).kind == "running"
        await rt.terminate("lost", 0, 0.0)
        ev = rt.events.get_nowait()
        assert (ev.kind, ev.exit_code) == ("exited", ko.KILLED)
        assert ev.reason and name_of("lost") in ev.reason and "still Terminating" in ev.reason
        assert ev.log_incomplete
        assert name_of("lost") in cluster.pods(NS), "the pod is still there: it is reported"
    finally:
        await rt.aclose(0.0)
