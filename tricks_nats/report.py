"""`tricks-nats report`: a run's records as a short text summary (pods, events, workflow
moments) and, drawn by `timeline.py` and `plots.py`, its pictures: `draw_all` writes the
timeline and one figure per metric into a folder.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from tricks_nats import entries, figures, outcomes, stats
from tricks_nats.entries import EventEntry, FaultEntry, PodEntry, WorkflowEntry
from tricks_nats.errors import UsageError
from tricks_nats.records import Summary
from tricks_nats.words import plural


@dataclass(frozen=True)
class Bar:
    pod: str
    tag: str
    start: float
    stop: float
    outcome: str
    #: When the pod was started again (a restart), seconds since the run's start.
    restarts: tuple[float, ...] = ()


@dataclass(frozen=True)
class Marker:
    at: float
    label: str
    #: workflow (a condition met) or fault (a fault injected).
    kind: str = "workflow"


@dataclass(frozen=True)
class Shade:
    """A pod under a lasting fault (a pause, a network fault), from `start` to `stop`."""

    pod: str
    start: float
    stop: float
    label: str


@dataclass(frozen=True)
class EventMark:
    """One registration of a user event (not `<tag>_start` / `<tag>_stop`)."""

    at: float
    name: str
    count: int
    pod: str | None


@dataclass(frozen=True)
class Run:
    experiment: str
    verdict: str
    started_at: float
    ended_at: float
    bars: list[Bar]
    markers: list[Marker]
    summary: Summary
    events: list[EventMark] = field(default_factory=list)
    #: The pod whose failure failed the run: the first, by stop time, that failed.
    cause: str | None = None
    shades: list[Shade] = field(default_factory=list)


def load_run(run_dir: Path) -> Run:
    try:
        summary = msgspec.json.decode((run_dir / "summary.json").read_bytes(), type=Summary)
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"{run_dir}: no readable summary.json (is this a run directory?)") from exc
    t0, end = summary.started_at, summary.ended_at
    journal: list[entries.Entry] = []
    with contextlib.suppress(OSError):  # no journal: a timeline without its markers
        journal = entries.read(run_dir / "journal.jsonl")
    restarts: dict[str, list[float]] = {}
    for entry in journal:
        if isinstance(entry, PodEntry) and entry.outcome == outcomes.RESTARTED:
            restarts.setdefault(f"{entry.tag}-{entry.pod_id}", []).append(entry.ts - t0)
    bars = []
    stops: list[tuple[float, str]] = []
    for pod in summary.pods:
        start, stop = pod.started_at, pod.stopped_at or end
        bar = Bar(
            pod=f"{pod.tag}-{pod.pod_id}",
            tag=pod.tag,
            start=(start - t0) if start is not None else 0.0,
            stop=(stop - t0) if start is not None else 0.0,
            outcome=outcomes.of(pod, summary.verdict),
            restarts=tuple(restarts.get(f"{pod.tag}-{pod.pod_id}", ())),
        )
        bars.append(bar)
        if bar.outcome == outcomes.FAILED:
            stops.append((stop, bar.pod))
    markers = []
    events = []
    coordinator = {f"{p.tag}_{what}" for p in summary.pods for what in ("start", "stop")}
    for entry in journal:
        if isinstance(entry, WorkflowEntry):
            c = entry.condition
            markers.append(
                Marker(
                    at=entry.ts - t0,
                    label=f"{c.name} {c.value} -> {entry.action} {entry.tag}",
                )
            )
        elif isinstance(entry, EventEntry) and entry.name not in coordinator:
            events.append(EventMark(entry.ts - t0, entry.name, entry.count, entry.pod))
        elif isinstance(entry, FaultEntry) and entry.state == "injected":
            markers.append(Marker(entry.ts - t0, _fault_label(entry), kind="fault"))
    # recorded since outcomes were; before: the first failed pod by stop time
    cause = summary.cause or (min(stops)[1] if stops and summary.verdict == "failed" else None)
    run = Run(summary.experiment, summary.verdict, t0, end, bars, markers, summary, events, cause)
    run.shades.extend(_shades(journal, t0, end))
    return run


def _fault_label(entry: FaultEntry) -> str:
    """`fault: kill server-1`, `fault: delay client-0 ↔ server-0 +2`."""
    shown = entry.pods[0] + (f" +{len(entry.pods) - 1}" if len(entry.pods) > 1 else "")
    if entry.peers:
        shown += f" ↔ {entry.peers[0]}" + (
            f" +{len(entry.peers) - 1}" if len(entry.peers) > 1 else ""
        )
    return f"fault: {entry.action} {shown}"


def _shades(journal: list[entries.Entry], t0: float, end: float) -> list[Shade]:
    """Every pod under a pause or a network fault, from its injection to its healing."""
    open_: dict[tuple[str, int], FaultEntry] = {}
    spans: list[tuple[FaultEntry, float]] = []
    for entry in journal:
        if not isinstance(entry, FaultEntry) or entry.action in ("kill", "restart"):
            continue
        key = (entry.fault, entry.firing)
        if entry.state == "injected":
            open_[key] = entry
        elif entry.state == "healed" and key in open_:
            spans.append((open_.pop(key), entry.ts))
    spans += [(entry, end) for entry in open_.values()]
    return [
        Shade(pod, entry.ts - t0, stop - t0, entry.action)
        for entry, stop in spans
        for pod in entry.pods + (entry.peers or [])
    ]


def text_summary(run: Run) -> str:
    lines = [f"{run.experiment}: {run.verdict} in {run.ended_at - run.started_at:.2f}s"]
    if run.summary.reason:
        lines.append(f"  reason: {run.summary.reason}")
    for tag in dict.fromkeys(b.tag for b in run.bars):
        bars = [b for b in run.bars if b.tag == tag]
        ran = [b for b in bars if b.outcome != outcomes.NEVER_STARTED]
        span = (
            f"{min(b.start for b in ran):.2f}s -> {max(b.stop for b in ran):.2f}s"
            if ran
            else "never ran"
        )
        shown = outcomes.counted([b.outcome for b in bars])
        lines.append(f"  {tag}: {plural(len(bars), 'pod')} ({shown}), {span}")
    if run.cause is not None:
        bar = next(b for b in run.bars if b.pod == run.cause)
        pod = next(p for p in run.summary.pods if f"{p.tag}-{p.pod_id}" == run.cause)
        lines.append(f"  caused the failure: {run.cause} (exit {pod.exit_code}) at {bar.stop:.2f}s")
    events = run.summary.events
    if events:
        lines.append("  events: " + ", ".join(f"{k}={v}" for k, v in sorted(events.items())))
    for m in run.markers:
        lines.append(f"  at {m.at:.2f}s: {m.label}")
    return "\n".join(lines)


# -- layout ----------------------------------------------------------------------------------


def default_kind(name: str) -> str:
    """The figure `draw_all` draws for a metric: a CDF for a time (a latency), else the
    values over time."""
    return "cdf" if stats.seconds_per_unit(name) is not None else "line"


def draw_all(run_dir: Path, out_dir: Path, *, suffix: str = ".png") -> list[Path]:
    """The timeline (`timeline<suffix>`) and one figure per metric of metrics.csv
    (`<metric>-<kind><suffix>`, kind by `default_kind`, one series per tag, time zero the
    run's start) into `out_dir` (created if need be). Returns the files written."""
    from tricks_nats import plots
    from tricks_nats.metrics_csv import read
    from tricks_nats.timeline import draw

    run = load_run(run_dir)
    figures.check_format(Path("x" + suffix))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    written = [out_dir / f"timeline{suffix}"]
    draw(run, written[0])
    csv = run_dir / "metrics.csv"
    if not csv.exists():
        return written
    try:
        samples = read(csv)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{csv}: {exc}") from exc
    for name in samples.names():
        kind = default_kind(name)
        path = out_dir / f"{name}-{kind}{suffix}"
        plots.draw_metric(samples, name, kind, path, t0=run.started_at)
        written.append(path)
    return written
