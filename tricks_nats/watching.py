"""`watch` and `status`: read experiments from NATS while they run, from records afterwards.

A live experiment is followed through its journal stream (an ordered consumer: every entry
once, in order). If the server goes away before the verdict arrives (the embedded server stops
when `up` ends), the rest is read from the run's journal file, so the stream a watcher prints
is always the whole journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from tricks_nats import protocol as p
from tricks_nats import statefile
from tricks_nats.errors import TricksError, UsageError

Entry = dict[str, Any]


def resolve(experiment: str | None, runs_dir: Path) -> statefile.RunState:
    """The run `watch` means: the given one (running or finished), else the newest running."""
    if experiment is None:
        live = statefile.running()
        if not live:
            raise UsageError(
                "no experiment is running (start one with `tricks-nats up`), "
                "or name one: `tricks-nats watch EXPERIMENT`"
            )
        return live[0]
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
    entries = []
    path = Path(run_dir) / "journal.jsonl"
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries


async def follow(
    state: statefile.RunState, emit: Callable[[Entry], None], *, from_start: bool = True
) -> str | None:
    """Emit journal entries until the verdict; return the verdict (None if it never came)."""
    if state.finished or not state.nats_url:
        return _replay(read_journal(state.run_dir), emit, after=None)
    from nats.js.api import DeliverPolicy

    from tricks_nats.bus import Endpoint, connect

    seen: list[Entry] = []
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Any) -> None:
        try:
            entry = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            return
        if not isinstance(entry, dict) or done.done():
            return
        seen.append(entry)
        emit(entry)
        if entry.get("kind") == "verdict":
            done.set_result(str(entry.get("verdict")))

    async def on_closed() -> None:
        if not done.done():
            done.set_exception(ConnectionError("the experiment's NATS went away"))

    try:
        nc = await connect(
            Endpoint(state.nats_url, state.user, state.password),
            name="tricks-watch",
            exp=state.experiment,
            budget=0,
            keep_reconnecting=False,
            on_closed=on_closed,
        )
    except TricksError:
        # The run ended between reading its state and connecting: replay its records.
        return _replay(read_journal(state.run_dir), emit, after=None)
    try:
        js = nc.jetstream()
        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        sub = await js.subscribe(
            p.journal_subject(state.experiment),
            ordered_consumer=True,
            cb=on_msg,
            deliver_policy=policy,
        )
        try:
            return await done
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    except TricksError:
        raise
    except Exception:  # the server stopped under us: the records have the rest
        pass
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    # `up` writes the verdict to its journal file before it stops its NATS server.
    return _replay(read_journal(state.run_dir), emit, after=seen[-1] if seen else None)


def _replay(
    entries: list[Entry], emit: Callable[[Entry], None], *, after: Entry | None
) -> str | None:
    start = 0
    if after is not None:
        with contextlib.suppress(ValueError):
            start = entries.index(after) + 1
    verdict = None
    for entry in entries[start:]:
        emit(entry)
        if entry.get("kind") == "verdict":
            verdict = str(entry.get("verdict"))
    return verdict


async def status(nats_url: str | None) -> list[Entry]:
    """Experiments a NATS server holds (or, with no URL, those `up` is running here)."""
    from tricks_nats.bus import Endpoint

    if nats_url:
        from tricks_nats.running import split_url

        url, user, password, _, _ = split_url(nats_url)
        return await _status_of(Endpoint(url, user, password), None)
    rows: list[Entry] = []
    for state in statefile.running():
        if state.nats_url:
            ep = Endpoint(state.nats_url, state.user, state.password)
            rows.extend(await _status_of(ep, state.experiment))
    return rows


async def _status_of(endpoint: Any, only: str | None) -> list[Entry]:
    from tricks_nats.bus import Bus, connect

    nc = await connect(endpoint, name="tricks-status", exp=only, budget=0)
    try:
        js = nc.jetstream()
        infos = await js.streams_info()
        rows = []
        for info in infos:
            exp = p.experiment_of_stream(info.config.name or "")
            if exp is None or (only and exp != only):
                continue
            bus = Bus(nc, exp)
            rows.append(await _row(bus, js, exp, info))
        return sorted(rows, key=lambda r: r["age_s"])
    finally:
        await nc.close()


async def _row(bus: Any, js: Any, exp: str, info: Any) -> Entry:
    import nats.js.errors

    counts: dict[str, int] = {}
    prefix = f"$KV.{p.counts_bucket(exp)}."
    with contextlib.suppress(nats.js.errors.Error):
        detail = await js.stream_info(p.stream_of(p.counts_bucket(exp)), subjects_filter=">")
        for subject in detail.state.subjects or {}:
            if subject.startswith(prefix):
                key = subject[len(prefix) :]
                counts[key] = await bus.count(key)
    started = sum(v for k, v in counts.items() if k.endswith("_start"))
    stopped = sum(v for k, v in counts.items() if k.endswith("_stop"))
    verdict = None
    with contextlib.suppress(Exception):
        last = await js.get_last_msg(p.journal_stream(exp), p.journal_subject(exp, "verdict"))
        verdict = msgspec.json.decode(last.data).get("verdict")
    created = info.created
    age = 0.0
    if created:
        with contextlib.suppress(ValueError, TypeError):
            from datetime import datetime

            age = time.time() - datetime.fromisoformat(str(created)).timestamp()
    return {
        "experiment": exp,
        "age_s": round(age, 1),
        "running": started - stopped,
        "stopped": stopped,
        "started": started,
        "verdict": verdict,
        "events": {k: v for k, v in counts.items() if not k.endswith(("_start", "_stop"))},
    }
