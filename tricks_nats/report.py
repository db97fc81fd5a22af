"""`tricks-nats report`: a run's records as a short text summary and a timeline picture.

One bar per pod from start to stop, coloured by outcome, grouped by tag, with a marker where
each workflow condition was met. PNG through matplotlib, interactive HTML through plotly: both
in the optional extra `report`, imported only when a picture is asked for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tricks_nats import entries
from tricks_nats.entries import WorkflowEntry
from tricks_nats.errors import UsageError
from tricks_nats.records import PodSummary, Summary

COLOURS = {
    "succeeded": "#2e9e44",
    "stopped by workflow": "#3a6fd8",
    "failed": "#d8413a",
    "never started": "#9a9a9a",
}
DPI = 100
WIDTH_IN = 11.0


@dataclass(frozen=True)
class Bar:
    pod: str
    tag: str
    start: float
    stop: float
    outcome: str


@dataclass(frozen=True)
class Marker:
    at: float
    label: str


@dataclass(frozen=True)
class Run:
    experiment: str
    verdict: str
    started_at: float
    ended_at: float
    bars: list[Bar]
    markers: list[Marker]
    summary: Summary


def outcome_of(pod: PodSummary) -> str:
    if pod.started_at is None:
        return "never started"
    if pod.stopped_by_workflow:
        return "stopped by workflow"
    return "succeeded" if pod.exit_code == 0 else "failed"


def load_run(run_dir: Path) -> Run:
    try:
        summary = msgspec.json.decode((run_dir / "summary.json").read_bytes(), type=Summary)
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"{run_dir}: no readable summary.json (is this a run directory?)") from exc
    t0, end = summary.started_at, summary.ended_at
    bars = []
    for pod in summary.pods:
        start, stop = pod.started_at, pod.stopped_at or end
        bars.append(
            Bar(
                pod=f"{pod.tag}-{pod.pod_id}",
                tag=pod.tag,
                start=(start - t0) if start is not None else 0.0,
                stop=(stop - t0) if start is not None else 0.0,
                outcome=outcome_of(pod),
            )
        )
    markers = []
    journal: list[entries.Entry] = []
    with contextlib.suppress(OSError):  # no journal: a timeline without its markers
        journal = entries.read(run_dir / "journal.jsonl")
    for entry in journal:
        if isinstance(entry, WorkflowEntry):
            c = entry.condition
            markers.append(
                Marker(
                    at=entry.ts - t0,
                    label=f"{c.name} {c.value} -> {entry.action} {entry.tag}",
                )
            )
    return Run(summary.experiment, summary.verdict, t0, end, bars, markers, summary)


def text_summary(run: Run) -> str:
    lines = [f"{run.experiment}: {run.verdict} in {run.ended_at - run.started_at:.2f}s"]
    if run.summary.reason:
        lines.append(f"  reason: {run.summary.reason}")
    for tag in dict.fromkeys(b.tag for b in run.bars):
        bars = [b for b in run.bars if b.tag == tag]
        outcomes: dict[str, int] = {}
        for b in bars:
            outcomes[b.outcome] = outcomes.get(b.outcome, 0) + 1
        ran = [b for b in bars if b.outcome != "never started"]
        span = (
            f"{min(b.start for b in ran):.2f}s -> {max(b.stop for b in ran):.2f}s"
            if ran
            else "never ran"
        )
        shown = ", ".join(f"{n} {o}" for o, n in outcomes.items())
        lines.append(f"  {tag}: {len(bars)} pods ({shown}), {span}")
    events = run.summary.events
    if events:
        lines.append("  events: " + ", ".join(f"{k}={v}" for k, v in sorted(events.items())))
    for m in run.markers:
        lines.append(f"  at {m.at:.2f}s: {m.label}")
    return "\n".join(lines)


def _rows(run: Run) -> list[tuple[float, Bar]]:
    """Y positions: pods grouped by tag (in spec order), a gap between groups, top to bottom."""
    rows, y = [], 0.0
    for tag in dict.fromkeys(b.tag for b in run.bars):
        for b in (b for b in run.bars if b.tag == tag):
            rows.append((y, b))
            y -= 1
        y -= 0.6
    return rows


def figure_size(run: Run) -> tuple[float, float]:
    """Inches; at DPI this gives the PNG's exact pixel size."""
    return WIDTH_IN, 2.2 + 0.32 * len(run.bars) + 0.3 * len({b.tag for b in run.bars})


def draw(run: Run, output: Path) -> None:
    suffix = output.suffix.lower()
    if suffix == ".png":
        _png(run, output)
    elif suffix in (".html", ".htm"):
        _html(run, output)
    else:
        raise UsageError(f"-o {output}: use a .png or .html file name")


def _missing(package: str) -> UsageError:
    return UsageError(f"drawing needs {package}: pip install 'tricks-nats[report]'")


def _png(run: Run, output: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise _missing("matplotlib") from exc
    rows = _rows(run)
    fig, ax = plt.subplots(figsize=figure_size(run), dpi=DPI)
    try:
        for y, b in rows:
            width = max(b.stop - b.start, 0.002)
            ax.barh(y, width, left=b.start, height=0.7, color=COLOURS[b.outcome])
        ax.set_yticks([y for y, _ in rows], [b.pod for _, b in rows], fontsize=8)
        top = rows[0][0] + 0.8 if rows else 1
        span = max(run.ended_at - run.started_at, 0.01)
        for i, m in enumerate(run.markers):
            ax.axvline(m.at, color="#444444", linestyle="--", linewidth=1)
            right_half = m.at > span / 2
            ax.text(
                m.at,
                top + 0.45 * (i % 3),
                f" {m.label} " if right_half else f" {m.label}",
                fontsize=8,
                va="bottom",
                ha="right" if right_half else "left",
            )
        ax.set_xlim(0, span * 1.02)
        ax.set_ylim((rows[-1][0] - 1) if rows else -1, top + 1.6)
        ax.set_xlabel("seconds since the experiment started")
        ax.set_title(f"{run.experiment}: {run.verdict}", fontsize=10)
        ax.legend(
            handles=[Patch(color=c, label=o) for o, c in COLOURS.items()],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.09),
            ncol=4,
            fontsize=8,
            frameon=False,
        )
        ax.grid(axis="x", alpha=0.3)
        fig.subplots_adjust(left=0.12, right=0.98, top=0.93, bottom=0.16)
        fig.savefig(output, dpi=DPI)
    finally:
        plt.close(fig)


def _html(run: Run, output: Path) -> None:
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise _missing("plotly") from exc
    rows = _rows(run)
    fig = go.Figure()
    for outcome, colour in COLOURS.items():
        mine = [(y, b) for y, b in rows if b.outcome == outcome]
        if not mine:
            continue
        fig.add_trace(
            go.Bar(
                orientation="h",
                name=outcome,
                marker_color=colour,
                y=[b.pod for _, b in mine],
                base=[b.start for _, b in mine],
                x=[max(b.stop - b.start, 0.002) for _, b in mine],
                hovertemplate="%{y}: %{base:.3f}s + %{x:.3f}s<extra>" + outcome + "</extra>",
            )
        )
    for m in run.markers:
        fig.add_vline(
            x=m.at,
            line_dash="dash",
            line_color="#444444",
            annotation_text=m.label,
            annotation_position="top",
        )
    order = [b.pod for _, b in rows]
    fig.update_layout(
        title=f"{run.experiment}: {run.verdict}",
        barmode="overlay",
        xaxis_title="seconds since the experiment started",
        yaxis={"categoryorder": "array", "categoryarray": order[::-1]},
        height=int(figure_size(run)[1] * DPI),
        template="plotly_white",
    )
    fig.write_html(output, include_plotlyjs=True, full_html=True)
