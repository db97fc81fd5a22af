"""Which run (or campaign) directory a command means: `runs/<id>`, a path, or an id."""

from __future__ import annotations

from pathlib import Path

from tricks_nats.errors import UsageError

#: The file that makes a directory a campaign's.
CAMPAIGN_JSON = "campaign.json"


def find_run(run: str | Path, runs_dir: Path = Path("runs")) -> Path:
    """The records of `run`: a run directory as given, or `runs_dir/<run>` for an experiment
    id; a UsageError naming both places when neither holds a run (running or finished)."""
    for candidate in (Path(run), runs_dir / str(run)):
        if (candidate / "journal.jsonl").is_file() or (candidate / "spec.yaml").is_file():
            return candidate
    campaign = find_campaign(run, runs_dir)
    if campaign is not None:
        runs = sorted(p.name for p in campaign.iterdir() if (p / "spec.yaml").is_file())
        example = f" (e.g. {campaign / runs[0]})" if runs else ""
        raise UsageError(
            f"{campaign} is a campaign: give one of its runs{example}, or use "
            "`tricks-nats report` or `plot`, which compare its runs"
        )
    if Path(run).is_absolute() or "/" in str(run):
        raise UsageError(f"no run at {run}: no journal.jsonl or spec.yaml there")
    raise UsageError(f"no run {str(run)!r}: not a run directory, and nothing in {runs_dir / run}")


def find_campaign(run: str | Path, runs_dir: Path = Path("runs")) -> Path | None:
    """The campaign directory `run` names (a path, or an id under `runs_dir`), or None."""
    for candidate in (Path(run), runs_dir / str(run)):
        if (candidate / CAMPAIGN_JSON).is_file():
            return candidate
    return None


def is_finished(run_dir: Path) -> bool:
    """`summary.json` holds a verdict (the space reserved at the start is blank)."""
    try:
        with (run_dir / "summary.json").open("rb") as f:
            return bool(f.read(64).strip())
    except OSError:
        return False


def spec_tags(run_dir: Path) -> list[tuple[str, int]]:
    """The run's (tag, replicas) in the spec's order; empty if its spec cannot be read."""
    from tricks_nats import spec as specmod
    from tricks_nats.errors import TricksError

    for runtime in (None, "kubernetes"):  # the spec was valid for the runtime it ran on
        try:
            exp = specmod.load(run_dir / "spec.yaml", runtime=runtime)
        except TricksError:
            continue
        return [(t.tag, t.replicas) for t in exp.tags]
    return []
