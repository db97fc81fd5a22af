"""The live view of `up` on a terminal: per tag, pods by state and what each tag waits for.

Fed by journal entries (the same stream the records keep); drawn by rich a few times a second.
Only used when stdout is a terminal: pipes and CI get plain lines instead.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tricks_nats import outcomes
from tricks_nats.entries import (
    Entry,
    EventEntry,
    FaultEntry,
    PodEntry,
    VerdictEntry,
    WorkflowEntry,
)
from tricks_nats.render import fault_line
from tricks_nats.spec import Condition, Experiment

DONE = {"start": "started", "stop": "stopped"}
LOG_LINES = 4


class LiveView:
    def __init__(
        self, exp: Experiment, console: Console | None = None, *, transient: bool = False
    ) -> None:
        self.exp = exp
        #: Cleared at the end (a campaign's runs: its progress lines stay, not every table).
        self.transient = transient
        self.console = console or Console()
        #: The run's clock starts at its first journal entry and ends at its verdict.
        self.t0: float | None = None
        self.took: str | None = None
        self.experiment = ""
        self.run_dir: Path | None = None
        #: Per pod: pending, running, or how it ended.
        self.pods: dict[tuple[str, int], str] = {}
        self.counts: dict[str, int] = {}
        #: Per tag and action (start, stop): the count that triggered it.
        self.done: dict[tuple[str, str], int] = {}
        self.failures: deque[str] = deque(maxlen=3)
        #: The last faults injected or healed, as `watch` prints them.
        self.faults: deque[str] = deque(maxlen=3)
        self.verdict: str | None = None
        self._live: Live | None = None

    def __enter__(self) -> LiveView:
        self._live = Live(
            get_renderable=self.render,
            console=self.console,
            refresh_per_second=4,
            transient=self.transient,
        )
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)

    def on_start(self, experiment: str, run_dir: Path) -> None:
        self.experiment, self.run_dir = experiment, run_dir

    def on_journal(self, entry: Entry) -> None:
        if self.t0 is None:
            self.t0 = entry.ts
        match entry:
            case PodEntry(tag=tag, pod_id=pod_id, state=state, outcome=outcome):
                ended = outcome or {"exited": outcomes.SUCCEEDED}.get(state, state)
                self.pods[(tag, pod_id)] = ended
                if ended == outcomes.FAILED:
                    self.failures.append(f"{tag}-{pod_id}")
            case EventEntry(name=name, count=count):
                self.counts[name] = max(count, self.counts.get(name, 0))
            case WorkflowEntry(tag=tag, action=action, condition=c):
                self.done[(tag, action)] = c.value
            case FaultEntry():
                self.faults.append(fault_line(entry, colour=False))
            case VerdictEntry(verdict=verdict):
                self.verdict = verdict

    def on_end(self, took: str) -> None:
        """The run is over: its clock stops at `took` (the verdict line's duration)."""
        self.took = took

    def _workflow(self, tag: Any) -> str:
        parts = []
        for action, cond in (("start", tag.start), ("stop", tag.stop)):
            if cond is not None:
                parts.append(self._condition(tag.tag, action, cond))
        return "; ".join(parts) or "-"

    def _condition(self, tag: str, action: str, cond: Condition) -> str:
        have = min(self.counts.get(cond.name, 0), cond.value)
        if (tag, action) in self.done:
            return f"{DONE[action]} at {cond.name} {cond.value}"
        return f"{action} when {cond.name} {have}/{cond.value}"

    def _clock(self) -> str:
        if self.took is not None:
            return self.took
        if self.t0 is None:
            return "starting"
        return f"{time.time() - self.t0:.1f}s"

    def render(self) -> RenderableType:
        title = f"{self.experiment or self.exp.name}  {self._clock()}"
        if self.verdict:
            title += f"  {self.verdict}"
        table = Table(title=title, title_justify="left", expand=False)
        table.add_column("tag")
        table.add_column("pending", justify="right")
        table.add_column("running", justify="right")
        table.add_column("ended")
        table.add_column("workflow")
        for tag in self.exp.tags:
            states = [self.pods.get((tag.tag, i), "pending") for i in range(tag.replicas)]
            ended = [s for s in states if s not in ("pending", "running")]
            counted = outcomes.counted(ended)
            if outcomes.FAILED in ended:
                counted = counted.replace(outcomes.FAILED, f"[red]{outcomes.FAILED}[/red]")
            table.add_row(
                tag.tag,
                str(states.count("pending") or ""),
                str(states.count("running") or ""),
                counted,
                self._workflow(tag),
            )
        parts: list[RenderableType] = [table]
        user = [f"{n}={c}" for n, c in self.counts.items() if n not in self.exp.lifecycle]
        if user:
            parts.append(Text("events: " + ", ".join(user[:12]), style="cyan"))
        for line in self.faults:
            parts.append(Text(line, style="magenta"))
        for pod in list(self.failures):
            parts.append(Text(f"{pod} failed; last lines of its log:", style="red"))
            parts.append(Text(self._tail(pod), style="dim"))
        return Group(*parts)

    def _tail(self, pod: str) -> str:
        if self.run_dir is None:
            return ""
        try:
            lines = (self.run_dir / "logs" / f"{pod}.log").read_text(errors="replace")
        except OSError:
            return "  (no log)"
        tail = lines.splitlines()[-LOG_LINES:]
        return "\n".join(f"  {line}" for line in tail) or "  (empty log)"
