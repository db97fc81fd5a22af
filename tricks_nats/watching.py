"""`watch` and `status`: read experiments from NATS while they run, from records afterwards.

A live experiment is followed through its journal stream (an ordered consumer: every entry
once, in order). If the server goes away before the verdict arrives (the embedded server stops
when `up` ends), the rest is read from the run's journal file, so the stream a watcher prints
is always the whole journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tricks_nats import entries, statefile
from tricks_nats import protocol as p
from tricks_nats.entries import Entry, VerdictEntry
from tricks_nats.errors import TricksError, UsageError

if TYPE_CHECKING:
    from tricks_nats.bus import ExperimentState
    from tricks_nats.endpoint import Endpoint

#: One experiment as `status` shows it.
StatusRow = dict[str, Any]


def started_here(states: list[statefile.RunState]) -> list[statefile.RunState]:
    """The runs among `states` whose `up` was started in this directory."""
    cwd = statefile.here()
    return [s for s in states if s.cwd == cwd]


def pick_running() -> tuple[statefile.RunState, str]:
    """The run `watch` follows without an argument, and a line saying which one it is: the
    newest started in this directory, else the newest anywhere (saying where it was started)."""
    live = statefile.running()
    if not live:
        raise UsageError(
            "no experiment is running (start one with `tricks-nats up`), "
            "or name one: `tricks-nats watch EXPERIMENT`"
        )
    mine = started_here(live)
    state = (mine or live)[0]
    note = f"watching {state.experiment}"
    if not mine:
        note += f", started in {state.cwd or 'another directory'} (none was started here)"
    others = len(live) - 1
    if others:
        note += (
            f"; {others} more running (`tricks-nats status --all` lists them, "
            "`tricks-nats watch EXPERIMENT` picks one)"
        )
    return state, note


def resolve(experiment: str | None, runs_dir: Path) -> statefile.RunState:
    """The run `watch` means: the given one (running or finished), else `pick_running()`."""
    if experiment is None:
        return pick_running()[0]
    state = statefile.lookup(experiment)
    if state is not None:
        return state
    for candidate in (Path(experiment), runs_dir / experiment):
        if (candidate / "journal.jsonl").is_file():
            return statefile.RunState(
                experiment=candidate.name,
                run_dir=str(candidate),
                pid=0,
                started_at=0.0,
                finished=True,
            )
    raise UsageError(
        f"no experiment {experiment!r}: not running, and no records in {runs_dir / experiment}"
    )


def read_journal(run_dir: str | Path) -> list[Entry]:
    """A run's journal file; empty if there is none (yet)."""
    try:
        return entries.read(Path(run_dir) / "journal.jsonl")
    except OSError:
        return []


async def follow(
    state: statefile.RunState, emit: Callable[[Entry], None], *, from_start: bool = True
) -> str | None:
    """Emit journal entries until the verdict; return the verdict (None if it never came)."""
    if state.finished or not state.nats_url:
        return _replay(read_journal(state.run_dir), emit, after=None)
    from tricks_nats.bus import Bus, Endpoint, StreamMsg

    seen: list[Entry] = []
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: StreamMsg) -> None:
        entry = entries.decode(msg.data)
        if entry is None or done.done():
            return
        seen.append(entry)
        emit(entry)
        if isinstance(entry, VerdictEntry):
            done.set_result(entry.verdict)

    async def on_closed() -> None:
        if not done.done():
            done.set_exception(ConnectionError("the experiment's NATS went away"))

    try:
        bus = await Bus.open(
            Endpoint(state.nats_url, state.user, state.password),
            state.experiment,
            name="tricks-watch",
            budget=0,
            keep_reconnecting=False,
            on_closed=on_closed,
        )
    except TricksError:
        # The run ended between reading its state and connecting: replay its records.
        return _replay(read_journal(state.run_dir), emit, after=None)
    try:
        subject = p.journal_subject(state.experiment)
        follower = await bus.follow(subject, on_msg, new_only=not from_start, resume=False)
        try:
            return await done
        except ConnectionError:
            pass
        finally:
            await follower.stop()
    except TricksError:
        raise
    except Exception:  # the server stopped under us: the records have the rest
        pass
    finally:
        await bus.close()
    # `up` writes the verdict to its journal file before it stops its NATS server.
    return _replay(read_journal(state.run_dir), emit, after=seen[-1] if seen else None)


def _replay(
    journal: list[Entry], emit: Callable[[Entry], None], *, after: Entry | None
) -> str | None:
    start = 0
    if after is not None:
        with contextlib.suppress(ValueError):
            start = journal.index(after) + 1
    verdict = None
    for entry in journal[start:]:
        emit(entry)
        if isinstance(entry, VerdictEntry):
            verdict = entry.verdict
    return verdict


async def status(nats_url: str | None, states: list[statefile.RunState]) -> list[StatusRow]:
    """Experiments a NATS server holds; with no URL, those of `states` (runs `up` has going)."""
    from tricks_nats.endpoint import Endpoint

    if nats_url:
        return await _status_of(Endpoint.from_url(nats_url), None)
    rows: list[StatusRow] = []
    for state in states:
        if state.nats_url:
            ep = Endpoint(state.nats_url, state.user, state.password)
            for row in await _status_of(ep, state.experiment):
                rows.append({**row, "directory": state.cwd, "records": state.run_dir})
    return rows


async def _status_of(endpoint: Endpoint, only: str | None) -> list[StatusRow]:
    from tricks_nats.bus import survey

    rows = [_row(state) for state in await survey(endpoint, only)]
    return sorted(rows, key=lambda r: r["age_s"])


def _row(state: ExperimentState) -> StatusRow:
    counts = state.counts
    started = sum(v for k, v in counts.items() if k.endswith("_start"))
    stopped = sum(v for k, v in counts.items() if k.endswith("_stop"))
    verdict = None
    if state.verdict_entry is not None:
        entry = entries.decode(state.verdict_entry)
        verdict = entry.verdict if isinstance(entry, VerdictEntry) else None
    age = time.time() - state.created if state.created else 0.0
    return {
        "experiment": state.experiment,
        "age_s": round(age, 1),
        "running": started - stopped,
        "stopped": stopped,
        "started": started,
        "verdict": verdict,
        "events": {k: v for k, v in counts.items() if not k.endswith(("_start", "_stop"))},
    }
