"""`tricks-nats plot`: one metric of a run as a figure ready for a paper, or an HTML page.

Kinds: `cdf` (fraction of samples <= value), `line` (value over time), `rate` (samples per
second over time), `bar` (p50, mean and p99 with 95% confidence intervals), `hist` (shared
bins). One series per tag (or per pod); PNG, SVG and PDF through matplotlib, HTML through
plotly; the style, the palette and the file writers are `tricks_nats.figures`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tricks_nats import figures, stats
from tricks_nats.errors import UsageError
from tricks_nats.metrics_csv import Samples

KINDS = ("cdf", "line", "rate", "bar", "hist")
TIME_AXIS = "time since start (s)"
#: Above this many points a line is rasterized in SVG and PDF (the rest stays vector).
RASTERIZE_ABOVE = 10_000
#: A CDF keeps at most about twice this many points per series (every rank step and value
#: step of 1/CDF_STEPS of the range): finer than any figure shows.
CDF_STEPS = 1500
#: The points one HTML line figure holds, all series together (keeps the page small).
HTML_LINE_POINTS = 20_000
HIST_MAX_BINS = 80
RATE_BINS = 100
RATE_MIN_BIN_S = 0.01
#: Statistics of the bar kind, in order, with their colours.
BAR_STATS = (("p50", figures.OKABE_ITO[0]), ("mean", figures.OKABE_ITO[3]), ("p99", "#D55E00"))


@dataclass
class Trace:
    """One series as drawn: x, y, and for bars the error bar ends."""

    label: str
    x: list[float]
    y: list[float]
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)


@dataclass
class Plot:
    """What to draw, whatever the backend."""

    kind: str
    title: str
    xlabel: str
    ylabel: str
    traces: list[Trace]
    log_x: bool = False
    #: bar: the categories on the x axis (series names); rate and hist: stairs (edges in x).
    categories: list[str] = field(default_factory=list)


def natural_key(text: str) -> list[tuple[int, int | str]]:
    """`client-2` before `client-10`."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p]


def draw_metric(
    samples: Samples,
    name: str,
    kind: str,
    output: Path,
    *,
    by: str = "tag",
    tags: Sequence[str] | None = None,
    log_x: bool = False,
    t0: float | None = None,
    title: str | None = None,
) -> list[str]:
    """Draw metric `name` as `kind` into `output` (.png, .svg, .pdf or .html); returns the
    series drawn, in the order of the legend. `by`: one series per "tag" or per "pod";
    `tags`: only these tags; `t0`: time zero of line and rate (seconds since the epoch;
    default the first sample drawn); `log_x`: log value axis (cdf, hist). `title` is drawn on
    the figure only when given (captions live outside figures in papers); the files' metadata
    always name the figure and its series. Raises UsageError for a bad kind, format, name or
    filter, with one line saying what would have worked."""
    if kind not in KINDS:
        raise UsageError(f"unknown plot kind {kind!r}: use one of {', '.join(KINDS)}")
    suffix = figures.check_format(output)
    if by not in ("tag", "pod"):
        raise UsageError(f"cannot split series by {by!r}: use 'tag' or 'pod'")
    if log_x and kind not in ("cdf", "hist"):
        raise UsageError(f"a log x axis suits the cdf and hist kinds, not {kind}")
    series = _series(samples, name, by, tags)
    plot = build(series, name, kind, log_x=log_x, t0=t0, title=title)
    labels = [t.label for t in plot.traces] if kind != "bar" else plot.categories
    meta_title = title or f"{name} {kind}"
    if suffix in figures.HTML_FORMATS:
        _plotly(plot, output, meta_title, labels)
    else:
        _matplotlib(plot, output, meta_title, labels, show_title=title is not None)
    return labels


def _series(
    samples: Samples, name: str, by: str, tags: Sequence[str] | None
) -> dict[str, tuple[list[float], list[float]]]:
    names = samples.names()
    if name not in names:
        if not names:
            raise UsageError(f"no metric {name!r}: there are no samples at all")
        shown = ", ".join(names[:20]) + (
            f" (and {len(names) - 20} more)" if len(names) > 20 else ""
        )
        raise UsageError(f"no metric {name!r}; the metrics are: {shown}")
    series = samples.series(name, by=by, tags=tags)
    if not series:
        have = sorted({t for t, n in zip(samples.tag, samples.name, strict=True) if n == name})
        raise UsageError(
            f"no samples of {name} from tag {', '.join(tags or ())}; "
            f"its tags are: {', '.join(have)}"
        )
    return {k: series[k] for k in sorted(series, key=natural_key)}


def build(
    series: dict[str, tuple[list[float], list[float]]],
    name: str,
    kind: str,
    *,
    log_x: bool = False,
    t0: float | None = None,
    title: str | None = None,
) -> Plot:
    """The backend-independent figure: the numbers each kind draws."""
    meta_title = title or f"{name} {kind}"
    label = stats.axis_label(name)
    if kind == "cdf":
        traces = [_cdf(k, sorted(v), log_x) for k, (_, v) in series.items()]
        if log_x:
            _require_positive(name, traces)
        return Plot(kind, meta_title, label, "fraction of samples ≤ x", traces, log_x)
    if kind in ("line", "rate"):
        start = t0 if t0 is not None else min(ts[0] for ts, _ in series.values())
        if kind == "line":
            traces = [Trace(k, [t - start for t in ts], list(v)) for k, (ts, v) in series.items()]
            return Plot(kind, meta_title, TIME_AXIS, label, traces)
        return _rate(series, name, start, meta_title)
    if kind == "hist":
        return _hist(series, name, log_x, meta_title)
    return _bar(series, name, meta_title)


def _require_positive(name: str, traces: list[Trace]) -> None:
    if not any(x > 0 for t in traces for x in t.x):
        raise UsageError(f"a log x axis needs positive values; {name} has none")


def _cdf(label: str, ordered: list[float], log_x: bool) -> Trace:
    """The empirical CDF as step points (x, fraction <= x), starting at (min, 0); thinned to
    the points where the rank or the value moves by 1/CDF_STEPS of its range."""
    n = len(ordered)
    lo, hi = ordered[0], ordered[-1]
    use_log = log_x and lo > 0
    span = (math.log(hi) - math.log(lo)) if use_log else (hi - lo)
    xs, ys = [lo], [0.0]
    last_rank, last_value = -1, -1
    for i, x in enumerate(ordered):
        if i + 1 < n and ordered[i + 1] == x:
            continue  # only the last of equal values: the top of its step
        rank_step = (i + 1) * CDF_STEPS // n
        if span > 0:
            pos = (math.log(x) - math.log(lo)) if use_log else (x - lo)
            value_step = int(pos / span * CDF_STEPS)
        else:
            value_step = 0
        if rank_step != last_rank or value_step != last_value or i + 1 == n:
            xs.append(x)
            ys.append((i + 1) / n)
            last_rank, last_value = rank_step, value_step
    return Trace(label, xs, ys)


def nice_step(raw: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= raw."""
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * power >= raw * (1 - 1e-9):
            return m * power
    return 10 * power


def rate_bin(span_s: float) -> float:
    """The bin width of a rate plot: about RATE_BINS bins over the span, a nice step, at
    least RATE_MIN_BIN_S."""
    if span_s <= 0:
        return RATE_MIN_BIN_S
    return max(RATE_MIN_BIN_S, nice_step(span_s / RATE_BINS))


def _rate(
    series: dict[str, tuple[list[float], list[float]]], name: str, start: float, title: str
) -> Plot:
    end = max(ts[-1] for ts, _ in series.values()) - start
    width = rate_bin(max(end, 0.0))
    bins = max(1, math.ceil(end / width + 1e-9))
    if start + bins * width <= start + end:
        bins += 1  # the last sample falls on the last edge: one more bin holds it
    edges = [i * width for i in range(bins + 1)]
    traces = []
    for label, (ts, _) in series.items():
        counts = [0] * bins
        for t in ts:
            i = math.floor((t - start) / width)
            if 0 <= i < bins:
                counts[i] += 1
        traces.append(Trace(label, edges, [c / width for c in counts]))
    ylabel = f"{name} samples/s"
    return Plot("rate", title, TIME_AXIS, ylabel, traces, categories=["stairs"])


def _hist(
    series: dict[str, tuple[list[float], list[float]]], name: str, log_x: bool, title: str
) -> Plot:
    import numpy as np

    every = np.concatenate([np.asarray(v, dtype=float) for _, v in series.values()])
    if log_x:
        positive = every[every > 0]
        if positive.size == 0:
            raise UsageError(f"a log x axis needs positive values; {name} has none")
        lo, hi = float(positive.min()), float(positive.max())
        if hi <= lo:
            lo, hi = lo / 1.5, hi * 1.5
        bins = int(min(HIST_MAX_BINS, max(10, 2 * math.sqrt(positive.size))))
        edges = np.geomspace(lo, hi, bins + 1)
    else:
        edges = np.histogram_bin_edges(every, bins="auto")
        if len(edges) - 1 > HIST_MAX_BINS:
            edges = np.linspace(edges[0], edges[-1], HIST_MAX_BINS + 1)
    traces = []
    for label, (_, v) in series.items():
        counts, _ = np.histogram(np.asarray(v, dtype=float), bins=edges)
        traces.append(Trace(label, edges.tolist(), counts.astype(float).tolist()))
    return Plot(
        "hist", title, stats.axis_label(name), "samples", traces, log_x, categories=["stairs"]
    )


def _bar(series: dict[str, tuple[list[float], list[float]]], name: str, title: str) -> Plot:
    labels = list(series)
    traces = []
    for stat, _ in BAR_STATS:
        ys, lows, highs = [], [], []
        for _, values in series.values():
            ordered = sorted(values)
            if stat == "mean":
                y = math.fsum(ordered) / len(ordered)
                lo, hi = stats.mean_ci(ordered)
            else:
                q = float(stat[1:])
                y = stats.percentile(ordered, q)
                lo, hi = stats.quantile_ci(ordered, q)
            ys.append(y)
            lows.append(max(0.0, y - lo))
            highs.append(max(0.0, hi - y))
        traces.append(Trace(stat, list(range(len(labels))), ys, lows, highs))
    return Plot("bar", title, "", stats.axis_label(name), traces, categories=labels)


# -- matplotlib ------------------------------------------------------------------------------


def _matplotlib(
    plot: Plot, output: Path, meta_title: str, labels: list[str], *, show_title: bool
) -> None:
    with figures.pyplot() as plt:
        width, height = figures.COLUMN_IN
        if plot.kind == "bar" and len(plot.categories) > 6:
            width = min(figures.TWO_COLUMNS_IN, 1.2 + 0.4 * len(plot.categories))
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        n = len(plot.traces)
        if plot.kind == "bar":
            handles = _mpl_bar(ax, plot)
        else:
            handles = []
            for i, trace in enumerate(plot.traces):
                style = figures.series_style(i, n)
                common: dict[str, Any] = {
                    "color": style.color,
                    "linestyle": style.linestyle,
                    "label": trace.label,
                }
                if style.marker is not None:
                    every = 0.1 if plot.kind == "cdf" else max(1, len(trace.x) // 8)
                    common |= {"marker": style.marker, "markevery": every, "markersize": 3}
                if plot.kind == "cdf":
                    (artist,) = ax.step(trace.x, trace.y, where="post", **common)
                elif plot.kind == "line":
                    width_pt = 0.8 if len(trace.x) > 2000 else 1.1
                    (artist,) = ax.plot(trace.x, trace.y, linewidth=width_pt, **common)
                    if len(trace.x) > RASTERIZE_ABOVE:
                        artist.set_rasterized(True)
                else:  # stairs: rate, hist
                    common.pop("marker", None)
                    common.pop("markevery", None)
                    common.pop("markersize", None)
                    artist = ax.stairs(trace.y, trace.x, baseline=None, **common)
                handles.append(artist)
        ax.set_xlabel(plot.xlabel)
        ax.set_ylabel(plot.ylabel)
        if plot.log_x:
            _log_x(ax)
        if plot.kind == "cdf":
            ax.set_ylim(0, 1.02)
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        elif plot.kind in ("rate", "hist"):
            ax.set_ylim(bottom=0)
        if plot.kind in ("line", "rate"):
            ax.set_xlim(left=min(0.0, min(min(t.x) for t in plot.traces)))
        if show_title:
            fig.suptitle(plot.title)
        _mpl_legend(fig, ax, handles, [h.get_label() for h in handles], width)
        figures.save(fig, output, title=meta_title, series=labels)


def _mpl_bar(ax: Any, plot: Plot) -> list[Any]:
    groups = len(plot.categories)
    width = 0.8 / len(plot.traces)
    handles = []
    for j, (trace, (_, colour)) in enumerate(zip(plot.traces, BAR_STATS, strict=True)):
        xs = [x + (j - (len(plot.traces) - 1) / 2) * width for x in trace.x]
        bars = ax.bar(
            xs,
            trace.y,
            width * 0.92,
            yerr=[trace.low, trace.high],
            color=colour,
            label=trace.label,
            error_kw={"elinewidth": 0.8, "capsize": 2, "capthick": 0.8, "ecolor": "#222222"},
        )
        handles.append(bars)
    ax.set_xticks(range(groups), plot.categories)
    if groups > 4 or max(len(c) for c in plot.categories) > 10:
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    ax.grid(axis="x", visible=False)
    ax.set_ylim(bottom=0)
    return handles


def _mpl_legend(fig: Any, ax: Any, handles: list[Any], labels: list[str], width_in: float) -> None:
    """Above the axes, outside them (under a title if there is one): it never hides data or
    labels; with many series, to the right. Shown for a single series too: it names the tag or
    pod."""
    if not handles:
        return
    if len(labels) <= 12:
        figures.fit_legend(fig, ax, handles, loc="lower center", bbox_to_anchor=(0.5, 1.02))
    else:
        rows = math.ceil(len(labels) / max(1, math.ceil(len(labels) / 18)))
        ncols = math.ceil(len(labels) / rows)
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncols=ncols)


def _log_x(ax: Any) -> None:
    """A log x axis labelled 1, 2, 5, 10, 20, ... in plain numbers (no 3 x 10^0 crowding)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


# -- plotly ----------------------------------------------------------------------------------


def _plotly(plot: Plot, output: Path, meta_title: str, labels: list[str]) -> None:
    try:
        import numpy as np
        import plotly.graph_objects as go
    except ImportError as exc:
        raise figures.missing("plotly") from exc
    fig = go.Figure()
    n = len(plot.traces)
    if plot.kind == "bar":
        for trace, (_, colour) in zip(plot.traces, BAR_STATS, strict=True):
            fig.add_trace(
                go.Bar(
                    name=trace.label,
                    x=plot.categories,
                    y=trace.y,
                    marker_color=colour,
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": trace.high,
                        "arrayminus": trace.low,
                    },
                )
            )
    else:
        budget = max(200, HTML_LINE_POINTS // max(1, n))
        for i, trace in enumerate(plot.traces):
            style = figures.series_style(i, n)
            x, y = trace.x, trace.y
            shape = "linear"
            if plot.kind == "cdf":
                shape = "hv"
            elif plot.kind in ("rate", "hist"):
                shape, x, y = "hv", x, [*y, y[-1]]  # stairs: one more y than edges drawn
            elif len(x) > budget:
                x, y = thin(x, y, budget)
            fig.add_trace(
                go.Scatter(
                    name=trace.label,
                    x=np.asarray(x, dtype=float),
                    y=np.asarray(y, dtype=float),
                    mode="lines+markers" if style.marker and plot.kind == "line" else "lines",
                    line={
                        "color": style.color,
                        "dash": figures.plotly_dash(style.linestyle),
                        "shape": shape,
                        "width": 1.5,
                    },
                    showlegend=True,
                )
            )
    layout = figures.plotly_layout(
        plot.title,
        xaxis={"title": {"text": plot.xlabel}, **({"type": "log"} if plot.log_x else {})},
        yaxis={"title": {"text": plot.ylabel}},
    )
    if plot.kind == "bar":
        layout["barmode"] = "group"
    if plot.kind == "cdf":
        layout["yaxis"]["range"] = [0, 1.02]
    fig.update_layout(**layout)
    figures.write_html(fig, output, title=meta_title, series=labels)


def thin(x: list[float], y: list[float], budget: int) -> tuple[list[float], list[float]]:
    """At most about `budget` points of a line, keeping each slice's lowest and highest point
    (spikes survive), in time order."""
    buckets = max(1, budget // 2)
    size = len(x) / buckets
    keep: list[int] = []
    for b in range(buckets):
        lo, hi = int(b * size), int((b + 1) * size)
        if hi <= lo:
            continue
        chunk = range(lo, hi)
        i_min = min(chunk, key=y.__getitem__)
        i_max = max(chunk, key=y.__getitem__)
        keep.extend(sorted({i_min, i_max}))
    return [x[i] for i in keep], [y[i] for i in keep]
