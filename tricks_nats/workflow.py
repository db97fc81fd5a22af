"""The experiment's rules, pure: facts in, actions out.

No asyncio, no NATS, no files, no clock. The coordinator turns everything that happens into a
fact (a count moved, a pod runs or exited, the grace period is over, the time is up, Ctrl-C,
NATS gone, nothing left to happen) and feeds it to `Workflow.handle`, which updates the state
of every tag and pod and returns what to do, in order: launch or terminate pods, arm the
fail-fast timer, write the journal, update a roster, finish. `verdict()` answers how the run
ended once the pods are down. Every rule is tested from tables in tests/test_workflow.py.

After `Finish`, the run is tearing down: facts still update the pods' records (how each one
ended) but start nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tricks_nats import entries as J
from tricks_nats import outcomes
from tricks_nats.faults import Fault, FaultAction
from tricks_nats.protocol import pod_name
from tricks_nats.records import PodSummary
from tricks_nats.spec import Condition, Experiment, Tag

Verdict = Literal["succeeded", "failed", "timed_out", "interrupted", "error"]


def open_ended(exp: Experiment, timeout: float | None) -> list[str]:
    """Why a run without a time limit may never end: a tag that stops only on an event of the
    user's (its pods may never register it; a lifecycle count is checked by `validate`)."""
    if timeout if timeout is not None else exp.timeout:
        return []
    return [
        f"no timeout: tag {t.tag!r} stops only when {t.stop.name!r} reaches {t.stop.value}; "
        "if it never does, the run goes on until Ctrl-C (set `timeout:` in the spec, or "
        "--timeout SECONDS)"
        for t in exp.tags
        if t.stop is not None and t.stop.name not in exp.lifecycle
    ]


def exit_code(verdict: str) -> int:
    """What `up` exits with for a verdict (and `watch --exit-status`)."""
    return {"succeeded": 0, "interrupted": 130}.get(verdict, 1)


# -- facts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """The run starts: tags without a start condition launch."""


@dataclass(frozen=True)
class CountChanged:
    event: str
    value: int
    pod: str | None = None


@dataclass(frozen=True)
class PodRunning:
    tag: str
    pod_id: int
    at: float
    ip: str | None = None


@dataclass(frozen=True)
class PodExited:
    tag: str
    pod_id: int
    at: float
    exit_code: int | None
    reason: str | None = None
    log_bytes_lost: int = 0
    log_incomplete: str | None = None
    #: Killed or evicted by something other than tricks-nats (a restart policy's `preemption`).
    preempted: bool = False


@dataclass(frozen=True)
class FaultDue:
    """The time of a fault's firing (1, 2, ...) has come."""

    index: int
    firing: int


@dataclass(frozen=True)
class GraceOver:
    """The grace period after a fail-fast failure has passed."""


@dataclass(frozen=True)
class TimedOut:
    seconds: float


@dataclass(frozen=True)
class Interrupted:
    """Ctrl-C (or SIGTERM); `force` for the second one: no grace period."""

    force: bool = False


@dataclass(frozen=True)
class Aborted:
    """The run cannot go on (NATS gone for good, an error of the coordinator's own)."""

    reason: str


@dataclass(frozen=True)
class StopFailed:
    """The pods could not all be stopped: a run that had succeeded ends in `error`."""

    reason: str


@dataclass(frozen=True)
class Settled:
    """No pod is alive, no fact is queued and the counts were read again: nothing can happen."""


Fact = (
    Begin
    | CountChanged
    | PodRunning
    | PodExited
    | FaultDue
    | GraceOver
    | TimedOut
    | Interrupted
    | Aborted
    | StopFailed
    | Settled
)

# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    tag: str
    pod_id: int


@dataclass(frozen=True)
class Terminate:
    """Stop one pod (signal, grace period, kill)."""

    tag: str
    pod_id: int


@dataclass(frozen=True)
class ArmFailFast:
    """Feed `GraceOver` after the grace period (the others may finish on their own first)."""

    reason: str


@dataclass(frozen=True)
class Journal:
    entry: J.Entry


@dataclass(frozen=True)
class AddToRoster:
    tag: str
    pod_id: int
    ip: str
    incarnation: int = 0


@dataclass(frozen=True)
class RemoveFromRoster:
    tag: str
    pod_id: int
    #: Whether the pod was added (it ran); its stop is counted either way.
    listed: bool
    #: 0, then 1 after the pod's first restart...: each incarnation's stop counts.
    incarnation: int = 0


@dataclass(frozen=True)
class KeepLogTail:
    """A failed pod: keep the end of its log in the summary."""

    tag: str
    pod_id: int


@dataclass(frozen=True)
class Finish:
    """Stop the run: pods get the grace period unless `grace` is False."""

    verdict: Verdict
    reason: str | None
    grace: bool = True


@dataclass(frozen=True)
class ArmFault:
    """Feed `FaultDue(index, firing)` after `delay` seconds."""

    index: int
    firing: int
    delay: float


@dataclass(frozen=True)
class Inject:
    """Carry out one firing of a fault (a `restart`: kill its pods; the rules relaunch them)."""

    action: FaultAction
    fault: Fault
    firing: int


@dataclass(frozen=True)
class KillNow:
    """While stopping: do not wait for the grace period any more (a second Ctrl-C)."""


Action = (
    Launch
    | Terminate
    | ArmFailFast
    | Journal
    | AddToRoster
    | RemoveFromRoster
    | KeepLogTail
    | Finish
    | KillNow
    | ArmFault
    | Inject
)

ALIVE = ("launching", "running")


@dataclass
class TagState:
    tag: Tag
    started: bool = False
    stop_requested: bool = False


class Workflow:
    """The state of one run's tags and pods, and the rules that move it."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.tags = {t.tag: TagState(t) for t in exp.tags}
        #: Faults by the event that fires them; a fault is armed once.
        self._faults_on: dict[str, list[Fault]] = {}
        for fault in exp.faults:
            self._faults_on.setdefault(fault.event, []).append(fault)
        self._armed: set[int] = set()
        #: Pods being restarted (killed, to be launched again), and pods a fault stopped.
        self._restarting: set[tuple[str, int]] = set()
        self._faulted: dict[tuple[str, int], Fault] = {}
        #: Each pod's incarnation (0, then 1 after its first restart...).
        self.incarnation: dict[tuple[str, int], int] = {}
        #: The tags whose start or stop condition names an event, in spec order: a count
        #: looks at those only (a run of many tags counts `<tag>_start` once per pod).
        self._waiting_on: dict[str, list[TagState]] = {}
        for state in self.tags.values():
            names = {c.name for c in (state.tag.start, state.tag.stop) if c is not None}
            for name in names:
                self._waiting_on.setdefault(name, []).append(state)
        #: Pods launching or running.
        self._alive = 0
        #: One record per pod, in spec order then pod id: the summary's `pods`.
        self.pods: dict[tuple[str, int], PodSummary] = {
            (t.tag, i): PodSummary(tag=t.tag, pod_id=i) for t in exp.tags for i in range(t.replicas)
        }
        #: Counts as the facts told them.
        self.counts: dict[str, int] = {}
        #: How the run ends, once decided (the first decision stands).
        self.decided: tuple[Verdict, str | None] | None = None
        #: The failure that stops the run (a tag with `on_failure: stop`).
        self.stopping_failure: str | None = None
        #: The first pod failure of any tag, explained (the likely cause of what follows).
        self.first_failure: str | None = None
        self.first_failed: str | None = None
        #: The pod whose failure failed the run (`tag-id`): set once the verdict is failed.
        self.cause: str | None = None

    @property
    def finishing(self) -> bool:
        return self.decided is not None

    def alive(self) -> bool:
        """Whether a pod is launching or running (while none is, only a count can help)."""
        return self._alive > 0

    def conditions(self) -> list[str]:
        """The counts the start and stop conditions depend on."""
        names = {c.name for s in self.tags.values() for c in (s.tag.start, s.tag.stop) if c}
        return sorted(names | set(self._faults_on))

    def handle(self, fact: Fact) -> list[Action]:
        match fact:
            case Begin():
                return self._begin()
            case CountChanged():
                return self._count_changed(fact)
            case PodRunning():
                return self._running(fact)
            case PodExited():
                return self._exited(fact)
            case FaultDue(index, firing):
                return self._fault_due(self.exp.faults[index], firing)
            case GraceOver():
                return self._finish("failed", f"{self.stopping_failure}; stopped the rest")
            case TimedOut(seconds):
                return self._finish("timed_out", f"the experiment ran out of time ({seconds:g}s)")
            case Interrupted(force):
                if self.finishing:
                    return [KillNow()] if force else []
                return self._finish("interrupted", "interrupted by a signal", grace=not force)
            case Aborted(reason):
                return self._finish("error", reason)
            case StopFailed(reason):
                if self.decided is None or self.decided[0] == "succeeded":
                    self.decided = ("error", f"stopping the pods failed: {reason}")
                return []
            case Settled():
                return self._settled()

    def verdict(self) -> tuple[Verdict, str | None]:
        """How the run ended, once its pods are down: a success with failed pods (of tags
        with `on_failure: continue`) is a failure; pods never launched say so."""
        for pod in self.pods.values():
            if pod.state == "launching":  # its launch was cut short: it never ran
                pod.state = "pending"
                self._alive -= 1
            if pod.state == "pending":
                pod.reason = pod.reason or "never started"
            if pod.outcome is None:  # it never ran (pending, or stopped before it started)
                pod.outcome = outcomes.NEVER_STARTED
        verdict, reason = self.decided or ("error", "the coordinator stopped before a verdict")
        if verdict == "succeeded":
            failed = [s for s in self.pods.values() if s.state == "failed"]
            if failed:
                verdict = "failed"
                reason = "; ".join(
                    f"{pod_name(s.tag, s.pod_id)} exited with {s.exit_code}"
                    + (f" ({s.reason})" if s.reason else "")
                    for s in failed[:5]
                ) + (" ..." if len(failed) > 5 else "")
        if verdict == "failed" and self.cause is None:
            self.cause = self.first_failed
        return verdict, reason

    # -- rules ------------------------------------------------------------------------------

    def _finish(self, verdict: Verdict, reason: str | None, grace: bool = True) -> list[Action]:
        if self.decided is not None:
            return []
        self.decided = (verdict, reason)
        return [Finish(verdict, reason, grace)]

    def _begin(self) -> list[Action]:
        actions: list[Action] = []
        for state in self.tags.values():
            if state.tag.start is None:
                actions += self._start(state, None)
        return actions

    def _count_changed(self, fact: CountChanged) -> list[Action]:
        # Judge by the value this fact carries, not the latest count: the journal then shows
        # each workflow action right after the event value that caused it.
        self.counts[fact.event] = max(fact.value, self.counts.get(fact.event, 0))
        actions: list[Action] = [
            Journal(J.EventEntry(name=fact.event, count=fact.value, pod=fact.pod))
        ]
        if self.finishing:
            return actions
        for fault in self._faults_on.get(fact.event, ()):
            if fact.value >= fault.value and fault.index not in self._armed:
                self._armed.add(fault.index)
                actions.append(ArmFault(fault.index, 1, fault.after))
        for state in self._waiting_on.get(fact.event, ()):
            if _met(state.tag.stop, fact) and not state.stop_requested:
                actions += self._stop(state, state.tag.stop)
            if not state.started and not state.stop_requested and _met(state.tag.start, fact):
                actions += self._start(state, state.tag.start)
        return actions

    def _start(self, state: TagState, cond: Condition | None) -> list[Action]:
        state.started = True
        tag = state.tag.tag
        actions: list[Action] = []
        if cond is not None:
            actions.append(Journal(_workflow_entry(tag, "start", cond)))
        for pod_id in range(state.tag.replicas):
            self.pods[(tag, pod_id)].state = "launching"
            self._alive += 1
            actions.append(Journal(J.PodEntry(tag=tag, pod_id=pod_id, state="pending")))
            actions.append(Launch(tag, pod_id))
        return actions

    def _stop(self, state: TagState, cond: Condition | None) -> list[Action]:
        state.stop_requested = True
        tag = state.tag.tag
        actions: list[Action] = []
        if cond is not None:
            actions.append(Journal(_workflow_entry(tag, "stop", cond)))
        for pod_id in range(state.tag.replicas):
            pod = self.pods[(tag, pod_id)]
            if pod.state in ALIVE:
                pod.stopped_by_workflow = True
                actions.append(Terminate(tag, pod_id))
            elif pod.state == "pending":
                pod.state = "stopped"
                pod.stopped_by_workflow = True
                pod.reason = "stopped by its workflow before it started"
        return actions

    def _running(self, fact: PodRunning) -> list[Action]:
        key = (fact.tag, fact.pod_id)
        pod = self.pods.get(key)
        if pod is None or pod.state != "launching":
            return []
        pod.state, pod.ip = "running", fact.ip
        if pod.started_at is None:  # a restarted pod keeps its first start
            pod.started_at = fact.at
        if self.finishing:
            return []
        return [
            Journal(J.PodEntry(tag=fact.tag, pod_id=fact.pod_id, state="running", ip=fact.ip)),
            AddToRoster(fact.tag, fact.pod_id, fact.ip or "", self.incarnation.get(key, 0)),
        ]

    def _exited(self, fact: PodExited) -> list[Action]:
        key = (fact.tag, fact.pod_id)
        pod = self.pods.get(key)
        if pod is None or pod.state not in ALIVE:
            return []
        self._alive -= 1
        pod.stopped_at, pod.exit_code = fact.at, fact.exit_code
        if fact.reason:
            pod.reason = fact.reason
        pod.log_bytes_lost = fact.log_bytes_lost
        pod.log_incomplete = fact.log_incomplete
        fault = self._faulted.pop(key, None)
        restart = key in self._restarting
        self._restarting.discard(key)
        if pod.stopped_by_workflow:
            pod.state, pod.outcome = "stopped", outcomes.BY_WORKFLOW
        elif self.decided is not None:
            pod.state, pod.outcome = "stopped", outcomes.stopped_as_run_ended(self.decided[0])
        elif restart:
            pod.state, pod.outcome = "stopped", outcomes.RESTARTED
        elif fault is not None and not fault.judge_exit:
            pod.state, pod.outcome = "stopped", outcomes.BY_FAULT
        elif fact.exit_code == 0:
            pod.state, pod.outcome = "exited", outcomes.SUCCEEDED
        else:
            pod.state, pod.outcome = "failed", outcomes.FAILED
        if pod.state != "stopped" and self._policy_restarts(pod, fact):
            restart = True
            pod.state, pod.outcome = "stopped", outcomes.RESTARTED
            policy = self.exp.tag(pod.tag).restart
            assert policy is not None
            pod.reason = (
                f"{fact.reason + '; ' if fact.reason else ''}restarted by its tag's policy "
                f"(on {policy.on}, {pod.restarts + 1} of {policy.max})"
            )
        actions: list[Action] = [
            Journal(
                J.PodEntry(
                    tag=fact.tag,
                    pod_id=fact.pod_id,
                    state=pod.state,
                    exit_code=fact.exit_code,
                    reason=pod.reason if restart else fact.reason,
                    outcome=pod.outcome,
                )
            )
        ]
        listed = pod.started_at is not None
        incarnation = self.incarnation.get(key, 0)
        if restart:
            actions.append(RemoveFromRoster(fact.tag, fact.pod_id, listed, incarnation))
            return actions + self._relaunch(pod)
        if pod.state == "failed":
            actions.append(KeepLogTail(fact.tag, fact.pod_id))
            if self.first_failure is None:
                self.first_failure = _explain(pod)
                self.first_failed = pod_name(pod.tag, pod.pod_id)
            actions += self._on_failure(pod)
        actions.append(RemoveFromRoster(fact.tag, fact.pod_id, listed, incarnation))
        return actions

    def _policy_restarts(self, pod: PodSummary, fact: PodExited) -> bool:
        """Whether the tag's restart policy starts this pod again."""
        policy = self.exp.tag(pod.tag).restart
        if policy is None or pod.restarts >= policy.max:
            return False
        if policy.on == "always":
            return True
        if policy.on == "preemption":
            return fact.preempted
        return fact.exit_code != 0

    def _relaunch(self, pod: PodSummary) -> list[Action]:
        """Start a pod again: the same tag, pod id and plan (so the same IP), counted again."""
        key = (pod.tag, pod.pod_id)
        self.incarnation[key] = self.incarnation.get(key, 0) + 1
        pod.restarts += 1
        pod.state = "launching"
        pod.exit_code = pod.stopped_at = None
        self._alive += 1
        return [
            Journal(J.PodEntry(tag=pod.tag, pod_id=pod.pod_id, state="pending")),
            Launch(pod.tag, pod.pod_id),
        ]

    # -- faults -----------------------------------------------------------------------------

    def _running_ids(self, tag: str) -> list[int]:
        state = self.tags.get(tag)
        if state is None:
            return []
        return [
            i
            for i in range(state.tag.replicas)
            if self.pods[(tag, i)].state == "running" and (tag, i) not in self._restarting
        ]

    def _fault_due(self, fault: Fault, firing: int) -> list[Action]:
        """Choose the pods of one firing (seeded), mark them, and inject; arm the next one."""
        if self.finishing:
            return []
        actions: list[Action] = []
        if fault.every is not None and firing < fault.times:
            actions.append(ArmFault(fault.index, firing + 1, fault.every))
        rng = fault.rng(firing)
        chosen = fault.pods.choose(self._running_ids(fault.pods.tag), rng)
        pods = tuple((fault.pods.tag, i) for i in chosen)
        peers: tuple[tuple[str, int], ...] = ()
        if fault.to is not None:
            peers = tuple(
                (fault.to.tag, i) for i in fault.to.choose(self._running_ids(fault.to.tag), rng)
            )
        action = FaultAction(
            id=f"{fault.name}#{firing}",
            kind=fault.kind,
            pods=pods,
            peers=peers,
            direction=fault.direction,
            signal=fault.signal,
            duration=fault.duration,
            delay_ms=fault.delay_ms,
            jitter_ms=fault.jitter_ms,
            loss_percent=fault.loss_percent,
        )
        if not pods or (fault.to is not None and not peers):
            entry = fault_entry(fault, action, firing, "skipped", "no running pod to choose")
            return [*actions, Journal(entry)]
        for key in pods + peers:
            record = self.pods[key]
            record.faults = [*(record.faults or []), fault.name]
        if fault.kind == "kill":
            self._faulted.update((key, fault) for key in pods)
        elif fault.kind == "restart":
            self._restarting.update(pods)
        actions.append(Inject(action, fault, firing))
        return actions

    def _on_failure(self, pod: PodSummary) -> list[Action]:
        """The first failure of a tag with `on_failure: stop` fails the run; pods still running
        get the grace period to finish on their own (pods failing at the same moment report
        their own exit codes), then the rest are stopped."""
        if self.stopping_failure is not None or self.exp.tag(pod.tag).on_failure != "stop":
            return []
        self.stopping_failure = _explain(pod)
        self.cause = pod_name(pod.tag, pod.pod_id)
        return [ArmFailFast(self.stopping_failure)]

    def _settled(self) -> list[Action]:
        waiting = [s for s in self.tags.values() if not s.started and not s.stop_requested]
        if not waiting:
            return self._finish("succeeded", None)
        notes = [self.first_failure] if self.first_failure else []  # the likely cause first
        for s in waiting:
            cond = s.tag.start
            assert cond is not None  # tags without one started at Begin
            have = self.counts.get(cond.name, 0)
            notes.append(
                f"tag {s.tag.tag!r} never started: {cond.name!r} reached {have} of "
                f"{cond.value} and no pod is left to register it"
            )
        return self._finish("failed", "; ".join(notes))


def fault_entry(
    fault: Fault, action: FaultAction, firing: int, state: str, reason: str | None = None
) -> J.FaultEntry:
    """The journal's record of one firing of `fault`, in `state`."""
    return J.FaultEntry(
        fault=fault.name,
        action=fault.kind,
        firing=firing,
        state=state,  # type: ignore[arg-type]
        pods=[pod_name(t, i) for t, i in action.pods],
        peers=[pod_name(t, i) for t, i in action.peers] if fault.network else None,
        condition=J.Condition(name=fault.event, value=fault.value),
        seed=fault.seed,
        duration=action.duration,
        reason=reason,
    )


def _met(cond: Condition | None, fact: CountChanged) -> bool:
    return cond is not None and cond.name == fact.event and fact.value >= cond.value


def _workflow_entry(tag: str, action: Literal["start", "stop"], cond: Condition) -> J.Entry:
    condition = J.Condition(name=cond.name, value=cond.value)
    return J.WorkflowEntry(tag=tag, action=action, condition=condition)


def _explain(pod: PodSummary) -> str:
    """`server-0 failed (exit 127): <why>`, the why when the runtime knows one."""
    what = f"{pod_name(pod.tag, pod.pod_id)} failed (exit {pod.exit_code})"
    return f"{what}: {pod.reason}" if pod.reason else what
