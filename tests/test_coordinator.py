"""The coordinator with the in-memory fake runtime and a real nats-server: workflows, lifecycle
counts, verdicts, timeouts and interrupts, without processes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from tricks_nats import protocol as p
from tricks_nats.driver import Config, Driver
from tricks_nats.runtimes import PodPlan
from tricks_nats.runtimes.fake import Program, exit_on_term, ignore_term
from tricks_nats.spec import parse


def driven(body: Callable[[Driver, PodPlan, asyncio.Event], Any]) -> Program:
    """A fake pod program that talks to NATS through the real driver, configured from the
    environment the coordinator gave it."""

    async def program(plan: PodPlan, stop: asyncio.Event) -> int:
        async with Driver(Config.from_env(plan.env)) as d:
            code: int = await body(d, plan, stop)
            return code

    return program


WORKFLOW = """
experiment:
- tag: server
  command: x
  replicas: 3
  workflow: {stop: {name: client_stop, value: 2}}
- tag: client
  command: x
  replicas: 2
  workflow: {start: {name: ready, value: 3}}
"""


async def test_start_and_stop_workflow(make_run) -> None:
    async def server(d: Driver, plan: PodPlan, stop: asyncio.Event) -> int:
        await d.register_event("ready")
        await stop.wait()
        return 143

    async def client(d: Driver, plan: PodPlan, stop: asyncio.Event) -> int:
        peers = await d.discover("server", 3, timeout=10)
        return 0 if len(peers) == 3 else 1

    run = await make_run(WORKFLOW, {"server": driven(server), "client": driven(client)})
    outcome = await run.outcome()
    assert outcome.verdict == "succeeded", outcome.reason
    assert outcome.exit_code == 0
    assert outcome.summary.events == {
        "ready": 3,
        "server_start": 3,
        "client_start": 2,
        "client_stop": 2,
        "server_stop": 3,
    }
    for i in range(3):
        s = run.pod(outcome, "server", i)
        assert (s.state, s.stopped_by_workflow, s.exit_code) == ("stopped", True, 143)
    for i in range(2):
        c = run.pod(outcome, "client", i)
        assert (c.state, c.stopped_by_workflow, c.exit_code) == ("exited", False, 0)
    journal = run.journal()
    kinds = [
        (e["kind"], e.get("name") or e.get("tag"), e.get("count") or e.get("action"))
        for e in journal
    ]
    assert kinds.index(("workflow", "client", "start")) > kinds.index(("event", "ready", 3))
    assert kinds.index(("workflow", "server", "stop")) > kinds.index(("event", "client_stop", 2))
    assert journal[-1]["kind"] == "verdict" and journal[-1]["verdict"] == "succeeded"
    # Every client launch came after the start condition, never before.
    first_client = min(
        i for i, e in enumerate(journal) if e["kind"] == "pod" and e["tag"] == "client"
    )
    assert first_client > kinds.index(("workflow", "client", "start"))


async def test_pods_get_the_environment_contract(make_run) -> None:
    spec = """
experiment:
- tag: a
  command: x
  replicas: 2
  env: [{name: MODE, value: fast}]
"""

    async def ok(plan: PodPlan, stop: asyncio.Event) -> int:
        return 0

    run = await make_run(spec, {"a": ok})
    await run.outcome()
    env = run.runtime.launched[1].env
    assert env["TAG"] == "a" and env["REPLICAS"] == "2" and env["POD_ID"] == "1"
    assert env["EXP_ID"] == run.coordinator.exp_id and env["MODE"] == "fast"
    assert env["TRICKS_NATS_URL"].startswith("nats://127.0.0.1:")
    assert env["TRICKS_PORT"] == env["TRICKS_NATS_URL"].rsplit(":", 1)[1]
    assert env["TRICKS_PROTOCOL"] == p.VERSION
    assert env["TRICKS_TAGS"] == ",".join(t.tag for t in run.coordinator.exp.tags)


async def test_failed_pods_fail_the_run_and_still_count_as_stopped(make_run) -> None:
    spec = """
experiment:
- tag: crash
  command: x
  replicas: 2
- tag: watcher
  command: x
  workflow: {stop: {name: crash_stop, value: 2}}
"""

    async def crash(plan: PodPlan, stop: asyncio.Event) -> int:
        return 3

    run = await make_run(spec, {"crash": crash, "watcher": exit_on_term})
    outcome = await run.outcome()
    assert (outcome.verdict, outcome.exit_code) == ("failed", 1)
    assert [run.pod(outcome, "crash", i).exit_code for i in range(2)] == [3, 3]
    assert outcome.summary.events["crash_stop"] == 2
    w = run.pod(outcome, "watcher", 0)
    assert (w.state, w.stopped_by_workflow) == ("stopped", True)
    assert "crash-0 exited with 3" in (outcome.reason or "")


async def test_an_event_registered_just_before_exit_still_starts_the_next_tag(make_run) -> None:
    spec = """
experiment:
- tag: first
  command: x
- tag: second
  command: x
  workflow: {start: {name: done, value: 1}}
"""

    async def first(d: Driver, plan: PodPlan, stop: asyncio.Event) -> int:
        await d.register_event("done")
        return 0

    async def second(plan: PodPlan, stop: asyncio.Event) -> int:
        return 0

    run = await make_run(spec, {"first": driven(first), "second": second})
    outcome = await run.outcome()
    assert outcome.verdict == "succeeded", outcome.reason
    assert outcome.summary.events["second_stop"] == 1


async def test_a_start_condition_that_can_never_be_met_fails_instead_of_hanging(make_run) -> None:
    spec = """
experiment:
- tag: a
  command: x
  replicas: 2
- tag: b
  command: x
  workflow: {start: {name: never, value: 3}}
"""

    async def ok(plan: PodPlan, stop: asyncio.Event) -> int:
        return 0

    run = await make_run(spec, {"a": ok, "b": ok})
    outcome = await run.outcome()
    assert outcome.verdict == "failed"
    assert "tag 'b' never started: 'never' reached 0 of 3" in (outcome.reason or "")
    assert run.pod(outcome, "b", 0).started_at is None
    assert [pl.tag for pl in run.runtime.launched] == ["a", "a"]


async def test_timeout_stops_everything(make_run) -> None:
    spec = "experiment:\n- {tag: a, command: x, replicas: 2}\n"
    run = await make_run(spec, {"a": ignore_term}, timeout=0.3, grace=0.1)
    outcome = await run.outcome()
    assert (outcome.verdict, outcome.exit_code) == ("timed_out", 1)
    assert {run.pod(outcome, "a", i).exit_code for i in range(2)} == {137}
    assert {run.pod(outcome, "a", i).state for i in range(2)} == {"stopped"}
    assert outcome.summary.events["a_stop"] == 2


async def test_timeout_zero_lifts_the_specs_timeout(make_run) -> None:
    """`up --timeout 0` means no limit, as `timeout: 0` in a spec does (coreutils' timeout 0)."""

    async def works_a_while(plan: PodPlan, stop: asyncio.Event) -> int:
        await asyncio.sleep(0.2)  # the pod's work: far beyond the spec's 0.01 s
        return 0

    spec = "timeout: 0.01\nexperiment:\n- {tag: a, command: x}\n"
    run = await make_run(spec, {"a": works_a_while}, timeout=0)
    assert run.coordinator.timeout is None
    assert (await run.outcome()).verdict == "succeeded"
    assert parse("timeout: 0\nexperiment:\n- {tag: a, command: x}\n", "t.yaml").timeout is None


async def test_interrupt_stops_pods_and_reports_interrupted(make_run) -> None:
    running = asyncio.Event()
    started: set[int] = set()

    async def stubborn(plan: PodPlan, stop: asyncio.Event) -> int:
        started.add(plan.pod_id)
        if len(started) == 3:
            running.set()
        return await ignore_term(plan, stop)

    spec = "experiment:\n- {tag: a, command: x, replicas: 3}\n"
    run = await make_run(spec, {"a": stubborn}, grace=0.1)
    task = asyncio.create_task(run.outcome())
    await running.wait()
    run.coordinator.interrupt()
    outcome = await task
    assert (outcome.verdict, outcome.exit_code) == ("interrupted", 130)
    assert sorted(run.runtime.terminated) == ["a-0", "a-1", "a-2"]
    assert all(x.state == "stopped" for x in outcome.summary.pods)


async def test_a_pod_that_cannot_launch_fails_the_run(make_run) -> None:
    spec = "experiment:\n- {tag: a, command: x}\n- {tag: b, command: y}\n"

    async def ok(plan: PodPlan, stop: asyncio.Event) -> int:
        return 0

    run = await make_run(spec, {"a": ok, "b": ok}, refuse=["b"])
    outcome = await run.outcome()
    assert outcome.verdict == "failed"
    b = run.pod(outcome, "b", 0)
    assert (b.exit_code, b.state, b.started_at) == (127, "failed", None)
    assert outcome.summary.events["b_stop"] == 1 and "b_start" not in outcome.summary.events


async def test_stop_condition_met_before_a_tag_starts_means_it_never_starts(make_run) -> None:
    spec = """
experiment:
- tag: a
  command: x
- tag: late
  command: x
  workflow:
    start: {name: a_stop, value: 1}
    stop: {name: a_start, value: 1}
"""

    async def ok(plan: PodPlan, stop: asyncio.Event) -> int:
        return 0

    run = await make_run(spec, {"a": ok, "late": ok})
    outcome = await run.outcome()
    assert outcome.verdict == "succeeded", outcome.reason
    late = run.pod(outcome, "late", 0)
    assert (late.state, late.stopped_by_workflow, late.started_at) == ("stopped", True, None)


async def test_garbage_on_the_wire_is_ignored_and_the_run_goes_on(make_run) -> None:
    waiting = asyncio.Event()
    ready: set[int] = set()

    async def worker(d: Driver, plan: PodPlan, stop: asyncio.Event) -> int:
        await d.register_event("ready")
        ready.add(plan.pod_id)
        if len(ready) == 3:
            waiting.set()
        await d.wait_event("go", 1, timeout=30)
        peers = await d.discover("worker", 3, timeout=30)
        return 0 if [x.pod_id for x in peers] == [0, 1, 2] else 1

    run = await make_run(
        "experiment:\n- {tag: worker, command: x, replicas: 3}\n", {"worker": driven(worker)}
    )
    task = asyncio.create_task(run.outcome())
    await waiting.wait()
    nc, exp = run.coordinator.bus.nc, run.coordinator.exp_id
    counts, pods = f"$KV.{p.counts_bucket(exp)}", f"$KV.{p.pods_bucket(exp)}"
    junk: list[tuple[str, bytes, dict[str, str]]] = [
        (f"{counts}.ready", b"garbage", {}),  # not an increment
        (f"{counts}.ready", b"", {"Nats-Incr": "abc"}),  # not a number
        (f"{counts}.ready", b"x" * 100_000, {"Nats-Incr": "1"}),  # huge
        (f"{counts}.ready", b"{", {"Nats-Incr": "1"}),  # a counter with a body
        (f"{pods}.worker.7", b"{not json", {}),  # a bogus pod record
        (f"{pods}.worker.8", b'{"tag": 5}', {}),  # wrong types
        (p.journal_subject(exp, "pod"), b"\xff\xfe", {}),  # not even UTF-8
    ]
    rng = random.Random(7)  # and a few hundred random ones, the same every run
    for _ in range(300):
        subject = rng.choice(
            [f"{counts}.ready", f"{counts}.go", f"{pods}.worker.9", p.journal_subject(exp, "event")]
        )
        body = rng.randbytes(rng.choice([0, 1, 10, 5000]))
        headers = rng.choice(
            [
                {},
                {"Nats-Incr": rng.choice(["", "x", "1.5", "+"])},
                {"Nats-Msg-Id": "x"},
                {"Tricks-Pod": "\x00" * 3},
            ]
        )
        junk.append((subject, body, headers))
    for subject, body, headers in junk:
        await nc.publish(subject, body, headers=headers or None)
    await nc.flush()
    await run.coordinator.bus.increment("go")
    outcome = await task
    assert outcome.verdict == "succeeded", outcome.reason
    assert outcome.summary.events == {"ready": 3, "go": 1, "worker_start": 3, "worker_stop": 3}


async def test_first_failure_fails_the_run_and_stops_the_rest_after_the_grace(make_run) -> None:
    spec = """
experiment:
- tag: server
  command: x
  replicas: 3
- tag: client
  command: x
  workflow: {start: {name: server_start, value: 3}}
"""

    async def server(plan: PodPlan, stop: asyncio.Event) -> int:
        if plan.pod_id == 1:
            return 1
        return await ignore_term(plan, stop)  # would wait forever for its peer

    async def client(plan: PodPlan, stop: asyncio.Event) -> int:
        return await exit_on_term(plan, stop)

    run = await make_run(spec, {"server": server, "client": client}, grace=0.2)
    (run.records.logs / "server-1.log").write_text("listening\nboom: port in use\n")
    outcome = await run.outcome()
    assert (outcome.verdict, outcome.reason) == (
        "failed",
        "server-1 failed (exit 1); stopped the rest",
    )
    failed = run.pod(outcome, "server", 1)
    assert failed.state == "failed" and failed.last_log_lines == ["listening", "boom: port in use"]
    assert {run.pod(outcome, "server", i).state for i in (0, 2)} == {"stopped"}
    assert run.pod(outcome, "client", 0).state == "stopped"


async def test_on_failure_continue_keeps_going(make_run) -> None:
    spec = """
experiment:
- tag: flaky
  command: x
  on_failure: continue
- tag: steady
  command: x
  workflow: {start: {name: flaky_stop, value: 1}}
"""

    async def flaky(plan: PodPlan, stop: asyncio.Event) -> int:
        return 2

    async def steady(plan: PodPlan, stop: asyncio.Event) -> int:
        return 0

    run = await make_run(spec, {"flaky": flaky, "steady": steady}, grace=0.1)
    outcome = await run.outcome()
    assert outcome.verdict == "failed"  # a failure is still a failure ...
    assert run.pod(outcome, "steady", 0).exit_code == 0  # ... but the run went on
    assert outcome.reason == "flaky-0 exited with 2"
