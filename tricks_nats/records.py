"""Run records: `runs/<experiment-id>/` with spec.yaml, journal.jsonl, logs/ and summary.json.

The journal is one JSON object per line, the schema `watch --json` streams too: its entries,
their fields and their encoding are `tricks_nats.entries`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from tricks_nats.entries import Entry, EntryT, encode
from tricks_nats.protocol import pod_name
from tricks_nats.provenance import Provenance

log = logging.getLogger(__name__)


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
    #: Bytes of output that could not be written to its log (a full disk): the log is cut.
    log_bytes_lost: int = 0
    #: Why its log may be incomplete (a broken log stream on Kubernetes), if it may be.
    log_incomplete: str | None = None
    #: How it ended, in the words of `outcomes` (succeeded, stopped by workflow, ...).
    outcome: str | None = None
    #: Times it was started again (a `restart` fault, or its tag's restart policy).
    restarts: int = 0
    #: The faults that hit it, by name, in order.
    faults: list[str] | None = None


class CorrectedStats(msgspec.Struct):
    """Percentiles with the samples a stalled closed-loop client did not send added back
    (HdrHistogram's correction for coordination omission)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float


class MetricStats(msgspec.Struct, omit_defaults=True):
    """One metric of one tag, over the whole run."""

    name: str
    tag: str
    count: int
    mean: float
    min: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    #: Declared in the spec or by the pods; then `corrected` holds the corrected figures.
    expected_interval_ms: float | None = None
    corrected: CorrectedStats | None = None


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
    #: Journal lines that could not be written (a full disk).
    journal_lost: int = 0
    #: Every metric's figures (metrics.csv holds the samples).
    metrics: list[MetricStats] = []
    #: Samples each pod dropped (a full buffer, a refused batch), by pod; none: empty.
    metrics_dropped: dict[str, int] = {}
    #: Samples or batches the coordinator refused as malformed.
    metrics_rejected: int = 0
    #: Samples metrics.csv could not take (a full disk): counted in `metrics`, not in the file.
    metrics_lost: int = 0
    #: The configuration's variables (no `$`), for a run of a campaign.
    variables: dict[str, str | int | float | bool] = {}
    #: Versions, platform and the spec's commit: what it takes to run it again.
    provenance: Provenance | None = None
    #: The pod whose failure failed the run (`tag-id`), if one did.
    cause: str | None = None
    #: Firings of each fault that were injected, by fault name (the journal has each one).
    faults: dict[str, int] = {}
    #: The seed of the faults' random choices of pods (run again with `seed:` to replay).
    fault_seed: int | None = None


class RunRecords:
    """Writes one run's records; every journal line is flushed as it happens.

    Nothing here may stop a run: a listener that fails (a closed pipe) is dropped, a journal
    line that cannot be written (a full disk) is counted, and room for `summary.json` is
    reserved when the run starts, so the verdict is written even on a disk that filled up.
    """

    def __init__(self, root: Path, experiment: str) -> None:
        self.root = root
        self.experiment = experiment
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._journal = (root / "journal.jsonl").open("ab")
        #: Called with every entry written (stamped), in order; one that raises is dropped.
        self.listeners: list[Callable[[Entry], None]] = []
        #: Journal lines that could not be written.
        self.journal_lost = 0

    @classmethod
    def create(cls, runs_dir: Path, experiment: str, spec_text: str, pods: int = 0) -> RunRecords:
        root = runs_dir / experiment
        root.mkdir(parents=True, exist_ok=False)
        (root / "spec.yaml").write_text(spec_text)
        records = cls(root, experiment)
        try:  # a disk too full for the verdict: refuse the run (its pods never start)
            records.reserve_summary(pods)
        except OSError:
            records.close()
            raise
        return records

    def log_path(self, tag: str, pod_id: int) -> Path:
        return self.logs / f"{pod_name(tag, pod_id)}.log"

    def write(self, entry: EntryT) -> EntryT:
        """Stamp the entry (`ts` now, `experiment`), append it to the journal, tell the
        listeners; return it stamped."""
        entry = msgspec.structs.replace(entry, ts=round(time.time(), 6), experiment=self.experiment)
        try:
            self._journal.write(encode(entry) + b"\n")
            self._journal.flush()
        except (OSError, ValueError) as exc:
            self.journal_lost += 1
            if self.journal_lost == 1:
                log.warning("cannot write the journal (%s): lines are lost from now on", exc)
        for listener in list(self.listeners):
            try:
                listener(entry)
            except Exception as exc:  # a closed pipe (`up | head`): stop telling that one
                log.debug("dropping a journal listener: %r", exc)
                with contextlib.suppress(ValueError):
                    self.listeners.remove(listener)
        return entry

    def reserve_summary(self, pods: int) -> None:
        """Claim the disk space of the final summary now (rewritten in place if need be);
        OSError if the disk cannot give it."""
        with (self.root / "summary.json").open("wb") as f:
            f.write(b" " * (4096 + 1024 * pods))

    def write_summary(self, summary: Summary) -> Path | None:
        """Atomically when the disk allows it, else in the space reserved at the start; None
        (and a log line) if neither could be done."""
        path = self.root / "summary.json"
        data = msgspec.json.format(msgspec.json.encode(summary), indent=2) + b"\n"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return path
        except OSError as exc:
            first = exc
            with contextlib.suppress(OSError):
                tmp.unlink()
        try:
            with path.open("r+b") as f:
                f.write(data)
                f.truncate()
            return path
        except OSError as exc:
            log.error("cannot write %s: %s (and %s)", path, first, exc)
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._journal.close()
