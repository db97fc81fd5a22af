"""Run records: `runs/<experiment-id>/` with spec.yaml, journal.jsonl, logs/ and summary.json.

The journal is one JSON object per line, the schema `watch --json` streams too:
`ts` (Unix seconds), `experiment`, `kind` (pod | event | workflow | verdict) and per kind:
pod: tag, pod_id, state, exit_code?; event: name, count, pod?; workflow: tag, action, condition;
verdict: verdict, reason?.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec


class PodSummary(msgspec.Struct):
    tag: str
    pod_id: int
    started_at: float | None = None
    stopped_at: float | None = None
    exit_code: int | None = None
    stopped_by_workflow: bool = False
    state: str = "pending"
    ip: str | None = None
    reason: str | None = None
    #: For a failed pod: the end of its log, so the summary alone explains the failure.
    last_log_lines: list[str] | None = None


class Summary(msgspec.Struct):
    experiment: str
    name: str
    verdict: str
    started_at: float
    ended_at: float
    pods: list[PodSummary]
    events: dict[str, int]
    reason: str | None = None
    runtime: str = "local"


class RunRecords:
    """Writes one run's records; every journal line is flushed as it happens."""

    def __init__(self, root: Path, experiment: str) -> None:
        self.root = root
        self.experiment = experiment
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._journal = (root / "journal.jsonl").open("ab")
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    @classmethod
    def create(cls, runs_dir: Path, experiment: str, spec_text: str) -> RunRecords:
        root = runs_dir / experiment
        root.mkdir(parents=True, exist_ok=False)
        (root / "spec.yaml").write_text(spec_text)
        return cls(root, experiment)

    def log_path(self, tag: str, pod_id: int) -> Path:
        return self.logs / f"{tag}-{pod_id}.log"

    def journal(self, kind: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": round(time.time(), 6), "experiment": self.experiment, "kind": kind}
        entry.update({k: v for k, v in fields.items() if v is not None})
        self._journal.write(msgspec.json.encode(entry) + b"\n")
        self._journal.flush()
        for listener in self.listeners:
            listener(entry)
        return entry

    def write_summary(self, summary: Summary) -> Path:
        path = self.root / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(summary), indent=2) + b"\n")
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self._journal.close()
