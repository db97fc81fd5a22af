"""`tricks-nats watch`, `status` and `report`: seeing a run while it happens and afterwards."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from tricks_nats.cli.output import fail
from tricks_nats.entries import KINDS, Entry
from tricks_nats.errors import TricksError, UsageError

RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Where runs are, for an experiment id.")]


def watch(
    experiment: Annotated[
        str | None,
        typer.Argument(
            help="Experiment id or run directory (default: the newest run `up` has going, "
            "started in this directory if any).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    from_start: Annotated[
        bool,
        typer.Option(
            "--from-start/--from-now",
            help="Replay what already happened, then follow (default); or only what comes next.",
        ),
    ] = True,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only this tag (repeatable).")
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", help=f"Only these kinds: {', '.join(KINDS)} (repeatable)."),
    ] = None,
    exit_status: Annotated[
        bool,
        typer.Option(
            "--exit-status",
            help="Exit as `up` does: 0 succeeded, 1 failed, timed out or error, 130 interrupted.",
        ),
    ] = False,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where finished runs are.")] = Path(
        "runs"
    ),
) -> None:
    """Stream an experiment's events as they happen, until its verdict. Exit 0 when it ends,
    whatever its verdict (--exit-status: the verdict's code, as `up`), 1 if it ended without
    one (its `up` was killed)."""
    from tricks_nats.entries import json_line
    from tricks_nats.render import describe, matches
    from tricks_nats.rundir import spec_tags
    from tricks_nats.watching import follow, pick_running, resolve

    kinds = list(kind or [])
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        fail(UsageError(f"--kind {bad[0]!r}: expected one of {', '.join(KINDS)}"))
    colour = sys.stdout.isatty() and not as_json

    def emit(entry: Entry) -> None:
        if matches(entry, list(tag or []), kinds):
            typer.echo(json_line(entry) if as_json else describe(entry, colour=colour))

    try:
        if experiment is None:
            state, note = pick_running()
            if not as_json:
                typer.echo(note, err=True)
        else:
            state = resolve(experiment, runs_dir)
        _check_tags(tag or [], spec_tags(Path(state.run_dir)))
        verdict = asyncio.run(follow(state, emit, from_start=from_start))
    except TricksError as exc:
        fail(exc)
        return
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if verdict is None:
        typer.echo(
            f"tricks-nats: {state.experiment} ended without a verdict (was `up` killed?)", err=True
        )
        raise typer.Exit(1)
    if exit_status:
        from tricks_nats.workflow import exit_code

        raise typer.Exit(exit_code(verdict))
    raise typer.Exit(0)


def _check_tags(tags: list[str], known: list[tuple[str, int]]) -> None:
    """A UsageError for a --tag the run does not have (its spec read: `known`, may be empty)."""
    names = [t for t, _ in known]
    for t in tags:
        if names and t not in names:
            raise UsageError(f"--tag {t!r}: no such tag in this run (its tags: {', '.join(names)})")


def status(
    nats_url: Annotated[
        str | None,
        typer.Option(
            "--nats-url",
            help="Ask this NATS server (default: the runs `up` has going on this machine).",
        ),
    ] = None,
    every: Annotated[
        bool,
        typer.Option(
            "--all", help="Every run `up` has going on this machine, not only those started here."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list, one object each.")] = False,
) -> None:
    """The experiments running: id, age, pods running and stopped, verdict once finished. By
    default those `up` has going that were started in this directory; --all: all of this
    user's; --nats-url: all a NATS server holds."""
    from tricks_nats import statefile
    from tricks_nats.watching import started_here
    from tricks_nats.watching import status as get_status

    live = statefile.running()
    chosen = live if every or nats_url else started_here(live)
    try:
        rows = asyncio.run(get_status(nats_url, chosen))
    except TricksError as exc:
        fail(exc)
        return
    elsewhere = len(live) - len(chosen) if not nats_url else 0
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo("no experiments" + ("" if nats_url or every else " started here"))
    else:
        typer.echo(f"{'EXPERIMENT':40} {'AGE':>8} {'RUNNING':>8} {'STOPPED':>8}  VERDICT")
        for r in rows:
            typer.echo(
                f"{r['experiment']:40} {r['age_s']:>7.0f}s {r['running']:>8} "
                f"{r['stopped']:>8}  {r['verdict'] or '-'}"
            )
    if elsewhere and not as_json:
        typer.echo(
            f"({elsewhere} more running, started in other directories: `tricks-nats status --all`)"
        )


def report(
    run: Annotated[
        str,
        typer.Argument(
            help="A run: its directory (runs/<id>) or its experiment id; or a campaign's "
            "directory (runs/<campaign-id>), which compares its configurations."
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="A file: the timeline (.svg, .pdf, .png or .html). A directory (ending in /): "
            "the timeline plus a CDF of every metric.",
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="With -o DIR/: svg, pdf, png or html.")
    ] = "svg",
    runs_dir: RunsDir = Path("runs"),
) -> None:
    """Summarise a run: pods, events, and every metric's percentiles (with coordination-
    omission warnings); with -o, draw it (needs tricks-nats[report]). For a campaign: each
    metric per configuration, mean and spread over repetitions."""
    from tricks_nats import campaign_results, figures, results
    from tricks_nats.report import load_run, text_summary
    from tricks_nats.rundir import find_campaign, find_run

    try:
        campaign = find_campaign(run, runs_dir)
        if campaign is not None:
            if output is not None:
                raise UsageError(
                    f"-o draws a single run; draw campaign {campaign} with "
                    "`tricks-nats plot CAMPAIGN METRIC --x VARIABLE`"
                )
            typer.echo(campaign_results.render(campaign_results.load(campaign)))
            return
        run_dir = find_run(run, runs_dir)
        to_dir = output is not None and (output.endswith("/") or Path(output).is_dir())
        if output is not None:  # a bad format or a missing extra: said before the report
            if to_dir and fmt not in ("svg", "pdf", "png", "html"):
                raise UsageError(f"--format {fmt!r}: use svg, pdf, png or html")
            figures.check_drawable(Path(f"x.{fmt}") if to_dir else Path(output))
        timeline = load_run(run_dir)
        typer.echo(text_summary(timeline))
        found = results.load(run_dir)
        if found is not None:
            typer.echo(results.render(found))
        if output is None:
            return
        if to_dir:
            from tricks_nats.report import draw_all

            for path in draw_all(run_dir, Path(output), suffix=f".{fmt}"):
                typer.echo(f"wrote {path}")
        else:
            from tricks_nats.timeline import draw

            draw(timeline, Path(output))
            typer.echo(f"timeline written to {output}")
    except TricksError as exc:
        fail(exc)


def plot(
    run: Annotated[
        str,
        typer.Argument(
            help="A run: its directory (runs/<id>) or its experiment id; or a campaign's "
            "directory (runs/<campaign-id>), drawn against --x."
        ),
    ],
    name: Annotated[
        str,
        typer.Argument(
            help="The metric to draw (a name in metrics.csv; for a campaign, in results.csv, "
            "or duration_s: each run's duration)."
        ),
    ],
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            "-k",
            help="cdf (of the value; the default), line (value over time), rate (samples/s "
            "over time: throughput), bar (p50/mean/p99 with 95% intervals), hist.",
        ),
    ] = None,
    by: Annotated[
        str | None, typer.Option("--by", help="One series per tag (the default) or per pod.")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only this tag (repeatable).")
    ] = None,
    x: Annotated[
        str | None,
        typer.Option(
            "--x",
            help="A campaign: the variable on the x axis ($ optional). Each point is the mean "
            "over the repetitions of a configuration; other variables must not vary, or be "
            "--series.",
        ),
    ] = None,
    stat: Annotated[
        str | None,
        typer.Option(
            "--stat",
            help="A campaign: which figure of each run to draw: count, mean, p50, p90 or p99 "
            "(default p99; duration_s has one value per run).",
        ),
    ] = None,
    series: Annotated[
        str | None,
        typer.Option("--series", help="A campaign: one line per value of this variable."),
    ] = None,
    error: Annotated[
        str | None,
        typer.Option(
            "--error",
            help="A campaign: error bars from the lowest to the highest repetition (minmax, "
            "the default) or the 95% confidence interval of their mean (ci95, Student t).",
        ),
    ] = None,
    log_x: Annotated[
        bool, typer.Option("--log-x", help="Logarithmic x axis (cdf, hist; a campaign).")
    ] = False,
    log_y: Annotated[bool, typer.Option("--log-y", help="A campaign: logarithmic y axis.")] = False,
    title: Annotated[str | None, typer.Option("--title", help="Drawn on the figure.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The figure: .svg or .pdf (vector), .png, or .html. Default: "
            "<run>/<name>-<kind>.svg; for a campaign <campaign>/<name>-<stat>-by-<x>.svg.",
        ),
    ] = None,
    runs_dir: RunsDir = Path("runs"),
) -> None:
    """Draw one metric of a run from its metrics.csv; or of a campaign from its results.csv,
    against a variable (needs tricks-nats[report])."""
    from tricks_nats import metrics_csv
    from tricks_nats.plots import draw_metric
    from tricks_nats.rundir import find_campaign, find_run

    try:
        campaign = find_campaign(run, runs_dir)
        if campaign is not None:
            _refuse(f"for a single run ({campaign} is a campaign)", kind=kind, by=by, tag=tag)
            if x is None:
                raise UsageError(
                    f"{campaign} is a campaign: say which variable goes on the x axis with "
                    f"--x (its variables: {_variables(campaign)})"
                )
            opts = CampaignPlot(x, stat or "p99", series, error or "minmax", log_x, log_y, title)
            _plot_campaign(campaign, name, opts, output)
            return
        run_dir = find_run(run, runs_dir)
        _refuse(
            f"for a campaign ({run_dir} is a run)",
            x=x,
            stat=stat,
            series=series,
            error=error,
            log_y=log_y,
        )
        path = run_dir / "metrics.csv"
        if not path.is_file():
            raise UsageError(f"{run_dir}: no metrics.csv (the run recorded no metrics)")
        try:
            samples = metrics_csv.read(path)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        kind = kind or "cdf"
        target = output or run_dir / f"{name}-{kind}.svg"
        t0 = _started_at(run_dir)
        drawn = draw_metric(
            samples,
            name,
            kind,
            target,
            by=by or "tag",
            tags=tag or None,
            log_x=log_x,
            title=title,
            t0=t0,
        )
        typer.echo(f"wrote {target} ({len(drawn)} series: {', '.join(drawn)})")
    except TricksError as exc:
        fail(exc)


@dataclass(frozen=True)
class CampaignPlot:
    x: str
    stat: str
    series: str | None
    error: str
    log_x: bool
    log_y: bool
    title: str | None


def _plot_campaign(campaign: Path, name: str, opts: CampaignPlot, output: Path | None) -> None:
    from tricks_nats import campaign_plot, campaign_results

    results = campaign_results.load(campaign)
    stat = "" if name == campaign_results.DURATION else f"-{opts.stat}"
    target = output or campaign / f"{name}{stat}-by-{opts.x.removeprefix('$')}.svg"
    drawn = campaign_plot.draw(
        results,
        name,
        opts.x,
        target,
        stat=opts.stat,
        series=opts.series,
        error=opts.error,
        title=opts.title,
        log_x=opts.log_x,
        log_y=opts.log_y,
    )
    typer.echo(f"wrote {target} ({len(drawn)} series: {', '.join(drawn)})")


def _refuse(what: str, **given: object) -> None:
    """UsageError naming the first option given that means nothing here."""
    for option, value in given.items():
        if value:
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} is {what}")


def _variables(campaign: Path) -> str:
    from tricks_nats import campaign_file

    return ", ".join(campaign_file.read(campaign).variables) or "none"


def _started_at(run_dir: Path) -> float | None:
    """When the run started (time zero of line and rate plots, as on the timeline)."""
    import contextlib

    from tricks_nats.report import load_run

    with contextlib.suppress(TricksError):
        return load_run(run_dir).started_at
    return None


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command()(watch)
    app.command()(status)
    app.command()(report)
    app.command()(plot)
