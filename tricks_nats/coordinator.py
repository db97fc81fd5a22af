"""The coordinator: carries out what the workflow decides, and turns what happens into facts.

Data flows one way: the runtime's pod events, the counts, the timers and signals become facts
on one queue; one loop feeds each fact to the pure `Workflow` (workflow.py) and applies the
actions it returns (launch, terminate, journal, rosters, finish). No decision is made here: the
coordinator owns the queue, the timers, the effects and the teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from tricks_nats import env as E
from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.collector import Collector
from tricks_nats.counting import CountKeeper
from tricks_nats.entries import VerdictEntry
from tricks_nats.errors import NatsUnavailable, TricksError
from tricks_nats.faults import Fault, FaultAction
from tricks_nats.provenance import Provenance
from tricks_nats.records import RunRecords, Summary
from tricks_nats.registrar import Registrar, Rosters
from tricks_nats.runtimes import PodEvent, PodPlan, Runtime
from tricks_nats.spec import Experiment, Tag
from tricks_nats.tasks import Tasks
from tricks_nats.workflow import (
    Aborted,
    Action,
    AddToRoster,
    ArmFailFast,
    ArmFault,
    Begin,
    CountChanged,
    Fact,
    FaultDue,
    Finish,
    GraceOver,
    Inject,
    Interrupted,
    Journal,
    KeepLogTail,
    KillNow,
    Launch,
    PodExited,
    PodRunning,
    RemoveFromRoster,
    Settled,
    StopFailed,
    Terminate,
    TimedOut,
    Verdict,
    Workflow,
    exit_code,
    fault_entry,
)

log = logging.getLogger(__name__)

#: At the end, how long to wait for the pods' last metrics batches to be written.
DRAIN_METRICS_S = 10.0


@dataclass
class Outcome:
    verdict: Verdict
    reason: str | None
    summary: Summary
    exit_code: int = field(init=False)

    def __post_init__(self) -> None:
        self.exit_code = exit_code(self.verdict)


class Coordinator:
    def __init__(
        self,
        exp: Experiment,
        exp_id: str,
        bus: Bus,
        runtime: Runtime,
        records: RunRecords,
        pods_nats: Endpoint,
        *,
        grace: float = 5.0,
        timeout: float | None = None,
        provenance: Provenance | None = None,
    ) -> None:
        self.exp = exp
        self.provenance = provenance
        self.exp_id = exp_id
        self.bus = bus
        self.runtime = runtime
        self.records = records
        self.pods_nats = pods_nats
        self.grace = grace
        # 0 means no limit (`up --timeout 0` lifts the spec's timeout)
        self.timeout = (timeout if timeout is not None else exp.timeout) or None
        self.workflow = Workflow(exp)
        tags = ",".join(t.tag for t in exp.tags)
        # Drivers check discover's tag against it; past the size an environment takes easily
        # (thousands of tags), it is left out and drivers skip the check.
        self.tags_env = {E.TAGS: tags} if len(tags) <= E.TAGS_MAX else {}
        self.queue: asyncio.Queue[Fact] = asyncio.Queue()
        self.keeper = CountKeeper(bus, self._on_count)
        self.registrar = Registrar(bus, self.keeper, exp.lifecycle)
        self.rosters = Rosters(bus, self.keeper, {t.tag: t.replicas for t in exp.tags})
        self.collector = Collector(records.root, exp, bus)
        self._fail_timer: asyncio.TimerHandle | None = None
        self._stoppers = Tasks()
        #: Faults: timers of firings to come, firings injected and not healed yet, their tasks.
        self._fault_timers: list[asyncio.TimerHandle] = []
        self._injected: dict[str, tuple[FaultAction, Fault, int]] = {}
        self._faulting = Tasks()
        self._fired: dict[str, int] = {}
        self._forwarder: asyncio.Task[None] | None = None
        #: Seconds the pods get to stop at the end (0 after a second Ctrl-C).
        self._stop_grace = grace
        self._hurry = False

    # -- public ---------------------------------------------------------------------------

    def interrupt(self, *, force: bool = False) -> None:
        """Ask the run to stop (Ctrl-C); a second call kills pods without a grace period."""
        self.queue.put_nowait(Interrupted(force=force))

    def abort(self, reason: str) -> None:
        """End the run at once with verdict `error` (NATS is gone for good)."""
        self.bus.mark_gone(reason)
        self.queue.put_nowait(Aborted(reason))

    def plans(self, tag: Tag) -> list[PodPlan]:
        return [self._plan(tag, i) for i in range(tag.replicas)]

    async def run(self) -> Outcome:
        """Run to a verdict. Whatever happens (an exception of ours, NATS gone, a runtime
        error), the pods are stopped, and the verdict and summary are written."""
        started_at = time.time()
        try:
            await self._run_loop()
        except NatsUnavailable as exc:
            self.bus.mark_gone(str(exc))
            await self._apply(self.workflow.handle(Aborted(f"NATS went away: {exc}")))
        except Exception as exc:
            log.debug("the coordinator failed", exc_info=True)
            await self._apply(self.workflow.handle(Aborted(f"{type(exc).__name__}: {exc}")))
        finally:
            if not self.workflow.finishing:  # cancelled: tear down with no new decisions
                cut = Aborted("the coordinator stopped before a verdict")
                await self._apply(self.workflow.handle(cut))
            try:
                await self._teardown()
            except Exception as exc:
                log.warning("stopping the pods: %s", exc, exc_info=log.isEnabledFor(10))
                self.workflow.handle(StopFailed(str(exc)))
            verdict, reason = self.workflow.verdict()
            outcome = self._conclude(verdict, reason, started_at)
        return outcome

    async def _run_loop(self) -> None:
        await self.keeper.start()
        await self.collector.start()
        await self.registrar.start()
        self._forwarder = asyncio.create_task(self._forward_runtime(), name="runtime-events")
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                await self._loop()
        except TimeoutError:
            if not deadline.expired():
                raise
            assert self.timeout is not None
            await self._apply(self.workflow.handle(TimedOut(self.timeout)))

    def _conclude(self, verdict: Verdict, reason: str | None, started_at: float) -> Outcome:
        """Journal the verdict and write the summary; neither may raise (a full disk)."""
        self.records.write(VerdictEntry(verdict=verdict, reason=reason))
        try:
            metrics = self.collector.stats()
        except Exception as exc:  # the verdict is written whatever happens here
            log.warning("summarising the metrics: %s", exc, exc_info=log.isEnabledFor(10))
            metrics = []
        self.collector.close()
        summary = Summary(
            experiment=self.exp_id,
            name=self.exp.name,
            verdict=verdict,
            reason=reason,
            started_at=started_at,
            ended_at=time.time(),
            pods=list(self.workflow.pods.values()),  # spec order, then pod id
            events=dict(self.keeper.counts),
            runtime=self.runtime.name,
            journal_lost=self.records.journal_lost,
            metrics=metrics,
            metrics_dropped=dict(self.collector.dropped_by_pod()),
            metrics_rejected=self.collector.rejected,
            metrics_lost=self.collector.lost,
            variables=dict(self.exp.variables),
            provenance=self.provenance,
            cause=self.workflow.cause,
            faults=dict(self._fired),
            fault_seed=self.exp.seed if self.exp.faults else None,
        )
        self.records.write_summary(summary)
        return Outcome(verdict, reason, summary)

    # -- the loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        await self._apply(self.workflow.handle(Begin()))
        while not self.workflow.finishing:
            if self._quiet():
                await self._resync()
                if self._quiet():
                    await self._apply(self.workflow.handle(Settled()))
                    continue
            await self._apply(self.workflow.handle(await self.queue.get()))

    def _quiet(self) -> bool:
        """No pod alive and no fact waiting: only a count read straight from NATS can help."""
        return not self.workflow.alive() and self.queue.empty()

    async def _resync(self) -> None:
        """Read the counts that conditions need straight from NATS (a pod may have registered
        an event just before it exited, ahead of the stream consumer); a count that moved
        arrives as a fact."""
        for name in self.workflow.conditions():
            value = await self.bus.count(name)
            if value > self.keeper.counts.get(name, 0):
                await self.keeper.advance(name, value)

    def _on_count(self, event: str, value: int, pod: str | None) -> None:
        self.queue.put_nowait(CountChanged(event, value, pod))

    async def _forward_runtime(self) -> None:
        while True:
            self.queue.put_nowait(_fact(await self.runtime.events.get()))

    # -- effects --------------------------------------------------------------------------

    async def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Journal(entry):
                    self.records.write(entry)
                case Launch(tag, pod_id):
                    await self._launch(tag, pod_id)
                case Terminate(tag, pod_id):
                    self._stoppers.spawn(self.runtime.terminate(tag, pod_id, self.grace))
                case ArmFailFast():
                    self._fail_timer = asyncio.get_running_loop().call_later(
                        self.grace, self.queue.put_nowait, GraceOver()
                    )
                case AddToRoster(tag, pod_id, ip, incarnation):
                    await self.rosters.started(tag, pod_id, ip, incarnation)
                case RemoveFromRoster(tag, pod_id, listed, incarnation):
                    await self._unlist(tag, pod_id, listed, incarnation)
                case KeepLogTail(tag, pod_id):
                    self.workflow.pods[(tag, pod_id)].last_log_lines = self._tail(tag, pod_id)
                case Finish(grace=grace):
                    self._stop_grace = self.grace if grace else 0.0
                    if self._fail_timer is not None:
                        self._fail_timer.cancel()
                    for timer in self._fault_timers:
                        timer.cancel()
                case KillNow():
                    self._hurry = True
                case ArmFault(index, firing, delay):
                    self._fault_timers.append(
                        asyncio.get_running_loop().call_later(
                            delay, self.queue.put_nowait, FaultDue(index, firing)
                        )
                    )
                case Inject(fault_action, fault, firing):
                    self._faulting.spawn(self._inject(fault_action, fault, firing))

    async def _launch(self, tag: str, pod_id: int) -> None:
        await asyncio.sleep(0)  # between launches, let the registrar answer pods
        try:
            await self.runtime.launch(self._plan(self.exp.tag(tag), pod_id))
        except TricksError as exc:
            self.queue.put_nowait(PodExited(tag, pod_id, time.time(), 127, reason=str(exc)))

    async def _inject(self, action: FaultAction, fault: Fault, firing: int) -> None:
        """One firing: the runtime acts (a restart: its pods are killed, the workflow starts
        them again), the journal says how it went, a timer heals it after its duration."""
        try:
            if action.kind == "restart":
                for tag, pod_id in action.pods:
                    self._stoppers.spawn(self.runtime.terminate(tag, pod_id, 0.0))
            else:
                await self.runtime.inject(action)
        except Exception as exc:  # a fault that cannot be injected does not stop the run
            if not isinstance(exc, TricksError):
                log.warning("injecting %s failed", action.id, exc_info=exc)
            self.records.write(fault_entry(fault, action, firing, "failed", str(exc)))
            return
        self._fired[fault.name] = self._fired.get(fault.name, 0) + 1
        self.records.write(fault_entry(fault, action, firing, "injected"))
        if action.kind in ("kill", "restart"):
            return
        self._injected[action.id] = (action, fault, firing)
        if action.duration is not None and not self.workflow.finishing:
            self._fault_timers.append(
                asyncio.get_running_loop().call_later(
                    action.duration, lambda: self._faulting.spawn(self._heal(action.id))
                )
            )

    async def _heal(self, action_id: str, reason: str | None = None) -> None:
        found = self._injected.pop(action_id, None)
        if found is None:
            return
        action, fault, firing = found
        try:
            await self.runtime.heal(action)
        except Exception as exc:
            if not isinstance(exc, TricksError):
                log.warning("healing %s failed", action.id, exc_info=exc)
            self.records.write(fault_entry(fault, action, firing, "failed", f"healing: {exc}"))
            return
        self.records.write(fault_entry(fault, action, firing, "healed", reason))

    async def _unlist(self, tag: str, pod_id: int, listed: bool, incarnation: int) -> None:
        if not self.workflow.finishing:
            await self.rosters.stopped(tag, pod_id, listed=listed, incarnation=incarnation)
            return
        try:  # stopping: a record that NATS is gone for must not stop the others
            await self.rosters.stopped(tag, pod_id, listed=listed, incarnation=incarnation)
        except NatsUnavailable as exc:
            if self.bus.gone is None:
                log.warning("could not record the stop of %s: %s", p.pod_name(tag, pod_id), exc)
            self.bus.mark_gone(str(exc))  # the other pods' records: at once, not 20 s each
        except TricksError as exc:
            log.warning("could not record the stop of %s: %s", p.pod_name(tag, pod_id), exc)

    def _tail(self, tag: str, pod_id: int, lines: int = 10) -> list[str]:
        try:
            with self.records.log_path(tag, pod_id).open("rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def _plan(self, tag: Tag, pod_id: int) -> PodPlan:
        ep = self.pods_nats
        env = {
            **tag.env,
            E.TAG: tag.tag,
            E.REPLICAS: str(tag.replicas),
            E.POD_ID: str(pod_id),
            E.EXP_ID: self.exp_id,
            E.TRICKS_IP: ep.host,
            E.TRICKS_PORT: str(ep.port),
            E.NATS_URL: ep.url,
            E.PROTOCOL: p.VERSION,
            **self.tags_env,
        }
        if ep.user:
            env[E.NATS_USER] = ep.user
            env[E.NATS_PASSWORD] = ep.password or ""
        return PodPlan(
            tag=tag.tag,
            pod_id=pod_id,
            replicas=tag.replicas,
            command=tag.command,
            image=tag.image,
            env=env,
            log_path=self.records.log_path(tag.tag, pod_id),
            cwd=self.exp.base_dir,
            on_output=self.collector.tap(tag.tag, pod_id, self.records.log_path(tag.tag, pod_id)),
        )

    # -- teardown -------------------------------------------------------------------------

    async def _teardown(self) -> None:
        """Stop every pod still alive, record how each ended, release everything."""
        await self._heal_all()
        closing = asyncio.create_task(self.runtime.aclose(self._stop_grace))
        while not closing.done() or not self.queue.empty():
            getter = asyncio.ensure_future(self.queue.get())
            await asyncio.wait({closing, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                continue
            await self._apply(self.workflow.handle(getter.result()))
            if self._hurry and self._stop_grace > 0:
                self._stop_grace = 0.0
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing
                closing = asyncio.create_task(self.runtime.aclose(0.0))
        await closing
        await self._drain_runtime()  # events the runtime reported last
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forwarder
        await self._stoppers.cancel()
        await self._drain_runtime()
        await self.collector.drain(DRAIN_METRICS_S)
        await self.collector.stop()
        await self.keeper.stop()

    async def _heal_all(self) -> None:
        """The run ends: no firing to come; what is injected is healed before the pods stop
        (a paused pod must resume to hear its SIGTERM)."""
        for timer in self._fault_timers:
            timer.cancel()
        await self._faulting.cancel()
        for action_id in list(self._injected):
            try:
                await self._heal(action_id, "the run ended")
            except Exception as exc:  # the pods must still be stopped
                log.warning("healing fault %s: %s", action_id, exc, exc_info=log.isEnabledFor(10))

    async def _drain_runtime(self) -> None:
        while not self.runtime.events.empty():
            await self._apply(self.workflow.handle(_fact(self.runtime.events.get_nowait())))


def _fact(ev: PodEvent) -> PodRunning | PodExited:
    """A runtime's report as a fact, stamped with the time it arrived."""
    if ev.kind == "running":
        return PodRunning(ev.tag, ev.pod_id, time.time(), ev.ip)
    return PodExited(
        ev.tag,
        ev.pod_id,
        time.time(),
        ev.exit_code,
        ev.reason,
        log_bytes_lost=ev.log_bytes_lost,
        log_incomplete=ev.log_incomplete,
        preempted=ev.preempted,
    )
