"""`tricks-nats watch`, `status` and `report`: seeing a run while it happens and afterwards."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tricks_nats.cli.output import fail
from tricks_nats.entries import KINDS, Entry
from tricks_nats.errors import TricksError


def watch(
    experiment: Annotated[
        str | None,
        typer.Argument(
            help="Experiment id (default: the one `up` is running here), or a run directory."
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
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where finished runs are.")] = Path(
        "runs"
    ),
) -> None:
    """Stream an experiment's events as they happen; exit 0 when it ends (1 if it failed)."""
    from tricks_nats.entries import json_line
    from tricks_nats.render import describe, matches
    from tricks_nats.watching import follow, resolve

    kinds = list(kind or [])
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        typer.echo(
            f"tricks-nats: error: --kind {bad[0]!r}: expected one of {', '.join(KINDS)}", err=True
        )
        raise typer.Exit(2)
    colour = sys.stdout.isatty() and not as_json

    def emit(entry: Entry) -> None:
        if matches(entry, list(tag or []), kinds):
            typer.echo(json_line(entry) if as_json else describe(entry, colour=colour))

    try:
        state = resolve(experiment, runs_dir)
        if not as_json and experiment is None:
            typer.echo(f"watching {state.experiment}", err=True)
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
    raise typer.Exit(0)


def status(
    nats_url: Annotated[
        str | None,
        typer.Option(
            "--nats-url", help="Ask this NATS server (default: the runs `up` has going here)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The experiments a NATS server holds: id, age, pods by state, verdict if finished."""
    from tricks_nats.watching import status as get_status

    try:
        rows = asyncio.run(get_status(nats_url))
    except TricksError as exc:
        fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no experiments")
        return
    typer.echo(f"{'EXPERIMENT':40} {'AGE':>8} {'RUNNING':>8} {'STOPPED':>8}  VERDICT")
    for r in rows:
        typer.echo(
            f"{r['experiment']:40} {r['age_s']:>7.0f}s {r['running']:>8} "
            f"{r['stopped']:>8}  {r['verdict'] or '-'}"
        )


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run's records: runs/<experiment-id>.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write a timeline: .png (matplotlib) or .html (plotly)."
        ),
    ] = None,
) -> None:
    """Summarise a finished run; with -o, draw its timeline (needs tricks-nats[report])."""
    from tricks_nats.report import load_run, text_summary

    try:
        run = load_run(run_dir)
        typer.echo(text_summary(run))
        if output is not None:
            from tricks_nats.report import draw

            draw(run, output)
            typer.echo(f"timeline written to {output}")
    except TricksError as exc:
        fail(exc)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command()(watch)
    app.command()(status)
    app.command()(report)
