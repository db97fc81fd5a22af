"""Faults declared in the spec, fired by the experiment's own events: the spec's checks, the
seeded choice of pods, and process faults (kill, pause, restart, restart policy) on the local
runtime with real processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tricks_nats import entries, report, spec, timeline
from tricks_nats.errors import SpecError
from tricks_nats.faults import Selector, seconds, signal_number
from tricks_nats.running import UpOptions, up

from .conftest import ROOT, exp_processes

BASE = """\
experiment:
- tag: s
  command: sleep 1
  replicas: 3
"""


def errors_of(faults: str, base: str = BASE) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec.parse(base + textwrap.dedent(faults), "f.yaml")
    return info.value.errors


@pytest.mark.parametrize(
    ("faults", "expected"),
    [
        (
            "faults:\n- when: {name: s_start, value: 4}\n  kill: {tag: s}\n",
            "f.yaml:6:32: faults[0].when.value: 's_start' can never reach 4: tag 's' has 3 "
            "replicas",
        ),
        (
            "faults:\n- when: {name: q_start, value: 1}\n  kill: {tag: s}\n",
            "f.yaml:6:16: faults[0].when.name: 'q_start' refers to tag 'q', which does not exist",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1, after: soon}\n  kill: {tag: s}\n",
            "f.yaml:6:42: faults[0].when.after: after: 'soon' is not a duration (e.g. 2s, "
            "100ms, 1.5m, 3)",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1, times: 2}\n  kill: {tag: s}\n",
            "f.yaml:6:42: faults[0].when.times: times: 2 needs `every` (how often)",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n",
            "f.yaml:6:3: faults[0]: a fault needs one of kill, pause, restart, delay, loss, "
            "partition",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n  kill: {tag: s}\n  pause: {tag: s}\n",
            "f.yaml:8:10: faults[0].pause: a fault does one thing: kill and pause given",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n  kill: {tag: s, ids: [0, 3]}\n",
            "f.yaml:7:27: faults[0].kill.ids[1]: tag 's' has no pod 3 (ids 0 to 2)",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n  kill: {tag: s, count: 4}\n",
            "f.yaml:7:25: faults[0].kill.count: tag 's' has 3 pods, not 4",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n  kill: {tag: s, count: 1, percent: 5}\n",
            "f.yaml:7:37: faults[0].kill.percent: choose pods one way: count and percent given",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n  kill: {tag: s, signal: SIGNOPE}\n",
            "f.yaml:7:26: faults[0].kill.signal: 'SIGNOPE' is not a signal (e.g. SIGKILL)",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n  pause: {tag: s, duration: 0}\n",
            "f.yaml:7:29: faults[0].pause.duration: duration must be more than 0 seconds",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n"
            "  delay: {from: {tag: s}, to: {tag: t}, delay: 10ms}\n",
            "f.yaml:7:37: faults[0].delay.to.tag: tag 't' does not exist",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n"
            "  partition: {from: {tag: s}, to: {tag: s}, direction: sideways}\n",
            "f.yaml:7:56: faults[0].partition.direction: expected one of both, one, got 'sideways'",
        ),
        (
            "faults:\n- when: {name: s_start, value: 1}\n  kill: {tag: s, sginal: 9}\n",
            "f.yaml:7:18: faults[0].kill.sginal: unknown key 'sginal' (did you mean 'signal'?); "
            "known keys: tag, ids, count, percent, signal",
        ),
        (
            "faults:\n- {name: a, when: {name: s_start, value: 1}, kill: {tag: s}}\n"
            "- {name: a, when: {name: s_start, value: 1}, kill: {tag: s}}\n",
            "f.yaml:7:10: faults[1].name: fault name 'a' is used twice",
        ),
    ],
)
def test_a_mistake_in_faults_is_one_located_line(faults: str, expected: str) -> None:
    assert errors_of(faults) == [expected]


def test_a_valid_fault_and_restart_policy_read_as_written() -> None:
    exp = spec.parse(
        BASE
        + "  restart: {on: preemption, max: 2}\n"
        + "seed: 7\n"
        + "faults:\n"
        + "- when: {name: s_start, value: 3, after: 1.5s, every: 100ms, times: 4}\n"
        + "  delay: {from: {tag: s, ids: [0]}, to: {tag: s, percent: 50}, delay: 20ms,"
        + " jitter: 5ms, direction: one, duration: 1m}\n",
        "f.yaml",
    )
    (fault,) = exp.faults
    assert (fault.kind, fault.name, fault.event, fault.value) == ("delay", "delay-0", "s_start", 3)
    assert (fault.after, fault.every, fault.times, fault.seed) == (1.5, 0.1, 4, 7)
    assert (fault.delay_ms, fault.jitter_ms, fault.duration) == (20.0, 5.0, 60.0)
    assert fault.direction == "one" and fault.to == Selector("s", percent=50)
    policy = exp.tag("s").restart
    assert policy is not None and (policy.on, policy.max) == ("preemption", 2)


def test_durations_and_signals() -> None:
    assert [seconds(v) for v in (3, 0.5, "2s", "100ms", "1.5m", "1h", ".5")] == [
        3.0,
        0.5,
        2.0,
        0.1,
        90.0,
        3600.0,
        0.5,
    ]
    assert [seconds(v) for v in ("2 days", -1, True, "s", None)] == [None] * 5
    assert [signal_number(v) for v in ("SIGTERM", "term", "9", 15, "SIGNOPE")] == [
        15,
        15,
        9,
        15,
        None,
    ]


def test_the_same_seed_chooses_the_same_pods() -> None:
    exp = spec.parse(
        BASE.replace("replicas: 3", "replicas: 50")
        + "faults:\n- when: {name: s_start, value: 1}\n  kill: {tag: s, percent: 10}\n",
        "f.yaml",
    )
    (fault,) = exp.faults
    running = list(range(50))
    first = [fault.pods.choose(running, fault.rng(n)) for n in (1, 2, 3)]
    assert [len(c) for c in first] == [5, 5, 5]
    assert first == [fault.pods.choose(running, fault.rng(n)) for n in (1, 2, 3)]
    assert len({tuple(c) for c in first}) > 1  # each firing draws its own


# -- real processes -----------------------------------------------------------------------


async def run(tmp_path: Path, text: str) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    path = tmp_path / "spec.yaml"
    await asyncio.to_thread(write, path, textwrap.dedent(text))
    outcome = await up(spec.load(path), UpOptions(runs_dir=tmp_path / "runs", grace=2))
    (root,) = (tmp_path / "runs").iterdir()
    summary = json.loads((root / "summary.json").read_text())
    raw = (root / "journal.jsonl").read_bytes()
    journal = [json.loads(line) for line in raw.splitlines()]
    # every line, faults included, is read and written back to the same bytes
    assert b"".join(entries.encode(e) + b"\n" for e in entries.read(root / "journal.jsonl")) == raw
    assert summary["verdict"] == outcome.verdict
    assert not exp_processes(summary["experiment"])
    return summary, journal, root


def write(path: Path, text: str) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


def pods_of(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{p['tag']}-{p['pod_id']}": p for p in summary["pods"]}


def faults_in(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in journal if e["kind"] == "fault"]


async def test_a_kill_after_an_event_stops_a_pod_by_fault_and_the_run_succeeds(
    tmp_path: Path,
) -> None:
    summary, journal, _ = await run(
        tmp_path,
        """\
        timeout: 60
        experiment:
        - tag: server
          replicas: 3
          command: tricks-nats wait server_stop 1 --timeout 50
        faults:
        - name: kill-one
          when: {name: server_start, value: 3}
          kill: {tag: server, ids: [1]}
        """,
    )
    assert summary["verdict"] == "succeeded"
    pods = pods_of(summary)
    assert pods["server-1"]["outcome"] == "stopped by fault"
    assert pods["server-1"]["exit_code"] == 137 and pods["server-1"]["faults"] == ["kill-one"]
    assert {pods[n]["outcome"] for n in ("server-0", "server-2")} == {"succeeded"}
    (fired,) = faults_in(journal)
    assert fired["fault"] == "kill-one" and fired["state"] == "injected"
    assert fired["pods"] == ["server-1"] and fired["condition"] == {
        "name": "server_start",
        "value": 3,
    }
    # the fault comes after the event that fires it, the killed pod's stop is counted
    assert journal.index(fired) > next(
        i for i, e in enumerate(journal) if e.get("name") == "server_start" and e["count"] == 3
    )
    assert summary["events"]["server_stop"] == 3 and summary["faults"] == {"kill-one": 1}
    assert summary["fault_seed"] == fired["seed"]


async def test_a_killed_pods_exit_code_counts_when_the_fault_says_so(tmp_path: Path) -> None:
    summary, _, _ = await run(
        tmp_path,
        """\
        timeout: 60
        experiment:
        - tag: server
          replicas: 2
          command: tricks-nats wait server_stop 1 --timeout 50
        faults:
        - when: {name: server_start, value: 2}
          kill: {tag: server, ids: [0], signal: SIGTERM}
          judge_exit: true
        """,
    )
    assert summary["verdict"] == "failed"
    assert pods_of(summary)["server-0"]["outcome"] == "failed"
    assert pods_of(summary)["server-0"]["exit_code"] == 143


async def test_a_repeated_kill_draws_its_pods_from_the_recorded_seed(tmp_path: Path) -> None:
    text = """\
        timeout: 60
        seed: 1234
        experiment:
        - tag: server
          replicas: 5
          command: tricks-nats wait server_stop 3 --timeout 50
        faults:
        - when: {name: server_start, value: 5, every: 50ms, times: 3}
          kill: {tag: server, count: 1}
        """
    summary, journal, _ = await run(tmp_path / "a", text)
    fired = faults_in(journal)
    assert [(f["firing"], f["state"], f["seed"]) for f in fired] == [
        (1, "injected", 1234),
        (2, "injected", 1234),
        (3, "injected", 1234),
    ]
    killed = [f["pods"][0] for f in fired]
    assert len(set(killed)) == 3
    outcomes = sorted(p["outcome"] for p in summary["pods"])
    assert outcomes == ["stopped by fault"] * 3 + ["succeeded"] * 2
    _, journal_again, _ = await run(tmp_path / "b", text)
    assert [f["pods"] for f in faults_in(journal_again)] == [f["pods"] for f in fired]


async def test_a_pause_freezes_a_ticking_pod_and_the_timeline_shows_the_faults(
    tmp_path: Path,
) -> None:
    summary, journal, root = await run(
        tmp_path,
        """\
        timeout: 60
        experiment:
        - tag: ticker
          command: [python, -c, "import time\\nfor i in range(20):
            print(f'tick {time.time()}', flush=True); time.sleep(0.05)"]
        - tag: w
          command: tricks-nats wait w_start 2 --timeout 50
        faults:
        - when: {name: ticker_start, value: 1, after: 0.2s}
          pause: {tag: ticker, duration: 1s}
        - when: {name: w_start, value: 1}
          restart: {tag: w}
        """,
    )
    assert summary["verdict"] == "succeeded"
    log = (root / "logs" / "ticker-0.log").read_text().splitlines()
    ticks = [float(line.split()[1]) for line in log]
    assert len(ticks) == 20
    # no tick can be printed while the pod is frozen: the log shows the whole second
    assert max(b - a for a, b in itertools.pairwise(ticks)) >= 1.0
    states = [(f["fault"], f["state"], f["pods"]) for f in faults_in(journal)]
    assert sorted(states) == [
        ("pause-0", "healed", ["ticker-0"]),
        ("pause-0", "injected", ["ticker-0"]),
        ("restart-1", "injected", ["w-0"]),
    ]
    # the timeline: a mark per fault, the paused bar shaded for the pause, a cut at the restart
    timed = report.load_run(root)
    marks = [m.label for m in timed.markers if m.kind == "fault"]
    assert sorted(marks) == ["fault: pause ticker-0", "fault: restart w-0"]
    (shade,) = timed.shades
    assert shade.pod == "ticker-0" and shade.stop - shade.start >= 1.0
    (bar,) = [b for b in timed.bars if b.pod == "w-0"]
    assert len(bar.restarts) == 1 and bar.start < bar.restarts[0] < bar.stop
    assert "at " in report.text_summary(timed) and "fault: restart w-0" in report.text_summary(
        timed
    )
    figure = root / "timeline.svg"
    await asyncio.to_thread(timeline.draw, timed, figure)
    drawn = figure.read_text()
    for text in ("fault: pause ticker-0", "under a fault", "started again", "fault injected"):
        assert text in drawn, text


async def test_a_restart_starts_the_same_pod_again_and_counts_it_again(tmp_path: Path) -> None:
    summary, journal, root = await run(
        tmp_path,
        """\
        timeout: 60
        experiment:
        - tag: s
          replicas: 2
          command: >-
            echo "up $POD_ID $POD_IP"; tricks-nats event ready;
            tricks-nats wait s_start 3 --timeout 50
        faults:
        - when: {name: ready, value: 2}  # both said so (a pod counts as started before)
          restart: {tag: s, ids: [0]}
        """,
    )
    assert summary["verdict"] == "succeeded"
    lines = (root / "logs" / "s-0.log").read_text().splitlines()
    ups = [line for line in lines if line.startswith("up ")]
    assert len(ups) == 2 and ups[0] == ups[1] and ups[0].startswith("up 0 127.")
    assert pods_of(summary)["s-0"]["restarts"] == 1
    assert pods_of(summary)["s-0"]["outcome"] == "succeeded"
    assert summary["events"] == {"ready": 3, "s_start": 3, "s_stop": 3}
    s0 = [e["state"] for e in journal if e["kind"] == "pod" and e["pod_id"] == 0]
    assert s0 == ["pending", "running", "stopped", "pending", "running", "exited"]


async def test_a_restart_policy_starts_a_failed_pod_again_up_to_its_max(tmp_path: Path) -> None:
    summary, journal, _ = await run(
        tmp_path / "a",
        """\
        timeout: 60
        experiment:
        - tag: flaky
          command: if [ -e tried ]; then exit 0; fi; touch tried; exit 3
          restart: {on: failure, max: 2}
        """,
    )
    assert summary["verdict"] == "succeeded"
    (pod,) = summary["pods"]
    assert (pod["restarts"], pod["outcome"]) == (1, "succeeded")
    assert summary["events"] == {"flaky_start": 2, "flaky_stop": 2}
    restarted = [e for e in journal if e.get("outcome") == "restarted"]
    assert "restarted by its tag's policy (on failure, 1 of 2)" in restarted[0]["reason"]
    summary, _, _ = await run(
        tmp_path / "b",
        """\
        timeout: 60
        experiment:
        - tag: broken
          command: exit 3
          restart: {on: failure, max: 2}
        """,
    )
    assert summary["verdict"] == "failed"
    (pod,) = summary["pods"]
    assert (pod["restarts"], pod["outcome"], pod["exit_code"]) == (2, "failed", 3)


# -- the coordinator with the fake runtime: what a firing does when it cannot act ----------


async def test_a_firing_with_no_running_pod_is_skipped_and_one_that_fails_says_why(
    make_run: Any,
) -> None:
    async def waits(plan: Any, stop: asyncio.Event) -> int:
        await stop.wait()
        return 0

    async def quits(plan: Any, stop: asyncio.Event) -> int:
        return 0

    text = """
timeout: 30
experiment:
- tag: a
  command: x
  workflow: {stop: {name: b_stop, value: 1}}
- tag: b
  command: x
faults:
- when: {name: b_stop, value: 1}
  pause: {tag: b, duration: 1s}
- when: {name: a_start, value: 1}
  partition: {from: {tag: a}, to: {tag: a}}
"""
    run = await make_run(text, {"a": waits, "b": quits})
    run.runtime.fault_problems = lambda faults: []  # the fake shapes no network: no refusal
    outcome = await run.outcome()
    assert outcome.verdict == "succeeded", outcome.reason
    fired = {e["fault"]: e for e in run.journal() if e["kind"] == "fault"}
    assert fired["pause-0"]["state"] == "skipped"
    assert fired["pause-0"]["reason"] == "no running pod to choose"
    # the fake runtime injects what it is given; a network fault is healed at the end
    assert fired["partition-1"]["peers"] == ["a-0"]
    assert [a.kind for a in run.runtime.healed] == ["partition"]


def test_watch_prints_a_fault_in_one_line() -> None:
    from tricks_nats.render import describe

    entry = entries.FaultEntry(
        fault="cut",
        action="partition",
        firing=2,
        state="injected",
        pods=["client-0"],
        peers=["server-0", "server-1"],
        condition=entries.Condition(name="server_start", value=2),
        duration=1.5,
        ts=0.0,
    )
    line = describe(entry)
    assert line.endswith(
        "fault cut #2 partition injected: client-0 <-> server-0, server-1 for 1.5s (server_start 2)"
    )


async def test_the_ring_faults_example_rides_out_a_restart_and_a_pause(tmp_path: Path) -> None:
    example = ROOT / "examples" / "ring-faults" / "ring-faults.yaml"
    outcome = await up(spec.load(example), UpOptions(runs_dir=tmp_path / "runs", grace=2))
    assert outcome.verdict == "succeeded", outcome.reason
    summary = outcome.summary
    by_name = {f"{p.tag}-{p.pod_id}": p for p in summary.pods}
    assert by_name["server-1"].restarts == 1 and by_name["server-1"].faults == ["crash-server-1"]
    assert by_name["server-2"].faults == ["stall-server-2"]
    assert summary.faults == {"crash-server-1": 1, "stall-server-2": 1}
    assert summary.fault_seed == 7
    # every request made it round the ring in the end, the faults notwithstanding
    (requests,) = [m for m in summary.metrics if m.name == "request_ms"]
    assert requests.count == 4 * 300
    assert summary.events["server_start"] == 5 and summary.events["server_stop"] == 5
