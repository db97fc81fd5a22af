"""The coordinator: launches tags, counts lifecycle events, applies workflows, decides the verdict.

Everything that happens (a pod runs or exits, a count moves, a timeout, Ctrl-C) becomes one
item on one queue, handled in order by one loop: no locks, no polling, no races between a pod's
exit and the count it moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from tricks_nats import env as E
from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.counting import CountWatcher
from tricks_nats.errors import NatsUnavailable, TricksError
from tricks_nats.records import PodSummary, RunRecords, Summary
from tricks_nats.registrar import Registrar, Rosters
from tricks_nats.runtimes import PodEvent, PodPlan, Runtime
from tricks_nats.spec import Condition, Experiment, Tag

log = logging.getLogger(__name__)

Verdict = Literal["succeeded", "failed", "timed_out", "interrupted", "error"]


@dataclass
class _Interrupt:
    force: bool = False


@dataclass
class _Abort:
    """The run cannot go on (NATS gone for good): end it now with verdict `error`."""

    reason: str


@dataclass
class _FailFast:
    pass


@dataclass
class _Count:
    event: str
    value: int
    pod: str | None


@dataclass
class _TagState:
    tag: Tag
    started: bool = False
    stop_requested: bool = False


@dataclass
class PodEndpoint:
    """NATS as the pods see it (host and port may differ from the coordinator's view)."""

    endpoint: Endpoint
    host: str
    port: int


@dataclass
class Outcome:
    verdict: Verdict
    reason: str | None
    summary: Summary
    exit_code: int = field(init=False)

    def __post_init__(self) -> None:
        self.exit_code = {"succeeded": 0, "interrupted": 130}.get(self.verdict, 1)


def _met(cond: Condition | None, item: _Count) -> bool:
    return cond is not None and cond.name == item.event and item.value >= cond.value


class Coordinator:
    def __init__(
        self,
        exp: Experiment,
        exp_id: str,
        bus: Bus,
        runtime: Runtime,
        records: RunRecords,
        pods_nats: PodEndpoint,
        *,
        grace: float = 5.0,
        timeout: float | None = None,
    ) -> None:
        self.exp = exp
        self.exp_id = exp_id
        self.bus = bus
        self.runtime = runtime
        self.records = records
        self.pods_nats = pods_nats
        self.grace = grace
        self.timeout = timeout if timeout is not None else exp.timeout
        self.queue: asyncio.Queue[PodEvent | _Count | _Interrupt | _FailFast | _Abort] = (
            asyncio.Queue()
        )
        self._first_failure: str | None = None  # the one that fails the run (on_failure: stop)
        self._first_failed: str | None = None  # the first pod failure of any tag, explained
        self._fail_timer: asyncio.TimerHandle | None = None
        self.tags = {t.tag: _TagState(t) for t in exp.tags}
        self.pods: dict[tuple[str, int], PodSummary] = {
            (t.tag, i): PodSummary(tag=t.tag, pod_id=i) for t in exp.tags for i in range(t.replicas)
        }
        self.watcher = CountWatcher(bus, self._on_count)
        self._stoppers: set[asyncio.Task[None]] = set()
        self._forwarder: asyncio.Task[None] | None = None
        self._tearing_down = False
        self._forced = False
        lifecycle = {n for t in exp.tags for n in (p.start_event(t.tag), p.stop_event(t.tag))}
        self.registrar = Registrar(bus, self.watcher, lifecycle)
        self.rosters = Rosters(bus, self.watcher)

    # -- public ---------------------------------------------------------------------------

    def interrupt(self, *, force: bool = False) -> None:
        """Ask the run to stop (Ctrl-C); a second call kills pods without a grace period."""
        self.queue.put_nowait(_Interrupt(force=force))

    def abort(self, reason: str) -> None:
        """End the run at once with verdict `error` (NATS is gone for good)."""
        self.bus.mark_gone(reason)
        self.queue.put_nowait(_Abort(reason))

    def plans(self, tag: Tag) -> list[PodPlan]:
        return [self._plan(tag, i) for i in range(tag.replicas)]

    async def run(self) -> Outcome:
        """Run to a verdict. Whatever happens (an exception of ours, NATS gone, a runtime
        error), the pods are stopped, and the verdict and summary are written."""
        started_at = time.time()
        verdict: Verdict = "error"
        reason: str | None = "the coordinator stopped before a verdict"
        try:
            verdict, reason = await self._run_loop()
        except NatsUnavailable as exc:
            self.bus.mark_gone(str(exc))
            verdict, reason = "error", f"NATS went away: {exc}"
        except Exception as exc:
            log.debug("the coordinator failed", exc_info=True)
            verdict, reason = "error", f"{type(exc).__name__}: {exc}"
        finally:
            try:
                await self._teardown()
            except Exception as exc:
                log.warning("stopping the pods: %s", exc, exc_info=log.isEnabledFor(10))
                if verdict == "succeeded":
                    verdict, reason = "error", f"stopping the pods failed: {exc}"
            if verdict == "succeeded":
                failed = [s for s in self.pods.values() if s.state == "failed"]
                if failed:
                    verdict = "failed"
                    reason = "; ".join(
                        f"{s.tag}-{s.pod_id} exited with {s.exit_code}"
                        + (f" ({s.reason})" if s.reason else "")
                        for s in failed[:5]
                    ) + (" ..." if len(failed) > 5 else "")
            outcome = self._conclude(verdict, reason, started_at)
        return outcome

    async def _run_loop(self) -> tuple[Verdict, str | None]:
        await self.watcher.start()
        await self.registrar.start()
        self._forwarder = asyncio.create_task(self._forward_runtime(), name="runtime-events")
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                return await self._loop()
        except TimeoutError:
            if not deadline.expired():
                raise
            return "timed_out", f"the experiment ran out of time ({self.timeout:g}s)"

    def _conclude(self, verdict: Verdict, reason: str | None, started_at: float) -> Outcome:
        """Journal the verdict and write the summary; neither may raise (a full disk)."""
        self.records.journal("verdict", verdict=verdict, reason=reason)
        summary = Summary(
            experiment=self.exp_id,
            name=self.exp.name,
            verdict=verdict,
            reason=reason,
            started_at=started_at,
            ended_at=time.time(),
            pods=list(self.pods.values()),  # spec order, then pod id
            events=dict(self.watcher.counts),
            runtime=self.runtime.name,
            journal_lost=self.records.journal_lost,
        )
        self.records.write_summary(summary)
        return Outcome(verdict, reason, summary)

    # -- the loop -------------------------------------------------------------------------

    async def _loop(self) -> tuple[Verdict, str | None]:
        for state in self.tags.values():
            if state.tag.start is None:
                await self._start_tag(state, None)
        await self._resync()
        while True:
            if self._idle():
                await self._resync()
                if self._idle():
                    return self._finish()
            item = await self.queue.get()
            if isinstance(item, _Interrupt):
                self._forced = item.force
                return "interrupted", "interrupted by a signal"
            if isinstance(item, _FailFast):
                return "failed", f"{self._first_failure}; stopped the rest"
            if isinstance(item, _Abort):
                return "error", item.reason
            if isinstance(item, _Count):
                await self._count_changed(item)
            else:
                await self._pod_event(item)

    def _idle(self) -> bool:
        """Nothing can happen any more: no pod alive, no tag that could still start."""
        alive = any(s.state in ("launching", "running") for s in self.pods.values())
        return not alive and self.queue.empty()

    def _finish(self) -> tuple[Verdict, str | None]:
        waiting = [s for s in self.tags.values() if not s.started and not s.stop_requested]
        if not waiting:
            return "succeeded", None
        notes = [self._first_failed] if self._first_failed else []  # the likely cause first
        for s in waiting:
            cond = s.tag.start
            assert cond is not None
            have = self.watcher.counts.get(cond.name, 0)
            notes.append(
                f"tag {s.tag.tag!r} never started: {cond.name!r} reached {have} of "
                f"{cond.value} and no pod is left to register it"
            )
        return "failed", "; ".join(notes)

    async def _resync(self) -> None:
        """Read the counts that pending conditions need straight from NATS (a pod may have
        registered an event just before it exited, ahead of the stream consumer)."""
        names = {c.name for s in self.tags.values() for c in (s.tag.start, s.tag.stop) if c}
        for name in sorted(names):
            value = await self.bus.count(name)
            if value > self.watcher.counts.get(name, 0):
                await self.watcher.advance(name, value)
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, _Count):
                await self._count_changed(item)
            elif isinstance(item, (_Interrupt, _FailFast, _Abort)):
                self.queue.put_nowait(item)
                return
            else:
                await self._pod_event(item)

    def _on_count(self, event: str, value: int, pod: str | None) -> None:
        self.queue.put_nowait(_Count(event, value, pod))

    async def _forward_runtime(self) -> None:
        while True:
            self.queue.put_nowait(await self.runtime.events.get())

    # -- counts and workflows -------------------------------------------------------------

    async def _count_changed(self, item: _Count) -> None:
        # Judge by the value this item carries, not the latest count: the journal then shows
        # each workflow action right after the event value that caused it.
        self.records.journal("event", name=item.event, count=item.value, pod=item.pod)
        for state in self.tags.values():
            if _met(state.tag.stop, item) and not state.stop_requested:
                await self._stop_tag(state, state.tag.stop)
            if not state.started and not state.stop_requested and _met(state.tag.start, item):
                await self._start_tag(state, state.tag.start)

    async def _start_tag(self, state: _TagState, cond: Condition | None) -> None:
        state.started = True
        tag = state.tag
        if cond is not None:
            self.records.journal(
                "workflow",
                tag=tag.tag,
                action="start",
                condition={"name": cond.name, "value": cond.value},
            )
        for plan in self.plans(tag):
            pod = self.pods[(tag.tag, plan.pod_id)]
            pod.state = "launching"
            self.records.journal("pod", tag=tag.tag, pod_id=plan.pod_id, state="pending")
            await asyncio.sleep(0)  # between launches, let the registrar answer pods
            try:
                await self.runtime.launch(plan)
            except TricksError as exc:
                await self.runtime.events.put(
                    PodEvent("exited", tag.tag, plan.pod_id, exit_code=127, reason=str(exc))
                )

    async def _stop_tag(self, state: _TagState, cond: Condition | None) -> None:
        state.stop_requested = True
        if cond is not None:
            self.records.journal(
                "workflow",
                tag=state.tag.tag,
                action="stop",
                condition={"name": cond.name, "value": cond.value},
            )
        for (tag, pod_id), pod in self.pods.items():
            if tag != state.tag.tag:
                continue
            if pod.state in ("launching", "running"):
                pod.stopped_by_workflow = True
                task = asyncio.create_task(self.runtime.terminate(tag, pod_id, self.grace))
                self._stoppers.add(task)
                task.add_done_callback(self._stoppers.discard)
            elif pod.state == "pending":
                pod.state = "stopped"
                pod.stopped_by_workflow = True
                pod.reason = "stopped by its workflow before it started"

    # -- pods -----------------------------------------------------------------------------

    async def _pod_event(self, ev: PodEvent) -> None:
        pod = self.pods.get((ev.tag, ev.pod_id))
        if pod is None:
            log.warning("ignoring an event for unknown pod %s", ev.name)
            return
        now = time.time()
        if ev.kind == "running":
            pod.state, pod.started_at, pod.ip = "running", now, ev.ip
            self.records.journal("pod", tag=ev.tag, pod_id=ev.pod_id, state="running", ip=ev.ip)
            await self.rosters.started(ev.tag, ev.pod_id, ev.ip or "")
            return
        pod.stopped_at, pod.exit_code = now, ev.exit_code
        if ev.reason:
            pod.reason = ev.reason
        pod.log_bytes_lost = ev.log_bytes_lost
        pod.log_incomplete = ev.log_incomplete
        if pod.stopped_by_workflow or self._tearing_down:
            pod.state = "stopped"
        else:
            pod.state = "exited" if ev.exit_code == 0 else "failed"
        self.records.journal(
            "pod",
            tag=ev.tag,
            pod_id=ev.pod_id,
            state=pod.state,
            exit_code=ev.exit_code,
            reason=ev.reason,
        )
        if pod.state == "failed":
            pod.last_log_lines = self._tail(ev.tag, ev.pod_id)
            if self._first_failed is None:
                self._first_failed = _explain(pod)
            self._on_failure(pod)
        await self.rosters.stopped(ev.tag, ev.pod_id, listed=pod.started_at is not None)

    def _on_failure(self, pod: PodSummary) -> None:
        """The first failure of a tag with `on_failure: stop` fails the run; pods still running
        get the grace period to finish on their own (pods failing at the same moment report
        their own exit codes), then the rest are stopped."""
        if self._tearing_down or self._first_failure is not None:
            return
        if self.exp.tag(pod.tag).on_failure != "stop":
            return
        self._first_failure = _explain(pod)
        self._fail_timer = asyncio.get_running_loop().call_later(
            self.grace, self.queue.put_nowait, _FailFast()
        )

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
            E.NATS_URL: ep.endpoint.url,
            E.PROTOCOL: p.VERSION,
        }
        if ep.endpoint.user:
            env[E.NATS_USER] = ep.endpoint.user
            env[E.NATS_PASSWORD] = ep.endpoint.password or ""
        return PodPlan(
            tag=tag.tag,
            pod_id=pod_id,
            replicas=tag.replicas,
            command=tag.command,
            image=tag.image,
            env=env,
            log_path=self.records.log_path(tag.tag, pod_id),
            cwd=self.exp.base_dir,
        )

    # -- teardown -------------------------------------------------------------------------

    async def _teardown(self) -> None:
        """Stop every pod still alive, record how each ended, release everything."""
        self._tearing_down = True
        if self._fail_timer is not None:
            self._fail_timer.cancel()
        grace = 0.0 if self._forced else self.grace
        closing = asyncio.create_task(self.runtime.aclose(grace))
        while not closing.done() or not self.queue.empty():
            getter = asyncio.ensure_future(self.queue.get())
            await asyncio.wait({closing, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                continue
            item = getter.result()
            if isinstance(item, _Interrupt) and item.force and not self._forced:
                self._forced = True
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing
                closing = asyncio.create_task(self.runtime.aclose(0.0))
            elif isinstance(item, PodEvent):
                await self._settle(item)
            elif isinstance(item, _Count):
                self.records.journal("event", name=item.event, count=item.value, pod=item.pod)
        await closing
        # Events the runtime reported last, after the forwarder saw them.
        while not self.runtime.events.empty():
            await self._settle(self.runtime.events.get_nowait())
        for task in (self._forwarder, *self._stoppers):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.gather(*self._stoppers, return_exceptions=True)
        while not self.runtime.events.empty():
            await self._settle(self.runtime.events.get_nowait())
        await self.watcher.stop()
        for pod in self.pods.values():
            if pod.state == "pending":
                pod.reason = pod.reason or "never started"

    async def _settle(self, ev: PodEvent) -> None:
        pod = self.pods.get((ev.tag, ev.pod_id))
        if pod is None:
            return
        if ev.kind == "exited" and pod.state in ("launching", "running"):
            try:
                await self._pod_event(ev)
            except NatsUnavailable as exc:  # NATS gone at the very end: keep the record anyway
                if self.bus.gone is None:
                    log.warning("could not record the stop of %s: %s", ev.name, exc)
                self.bus.mark_gone(str(exc))  # the other pods' records: at once, not 20 s each
            except TricksError as exc:
                log.warning("could not record the stop of %s: %s", ev.name, exc)
        elif ev.kind == "running":
            pod.state, pod.started_at, pod.ip = "running", time.time(), ev.ip


def _explain(pod: PodSummary) -> str:
    """`server-0 failed (exit 127): <why>`, the why when the runtime knows one."""
    what = f"{pod.tag}-{pod.pod_id} failed (exit {pod.exit_code})"
    return f"{what}: {pod.reason}" if pod.reason else what
