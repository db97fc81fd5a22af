"""A campaign's results compared across configurations, for `report CAMPAIGN` and the figures of
`plot CAMPAIGN`: read from campaign.json and results.csv only (never the run directories, which
may be elsewhere or pruned), with no drawing library.

A claim about a system is a claim about a configuration, not about one run: so runs are grouped
by configuration, only succeeded runs count (a failed run's latency says nothing), and every
figure comes with its spread across repetitions (min-max, or a 95% interval of the mean: Student
t, since campaigns repeat a run three or five times, not thirty).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tricks_nats import campaign_file as cf
from tricks_nats.errors import UsageError
from tricks_nats.rundir import CAMPAIGN_JSON
from tricks_nats.stats import axis_label, format_value, unit_of

Value = int | float | str
#: The figures results.csv gives for each metric.
STATS = cf.STATS
#: A pseudo-metric: each run's duration (its "statistics" are the value itself).
DURATION = "duration_s"
#: The statistics `report` shows for each metric.
SHOWN = ("mean", "p50", "p99")
#: Two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond, the normal one.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
Z95 = 1.959964
#: Between a spread's ends (an en dash: a hyphen would read as a minus sign).
DASH = "\N{EN DASH}"


@dataclass(frozen=True)
class Row:
    """One finished run, as results.csv has it."""

    run: int
    config: int
    repetition: int
    verdict: str
    duration_s: float | None
    experiment: str
    #: (metric, stat) -> value, for the metrics the run recorded.
    figures: dict[tuple[str, str], float] = field(default_factory=dict)

    def value(self, metric: str, stat: str) -> float | None:
        if metric == DURATION and (metric, stat) not in self.figures:
            return self.duration_s
        return self.figures.get((metric, stat))


@dataclass(frozen=True)
class Configuration:
    index: int
    variables: dict[str, Value]
    #: Its finished runs, in run order.
    rows: list[Row] = field(default_factory=list)

    @property
    def succeeded(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "succeeded"]


@dataclass(frozen=True)
class CampaignResults:
    directory: Path
    campaign: str
    name: str
    state: str
    variables: list[str]
    #: Runs in the campaign, finished or not.
    runs: int
    configurations: list[Configuration]
    #: The metrics results.csv has columns for, sorted.
    metrics: list[str]

    @property
    def rows(self) -> list[Row]:
        return sorted((r for c in self.configurations for r in c.rows), key=lambda r: r.run)


@dataclass(frozen=True)
class Point:
    """One configuration's values of a statistic across its repetitions."""

    n: int
    mean: float
    min: float
    max: float
    #: The 95% interval of the mean; None for one value.
    ci95: tuple[float, float] | None


# -- reading ---------------------------------------------------------------------------------


def typed(cell: str) -> Value:
    """A variable's value as results.csv writes it: int, else float, else the text."""
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        return cell


def text(value: object) -> str:
    """A campaign.json value as results.csv writes it (booleans as `true`, `false`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load(campaign_dir: Path) -> CampaignResults:
    """campaign.json and results.csv (no results.csv yet: no run has finished). UsageError,
    naming the file, when either is missing, unreadable or not what the runner writes."""
    c = cf.read(campaign_dir)
    configs: dict[int, Configuration] = {}
    for entry in c.runs:
        if entry.config not in configs:
            values = {k: typed(text(entry.variables.get(k, ""))) for k in c.variables}
            configs[entry.config] = Configuration(entry.config, values)
    path = campaign_dir / cf.RESULTS_CSV
    metrics, rows = _read_csv(path, c.variables) if path.exists() else ([], [])
    for row in rows:
        if row.config not in configs:
            raise UsageError(
                f"{path}: run {row.run} has configuration {row.config}, which "
                f"{CAMPAIGN_JSON} does not have"
            )
        configs[row.config].rows.append(row)
    return CampaignResults(
        directory=campaign_dir,
        campaign=c.campaign,
        name=c.name,
        state=c.state,
        variables=list(c.variables),
        runs=len(c.runs),
        configurations=[configs[k] for k in sorted(configs)],
        metrics=metrics,
    )


def _read_csv(path: Path, variables: Sequence[str]) -> tuple[list[str], list[Row]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a results file tricks-nats can read: {exc}") from exc
    if not lines:
        raise UsageError(f"{path}: empty (not even a header)")
    header = lines[0]
    fixed = [*cf.HEAD, *variables, *cf.TAIL]
    if header[: len(fixed)] != fixed:
        raise UsageError(
            f"{path}: not this campaign's results: its columns should begin {','.join(fixed)}"
        )
    columns = [_metric_column(path, col) for col in header[len(fixed) :]]
    rows = [_row(f"{path}:{i}", cells, header, columns) for i, cells in enumerate(lines[1:], 2)]
    return sorted({m for m, _ in columns}), rows


def _metric_column(path: Path, column: str) -> tuple[str, str]:
    metric, _, stat = column.rpartition("_")
    if not metric or stat not in STATS:
        raise UsageError(
            f"{path}: unexpected column {column!r} (metric columns end in "
            f"{', '.join('_' + s for s in STATS)})"
        )
    return metric, stat


def _row(where: str, cells: list[str], header: list[str], columns: list[tuple[str, str]]) -> Row:
    """One line of results.csv (`where`: its file and line number, for errors)."""
    if len(cells) != len(header):
        raise UsageError(f"{where}: {len(cells)} cells where the header has {len(header)}")

    def number(col: int, kind: type[float] | type[int] = float) -> float:
        try:
            return kind(cells[col])
        except ValueError:
            raise UsageError(f"{where}: {header[col]} is {cells[col]!r}, not a number") from None

    fixed = len(header) - len(columns)
    verdict, duration, experiment = cells[fixed - 3 : fixed]
    figures = {key: number(fixed + k) for k, key in enumerate(columns) if cells[fixed + k] != ""}
    return Row(
        run=int(number(0, int)),
        config=int(number(1, int)),
        repetition=int(number(2, int)),
        verdict=verdict,
        duration_s=number(fixed - 2) if duration else None,
        experiment=experiment,
        figures=figures,
    )


# -- names -----------------------------------------------------------------------------------


def metric_names(results: CampaignResults) -> list[str]:
    """The metrics results.csv has, then the pseudo-metric `duration_s`."""
    return [*results.metrics, *([] if DURATION in results.metrics else [DURATION])]


def require(results: CampaignResults, metric: str, stat: str) -> None:
    """UsageError, listing what exists, unless the campaign has `metric` and `stat` is one of
    results.csv's statistics."""
    names = metric_names(results)
    if metric not in names:
        raise UsageError(
            f"no metric {metric!r} in {results.directory / cf.RESULTS_CSV}; "
            f"the metrics are: {', '.join(names)}"
        )
    if stat not in STATS:
        raise UsageError(f"no statistic {stat!r}: use one of {', '.join(STATS)}")


def variable(results: CampaignResults, name: str) -> str:
    """A variable's name without its `$`; UsageError, listing the variables, if none such."""
    bare = name.removeprefix("$")
    if bare not in results.variables:
        have = ", ".join(results.variables) or "none (a campaign of repetitions only)"
        raise UsageError(
            f"no variable {name!r} in campaign {results.campaign}; its variables are: {have}"
        )
    return bare


# -- arithmetic ------------------------------------------------------------------------------


def values(results: CampaignResults, metric: str, stat: str) -> dict[int, list[float]]:
    """Configuration index -> the `stat` of `metric` in each of its succeeded runs (runs that
    did not record the metric have nothing to give)."""
    out: dict[int, list[float]] = {}
    for c in results.configurations:
        found = (r.value(metric, stat) for r in c.succeeded)
        out[c.index] = [v for v in found if v is not None]
    return out


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom (>= 1)."""
    if df < 1:
        raise ValueError(f"{df} degrees of freedom")
    return T95[df - 1] if df <= len(T95) else Z95


def ci95(xs: Sequence[float]) -> tuple[float, float] | None:
    """The 95% interval of the mean of `xs`: mean -/+ t s / sqrt(n); None for fewer than two."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    half = t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m - half, m + half


def point(xs: Sequence[float]) -> Point | None:
    """Mean, min, max and 95% interval of one configuration's values; None for none."""
    if not xs:
        return None
    return Point(len(xs), mean(xs), min(xs), max(xs), ci95(xs))


# -- the report ------------------------------------------------------------------------------


def render(results: CampaignResults) -> str:
    """`report CAMPAIGN`: a header line, then per metric (and for run durations) one row per
    configuration: its variables, runs succeeded/finished, and each statistic's mean across
    repetitions with its spread [min, max]."""
    out = [_headline(results)]
    if not results.rows:
        return "\n".join([*out, "no run has finished yet"])
    for metric in metric_names(results):
        out += ["", *_table(results, metric)]
    return "\n".join(out)


def _headline(results: CampaignResults) -> str:
    rows = results.rows
    verdicts: dict[str, int] = {"succeeded": 0, "failed": 0}
    for r in rows:
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    counts = ", ".join(f"{n} {v.replace('_', ' ')}" for v, n in verdicts.items())
    return (
        f"campaign {results.name} ({results.campaign}), {results.state}: "
        f"{len(rows)} of {results.runs} runs finished ({counts})"
    )


def _table(results: CampaignResults, metric: str) -> list[str]:
    duration = metric == DURATION and metric not in results.metrics
    shown = ("mean",) if duration else SHOWN
    what = "duration" if duration else ", ".join(shown[:-1]) + " and " + shown[-1]
    unit = unit_of(metric)
    configs = results.configurations
    columns = [[text(c.variables[v]) for c in configs] for v in results.variables]
    columns.append([f"{len(c.succeeded)}/{len(c.rows)}" for c in configs])
    for s in shown:
        per_config = values(results, metric, s)
        columns.append(_stat_column([point(per_config[c.index]) for c in configs], unit))
    head = [*results.variables, "runs", *(["duration"] if duration else shown)]
    lines = [
        f"{axis_label(metric)}: mean over repetitions [min{DASH}max] of each run's {what}",
        *_aligned(head, columns, right=len(results.variables)),
    ]
    missing = [
        str(r.run)
        for r in results.rows
        if r.verdict == "succeeded" and r.value(metric, shown[0]) is None
    ]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        lines.append(
            f"  not recorded by {len(missing)} succeeded run{'s' * (len(missing) > 1)}: "
            f"{', '.join(missing[:10])}{more}"
        )
    return lines


def _stat_column(points: list[Point | None], unit: str | None) -> list[str]:
    """Each mean with its unit, right-aligned, then its spread `[min, max]` (none for a single
    value; `-` for no value)."""
    means = ["-" if p is None else format_value(p.mean, unit) for p in points]
    width = max(map(len, means), default=0)
    spreads = [
        ""
        if p is None or p.min == p.max
        else f" [{format_value(p.min, None)}{DASH}{format_value(p.max, None)}]"
        for p in points
    ]
    return [m.rjust(width) + s for m, s in zip(means, spreads, strict=True)]


def _aligned(head: list[str], columns: list[list[str]], right: int) -> list[str]:
    """Columns two spaces apart, left-aligned but for column `right`."""
    widths = [max([len(h), *map(len, col)]) for h, col in zip(head, columns, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if k == right else c.ljust(w)
            for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return ("  " + "  ".join(parts)).rstrip()

    return [line(head), *(line(row) for row in zip(*columns, strict=True))]
