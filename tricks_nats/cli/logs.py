"""`tricks-nats logs`: every pod's log of a run, merged in time order, like `docker compose logs`.

The merging and filtering are in tricks_nats.logmerge; this is the command: options, the run's
spec (for the pods' order, colours and width), output that survives a closed pipe, and
`--follow`'s loop, which checks the files on disk a few times a second (as `tail -f` does).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from tricks_nats.cli.output import fail
from tricks_nats.errors import TricksError, UsageError

#: Seconds between two looks at the files while following.
POLL_S = 0.2


class _PipeClosed(Exception):
    """Whoever reads our output has gone (`logs RUN | head`)."""


def _write(strings: Iterable[str]) -> None:
    """Print, in batches, straight to stdout's bytes (UTF-8); then flush."""
    out = sys.stdout.buffer
    batch: list[str] = []
    try:
        for s in strings:
            batch.append(s)
            if len(batch) >= 1000:
                out.write("".join(batch).encode("utf-8", "replace"))
                batch.clear()
        if batch:
            out.write("".join(batch).encode("utf-8", "replace"))
        out.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that stays quiet.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        raise _PipeClosed from None


def _up_alive(run_dir: Path) -> bool | None:
    """Whether the `up` recording this run (here, per its state file) is still at it; None
    when no state file names this run (it may run elsewhere, or not have written it yet)."""
    from tricks_nats import statefile

    state = statefile.lookup(run_dir.name)
    if state is None or Path(state.run_dir).resolve() != run_dir.resolve():
        return None
    if state.finished:
        return False
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def logs(
    run: Annotated[
        str,
        typer.Argument(metavar="RUN", help="A run directory, or an experiment id (in --runs-dir)."),
    ],
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Then print new lines as the pods write them; exit when the run ends.",
        ),
    ] = False,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", metavar="TAG", help="Only this tag's pods (repeatable)."),
    ] = None,
    pod: Annotated[
        list[str] | None,
        typer.Option(
            "--pod",
            metavar="POD",
            help="Only this pod: N (pod N of each selected tag) or TAG-N (repeatable).",
        ),
    ] = None,
    grep: Annotated[
        str | None,
        typer.Option(
            "--grep", metavar="REGEX", help="Only lines matching this (Python) regular expression."
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="WHEN",
            help="Only lines from this time on: a duration back from now (10s, 1.5m, 1h30m), "
            "an ISO-8601 time, or a unix timestamp.",
        ),
    ] = None,
    timestamps: Annotated[
        bool,
        typer.Option("--timestamps", "-t", help="Show each line's time (HH:MM:SS.mmm, local)."),
    ] = False,
    no_color: Annotated[
        bool,
        typer.Option("--no-color", help="No colours (there are none unless on a terminal)."),
    ] = False,
    runs_dir: Annotated[
        Path, typer.Option("--runs-dir", metavar="DIR", help="Where runs are.")
    ] = Path("runs"),
) -> None:
    """Print the pods' logs of a run (running or finished), merged in time order.

    Each line shows as `TAG-ID | text`, ordered by when it was read from its pod (equal times:
    the spec's order of pods). A log without a time index (an older run) is timed by its
    file's modification time. While the run goes on, a line still being written waits for its
    end. With --follow, each check of the files prints what arrived since the last one,
    merged by time; it exits 0 when the run ends (1 if `up` died without a verdict).
    """
    import re

    from tricks_nats import logmerge, rundir

    try:
        run_dir = rundir.find_run(run, runs_dir)
        selection = logmerge.Selection.parse(tag or (), pod or ())
        try:
            search = re.compile(grep).search if grep is not None else None
        except re.error as exc:
            raise UsageError(f"--grep {grep!r}: not a regular expression: {exc}") from None
        cutoff = logmerge.parse_since(since) if since is not None else None
        spec_tags = rundir.spec_tags(run_dir)
        if spec_tags:
            selection.check(spec_tags)
    except TricksError as exc:
        fail(exc)
    colour = sys.stdout.isatty() and not no_color and not os.environ.get("NO_COLOR")
    logset = logmerge.LogSet(run_dir / "logs", selection, spec_tags, since=cutoff, grep=search)

    def show(*, whole_only: bool) -> None:
        logset.refresh()
        lines = logset.lines(whole_only=whole_only)
        _write(logmerge.render(lines, logset.width, colour=colour, timestamps=timestamps))

    try:
        if not follow:
            over = rundir.is_finished(run_dir) or _up_alive(run_dir) is False
            show(whole_only=not over)
            return
        seen_live = False
        while True:
            done = rundir.is_finished(run_dir)
            abandoned = False
            if not done:
                alive = _up_alive(run_dir)
                seen_live = seen_live or bool(alive)
                if alive is False or (alive is None and seen_live):
                    done = rundir.is_finished(run_dir)  # `up` may have just written it
                    abandoned = not done
            show(whole_only=not (done or abandoned))
            if abandoned:
                fail(f"{run_dir.name} ended without a verdict (was `up` killed?)", 1)
            if done:
                return
            time.sleep(POLL_S)
    except _PipeClosed:
        return
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    """Add this module's command to the main app."""
    app.command()(logs)
