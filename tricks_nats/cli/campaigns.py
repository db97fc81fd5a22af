"""What `up` prints and runs: one experiment, or a campaign of them (and `resume`).

A single run prints its journal (or a live view on a terminal) and a verdict line. A campaign
prints a line as each run starts (k of n, its variables, the verdicts so far, the time left)
and as it ends; on a terminal each run also gets its live view.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tricks_nats.cli.output import fail, say
from tricks_nats.errors import TricksError

if TYPE_CHECKING:
    from tricks_nats.campaign import Progress, RunOutput
    from tricks_nats.entries import Entry
    from tricks_nats.liveview import LiveView
    from tricks_nats.running import UpOptions
    from tricks_nats.spec import Experiment
    from tricks_nats.study import Study


FailFastOpt = Annotated[
    bool, typer.Option("--fail-fast", help="Stop a campaign at its first run that fails.")
]
RetryFailedOpt = Annotated[
    bool, typer.Option("--retry-failed", help="On resume: run the failed runs again too.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="On resume: go on even though the spec has changed.")
]


@dataclass(frozen=True)
class Show:
    quiet: bool = False
    as_json: bool = False
    #: stdout is a terminal: a live view, unless quiet or JSON.
    live: bool = False

    @property
    def lines(self) -> bool:
        return not self.quiet and not self.as_json


@dataclass(frozen=True)
class Flags:
    fail_fast: bool = False
    retry_failed: bool = False
    force: bool = False


def dry_run(study: Study) -> None:
    """`up --dry-run`: the runs, in order, with their variables."""
    from tricks_nats.variables import label

    say(f"{study.source}: {study.describe()}")
    for run in study.runs:
        exp = study.experiments[run.config]
        shown = label(run.variables) or "no variables"
        say(
            f"  run {run.index}: configuration {run.config + 1}, repetition {run.repetition}: "
            f"{shown} ({exp.pod_count} pods)"
        )


def _journal_printer(
    show: Show, live: LiveView | None
) -> tuple[Callable[[Entry], None], Callable[[str, Path], None]]:
    from tricks_nats.entries import VerdictEntry, json_line
    from tricks_nats.render import describe

    def on_journal(entry: Entry) -> None:
        if live is not None:
            live.on_journal(entry)
        elif show.as_json:
            say(json_line(entry))
        elif not show.quiet and not isinstance(entry, VerdictEntry):
            say(describe(entry))

    def on_start(exp_id: str, root: Path) -> None:
        if live is not None:
            live.on_start(exp_id, root)
        elif show.lines:
            say(f"experiment {exp_id}: records in {root}")

    return on_journal, on_start


def _live(exp: Experiment, show: Show, *, transient: bool = False) -> LiveView | None:
    if not show.live or not show.lines:
        return None
    from tricks_nats.liveview import LiveView

    return LiveView(exp, transient=transient)


def single(exp: Experiment, opts: UpOptions, show: Show) -> int:
    """One experiment: its journal (or live view), then its verdict line and what to look at
    next (how pods ended, events, failing logs, records); the exit code."""
    from tricks_nats.cli import epilogue
    from tricks_nats.running import up as run_up
    from tricks_nats.workflow import open_ended

    if not show.quiet:
        for note in open_ended(exp, opts.timeout):
            say(f"tricks-nats: note: {note}", err=True)
    live = _live(exp, show)
    on_journal, on_start = _journal_printer(show, live)
    where: list[Path] = []

    def started(exp_id: str, root: Path) -> None:
        where.append(root)
        on_start(exp_id, root)

    opts = replace(opts, on_journal=on_journal, on_start=started)
    with live if live is not None else contextlib.nullcontext():
        outcome = asyncio.run(run_up(exp, opts))
        if live is not None:
            live.on_end(epilogue.duration(outcome))
    if show.as_json:
        return outcome.exit_code
    err = outcome.exit_code != 0
    say(epilogue.verdict_line(outcome), err=err)
    if not show.quiet:
        records = where[0] if where else None
        for line in epilogue.details(outcome, exp, records, live=live is not None):
            say(line, err=err)
    return outcome.exit_code


def up(study: Study, opts: UpOptions, show: Show, flags: Flags, resume: Path | None) -> int:
    """Every run of a campaign still to do; the exit code (0: every run succeeded)."""
    from tricks_nats import campaign as cmod
    from tricks_nats.running import preflight

    if resume is not None:
        found, experiments = cmod.resumable(resume, study, force=flags.force)
        directory = resume
    else:
        experiments = dict(enumerate(study.experiments))
    for exp in experiments.values():  # before the first run: every configuration can start
        preflight(exp, opts)
    if resume is None:
        found, directory = cmod.new(study, opts.runs_dir)
    todo = found.todo(retry_failed=flags.retry_failed)
    if show.lines:
        what = f"{len(todo)} of {len(found.runs)} runs" if resume else study.describe()
        if resume and not todo:
            failed = sum(r.state in ("failed", "error") for r in found.runs)
            what = "every run has a verdict: nothing to run" + (
                f" (--retry-failed runs the {failed} failed again)" if failed else ""
            )
        say(f"campaign {found.campaign}: {what}; records in {directory}")
    printer = _Progress(show)
    options = cmod.CampaignOptions(
        fail_fast=flags.fail_fast,
        retry_failed=flags.retry_failed,
        force=flags.force,
        on_run_start=printer.start,
        on_run_end=printer.end,
        around_run=printer.around,
    )
    try:
        ended = asyncio.run(cmod.run(found, directory, experiments, opts, options))
    except KeyboardInterrupt:
        say(f"interrupted: `tricks-nats resume {directory}` runs what is left", err=True)
        raise
    c = ended.campaign
    ok = sum(r.state == "succeeded" for r in c.runs)
    done = sum(r.state in ("succeeded", "failed", "error") for r in c.runs)
    took = _duration(sum(r.duration_s or 0.0 for r in c.runs))
    line = f"campaign {c.campaign}: {ok} of {len(c.runs)} runs succeeded ({took} of runs)"
    if done < len(c.runs):
        line += f"; {len(c.runs) - done} not run: `tricks-nats resume {directory}`"
    if ended.exit_code == 130:
        line = f"interrupted: {line}"
    if not show.quiet or ended.exit_code != 0:  # with --json: on stderr, out of the stream
        say(line, err=ended.exit_code != 0 or show.as_json)
        if show.lines and done:
            say(f"results: {directory / 'results.csv'}; `tricks-nats report {directory}`")
    return ended.exit_code


class _Progress:
    """The campaign's lines, and each run's own output (live view, JSON lines)."""

    def __init__(self, show: Show) -> None:
        self.show = show

    def start(self, progress: Progress, exp: Experiment) -> None:
        if not self.show.lines:
            return
        from tricks_nats.variables import label

        c, r = progress.campaign, progress.run
        ok = sum(x.state == "succeeded" for x in c.runs)
        bad = sum(x.state in ("failed", "error") for x in c.runs)
        left = f", about {_duration(progress.eta_s)} left" if progress.eta_s is not None else ""
        say(
            f"run {progress.position}/{progress.total} (#{r.index}, repetition {r.repetition}): "
            f"{label(r.variables) or 'no variables'} [{ok} succeeded, {bad} failed{left}]"
        )

    def end(self, progress: Progress) -> None:
        r = progress.run
        if self.show.as_json:
            import json

            say(
                json.dumps(
                    {
                        "kind": "campaign_run",
                        "campaign": progress.campaign.campaign,
                        "run": r.index,
                        "of": len(progress.campaign.runs),
                        "variables": r.variables,
                        "repetition": r.repetition,
                        "verdict": r.verdict,
                        "experiment": r.experiment,
                        "duration_s": r.duration_s,
                    }
                )
            )
        elif self.show.lines:
            reason = f": {r.reason}" if r.reason and r.state != "succeeded" else ""
            say(f"  {r.verdict} in {_duration(r.duration_s or 0.0)}{reason}")

    @contextlib.contextmanager
    def around(self, progress: Progress, exp: Experiment) -> Iterator[RunOutput]:
        """A run's own output: its live view on a terminal, its journal with --json."""
        from tricks_nats.campaign import RunOutput

        live = _live(exp, self.show, transient=True)
        if live is None and not self.show.as_json:
            yield RunOutput()
            return
        on_journal, on_start = _journal_printer(self.show, live)
        with live if live is not None else contextlib.nullcontext():
            yield RunOutput(on_journal, on_start)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def resume(
    campaign_dir: Annotated[Path, typer.Argument(help="The campaign's directory.")],
    retry_failed: RetryFailedOpt = False,
    force: ForceOpt = False,
    fail_fast: FailFastOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the verdict.")] = False,
) -> None:
    """Go on with an interrupted campaign: run what has no verdict yet, with its spec."""
    import sys

    from tricks_nats import campaign_file
    from tricks_nats import study as studymod
    from tricks_nats.running import UpOptions

    try:
        found = campaign_file.read(campaign_dir)
        path = Path(found.spec_path)
        if path.is_file():
            current = studymod.load(path, repeat=found.repeat)
        else:  # moved or deleted: the text the campaign began with
            current = studymod.parse(
                found.spec, str(path), base_dir=path.parent, repeat=found.repeat
            )
        show = Show(quiet=quiet, live=sys.stdout.isatty())
        code = up(current, UpOptions(), show, Flags(fail_fast, retry_failed, force), campaign_dir)
    except TricksError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(resume)
