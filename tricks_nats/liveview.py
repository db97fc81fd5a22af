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

from tricks_nats.entries import Entry, EventEntry, PodEntry, VerdictEntry, WorkflowEntry
from tricks_nats.spec import Experiment

STATES = ("pending", "running", "done", "failed")
LOG_LINES = 4


class LiveView:
    def __init__(
        self, exp: Experiment, console: Console | None = None, *, transient: bool = False
    ) -> None:
        self.exp = exp
        #: Cleared at the end (a campaign's runs: its progress lines stay, not every table).
        self.transient = transient
        self.console = console or Console()
        self.started = time.monotonic()
        self.experiment = ""
        self.run_dir: Path | None = None
        self.pods: dict[tuple[str, int], str] = {}
        self.counts: dict[str, int] = {}
        self.launched: set[str] = set()
        self.stopping: set[str] = set()
        self.failures: deque[str] = deque(maxlen=3)
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
        match entry:
            case PodEntry(tag=tag, pod_id=pod_id, state=state):
                self.pods[(tag, pod_id)] = {"exited": "done", "stopped": "done"}.get(state, state)
                if state == "failed":
                    self.failures.append(f"{tag}-{pod_id}")
            case EventEntry(name=name, count=count):
                self.counts[name] = count
            case WorkflowEntry(tag=tag, action=action):
                (self.launched if action == "start" else self.stopping).add(tag)
            case VerdictEntry(verdict=verdict):
                self.verdict = verdict

    def _waiting_for(self, tag: Any) -> str:
        parts = []
        if tag.start and tag.tag not in self.launched:
            have = self.counts.get(tag.start.name, 0)
            parts.append(
                f"start when {tag.start.name} {min(have, tag.start.value)}/{tag.start.value}"
            )
        if tag.stop and tag.tag not in self.stopping:
            have = self.counts.get(tag.stop.name, 0)
            parts.append(f"stop when {tag.stop.name} {min(have, tag.stop.value)}/{tag.stop.value}")
        return "; ".join(parts) or "-"

    def render(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        title = f"{self.experiment or self.exp.name}  {elapsed:6.1f}s"
        if self.verdict:
            title += f"  {self.verdict}"
        table = Table(title=title, title_justify="left", expand=False)
        table.add_column("tag")
        for state in STATES:
            table.add_column(state, justify="right")
        table.add_column("workflow")
        for tag in self.exp.tags:
            states = [self.pods.get((tag.tag, i), "pending") for i in range(tag.replicas)]
            cells = [str(states.count(s)) if states.count(s) else "" for s in STATES]
            if cells[3]:
                cells[3] = f"[red]{cells[3]}[/red]"
            table.add_row(tag.tag, *cells, self._waiting_for(tag))
        parts: list[RenderableType] = [table]
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
