"""A campaign's records: `campaign.json` (the spec, every run, its state) and `results.csv`
(one row per finished run: its variables, verdict, duration and every metric's figures).

Both are rewritten whole and atomically (a temporary file, then a rename) each time a run
changes state, so a reader (pandas, `report`, a resumed `up`) never sees half a file and a
SIGKILL loses nothing but the run in progress.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import time
from pathlib import Path
from typing import Literal

import msgspec

from tricks_nats.errors import UsageError
from tricks_nats.records import MetricStats, Summary
from tricks_nats.rundir import CAMPAIGN_JSON

log = logging.getLogger(__name__)

FORMAT = 1
RESULTS_CSV = "results.csv"
#: Held (flock) by the `up` running the campaign.
LOCK = ".lock"
#: campaign.json's size, reserved on disk: enough for every run's entry once finished.
RESERVE_BYTES = 16 * 1024
RESERVE_PER_RUN = 1024

RunState = Literal["pending", "running", "succeeded", "failed", "error", "interrupted"]
#: States a run ends in for good (an interrupted run is run again on resume).
FINAL = ("succeeded", "failed", "error")
#: The figures results.csv gives for each metric.
STATS = ("count", "mean", "p50", "p90", "p99")
HEAD = ("run", "config", "repetition")
TAIL = ("verdict", "duration_s", "experiment")


def state_of(verdict: str) -> RunState:
    """A run's state from its verdict (a timed-out run failed)."""
    states: dict[str, RunState] = {
        "succeeded": "succeeded",
        "interrupted": "interrupted",
        "error": "error",
    }
    return states.get(verdict, "failed")


class RunEntry(msgspec.Struct):
    index: int
    config: int
    repetition: int
    variables: dict[str, str | int | float | bool]
    state: RunState = "pending"
    verdict: str | None = None
    reason: str | None = None
    experiment: str | None = None
    #: Relative to the campaign's directory.
    run_dir: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    duration_s: float | None = None
    #: Run directories of earlier attempts (interrupted, or failed and retried).
    previous: list[str] = []


class CampaignFile(msgspec.Struct):
    campaign: str
    name: str
    spec_path: str
    spec_sha256: str
    spec: str
    variables: list[str]
    configurations: int
    repeat: int
    started_at: float
    runs: list[RunEntry]
    updated_at: float = 0.0
    state: Literal["running", "finished", "interrupted"] = "running"
    format: int = FORMAT

    def todo(self, *, retry_failed: bool = False) -> list[RunEntry]:
        """The runs still to do: no verdict yet (and, with retry_failed, a failed one)."""
        again = ("failed", "error") if retry_failed else ()
        return [r for r in self.runs if r.state not in FINAL or r.state in again]

    @property
    def exit_code(self) -> int:
        return 0 if all(r.state == "succeeded" for r in self.runs) else 1


def path_of(campaign_dir: Path) -> Path:
    return campaign_dir / CAMPAIGN_JSON


def read(campaign_dir: Path) -> CampaignFile:
    path = path_of(campaign_dir)
    try:
        return msgspec.json.decode(path.read_bytes(), type=CampaignFile)
    except FileNotFoundError:
        raise UsageError(f"{campaign_dir}: not a campaign (no {CAMPAIGN_JSON})") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except msgspec.DecodeError as exc:
        raise UsageError(f"{path}: not a campaign file tricks-nats can read: {exc}") from exc


def write(campaign_dir: Path, campaign: CampaignFile) -> None:
    """Atomically; on a full disk, in the room reserved when the campaign began (the file is
    padded with blanks to a size that holds every run's verdict)."""
    campaign.updated_at = round(time.time(), 3)
    data = msgspec.json.format(msgspec.json.encode(campaign)) + b"\n"
    reserved = RESERVE_BYTES + RESERVE_PER_RUN * len(campaign.runs)
    data += b" " * (reserved - len(data))
    path = path_of(campaign_dir)
    try:
        _replace(path, data)
    except OSError as exc:
        try:
            with path.open("r+b") as f:
                f.write(data)
                f.truncate()
        except OSError:
            raise exc from None


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --- results.csv -------------------------------------------------------------------------------


class Results:
    """results.csv, kept in step with the campaign: each finished run's summary is read once."""

    def __init__(self, campaign_dir: Path) -> None:
        self.dir = campaign_dir
        self._figures: dict[str, dict[str, MetricStats]] = {}  # run_dir -> name -> figures

    def write(self, campaign: CampaignFile) -> None:
        rows = [r for r in campaign.runs if r.state in FINAL]
        figures = {r.index: self._of(r) for r in rows}
        names = sorted({n for f in figures.values() for n in f})
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow([*HEAD, *campaign.variables, *TAIL, *(f"{n}_{s}" for n in names for s in STATS)])
        for r in rows:
            cells: list[object] = [r.index, r.config, r.repetition]
            cells += [_cell(r.variables.get(v)) for v in campaign.variables]
            cells += [r.verdict or r.state, _round(r.duration_s), r.experiment or ""]
            for n in names:
                m = figures[r.index].get(n)
                cells += [_round(getattr(m, s)) if m else "" for s in STATS]
            w.writerow(cells)
        try:
            _replace(self.dir / RESULTS_CSV, out.getvalue().encode())
        except OSError as exc:  # a full disk: campaign.json still has every verdict
            log.warning("cannot write %s: %s", self.dir / RESULTS_CSV, exc)

    def _of(self, run: RunEntry) -> dict[str, MetricStats]:
        if run.run_dir is None:
            return {}
        if run.run_dir not in self._figures:
            self._figures[run.run_dir] = _metrics(self.dir / run.run_dir)
        return self._figures[run.run_dir]


def _metrics(run_dir: Path) -> dict[str, MetricStats]:
    """Each metric's figures over the run: from the summary when one tag recorded it, else
    computed again from metrics.csv over every tag."""
    try:
        summary = msgspec.json.decode((run_dir / "summary.json").read_bytes(), type=Summary)
    except (OSError, msgspec.DecodeError):
        return {}
    by_name: dict[str, list[MetricStats]] = {}
    for m in summary.metrics:
        by_name.setdefault(m.name, []).append(m)
    out = {name: ms[0] for name, ms in by_name.items() if len(ms) == 1}
    shared = [name for name, ms in by_name.items() if len(ms) > 1]
    if shared:
        out.update(_from_samples(run_dir, shared))
    return out


def _from_samples(run_dir: Path, names: list[str]) -> dict[str, MetricStats]:
    from tricks_nats import metrics_csv, stats

    try:
        samples = metrics_csv.read(run_dir / "metrics.csv")
    except (OSError, ValueError):
        return {}
    out = {}
    for name in names:
        values = [v for n, v in zip(samples.name, samples.value, strict=True) if n == name]
        if values:
            d = stats.describe(values)
            out[name] = MetricStats(
                name, "*", d.count, d.mean, d.min, d.p50, d.p90, d.p99, d.p999, d.max
            )
    return out


def _cell(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def _round(value: float | int | None) -> object:
    if value is None:
        return ""
    return value if isinstance(value, int) else round(value, 6)
