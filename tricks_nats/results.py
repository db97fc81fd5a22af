"""A run's metrics as `report` prints them: one row per metric and tag, corrected figures where
an interval was declared, and warnings where the samples look like coordination omission."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from tricks_nats import metrics_csv
from tricks_nats.records import CorrectedStats, MetricStats, Summary
from tricks_nats.stats import (
    describe,
    describe_corrected,
    detect_omission,
    format_value,
    interval_in_unit,
    unit_of,
    warning,
)

COLUMNS = ("count", "mean", "min", "p50", "p90", "p99", "p99.9", "max")


@dataclass
class Results:
    samples: metrics_csv.Samples
    #: Expected interval (ms) by (tag, name), as declared (spec or pods).
    intervals: dict[tuple[str, str], float] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    rejected: int = 0


def load(run_dir: Path) -> Results | None:
    """The run's samples (None when it has no metrics.csv) with what its summary declares."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    results = Results(metrics_csv.read(path))
    summary: Summary | None = None
    with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
        summary = msgspec.json.decode((run_dir / "summary.json").read_bytes(), type=Summary)
    if summary is not None:
        for m in summary.metrics:
            if m.expected_interval_ms is not None:
                results.intervals[(m.tag, m.name)] = m.expected_interval_ms
        results.dropped = dict(summary.metrics_dropped)
        results.rejected = summary.metrics_rejected
    else:  # a run still going: what the spec declares
        results.intervals = _spec_intervals(run_dir)
    return results


def _spec_intervals(run_dir: Path) -> dict[tuple[str, str], float]:
    from tricks_nats.errors import SpecError
    from tricks_nats.spec import load as load_spec

    try:
        exp = load_spec(run_dir / "spec.yaml")
    except SpecError:
        return {}
    return {
        (t.tag, m.name): m.expected_interval_ms
        for t in exp.tags
        for m in t.metrics
        if m.expected_interval_ms is not None
    }


def table(results: Results) -> list[MetricStats]:
    """Per metric and tag, in order of first appearance: raw, and corrected when declared."""
    s = results.samples
    groups: dict[tuple[str, str], list[float]] = {}
    for tag, name, value in zip(s.tag, s.name, s.value, strict=True):
        groups.setdefault((name, tag), []).append(value)
    return [
        metric_stats(name, tag, values, results.intervals.get((tag, name)))
        for (name, tag), values in groups.items()
    ]


def metric_stats(
    name: str, tag: str, values: Sequence[float], interval_ms: float | None
) -> MetricStats:
    """One metric of one tag: its figures, and corrected ones when its interval is declared."""
    d = describe(values)
    fixed = None
    if interval_ms is not None:
        c = describe_corrected(values, interval_in_unit(interval_ms, name))
        fixed = CorrectedStats(
            count=c.count, mean=c.mean, p50=c.p50, p90=c.p90, p99=c.p99, p999=c.p999, max=c.max
        )
    return MetricStats(
        name=name,
        tag=tag,
        count=d.count,
        mean=d.mean,
        min=d.min,
        p50=d.p50,
        p90=d.p90,
        p99=d.p99,
        p999=d.p999,
        max=d.max,
        expected_interval_ms=interval_ms,
        corrected=fixed,
    )


def omission_warnings(results: Results) -> list[str]:
    """One line per pod and metric whose samples look like coordination omission (metrics
    with a declared interval are corrected already: not warned about)."""
    s = results.samples
    series: dict[tuple[str, int, str], tuple[list[float], list[float]]] = {}
    for ts, tag, pod_id, name, value in zip(s.ts, s.tag, s.pod_id, s.name, s.value, strict=True):
        if (tag, name) in results.intervals:
            continue
        times, values = series.setdefault((tag, pod_id, name), ([], []))
        times.append(ts)
        values.append(value)
    lines = []
    for (tag, pod_id, name), (times, values) in series.items():
        found = detect_omission(times, values, name)
        if found is not None:
            lines.append(warning(f"{tag}-{pod_id}", name, found))
    return lines


def render(results: Results) -> str:
    """The metrics table, then corrections, drops and warnings, as `report` prints them."""
    rows = table(results)
    if not rows:
        return "metrics: none recorded"
    head = ["metric", "tag", *COLUMNS]
    body = []
    for m in rows:
        unit = unit_of(m.name)
        figures = [m.mean, m.min, m.p50, m.p90, m.p99, m.p999, m.max]
        body.append([m.name, m.tag, str(m.count), *(format_value(v, unit) for v in figures)])
        if m.corrected is not None:
            c = m.corrected
            fixed = [c.mean, m.min, c.p50, c.p90, c.p99, c.p999, c.max]
            label = f"  corrected ({format_value(m.expected_interval_ms or 0, 'ms')})"
            body.append([label, m.tag, str(c.count), *(format_value(v, unit) for v in fixed)])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  " + "  ".join(left + right).rstrip()

    out = [f"metrics ({len(results.samples)} samples, metrics.csv):", line(head)]
    out += [line(r) for r in body]
    for pod, n in sorted(results.dropped.items()):
        out.append(f"  {pod} dropped {n} samples (its buffer was full or a batch was refused)")
    if results.rejected:
        out.append(f"  {results.rejected} malformed samples or batches were ignored")
    for text in omission_warnings(results):
        out.append(f"  warning: {text}")
    return "\n".join(out)
