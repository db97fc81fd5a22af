"""`tricks-nats up` on a campaign: every (configuration, repetition) as a full run, one after
another, in `runs/<campaign-id>/`; and resuming one that was interrupted.

Each run is `running.up` as for a single spec (its own experiment id, NATS state and records);
this module only orders the runs and keeps `campaign.json` and `results.csv` in step, writing
both after every change of state so that Ctrl-C or SIGKILL loses at most the run in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tricks_nats import campaign_file as cf
from tricks_nats import protocol as p
from tricks_nats.entries import Entry
from tricks_nats.errors import TricksError, UsageError
from tricks_nats.running import UpOptions
from tricks_nats.spec import Experiment
from tricks_nats.study import Study

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a campaign stands, for the user: sent as each run starts and ends."""

    run: cf.RunEntry
    position: int  # 1-based, among the runs this invocation does
    total: int
    campaign: cf.CampaignFile
    #: Seconds the runs left should take, from the runs done (None until one is done).
    eta_s: float | None


@dataclass
class CampaignOptions:
    #: Stop at the first run that does not succeed.
    fail_fast: bool = False
    #: On resume, run the failed runs again too.
    retry_failed: bool = False
    #: On resume, run with the spec as it is now even if it changed since the campaign began.
    force: bool = False
    on_run_start: Callable[[Progress, Experiment], None] | None = None
    on_run_end: Callable[[Progress], None] | None = None
    #: Entered around each run (e.g. a live view of that run), giving the run's own output.
    around_run: Callable[[Progress, Experiment], AbstractContextManager[RunOutput]] | None = None


@dataclass
class RunOutput:
    """Where one run's journal goes (None: nowhere)."""

    on_journal: Callable[[Entry], None] | None = None
    on_start: Callable[[str, Path], None] | None = None


@dataclass
class Ended:
    campaign: cf.CampaignFile
    directory: Path
    exit_code: int


def new(study: Study, runs_dir: Path) -> tuple[cf.CampaignFile, Path]:
    """A campaign directory with every run pending."""
    cid = p.new_experiment_id(study.name)
    directory = runs_dir / cid
    try:
        directory.mkdir(parents=True)
    except OSError as exc:
        raise UsageError(
            f"cannot write run records under {runs_dir}: {exc.strerror or exc}"
        ) from exc
    campaign = cf.CampaignFile(
        campaign=cid,
        name=study.name,
        spec_path=str(Path(study.source).resolve()),
        spec_sha256=study.sha256,
        spec=study.text,
        variables=list(study.variables),
        configurations=len(study.configurations),
        repeat=study.repeat,
        started_at=round(time.time(), 3),
        runs=[cf.RunEntry(r.index, r.config, r.repetition, dict(r.variables)) for r in study.runs],
    )
    _save(directory, campaign)
    return campaign, directory


def resumable(
    directory: Path, study: Study, *, force: bool = False
) -> tuple[cf.CampaignFile, dict[int, Experiment]]:
    """The campaign in `directory`, and the experiment of each of its configurations; refused
    if the spec changed since the campaign began (unless `force`)."""
    campaign = cf.read(directory)
    if study.sha256 != campaign.spec_sha256 and not force:
        raise UsageError(
            f"{study.source} changed since campaign {campaign.campaign} began: "
            "--force runs what is left with the spec as it is now"
        )
    return campaign, experiments_for(campaign, study)


def experiments_for(campaign: cf.CampaignFile, study: Study) -> dict[int, Experiment]:
    """Each configuration of the campaign (by index) as `study` writes it: the same values."""
    found = {
        _key(c.variables): e for c, e in zip(study.configurations, study.experiments, strict=True)
    }
    out: dict[int, Experiment] = {}
    for run in campaign.runs:
        exp = found.get(_key(run.variables))
        if exp is None:
            if run.state in cf.FINAL:
                continue
            shown = ", ".join(f"${k}={v}" for k, v in run.variables.items()) or "no variables"
            raise UsageError(
                f"{study.source} has no configuration {shown}, which campaign "
                f"{campaign.campaign} still has to run"
            )
        out[run.config] = exp
    return out


def _key(variables: Mapping[str, object]) -> str:
    return msgspec.json.encode(dict(sorted(variables.items()))).decode()


async def run(
    campaign: cf.CampaignFile,
    directory: Path,
    experiments: dict[int, Experiment],
    up_opts: UpOptions,
    opts: CampaignOptions,
) -> Ended:
    """Run every run of `campaign` that is still to do (new, or resumed)."""
    with _held(directory):
        return await _Runner(campaign, directory, experiments, up_opts, opts).run()


@contextlib.contextmanager
def _held(directory: Path) -> Iterator[None]:
    """One `up` at a time per campaign (a lock the kernel drops if `up` is killed)."""
    import fcntl

    with (directory / cf.LOCK).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"campaign {directory} is being run by another tricks-nats up right now"
            ) from None
        yield


@dataclass
class _Runner:
    campaign: cf.CampaignFile
    directory: Path
    experiments: dict[int, Experiment]
    up_opts: UpOptions
    opts: CampaignOptions

    def __post_init__(self) -> None:
        from tricks_nats import provenance

        self.results = cf.Results(self.directory)
        self.todo = self.campaign.todo(retry_failed=self.opts.retry_failed)
        self.durations: list[float] = []
        self.origin = provenance.collect(self.campaign.spec_path)

    async def run(self) -> Ended:
        c = self.campaign
        c.state = "running"
        for entry in self.todo:  # a run in progress when `up` was killed starts over
            if entry.run_dir is not None:
                entry.previous.append(entry.run_dir)
            entry.state, entry.verdict, entry.reason = "pending", None, None
            entry.run_dir = entry.experiment = None
        _save(self.directory, c)
        self.results.write(c)  # again on resume: mends one a full disk cut short
        for position, entry in enumerate(self.todo, 1):
            await self.one(position, entry)
            if entry.state == "interrupted":
                return Ended(c, self.directory, 130)
            if self.opts.fail_fast and entry.state != "succeeded":
                c.state = "interrupted"
                _save(self.directory, c)
                return Ended(c, self.directory, 1)
        c.state = "finished"
        _save(self.directory, c)
        return Ended(c, self.directory, c.exit_code)

    async def one(self, position: int, entry: cf.RunEntry) -> None:
        from tricks_nats.running import up

        exp = self.experiments[entry.config]
        attempt = len(entry.previous) + 1
        exp_id = f"{self.campaign.campaign}-{entry.index:03d}"
        exp_id += f"-{attempt}" if attempt > 1 else ""
        entry.state, entry.experiment, entry.run_dir = "running", exp_id, exp_id
        entry.started_at = round(time.time(), 3)
        _save(self.directory, self.campaign)
        eta = _eta(self.durations, self.todo, position)
        progress = Progress(entry, position, len(self.todo), self.campaign, eta)
        if self.opts.on_run_start:
            self.opts.on_run_start(progress, exp)
        run_opts = dataclasses.replace(
            self.up_opts,
            runs_dir=self.directory,
            experiment_id=exp_id,
            provenance=msgspec.structs.replace(self.origin),
        )
        around = self.opts.around_run(progress, exp) if self.opts.around_run else None
        try:
            with around or contextlib.nullcontext(RunOutput()) as output:
                run_opts.on_journal, run_opts.on_start = output.on_journal, output.on_start
                outcome = await up(exp, run_opts)
            entry.state = cf.state_of(outcome.verdict)
            entry.verdict, entry.reason = outcome.verdict, outcome.reason
        except TricksError as exc:  # the run could not be made (a pod's command is missing...)
            entry.state, entry.verdict, entry.reason = "error", "error", str(exc)
        except BaseException:  # Ctrl-C between two runs' steps, or cancelled
            entry.state, entry.verdict, entry.reason = "interrupted", "interrupted", "interrupted"
            self.finish(entry)
            raise
        self.finish(entry)
        progress.eta_s = _eta(self.durations, self.todo, position + 1)
        if self.opts.on_run_end:
            self.opts.on_run_end(progress)

    def finish(self, entry: cf.RunEntry) -> None:
        entry.ended_at = round(time.time(), 3)
        if entry.started_at is not None:
            entry.duration_s = round(entry.ended_at - entry.started_at, 3)
            if entry.state in cf.FINAL:
                self.durations.append(entry.duration_s)
        if entry.run_dir is not None and not (self.directory / entry.run_dir).is_dir():
            entry.run_dir = None  # refused before it had records (a bad command, no cluster)
        if entry.state == "interrupted":
            self.campaign.state = "interrupted"
        _save(self.directory, self.campaign)
        self.results.write(self.campaign)


def _eta(durations: list[float], todo: list[cf.RunEntry], next_position: int) -> float | None:
    if not durations:
        return None
    left = len(todo) - next_position + 1
    return sum(durations) / len(durations) * max(0, left)


def _save(directory: Path, campaign: cf.CampaignFile) -> None:
    """campaign.json now; a disk that refuses it is said once and the runs go on (each run's
    own records still hold its verdict)."""
    try:
        cf.write(directory, campaign)
    except OSError as exc:
        log.warning("cannot write %s: %s", cf.path_of(directory), exc)
