"""`tricks-nats plot CAMPAIGN METRIC --x VAR`: a statistic of a metric against one variable, one
line per value of another (`--series`), each point the mean over repetitions with error bars
across them: the figure an evaluation section is made of.

The numbers are `campaign_results`' (succeeded runs only); the palette, the print style and the
file writers are `figures`', as for a single run's plots, so .svg, .pdf, .png and .html all work
and look alike. Every line has its own marker and dash pattern too: printed in grey, the lines
are still told apart. matplotlib and plotly are imported only to draw.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tricks_nats import campaign_results as cr
from tricks_nats import figures
from tricks_nats.campaign_results import CampaignResults, Point, Value
from tricks_nats.errors import UsageError
from tricks_nats.plots import natural_key
from tricks_nats.stats import axis_label

ERRORS = ("minmax", "ci95")
#: Lines sharing an x are moved apart by up to this fraction of the gap between x values, so
#: their error bars do not hide one another.
DODGE = 0.3
#: x values get a tick each, up to this many (more: matplotlib's own ticks).
MAX_TICKS = 12
PLOTLY_SYMBOLS = {
    "o": "circle",
    "s": "square",
    "^": "triangle-up",
    "D": "diamond",
    "v": "triangle-down",
    "P": "cross",
    "X": "x",
    "*": "star",
}


@dataclass
class Line:
    """One series as drawn: its points, with the error bars' lengths below and above."""

    label: str
    x: list[Value]
    y: list[float]
    low: list[float]
    high: list[float]
    n: list[int]


@dataclass
class Chart:
    """What to draw, whatever the backend."""

    title: str
    xlabel: str
    ylabel: str
    #: The series variable, titling the legend (None: one line, no legend).
    legend_title: str | None
    lines: list[Line]
    #: The x values in order, and whether they are numbers (else categories).
    xs: list[Value]
    numeric: bool
    log_x: bool = False
    log_y: bool = False


def draw(
    results: CampaignResults,
    metric: str,
    x: str,
    output: Path,
    *,
    stat: str = "p99",
    series: str | None = None,
    error: str = "minmax",
    title: str | None = None,
    log_x: bool = False,
    log_y: bool = False,
) -> list[str]:
    """Draw `stat` of `metric` against variable `x` (one line per value of variable `series`)
    into `output` (.png, .svg, .pdf or .html); returns the lines' labels, in legend order.
    `error`: bars from min to max over repetitions, or the 95% interval of their mean. `title`
    is drawn only when given (the files' metadata always name the figure). UsageError, saying
    what exists, for a bad name, statistic, format or combination."""
    suffix = figures.check_format(output)
    chart = build(
        results, metric, x, stat=stat, series=series, error=error, log_x=log_x, log_y=log_y
    )
    chart.title = title or chart.title
    labels = [line.label for line in chart.lines]
    if suffix in figures.HTML_FORMATS:
        _plotly(chart, output, labels)
    else:
        _matplotlib(chart, output, labels, show_title=title is not None)
    return labels


def build(
    results: CampaignResults,
    metric: str,
    x: str,
    *,
    stat: str = "p99",
    series: str | None = None,
    error: str = "minmax",
    log_x: bool = False,
    log_y: bool = False,
) -> Chart:
    """The backend-independent figure: each line's points and error bars."""
    if error not in ERRORS:
        raise UsageError(f"--error {error!r}: use {' or '.join(ERRORS)}")
    cr.require(results, metric, stat)
    xvar = cr.variable(results, x)
    svar = cr.variable(results, series) if series is not None else None
    if svar == xvar:
        raise UsageError(f"--series {series} is the x variable: choose another one")
    _check_fixed(results, xvar, svar)
    per_config = cr.values(results, metric, stat)
    points: dict[Value, dict[Value, Point]] = {}
    for c in results.configurations:
        p = cr.point(per_config[c.index])
        if p is not None:
            key = c.variables[svar] if svar is not None else ""
            points.setdefault(key, {})[c.variables[xvar]] = p
    if not points:
        raise UsageError(f"no succeeded run of campaign {results.campaign} has {metric} yet")
    xs = ordered({v for line in points.values() for v in line})
    labels = {k: cr.text(k) if svar is not None else metric for k in points}
    lines = [_line(labels[k], points[k], error) for k in ordered(points)]
    pseudo = metric == cr.DURATION and metric not in results.metrics
    chart = Chart(
        title=f"{metric} {'' if pseudo else stat + ' '}by {xvar}",
        xlabel=xvar,
        ylabel=axis_label(metric) if pseudo else f"{stat} of {axis_label(metric)}",
        legend_title=svar,
        lines=lines,
        xs=xs,
        numeric=all(isinstance(v, int | float) for v in xs),
        log_x=log_x,
        log_y=log_y,
    )
    _check_log(chart)
    return chart


def _check_fixed(results: CampaignResults, x: str, series: str | None) -> None:
    """UsageError when a variable other than x and the series takes several values (its
    configurations would be averaged together without a word)."""
    varying = {
        v: ordered({c.variables[v] for c in results.configurations})
        for v in results.variables
        if v not in (x, series)
    }
    varying = {v: vals for v, vals in varying.items() if len(vals) > 1}
    if not varying:
        return
    listed = "; ".join(
        f"${v} varies too ({', '.join(map(cr.text, vals))})" for v, vals in varying.items()
    )
    if series is None:
        hint = f"draw one line per value with --series {next(iter(varying))}"
    else:
        hint = f"a figure shows two variables, ${x} (--x) and ${series} (--series)"
    raise UsageError(f"{listed}: {hint}")


def ordered(values: Iterable[Value]) -> list[Value]:
    """Numbers in numeric order; anything else in natural order (`n-2` before `n-10`)."""
    found = list(values)
    if all(isinstance(v, int | float) for v in found):
        return sorted(found, key=float)
    return sorted(found, key=lambda v: natural_key(cr.text(v)))


def _line(label: str, points: dict[Value, Point], error: str) -> Line:
    line = Line(label, [], [], [], [], [])
    for x in ordered(points):
        p = points[x]
        lo, hi = (p.min, p.max) if error == "minmax" else (p.ci95 or (p.mean, p.mean))
        line.x.append(x)
        line.y.append(p.mean)
        line.low.append(max(0.0, p.mean - lo))
        line.high.append(max(0.0, hi - p.mean))
        line.n.append(p.n)
    return line


def _check_log(chart: Chart) -> None:
    if chart.log_x and not (chart.numeric and all(float(v) > 0 for v in chart.xs)):
        shown = ", ".join(map(cr.text, chart.xs))
        raise UsageError(f"a log x axis needs positive numbers; ${chart.xlabel} takes {shown}")
    if chart.log_y and not all(y > 0 for line in chart.lines for y in line.y):
        raise UsageError(f"a log y axis needs positive values; {chart.ylabel} has some <= 0")


def positions(chart: Chart) -> tuple[list[float], float]:
    """Where each x value goes on the axis (its index for categories), and the smallest gap
    between two (in log space on a log axis)."""
    if not chart.numeric:
        return [float(i) for i in range(len(chart.xs))], 1.0
    at = [float(v) for v in chart.xs]
    scaled = [math.log10(v) for v in at] if chart.log_x else at
    gaps = [b - a for a, b in itertools.pairwise(scaled) if b > a]
    return at, min(gaps, default=1.0)


def dodged(chart: Chart, i: int, at: float, gap: float) -> float:
    """Position `at` moved for line `i`, the lines spread over DODGE of the smallest gap."""
    n = len(chart.lines)
    if n == 1:
        return at
    shift = (i - (n - 1) / 2) * min(DODGE, 0.06 * (n - 1)) * gap / (n - 1)
    return at * 10**shift if chart.log_x else at + shift


def style(i: int, n: int) -> figures.SeriesStyle:
    """`figures.series_style`'s colour, and a marker and a dash pattern of its own."""
    colour = figures.series_style(i, n).color
    k = i + i // len(figures.OKABE_ITO)  # past 8 lines, colours repeat with other markers
    return figures.SeriesStyle(
        colour, figures.LINESTYLES[k % len(figures.LINESTYLES)], figures.MARKERS[k % 8]
    )


# -- matplotlib ------------------------------------------------------------------------------


def _matplotlib(chart: Chart, output: Path, labels: list[str], *, show_title: bool) -> None:
    at, gap = positions(chart)
    where: dict[Value, float] = dict(zip(chart.xs, at, strict=True))
    with figures.pyplot() as plt:
        width, height = figures.COLUMN_IN
        if not chart.numeric and len(chart.xs) > 6:
            width = min(figures.TWO_COLUMNS_IN, 1.2 + 0.4 * len(chart.xs))
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        handles = []
        for i, line in enumerate(chart.lines):
            s = style(i, len(chart.lines))
            xs = [dodged(chart, i, where[v], gap) for v in line.x]
            bars = ax.errorbar(
                xs,
                line.y,
                yerr=[line.low, line.high],
                color=s.color,
                linestyle=s.linestyle,
                marker=s.marker,
                markersize=3.5,
                linewidth=1.1,
                elinewidth=0.8,
                capsize=2.5,
                capthick=0.8,
                label=line.label,
            )
            handles.append(bars)
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
        _mpl_axes(ax, chart, at, gap)
        if show_title:
            fig.suptitle(chart.title)
        if chart.legend_title is not None:
            figures.fit_legend(
                fig,
                ax,
                handles,
                loc="lower center",
                bbox_to_anchor=(0.5, 1.02),
                title=chart.legend_title,
            )
        figures.save(fig, output, title=chart.title, series=labels)


def _mpl_axes(ax: Any, chart: Chart, at: list[float], gap: float) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    if chart.log_x:
        ax.set_xscale("log")
    if chart.log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 100, not 10²
    elif all(y - lo >= 0 for line in chart.lines for y, lo in zip(line.y, line.low, strict=True)):
        ax.set_ylim(bottom=0)
    if not chart.numeric:
        ax.set_xticks(at, [cr.text(v) for v in chart.xs])
        ax.set_xlim(-0.5, len(at) - 0.5)
        ax.grid(axis="x", visible=False)
        if len(at) > 4 or max(len(cr.text(v)) for v in chart.xs) > 8:
            ax.tick_params(axis="x", labelrotation=30)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
                tick.set_rotation_mode("anchor")
        return
    scaled = [math.log10(v) for v in at] if chart.log_x else at
    if len(at) <= MAX_TICKS and gap >= (scaled[-1] - scaled[0]) / MAX_TICKS:
        ax.set_xticks(at, [cr.text(v) for v in chart.xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())


# -- plotly ----------------------------------------------------------------------------------


def _plotly(chart: Chart, output: Path, labels: list[str]) -> None:
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise figures.missing("plotly") from exc
    fig = go.Figure()
    for i, line in enumerate(chart.lines):
        s = style(i, len(chart.lines))
        fig.add_trace(
            go.Scatter(
                name=line.label,
                x=line.x if chart.numeric else [cr.text(v) for v in line.x],
                y=line.y,
                customdata=line.n,
                hovertemplate=f"{chart.xlabel}=%{{x}}<br>%{{y}} (%{{customdata}} runs)",
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": line.high,
                    "arrayminus": line.low,
                    "thickness": 1.2,
                    "width": 4,
                },
                mode="lines+markers",
                marker={"symbol": PLOTLY_SYMBOLS.get(s.marker or "o", "circle"), "size": 8},
                line={"color": s.color, "dash": figures.plotly_dash(s.linestyle), "width": 2},
                showlegend=chart.legend_title is not None,
            )
        )
    xaxis: dict[str, Any] = {"title": {"text": chart.xlabel}}
    if chart.log_x:
        xaxis["type"] = "log"
    elif not chart.numeric:
        xaxis |= {
            "type": "category",
            "categoryorder": "array",
            "categoryarray": [cr.text(v) for v in chart.xs],
        }
    yaxis: dict[str, Any] = {"title": {"text": chart.ylabel}}
    yaxis |= {"type": "log"} if chart.log_y else {"rangemode": "tozero"}
    layout = figures.plotly_layout(chart.title, xaxis=xaxis, yaxis=yaxis)
    if chart.legend_title is not None:
        layout["legend"] = {**layout["legend"], "title": {"text": chart.legend_title}}
    fig.update_layout(**layout)
    figures.write_html(fig, output, title=chart.title, series=labels)
