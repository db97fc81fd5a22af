"""A run's timeline: one bar per pod from start to stop, coloured by outcome (Okabe-Ito colours,
hatched when the tool stopped the pod as the run ended), grouped by tag; the pod whose failure
failed the run is outlined and marked; a dashed line where each workflow condition was met;
faults are marked by a dotted line where each was injected, a pod under a pause or a network
fault is shaded while it lasts, and a white cut shows where a pod was started again;
under the bars, one row of ticks per user event (each registration). PNG, SVG and PDF through
matplotlib, interactive HTML through plotly: both in the optional extra `report`, imported only
when a picture is asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tricks_nats import figures, outcomes
from tricks_nats.report import Bar, Run

#: Outcome -> colour (Okabe-Ito; grey for pods that never ran), in legend order.
COLOURS = {
    outcomes.SUCCEEDED: "#009E73",
    outcomes.BY_WORKFLOW: "#0072B2",
    outcomes.BY_FAULT: "#F0E442",
    outcomes.AFTER_FAILURE: "#56B4E9",
    outcomes.AT_TIMEOUT: "#E69F00",
    outcomes.INTERRUPTED: "#CC79A7",
    outcomes.AFTER_ERROR: "#000000",
    outcomes.FAILED: "#D55E00",
    outcomes.NEVER_STARTED: "#BBBBBB",
}
#: Outcomes drawn hatched as well (told apart without colour too): the pods tricks-nats
#: stopped as the run ended, each reason its own pattern (matplotlib's, plotly's).
HATCHES = {
    outcomes.BY_FAULT: "---",
    outcomes.AFTER_FAILURE: "////",
    outcomes.AT_TIMEOUT: "\\\\\\\\",
    outcomes.INTERRUPTED: "xxx",
    outcomes.AFTER_ERROR: "...",
    outcomes.NEVER_STARTED: "....",
}
PATTERNS = {
    outcomes.BY_FAULT: "-",
    outcomes.AFTER_FAILURE: "/",
    outcomes.AT_TIMEOUT: "\\",
    outcomes.INTERRUPTED: "x",
    outcomes.AFTER_ERROR: ".",
}
CAUSE_LABEL = "✗ caused the failure"
#: PNG pixels per inch; `figure_size(run)` times DPI is the PNG's size.
DPI = 200
WIDTH_IN = figures.TWO_COLUMNS_IN
#: Height of one pod's row and one event's row (inches); above MAX_POD_LABELS pods the rows
#: are thinner and only tags are labelled.
ROW_IN = 0.2
MAX_BARS_IN = 8.0
MAX_POD_LABELS = 40
#: At most this many user events get a row (the first registered); the rest are counted.
MAX_EVENT_ROWS = 12


def _rows(run: Run) -> list[tuple[float, Bar]]:
    """Y positions: pods grouped by tag (in spec order), a gap between groups, top to bottom."""
    gap = 0.6 if len(run.bars) <= MAX_POD_LABELS else max(0.6, 0.02 * len(run.bars))
    rows, y = [], 0.0
    for tag in dict.fromkeys(b.tag for b in run.bars):
        for b in (b for b in run.bars if b.tag == tag):
            rows.append((y, b))
            y -= 1
        y -= gap
    return rows


def _event_names(run: Run) -> list[str]:
    return list(dict.fromkeys(e.name for e in run.events))[:MAX_EVENT_ROWS]


def _span(run: Run) -> float:
    """Seconds the x axis covers (before its 2% margin): the run, and any pod past its end."""
    return max(run.ended_at - run.started_at, 0.01, *(b.stop for b in run.bars))


def _text_in(text: str) -> float:
    """Rough width of a line of FONT_PT text, in inches (DejaVu Sans: ~0.6 em a character)."""
    return len(text) * figures.FONT_PT * 0.6 / 72


def _label_rows(run: Run) -> list[int]:
    """A row (0 = nearest the bars) for each workflow marker's label, so that no two labels of
    a row overlap: a label starts at its line (ends there, in the right half)."""
    plot_in = WIDTH_IN - 1.6  # about the axes' width
    span = _span(run) * 1.02
    taken: list[list[tuple[float, float]]] = []
    rows = []
    for m in run.markers:
        width = (_text_in(m.label) + 0.1) / plot_in * span
        lo, hi = (m.at - width, m.at) if m.at > span / 2 else (m.at, m.at + width)
        for r, spans in enumerate(taken):
            if all(hi < a or lo > b for a, b in spans):
                spans.append((lo, hi))
                rows.append(r)
                break
        else:
            taken.append([(lo, hi)])
            rows.append(len(taken) - 1)
    return rows


def _heights(run: Run) -> tuple[float, float, float]:
    """(bars, event strip, everything else) in inches."""
    rows = _rows(run)
    extent = (-rows[-1][0] + 1) if rows else 1
    bars_in = min(ROW_IN * extent, MAX_BARS_IN) + 0.15
    label_rows = max(_label_rows(run), default=-1) + 1
    bars_in += 0.19 * label_rows
    names = _event_names(run)
    events_in = ROW_IN * len(names) + 0.15 if names else 0.0
    other_in = 0.55 + 0.3 + 0.3  # x axis and its label, legend, title
    return bars_in, events_in, other_in


def figure_size(run: Run) -> tuple[float, float]:
    """Inches; at DPI this gives the PNG's exact pixel size (the height is a multiple of 1/8
    inch: exact in binary, so no pixel is lost to rounding)."""
    return WIDTH_IN, math.ceil(sum(_heights(run)) * 8) / 8


# -- drawing ---------------------------------------------------------------------------------


def draw(run: Run, output: Path, *, title: str | None = None) -> None:
    """The timeline as .png, .svg, .pdf or .html. The title (default "<experiment>:
    <verdict>") is drawn in PNG and HTML; in SVG and PDF, made for papers whose captions are
    outside the figure, only when given. Every format names the experiment and its pods in
    its metadata."""
    suffix = figures.check_format(output)
    if suffix in figures.HTML_FORMATS:
        _html(run, output, title)
    else:
        _matplotlib(run, output, title, show_title=title is not None or suffix == ".png")


def _title(run: Run, title: str | None) -> str:
    return title or f"{run.experiment}: {run.verdict}"


def _matplotlib(run: Run, output: Path, title: str | None, *, show_title: bool) -> None:
    with figures.pyplot() as plt:
        from matplotlib.collections import PolyCollection
        from matplotlib.patches import Patch

        rows = _rows(run)
        names = _event_names(run)
        bars_in, events_in, _ = _heights(run)
        size = figure_size(run)
        if names:
            fig, (ax, ev) = plt.subplots(
                2,
                1,
                figsize=size,
                sharex=True,
                layout="constrained",
                gridspec_kw={"height_ratios": [bars_in, events_in]},
            )
        else:
            fig, ax = plt.subplots(figsize=size, layout="constrained")
            ev = None
        span = _span(run)
        present = [
            o
            for o in COLOURS
            if o != outcomes.NEVER_STARTED and any(b.outcome == o for b in run.bars)
        ]
        many = len(run.bars) > MAX_POD_LABELS
        height = 0.7 if not many else 0.9
        for outcome in present:
            boxes = []
            for y, b in rows:
                if b.outcome != outcome:
                    continue
                x0, x1 = b.start, b.start + max(b.stop - b.start, span * 0.002)
                boxes.append(
                    [
                        (x0, y - height / 2),
                        (x1, y - height / 2),
                        (x1, y + height / 2),
                        (x0, y + height / 2),
                    ]
                )
            ax.add_collection(
                PolyCollection(
                    boxes,
                    facecolors=COLOURS[outcome],
                    edgecolors="white" if outcome in HATCHES else "none",
                    linewidths=0.0,
                    hatch=HATCHES.get(outcome),
                )
            )
        handles: list[Any] = [
            Patch(
                facecolor=COLOURS[o],
                hatch=HATCHES.get(o),
                edgecolor="white" if o in HATCHES else "none",
                label=o,
            )
            for o in present
        ]
        for y, b in rows:
            if b.outcome == outcomes.NEVER_STARTED and not many:
                ax.text(0, y, " never started", va="center", color="#666666", style="italic")
        handles += _mark_faults(ax, rows, run, height)
        if run.cause is not None:
            _mark_cause(ax, rows, run.cause, span, height)
            handles.append(
                Patch(
                    facecolor=COLOURS[outcomes.FAILED],
                    edgecolor="black",
                    linewidth=1.4,
                    label="caused the failure",
                )
            )
        if many:
            centres: dict[str, list[float]] = {}
            for y, b in rows:
                centres.setdefault(b.tag, []).append(y)
            ax.set_yticks(
                [sum(ys) / len(ys) for ys in centres.values()],
                [f"{tag} ({len(ys)})" for tag, ys in centres.items()],
            )
        else:
            ax.set_yticks([y for y, _ in rows], [b.pod for _, b in rows])
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="y", visible=False)
        ax.spines["left"].set_visible(False)
        bottom = (rows[-1][0] - 0.7) if rows else -1.0
        top = 0.7
        label_rows = _label_rows(run)
        n_label_rows = max(label_rows, default=-1) + 1
        pitch = (top - bottom) / max(bars_in - 0.15 - 0.19 * n_label_rows, 0.2) * 0.19
        for m, r in zip(run.markers, label_rows, strict=True):
            style = (0, (1, 1.5)) if m.kind == "fault" else (0, (4, 2))
            for axis in (ax, ev):
                if axis is not None:
                    axis.axvline(m.at, color="#222222", linestyle=style, linewidth=0.9)
            right_half = m.at > span * 1.02 / 2
            label = m.label.replace("->", "→")
            ax.text(
                m.at,
                top + 0.15 + pitch * r,
                label + " " if right_half else " " + label,
                va="bottom",
                ha="right" if right_half else "left",
                color="#333333",
                bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none"},
            )
        ax.set_ylim(bottom, top + 0.15 + pitch * n_label_rows + (0.05 if n_label_rows else 0))
        ax.set_xlim(0, span * 1.02)
        axis_x = ev if ev is not None else ax
        axis_x.set_xlabel("time since start (s)")
        if ev is not None:
            _event_strip(ev, run, names)
            ax.tick_params(axis="x", labelbottom=False)
        if show_title:
            fig.suptitle(_title(run, title))
        figures.fit_legend(
            fig,
            ax,
            handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0 + 0.02 * 2.5 / max(bars_in, 0.5)),
            handlelength=1.4,
        )
        figures.save(
            fig,
            output,
            title=_title(run, title),
            series=[b.pod for b in run.bars] + names,
            dpi=DPI,
        )


def _mark_faults(ax: Any, rows: list[tuple[float, Bar]], run: Run, h: float) -> list[Any]:
    """Shade the pods under a lasting fault, cut the bars where a pod started again; the
    legend's entries for what was drawn."""
    from matplotlib import patheffects
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    handles: list[Any] = []
    where = {b.pod: y for y, b in rows}
    for shade in run.shades:
        y = where.get(shade.pod)
        if y is None:
            continue
        ax.add_patch(
            Rectangle(
                (shade.start, y - h / 2 - 0.1),
                max(shade.stop - shade.start, 0.0),
                h + 0.2,
                facecolor="#00000022",
                edgecolor="#000000",
                hatch="xxx",
                linewidth=0.6,
                zorder=2.5,
            )
        )
    if run.shades:
        handles.append(
            Patch(facecolor="#00000022", edgecolor="#000000", hatch="xxx", label="under a fault")
        )
    cuts = [(t, y) for y, b in rows for t in b.restarts]
    if cuts:
        ax.vlines(
            [t for t, _ in cuts],
            [y - h / 2 for _, y in cuts],
            [y + h / 2 for _, y in cuts],
            color="white",
            linewidth=2.0,
            zorder=2.6,
        )
        cut = [patheffects.withStroke(linewidth=4.0, foreground="#444444")]
        handles.append(
            Line2D([], [], color="white", linewidth=2.0, path_effects=cut, label="started again")
        )
    if any(m.kind == "fault" for m in run.markers):
        handles.append(
            Line2D([], [], color="#222222", linestyle=(0, (1, 1.5)), label="fault injected")
        )
    return handles


def _mark_cause(ax: Any, rows: list[tuple[float, Bar]], cause: str, span: float, h: float) -> None:
    """A bold outline around the failing pod's bar and a label beside it (after its end, or
    before its start when there is no room after it)."""
    from matplotlib.patches import Rectangle

    y, bar = next((y, b) for y, b in rows if b.pod == cause)
    width = max(bar.stop - bar.start, span * 0.002)
    ax.add_patch(
        Rectangle(
            (bar.start, y - h / 2),
            width,
            h,
            fill=False,
            edgecolor="black",
            linewidth=1.4,
            zorder=3,
        )
    )
    room = (_text_in(CAUSE_LABEL) + 0.1) / (WIDTH_IN - 1.6) * span * 1.02
    if span * 1.02 - bar.stop > room:
        x, ha, dx = bar.stop, "left", 4
    elif bar.start > room:
        x, ha, dx = bar.start, "right", -4
    else:
        x, ha, dx = bar.start, "left", 4
    ax.annotate(
        CAUSE_LABEL,
        (x, y),
        xytext=(dx, 0),
        textcoords="offset points",
        va="center",
        ha=ha,
        color="black",
        zorder=4,
        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"},
    )


def _event_strip(ev: Any, run: Run, names: list[str]) -> None:
    """One row per user event: a tick at each registration, the row named by the event and
    its final count."""
    final: dict[str, int] = {}
    for e in run.events:
        final[e.name] = max(final.get(e.name, 0), e.count)
    for i, name in enumerate(names):
        times = [e.at for e in run.events if e.name == name]
        ev.vlines(times, -i - 0.35, -i + 0.35, color="#222222", linewidth=0.7)
    labels = [f"{n} ({final[n]})" for n in names]
    ev.set_yticks([-i for i in range(len(names))], labels)
    ev.set_ylim(-len(names) + 0.4, 0.6)
    ev.tick_params(axis="y", length=0)
    ev.grid(axis="y", visible=False)
    ev.spines["left"].set_visible(False)
    hidden = len(dict.fromkeys(e.name for e in run.events)) - len(names)
    if hidden > 0:
        ev.text(1.0, 0.0, f"+{hidden} more events", transform=ev.transAxes, ha="right", va="bottom")


def _html(run: Run, output: Path, title: str | None) -> None:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as exc:
        raise figures.missing("plotly") from exc
    rows = _rows(run)
    names = _event_names(run)
    bars_in, events_in, _ = _heights(run)
    if names:
        fig = make_subplots(
            rows=2,
            cols=1,
            shared_xaxes=True,
            vertical_spacing=0.03,
            row_heights=[bars_in, events_in],
        )
    else:
        fig = make_subplots(rows=1, cols=1)
    for outcome, colour in COLOURS.items():
        mine = [(y, b) for y, b in rows if b.outcome == outcome]
        if not mine:
            continue
        if outcome == outcomes.NEVER_STARTED:
            fig.add_trace(
                go.Scatter(
                    name=outcome,
                    x=[0.0] * len(mine),
                    y=[b.pod for _, b in mine],
                    mode="text",
                    text=["  never started"] * len(mine),
                    textposition="middle right",
                    textfont={"color": "#666666"},
                    hoverinfo="skip",
                    showlegend=False,
                ),
                row=1,
                col=1,
            )
            continue
        shape = PATTERNS.get(outcome)
        pattern = {"shape": shape, "fgcolor": "white"} if shape else None
        fig.add_trace(
            go.Bar(
                orientation="h",
                name=outcome,
                marker={"color": colour, "pattern": pattern, "line": {"width": 0}},
                y=[b.pod for _, b in mine],
                base=[b.start for _, b in mine],
                x=[max(b.stop - b.start, 0.002) for _, b in mine],
                hovertemplate="%{y}: %{base:.3f}s + %{x:.3f}s<extra>" + outcome + "</extra>",
            ),
            row=1,
            col=1,
        )
    if run.cause is not None:
        bar = next(b for b in run.bars if b.pod == run.cause)
        fig.add_trace(
            go.Scatter(
                name="caused the failure",
                x=[bar.stop],
                y=[bar.pod],
                mode="markers+text",
                marker={"symbol": "x-thin", "size": 12, "line": {"width": 3, "color": "black"}},
                text=[" caused the failure"],
                textposition="middle right",
                hovertemplate=f"{bar.pod} failed first at %{{x:.3f}}s<extra></extra>",
            ),
            row=1,
            col=1,
        )
    label_rows = _label_rows(run)
    for m, r in zip(run.markers, label_rows, strict=True):
        fig.add_vline(x=m.at, line_dash="dash", line_color="#555555", row=1, col=1)
        right_half = m.at > _span(run) * 1.02 / 2
        fig.add_annotation(
            x=m.at,
            y=1,
            xref="x",
            yref="y domain",
            text=m.label,
            showarrow=False,
            xanchor="right" if right_half else "left",
            yanchor="bottom",
            yshift=2 + 18 * r,
            font={"size": 12, "color": "#333333"},
        )
        if names:
            fig.add_vline(x=m.at, line_dash="dash", line_color="#555555", row=2, col=1)
    for name in names:
        mine_e = [e for e in run.events if e.name == name]
        fig.add_trace(
            go.Scatter(
                name=name,
                x=[e.at for e in mine_e],
                y=[name] * len(mine_e),
                mode="markers",
                marker={"symbol": "line-ns-open", "size": 14, "color": "#222222"},
                customdata=[[e.count, e.pod or "coordinator"] for e in mine_e],
                hovertemplate=name + " = %{customdata[0]} by %{customdata[1]} at %{x:.3f}s"
                "<extra></extra>",
                showlegend=False,
            ),
            row=2,
            col=1,
        )
    order = [b.pod for _, b in rows]
    n_label_rows = max(label_rows, default=-1) + 1
    fig.update_layout(
        **figures.plotly_layout(
            _title(run, title),
            barmode="overlay",
            height=int(figure_size(run)[1] * 110) + 18 * n_label_rows,
            margin={"l": 90, "r": 20, "t": 60 + 18 * n_label_rows, "b": 60},
            legend={"orientation": "v", "x": 1.01, "xanchor": "left", "y": 1, "yanchor": "top"},
        )
    )
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1], row=1, col=1)
    fig.update_xaxes(title_text="time since start (s)", row=2 if names else 1, col=1)
    if names:
        fig.update_yaxes(categoryorder="array", categoryarray=names[::-1], row=2, col=1)
    figures.write_html(
        fig, output, title=_title(run, title), series=[b.pod for b in run.bars] + names
    )


# -- a whole run -----------------------------------------------------------------------------
