"""The workflow rules from tables, with no server, no process and no clock.

Each case is a spec, the facts fed in order (one per line, in a short notation), the actions
each fact must produce, and the verdict once the pods are down. The notation:

facts    begin | count EVENT VALUE | run TAG-ID | exit TAG-ID CODE | preempted TAG-ID CODE
         | due FAULT FIRING | grace | timeout SECONDS | interrupt | interrupt! (the second,
         | forced) | abort REASON | stop-failed REASON | settled
actions  launch TAG-ID | terminate TAG-ID | fail-fast | roster+ TAG-ID | roster- TAG-ID
         | roster-unlisted TAG-ID | tail TAG-ID | finish VERDICT | finish! VERDICT (no grace)
         | kill-now | pod TAG-ID STATE | event NAME=VALUE | start TAG (NAME>=VALUE)
         | stop TAG (NAME>=VALUE) | arm FAULT FIRING DELAY | inject KIND#FIRING POD,POD...
         | fault NAME#FIRING STATE
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tricks_nats import entries as J
from tricks_nats import workflow as W
from tricks_nats.spec import parse

TWO_TIERS = """
experiment:
- tag: server
  command: x
  replicas: 2
  workflow: {stop: {name: client_stop, value: 1}}
- tag: client
  command: x
  workflow: {start: {name: ready, value: 2}}
"""

CONTINUE = """
experiment:
- tag: flaky
  command: x
  replicas: 2
  on_failure: continue
"""

ONE = """
experiment:
- tag: solo
  command: x
"""

STOP_BEFORE_START = """
experiment:
- tag: a
  command: x
- tag: b
  command: x
  workflow: {start: {name: go, value: 1}, stop: {name: halt, value: 1}}
"""


def fact(text: str) -> W.Fact:
    word, *args = text.split()
    match word:
        case "begin":
            return W.Begin()
        case "count":
            return W.CountChanged(args[0], int(args[1]), None)
        case "run":
            tag, pod_id = args[0].rsplit("-", 1)
            return W.PodRunning(tag, int(pod_id), at=1.0, ip="10.0.0.1")
        case "exit":
            tag, pod_id = args[0].rsplit("-", 1)
            return W.PodExited(tag, int(pod_id), at=2.0, exit_code=int(args[1]))
        case "preempted":
            tag, pod_id = args[0].rsplit("-", 1)
            return W.PodExited(tag, int(pod_id), at=2.0, exit_code=int(args[1]), preempted=True)
        case "due":
            return W.FaultDue(int(args[0]), int(args[1]))
        case "grace":
            return W.GraceOver()
        case "timeout":
            return W.TimedOut(float(args[0]))
        case "interrupt":
            return W.Interrupted()
        case "interrupt!":
            return W.Interrupted(force=True)
        case "abort":
            return W.Aborted(" ".join(args))
        case "stop-failed":
            return W.StopFailed(" ".join(args))
        case "settled":
            return W.Settled()
    raise ValueError(text)


def show(action: W.Action) -> str:
    match action:
        case W.Launch(tag, pod_id):
            return f"launch {tag}-{pod_id}"
        case W.Terminate(tag, pod_id):
            return f"terminate {tag}-{pod_id}"
        case W.ArmFailFast():
            return "fail-fast"
        case W.AddToRoster(tag, pod_id):
            return f"roster+ {tag}-{pod_id}"
        case W.RemoveFromRoster(tag, pod_id, listed):
            return f"roster{'-' if listed else '-unlisted'} {tag}-{pod_id}"
        case W.KeepLogTail(tag, pod_id):
            return f"tail {tag}-{pod_id}"
        case W.Finish(verdict, _, grace):
            return f"finish{'' if grace else '!'} {verdict}"
        case W.KillNow():
            return "kill-now"
        case W.Journal(J.PodEntry() as e):
            return f"pod {e.tag}-{e.pod_id} {e.state}"
        case W.Journal(J.EventEntry() as e):
            return f"event {e.name}={e.count}"
        case W.Journal(J.WorkflowEntry() as e):
            return f"{e.action} {e.tag} ({e.condition.name}>={e.condition.value})"
        case W.Journal(J.FaultEntry() as e):
            return f"fault {e.fault}#{e.firing} {e.state}"
        case W.ArmFault(index, firing, delay):
            return f"arm {index} {firing} {delay:g}"
        case W.Inject(fault_action, _, firing):
            pods = ",".join(f"{t}-{i}" for t, i in fault_action.pods + fault_action.peers)
            return f"inject {fault_action.kind}#{firing} {pods}"
    raise AssertionError(action)


@dataclass
class Case:
    name: str
    spec: str
    steps: list[tuple[str, list[str]]]
    verdict: str
    reason: str | None = None  # a part of the reason


CASES = [
    Case(
        "start waits for its condition, stop terminates what runs",
        TWO_TIERS,
        [
            (
                "begin",
                [
                    "pod server-0 pending",
                    "launch server-0",
                    "pod server-1 pending",
                    "launch server-1",
                ],
            ),
            ("run server-0", ["pod server-0 running", "roster+ server-0"]),
            ("run server-1", ["pod server-1 running", "roster+ server-1"]),
            ("count ready 1", ["event ready=1"]),
            (
                "count ready 2",
                [
                    "event ready=2",
                    "start client (ready>=2)",
                    "pod client-0 pending",
                    "launch client-0",
                ],
            ),
            ("run client-0", ["pod client-0 running", "roster+ client-0"]),
            (
                "count client_stop 1",
                [
                    "event client_stop=1",
                    "stop server (client_stop>=1)",
                    "terminate server-0",
                    "terminate server-1",
                ],
            ),
            ("exit client-0 0", ["pod client-0 exited", "roster- client-0"]),
            ("exit server-0 143", ["pod server-0 stopped", "roster- server-0"]),
            ("exit server-1 143", ["pod server-1 stopped", "roster- server-1"]),
            ("settled", ["finish succeeded"]),
        ],
        "succeeded",
    ),
    Case(
        "a count that jumps past the threshold starts the tag once",
        TWO_TIERS,
        [
            (
                "begin",
                [
                    "pod server-0 pending",
                    "launch server-0",
                    "pod server-1 pending",
                    "launch server-1",
                ],
            ),
            (
                "count ready 5",
                [
                    "event ready=5",
                    "start client (ready>=2)",
                    "pod client-0 pending",
                    "launch client-0",
                ],
            ),
            ("count ready 6", ["event ready=6"]),
        ],
        "error",
        "before a verdict",
    ),
    Case(
        "a start condition that can never be met fails and names the likely cause",
        TWO_TIERS,
        [
            (
                "begin",
                [
                    "pod server-0 pending",
                    "launch server-0",
                    "pod server-1 pending",
                    "launch server-1",
                ],
            ),
            ("run server-0", ["pod server-0 running", "roster+ server-0"]),
            ("count ready 1", ["event ready=1"]),
            ("exit server-0 0", ["pod server-0 exited", "roster- server-0"]),
            (
                "exit server-1 3",
                ["pod server-1 failed", "tail server-1", "fail-fast", "roster-unlisted server-1"],
            ),
            ("settled", ["finish failed"]),
        ],
        "failed",
        "server-1 failed (exit 3); tag 'client' never started: 'ready' reached 1 of 2",
    ),
    Case(
        "on_failure stop: the first failure arms the grace period, then the rest stop",
        ONE,
        [
            ("begin", ["pod solo-0 pending", "launch solo-0"]),
            ("run solo-0", ["pod solo-0 running", "roster+ solo-0"]),
            ("exit solo-0 1", ["pod solo-0 failed", "tail solo-0", "fail-fast", "roster- solo-0"]),
            ("grace", ["finish failed"]),
            ("grace", []),
        ],
        "failed",
        "solo-0 failed (exit 1); stopped the rest",
    ),
    Case(
        "on_failure continue: no fail-fast, but the verdict counts the failure",
        CONTINUE,
        [
            (
                "begin",
                ["pod flaky-0 pending", "launch flaky-0", "pod flaky-1 pending", "launch flaky-1"],
            ),
            ("run flaky-0", ["pod flaky-0 running", "roster+ flaky-0"]),
            ("exit flaky-0 2", ["pod flaky-0 failed", "tail flaky-0", "roster- flaky-0"]),
            ("exit flaky-1 0", ["pod flaky-1 exited", "roster-unlisted flaky-1"]),
            ("settled", ["finish succeeded"]),
        ],
        "failed",
        "flaky-0 exited with 2",
    ),
    Case(
        "a stop condition met before the tag started: it never starts, and that is fine",
        STOP_BEFORE_START,
        [
            ("begin", ["pod a-0 pending", "launch a-0"]),
            ("count halt 1", ["event halt=1", "stop b (halt>=1)"]),
            ("count go 1", ["event go=1"]),
            ("exit a-0 0", ["pod a-0 exited", "roster-unlisted a-0"]),
            ("settled", ["finish succeeded"]),
        ],
        "succeeded",
    ),
    Case(
        "timeout: the run finishes, pods that exit then are stopped, counts start nothing",
        TWO_TIERS,
        [
            (
                "begin",
                [
                    "pod server-0 pending",
                    "launch server-0",
                    "pod server-1 pending",
                    "launch server-1",
                ],
            ),
            ("run server-0", ["pod server-0 running", "roster+ server-0"]),
            ("timeout 7.5", ["finish timed_out"]),
            ("count ready 2", ["event ready=2"]),
            ("run server-1", []),
            ("exit server-0 0", ["pod server-0 stopped", "roster- server-0"]),
            ("exit server-1 143", ["pod server-1 stopped", "roster- server-1"]),
            ("interrupt", []),
        ],
        "timed_out",
        "the experiment ran out of time (7.5s)",
    ),
    Case(
        "interrupt: grace for the pods, a second one kills now",
        ONE,
        [
            ("begin", ["pod solo-0 pending", "launch solo-0"]),
            ("interrupt", ["finish interrupted"]),
            ("interrupt!", ["kill-now"]),
            ("exit solo-0 137", ["pod solo-0 stopped", "roster-unlisted solo-0"]),
        ],
        "interrupted",
        "interrupted by a signal",
    ),
    Case(
        "a forced interrupt first: no grace at all",
        ONE,
        [
            ("begin", ["pod solo-0 pending", "launch solo-0"]),
            ("interrupt!", ["finish! interrupted"]),
        ],
        "interrupted",
    ),
    Case(
        "NATS gone: error, and the first decision stands",
        ONE,
        [
            ("begin", ["pod solo-0 pending", "launch solo-0"]),
            ("abort NATS went away", ["finish error"]),
            ("grace", []),
            ("settled", []),
        ],
        "error",
        "NATS went away",
    ),
    Case(
        "pods that cannot be stopped turn a success into an error",
        ONE,
        [
            ("begin", ["pod solo-0 pending", "launch solo-0"]),
            ("exit solo-0 0", ["pod solo-0 exited", "roster-unlisted solo-0"]),
            ("settled", ["finish succeeded"]),
            ("stop-failed the API is down", []),
        ],
        "error",
        "stopping the pods failed: the API is down",
    ),
    Case(
        "a failure verdict is kept when stopping fails too",
        ONE,
        [
            ("begin", ["pod solo-0 pending", "launch solo-0"]),
            ("timeout 1", ["finish timed_out"]),
            ("stop-failed the API is down", []),
        ],
        "timed_out",
    ),
    Case(
        "a pod whose launch was cut short never started",
        ONE,
        [("begin", ["pod solo-0 pending", "launch solo-0"]), ("interrupt", ["finish interrupted"])],
        "interrupted",
    ),
    Case(
        "events for pods that are not alive are ignored",
        ONE,
        [
            ("exit solo-0 1", []),
            ("run solo-0", []),
            ("begin", ["pod solo-0 pending", "launch solo-0"]),
            ("exit solo-0 0", ["pod solo-0 exited", "roster-unlisted solo-0"]),
            ("exit solo-0 1", []),
            ("run solo-0", []),
            ("settled", ["finish succeeded"]),
        ],
        "succeeded",
    ),
    Case(
        "a kill fault fires once its event counts, after its delay; its pod is stopped by fault",
        """
experiment:
- tag: s
  command: x
  replicas: 2
faults:
- {name: k, when: {name: s_start, value: 2, after: 1.5s}, kill: {tag: s, ids: [1]}}
""",
        [
            ("begin", ["pod s-0 pending", "launch s-0", "pod s-1 pending", "launch s-1"]),
            ("run s-0", ["pod s-0 running", "roster+ s-0"]),
            ("run s-1", ["pod s-1 running", "roster+ s-1"]),
            ("count s_start 1", ["event s_start=1"]),
            ("count s_start 2", ["event s_start=2", "arm 0 1 1.5"]),
            ("count s_start 3", ["event s_start=3"]),  # armed once
            ("due 0 1", ["inject kill#1 s-1"]),
            ("exit s-1 137", ["pod s-1 stopped", "roster- s-1"]),
            ("exit s-0 0", ["pod s-0 exited", "roster- s-0"]),
            ("settled", ["finish succeeded"]),
        ],
        "succeeded",
    ),
    Case(
        "a repeated fault arms its next firing; one with no running pod is skipped",
        """
experiment:
- tag: s
  command: x
faults:
- {when: {name: s_start, value: 1, every: 2s, times: 2}, pause: {tag: s, duration: 1s}}
""",
        [
            ("begin", ["pod s-0 pending", "launch s-0"]),
            ("run s-0", ["pod s-0 running", "roster+ s-0"]),
            ("count s_start 1", ["event s_start=1", "arm 0 1 0"]),
            ("due 0 1", ["arm 0 2 2", "inject pause#1 s-0"]),
            ("exit s-0 0", ["pod s-0 exited", "roster- s-0"]),
            ("due 0 2", ["fault pause-0#2 skipped"]),
            ("settled", ["finish succeeded"]),
        ],
        "succeeded",
    ),
    Case(
        "a restart kills its pod and launches it again, counted again",
        """
experiment:
- tag: s
  command: x
faults:
- {when: {name: s_start, value: 1}, restart: {tag: s}}
""",
        [
            ("begin", ["pod s-0 pending", "launch s-0"]),
            ("run s-0", ["pod s-0 running", "roster+ s-0"]),
            ("due 0 1", ["inject restart#1 s-0"]),
            ("exit s-0 137", ["pod s-0 stopped", "roster- s-0", "pod s-0 pending", "launch s-0"]),
            ("run s-0", ["pod s-0 running", "roster+ s-0"]),
            ("exit s-0 0", ["pod s-0 exited", "roster- s-0"]),
            ("settled", ["finish succeeded"]),
        ],
        "succeeded",
    ),
    Case(
        "a killed pod's exit counts when its fault says judge_exit",
        """
experiment:
- tag: s
  command: x
faults:
- {when: {name: s_start, value: 1}, kill: {tag: s, signal: TERM}, judge_exit: true}
""",
        [
            ("begin", ["pod s-0 pending", "launch s-0"]),
            ("run s-0", ["pod s-0 running", "roster+ s-0"]),
            ("due 0 1", ["inject kill#1 s-0"]),
            ("exit s-0 143", ["pod s-0 failed", "tail s-0", "fail-fast", "roster- s-0"]),
            ("grace", ["finish failed"]),
        ],
        "failed",
        "s-0 failed (exit 143)",
    ),
    Case(
        "a restart policy on preemption restarts a preempted pod, not a failed one",
        """
experiment:
- tag: s
  command: x
  replicas: 2
  on_failure: continue
  restart: {on: preemption, max: 1}
""",
        [
            ("begin", ["pod s-0 pending", "launch s-0", "pod s-1 pending", "launch s-1"]),
            ("run s-0", ["pod s-0 running", "roster+ s-0"]),
            ("run s-1", ["pod s-1 running", "roster+ s-1"]),
            (
                "preempted s-0 137",
                ["pod s-0 stopped", "roster- s-0", "pod s-0 pending", "launch s-0"],
            ),
            ("run s-0", ["pod s-0 running", "roster+ s-0"]),
            ("preempted s-0 137", ["pod s-0 failed", "tail s-0", "roster- s-0"]),  # max 1
            ("exit s-1 2", ["pod s-1 failed", "tail s-1", "roster- s-1"]),
            ("settled", ["finish succeeded"]),
        ],
        "failed",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_workflow_rules(case: Case) -> None:
    wf = W.Workflow(parse(case.spec, "<test>"))
    for step, expected in case.steps:
        got = [show(a) for a in wf.handle(fact(step))]
        assert got == expected, step
    verdict, reason = wf.verdict()
    assert verdict == case.verdict
    if case.reason is not None:
        assert reason is not None and case.reason in reason


def test_a_pod_cut_short_or_never_launched_is_recorded_as_never_started() -> None:
    wf = W.Workflow(parse(TWO_TIERS, "<test>"))
    wf.handle(W.Begin())
    wf.handle(W.Interrupted())
    wf.verdict()
    assert [(s.state, s.reason) for s in wf.pods.values()] == [
        ("pending", "never started"),
        ("pending", "never started"),
        ("pending", "never started"),
    ]


def test_pod_records_keep_what_the_runtime_said() -> None:
    wf = W.Workflow(parse(ONE, "<test>"))
    wf.handle(W.Begin())
    wf.handle(W.PodRunning("solo", 0, at=10.0, ip="10.1.2.3"))
    wf.handle(
        W.PodExited(
            "solo",
            0,
            at=12.5,
            exit_code=1,
            reason="OOMKilled",
            log_bytes_lost=7,
            log_incomplete="the log stream broke",
        )
    )
    pod = wf.pods[("solo", 0)]
    assert (pod.state, pod.started_at, pod.stopped_at, pod.ip) == ("failed", 10.0, 12.5, "10.1.2.3")
    assert (pod.exit_code, pod.reason, pod.log_bytes_lost) == (1, "OOMKilled", 7)
    assert pod.log_incomplete == "the log stream broke"
    assert wf.first_failure == "solo-0 failed (exit 1): OOMKilled"


def test_conditions_are_the_counts_the_workflow_waits_on() -> None:
    assert W.Workflow(parse(TWO_TIERS, "<test>")).conditions() == ["client_stop", "ready"]
    assert W.Workflow(parse(ONE, "<test>")).conditions() == []


def test_many_failures_are_summarised_in_the_verdict() -> None:
    spec = CONTINUE.replace("replicas: 2", "replicas: 7")
    wf = W.Workflow(parse(spec, "<test>"))
    wf.handle(W.Begin())
    for i in range(7):
        wf.handle(W.PodExited("flaky", i, at=1.0, exit_code=i + 1))
    wf.handle(W.Settled())
    verdict, reason = wf.verdict()
    assert verdict == "failed"
    assert reason is not None and reason.endswith("flaky-4 exited with 5 ...")
    assert "flaky-5" not in reason


def test_alive_follows_launches_and_exits() -> None:
    wf = W.Workflow(parse(TWO_TIERS, "<test>"))
    assert not wf.alive()
    wf.handle(W.Begin())
    assert wf.alive()
    wf.handle(W.PodRunning("server", 0, at=1.0))
    wf.handle(W.PodExited("server", 0, at=2.0, exit_code=0))
    wf.handle(W.PodExited("server", 0, at=2.0, exit_code=0))  # a repeat changes nothing
    assert wf.alive()
    wf.handle(W.PodExited("server", 1, at=2.0, exit_code=0))
    assert not wf.alive()
    wf.handle(W.CountChanged("ready", 2))
    assert wf.alive()  # the client launches


def test_a_run_that_may_never_end_is_said_before_it_starts() -> None:
    """No timeout, and a tag that stops only on a user's event: `up` notes it may run forever.
    A lifecycle count (checked by validate) or any timeout needs no note."""
    spec = """\
experiment:
- tag: server
  command: x
  workflow:
    stop: {name: done, value: 3}
- tag: client
  command: x
  workflow:
    stop: {name: server_stop, value: 1}
"""
    (note,) = W.open_ended(parse(spec, "t.yaml"), None)
    assert note.startswith("no timeout: tag 'server' stops only when 'done' reaches 3;")
    assert W.open_ended(parse(spec, "t.yaml"), 60) == []
    assert W.open_ended(parse("timeout: 5\n" + spec, "t.yaml"), None) == []
    assert W.open_ended(parse("timeout: 5\n" + spec, "t.yaml"), 0) != []  # --timeout 0 lifts it
