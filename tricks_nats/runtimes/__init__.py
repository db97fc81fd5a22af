"""The contract between the coordinator and a runtime, and the registry of runtimes by name.

A runtime turns PodPlans into running pods and reports what happens to them as PodEvents on
its `events` queue. It never decides anything about workflows; a runtime never imports another.
Adding a runtime touches only this package: its module, and one line in `REGISTRY`.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tricks_nats.errors import UsageError
from tricks_nats.protocol import pod_name

if TYPE_CHECKING:
    from collections.abc import Iterable

    from tricks_nats.faults import Fault, FaultAction
    from tricks_nats.spec import Experiment

#: Runtimes by name: (module, class). Modules are imported when a run uses them, so heavy
#: clients (kubernetes-asyncio) load only for the runs that need them.
REGISTRY: dict[str, tuple[str, str]] = {
    "local": ("tricks_nats.runtimes.local", "LocalRuntime"),
    "kubernetes": ("tricks_nats.runtimes.kubernetes", "KubernetesRuntime"),
}


@dataclass(frozen=True)
class PodPlan:
    """Everything needed to launch one pod (one replica of a tag)."""

    tag: str
    pod_id: int
    replicas: int
    command: tuple[str, ...] | None
    image: str | None
    env: dict[str, str]
    log_path: Path
    cwd: Path = field(default=Path("."))
    #: Called with every chunk of the pod's output, in order, before it is written to the log
    #: (the coordinator's tap: the log's time index, samples from log lines). Never raises.
    on_output: Callable[[bytes], None] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return pod_name(self.tag, self.pod_id)


@dataclass(frozen=True)
class PodEvent:
    """`running` once the pod's program runs (with its IP); `exited` once it has ended.

    `log_bytes_lost`: output the pod wrote that its log could not keep (a full disk): the
    log is truncated by that much.
    """

    kind: Literal["running", "exited"]
    tag: str
    pod_id: int
    ip: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    log_bytes_lost: int = 0
    #: `exited` only: why the pod's log file may lack part of its output, if it may (a log
    #: stream broke and could not be read again); the file's last line says so too.
    log_incomplete: str | None = None
    #: `exited` only: killed or evicted by something other than tricks-nats (a signal it
    #: did not send, a node lost): what a restart policy `on: preemption` restarts.
    preempted: bool = False

    @property
    def name(self) -> str:
        return pod_name(self.tag, self.pod_id)


@dataclass(frozen=True)
class NatsRoute:
    """How NATS is reached in a run, as the runtime's pods need it."""

    #: The server the coordinator uses; None: start an embedded one on this machine.
    coordinator_url: str | None
    #: The same server as the pods reach it; None: the coordinator's address.
    pods_url: str | None = None


class Runtime(Protocol):
    """What the coordinator needs from a runtime."""

    name: str
    events: asyncio.Queue[PodEvent]

    @classmethod
    def for_experiment(cls, exp: Experiment, exp_id: str, options: Any) -> Runtime:
        """The runtime for one run; `options` is the runtime's own options object (None
        when the user gave none)."""
        ...

    def nats_route(self, nats_url: str | None) -> NatsRoute:
        """Where the coordinator and the pods reach NATS, given the user's --nats-url;
        a UsageError if this runtime cannot work with that."""
        ...

    def check(self, plans: Iterable[PodPlan]) -> list[str]:
        """Problems that would stop these pods from launching (e.g. a missing program)."""
        ...

    async def prepare(self) -> None:
        """Reach what the pods need (a cluster) before anything starts; a UsageError if it
        cannot be reached. A no-op for runtimes that need nothing."""
        ...

    async def launch(self, plan: PodPlan) -> None:
        """Create the pod; its `running`/`exited` events follow on `events`."""
        ...

    async def terminate(self, tag: str, pod_id: int, grace: float) -> None:
        """Stop one pod: polite signal, `grace` seconds, then kill. Returns once it is gone."""
        ...

    async def aclose(self, grace: float) -> None:
        """Stop every pod still alive and release everything; nothing may outlive this."""
        ...

    def fault_problems(self, faults: Iterable[Fault]) -> list[str]:
        """Why these faults cannot be injected here (no privileges, a tool or a cluster
        extension missing); checked before anything starts."""
        ...

    async def inject(self, action: FaultAction) -> None:
        """Inject one firing of a fault: `kill` signals the pods, `pause` freezes them, a
        network fault shapes the links between `pods` and `peers`; a TricksError if it
        cannot. (`restart` is the coordinator's: terminate, then launch the same plan.)"""
        ...

    async def heal(self, action: FaultAction) -> None:
        """Undo `inject` (resume paused pods, heal the links); never raises for a pod that
        is gone. Whatever is still injected at `aclose` is healed there."""
        ...


def create(name: str, exp: Experiment, exp_id: str, options: Mapping[str, Any]) -> Runtime:
    """The runtime called `name` for one run, with its options from `options[name]`."""
    if name not in REGISTRY:
        known = ", ".join(REGISTRY)
        raise UsageError(f"runtime {name!r} is not available (known: {known})")
    module, cls = REGISTRY[name]
    factory = getattr(load(module, name), cls)
    runtime: Runtime = factory.for_experiment(exp, exp_id, options.get(name))
    return runtime


#: The Python packages a runtime needs beyond the core, and the extra that installs them.
EXTRAS: dict[str, tuple[str, str]] = {"kubernetes": ("kubernetes_asyncio", "kubernetes")}


def load(module: str, runtime: str) -> Any:
    """Import one of a runtime's modules; a UsageError naming the extra to install when a
    package it needs is missing (`pip install 'tricks-nats[kubernetes]'`)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        package, extra = EXTRAS.get(runtime, ("", ""))
        if not package or (exc.name or "").split(".")[0] != package:
            raise
        raise UsageError(
            f"the {runtime} runtime needs {package.replace('_', '-')}, which is not "
            f"installed: pip install 'tricks-nats[{extra}]'"
        ) from exc


def exit_code_of(returncode: int) -> int:
    """Shell convention: killed by signal N reports 128 + N, as Kubernetes does."""
    return 128 - returncode if returncode < 0 else returncode
