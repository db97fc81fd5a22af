"""The contract between the coordinator and a runtime, and the registry of runtimes by name.

A runtime turns PodPlans into running pods and reports what happens to them as PodEvents on
its `events` queue. It never decides anything about workflows; a runtime never imports another.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable


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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.tag}-{self.pod_id}"


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

    @property
    def name(self) -> str:
        return f"{self.tag}-{self.pod_id}"


class Runtime(Protocol):
    """What the coordinator needs from a runtime."""

    name: str
    events: asyncio.Queue[PodEvent]

    def check(self, plans: Iterable[PodPlan]) -> list[str]:
        """Problems that would stop these pods from launching (e.g. a missing program)."""
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


def exit_code_of(returncode: int) -> int:
    """Shell convention: killed by signal N reports 128 + N, as Kubernetes does."""
    return 128 - returncode if returncode < 0 else returncode
