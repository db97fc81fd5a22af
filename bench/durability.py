"""What it costs to have every acknowledged count on disk: increments/s with JetStream's default
sync and with `sync_interval: always`, side by side in one run (README, "Durability").

JetStream acknowledges a write once it is in the operating system's page cache and forces
its files to disk (fsync) every 2 minutes by default, so an OS crash or a power loss can drop
acknowledged counts, even with 3 replicas if they all lose power (Jepsen's analysis of NATS
2.12.1, 2025-12). `sync_interval: always` fsyncs before every acknowledgement.

Measured as the "increments" section measures (`measures.nats_increments`: pods register an
event in a loop, through the coordinator's registrar, which commits in groups), against two
embedded servers that differ only in that setting, taking turns at each number of writers.
The disk's own fsync rate (a small append then fsync, in a loop, where the servers keep their
store) is the ceiling of one writer with `always`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import AsyncIterator

from bench import measures
from bench.measures import Log, NatsCtx, Plan
from bench.pool import Pool
from bench.report import NATS, Row, latency_row

SETTINGS = {"default (fsync every 2 min)": None, "sync_interval: always": "always"}
DISK = "disk"


@contextlib.asynccontextmanager
async def nats_experiment(sync_interval: str | None) -> AsyncIterator[NatsCtx]:
    """`measures.nats_experiment` on a server with this `sync_interval`."""
    from tricks_nats import protocol as p
    from tricks_nats.bus import Bus, Endpoint
    from tricks_nats.counting import CountKeeper
    from tricks_nats.natsserver import EmbeddedServer
    from tricks_nats.registrar import Registrar, Rosters

    async with EmbeddedServer(monitor=True, sync_interval=sync_interval) as server:
        exp = p.new_experiment_id("durability")
        bus = await Bus.open(Endpoint(server.url), exp, name="bench-coordinator")
        watcher = CountKeeper(bus, lambda _e, _v, _pod: None)
        try:
            await bus.create_buckets()
            await watcher.start()
            await Registrar(bus, watcher).start()
            yield NatsCtx(server, bus, exp, watcher, Rosters(bus, watcher))
        finally:
            await watcher.stop()
            await bus.close()


async def durability(pool: Pool, plan: Plan, log: Log) -> list[Row]:
    rows = [await asyncio.to_thread(fsync_floor, plan.increment_seconds)]
    log(f"disk: {rows[0].ops_per_s:.0f} fsyncs/s")
    async with contextlib.AsyncExitStack() as stack:
        ctxs = {
            label: await stack.enter_async_context(nats_experiment(sync))
            for label, sync in SETTINGS.items()
        }
        for writers in plan.writers:
            one = dataclasses.replace(plan, writers=[writers])
            measured = {}
            for label, ctx in ctxs.items():
                (row,) = await measures.nats_increments(ctx, pool, one, log)
                row.system = f"{NATS}, {label}"
                measured[label] = row
                rows.append(row)
            base, synced = measured.values()
            if base.ops_per_s and synced.ops_per_s:
                ratio = synced.ops_per_s / base.ops_per_s
                synced.note = f"{ratio:.2f}x the default's increments/s; {synced.note}"
                log(
                    f"durability x{writers}: {base.ops_per_s:.0f}/s by default, "
                    f"{synced.ops_per_s:.0f}/s with sync_interval always ({ratio:.2f}x)"
                )
    return rows


def fsync_floor(seconds: float) -> Row:
    """A 100-byte append and an fsync, in a loop, in the directory the servers keep their
    store in (the system's temporary directory)."""
    done, lat = 0, []
    with tempfile.NamedTemporaryFile(prefix="tricks-nats-fsync-") as f:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t = time.monotonic()
            f.write(b"x" * 100)
            f.flush()
            os.fsync(f.fileno())
            lat.append(time.monotonic() - t)
            done += 1
    row = latency_row(
        DISK, "append + fsync", 1, lat, f"{done} in {seconds:g} s in {tempfile.gettempdir()}"
    )
    row.ops_per_s = done / seconds
    return row
