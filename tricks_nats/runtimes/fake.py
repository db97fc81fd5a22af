"""An in-memory runtime for tests of the coordinator: pods are coroutines, not processes.

Like httpx's MockTransport, it ships with the library so users can test workflows too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable

from tricks_nats.faults import Fault, FaultAction
from tricks_nats.protocol import pod_name
from tricks_nats.runtimes import NatsRoute, PodEvent, PodPlan

#: A pod's program: gets its plan and an event set when it is asked to stop; returns exit code.
Program = Callable[[PodPlan, asyncio.Event], Awaitable[int]]


async def ignore_term(plan: PodPlan, stop: asyncio.Event) -> int:
    await asyncio.Event().wait()  # never ends by itself; only a kill stops it
    return 0


async def exit_on_term(plan: PodPlan, stop: asyncio.Event) -> int:
    await stop.wait()
    return 143


class FakeRuntime:
    name = "fake"

    def __init__(self, programs: dict[str, Program], *, refuse: Iterable[str] = ()) -> None:
        self.programs = programs
        self.refuse = set(refuse)
        self.events: asyncio.Queue[PodEvent] = asyncio.Queue()
        self.launched: list[PodPlan] = []
        self.terminated: list[str] = []
        self.injected: list[FaultAction] = []
        self.healed: list[FaultAction] = []
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stops: dict[tuple[str, int], asyncio.Event] = {}

    @classmethod
    def for_experiment(cls, exp: object, exp_id: str, options: object) -> FakeRuntime:
        """`options`: the programs by tag (a dict of Program)."""
        if not isinstance(options, dict):
            raise TypeError("the fake runtime's options are its programs by tag")
        return cls(options)

    def nats_route(self, nats_url: str | None) -> NatsRoute:
        return NatsRoute(nats_url)

    async def prepare(self) -> None:
        pass

    def check(self, plans: Iterable[PodPlan]) -> list[str]:
        return [f"no program for tag {p.tag!r}" for p in plans if p.tag not in self.programs]

    async def launch(self, plan: PodPlan) -> None:
        self.launched.append(plan)
        if plan.tag in self.refuse:
            await self.events.put(
                PodEvent(
                    "exited",
                    plan.tag,
                    plan.pod_id,
                    exit_code=127,
                    reason="refused by the fake runtime",
                )
            )
            return
        key = (plan.tag, plan.pod_id)
        stop = self._stops[key] = asyncio.Event()
        self._tasks[key] = asyncio.create_task(self._run(plan, stop), name=plan.name)

    async def _run(self, plan: PodPlan, stop: asyncio.Event) -> None:
        ip = f"10.0.{plan.pod_id // 250}.{plan.pod_id % 250 + 1}"
        await self.events.put(PodEvent("running", plan.tag, plan.pod_id, ip=ip))
        try:
            code = await self.programs[plan.tag](plan, stop)
        except asyncio.CancelledError:
            code = 137
        except Exception:
            code = 1
        await self.events.put(PodEvent("exited", plan.tag, plan.pod_id, exit_code=code))

    async def terminate(self, tag: str, pod_id: int, grace: float) -> None:
        task = self._tasks.get((tag, pod_id))
        if task is None or task.done():
            return
        self.terminated.append(pod_name(tag, pod_id))
        self._stops[(tag, pod_id)].set()
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def fault_problems(self, faults: Iterable[Fault]) -> list[str]:
        return [f"fault {f.name!r}: the fake runtime has no network" for f in faults if f.network]

    async def inject(self, action: FaultAction) -> None:
        """`kill` cancels the pods' programs (exit 137); `pause` is only recorded."""
        self.injected.append(action)
        if action.kind == "kill":
            for key in action.pods:
                task = self._tasks.get(key)
                if task is not None:
                    task.cancel()

    async def heal(self, action: FaultAction) -> None:
        self.healed.append(action)

    async def aclose(self, grace: float) -> None:
        await asyncio.gather(
            *(self.terminate(tag, pod_id, grace) for tag, pod_id in list(self._tasks))
        )
