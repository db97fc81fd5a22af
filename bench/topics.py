"""Topics (`publish` / `subscribe`, PROTOCOL.md 6.7, 6.8) side by side with Redis in one run.

tricks-nats: the run's topics stream stores each message and republishes it on
`tricks.<exp>.stored.<topic>`; a listening subscriber gets the republished message (one
delivery each), a late one reads the topic with one `$JS.API.STREAM.MSG.GET` per message.
The peer is Redis as Testground's sync service uses it: a stream per topic, `XADD` to
publish, one `XREAD BLOCK` per subscriber to listen, `XREAD` from 0 to catch up (plain
PUBLISH/SUBSCRIBE, which keeps nothing, and core NATS publish as the floors of fan-out).

- "topic fan-out" (N listening subscribers, spread over the workers, one connection each):
  one small publish, from the publish sent to the last subscriber having it; p50 over rounds.
- "topic catch-up" (K late subscribers, the topic already holding M messages): from the go to
  the last subscriber having read all M.
- "topic publish" (1 and 50 publishers, each waiting for its acknowledgement): messages/s.

The parent stands up the experiment as `measures.nats_experiment` does (the topics stream is
one of `Bus.create_buckets`) and publishes the fan-out and catch-up messages with its own
`Driver`; the pods' drivers (one connection each) live in the workers. The ratios to Redis
are in each tricks-nats row's note and in the side-by-side table (`side_by_side`).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable
from typing import Any

from bench.measures import (
    TIMEOUT_S,
    CpuMeter,
    Log,
    NatsCtx,
    Plan,
    _fan_out,
    _flat,
    nats_experiment,
    now,
    vm_hwm_mb,
)
from bench.peers import Unavailable
from bench.pool import Pool, split
from bench.report import FLOOR, NATS, REDIS, Row, _fmt, find, latency_row

FANOUT = "topic fan-out"
FANOUT_PUBSUB = "topic fan-out, pub/sub (floor)"
FANOUT_CORE = "topic fan-out, core publish (floor)"
CATCHUP = "topic catch-up"
CATCHUP_ONE = "topic catch-up, 1 entry a read"
PUBLISH = "topic publish"
FANOUT_SIZES = (100, 1000)
CATCHUP_M = 1000
CATCHUP_K = (1, 100)
PAYLOAD = b"x" * 64  # a small message
#: Redis's XADD per prefill pipeline.
PREFILL_BATCH = 500


async def topics_all(pool: Pool, plan: Plan, log: Log) -> list[Row]:
    """Every topics measure, tricks-nats and Redis in turn for each (Redis's rows say why
    when it is not there)."""
    from bench.peers import redis_server

    async with nats_experiment() as ctx:
        try:
            import redis  # noqa: F401

            with redis_server() as (port, pid):
                return await _all(ctx, pool, plan, log, (port, pid))
        except Unavailable as exc:
            log(f"Redis unavailable: {exc}")
            why = f"unavailable: {exc}"
        except ImportError as exc:
            why = f"unavailable: {exc} (pip install -e '.[bench]')"
        rows = await _all(ctx, pool, plan, log, None)
        rows += [Row(REDIS, FANOUT, n, note=why) for n in FANOUT_SIZES]
        rows += [Row(REDIS, CATCHUP, k, note=why) for k in CATCHUP_K]
        rows += [Row(REDIS, PUBLISH, w, note=why) for w in plan.writers]
        return rows


async def _all(
    ctx: NatsCtx, pool: Pool, plan: Plan, log: Log, redis_at: tuple[int, int] | None
) -> list[Row]:
    from tricks_nats.driver import Config, Driver

    most = max(*FANOUT_SIZES, *CATCHUP_K, *plan.writers)
    groups = split(most, pool.size)
    log(
        f"topics: {most} drivers and {most if redis_at else 0} Redis clients "
        f"over {len(groups)} procs"
    )
    await pool.call("nats_open", [{"url": ctx.url, "exp": ctx.exp, "ids": g} for g in groups])
    publisher = await Driver.connect(
        Config(
            tag="bench-publisher",
            replicas=0,
            pod_id=0,
            experiment=ctx.exp,
            pod_ip="127.0.0.1",
            nats_url=ctx.url,
        )
    )
    admin: Any = None
    rows: list[Row] = []
    try:
        if redis_at is not None:
            import redis.asyncio as aioredis

            admin = aioredis.Redis(host="127.0.0.1", port=redis_at[0])
            await pool.call("redis_open", [{"port": redis_at[0], "k": len(g)} for g in groups])
        for n in FANOUT_SIZES:
            rows.append(await _nats_fanout(ctx, pool, plan, publisher, n))
            log(f"tricks-nats {FANOUT} N={n}: {rows[-1].p50_ms:.2f} ms p50; {rows[-1].note}")
            if admin is not None and redis_at is not None:
                rows.append(await _redis_fanout(admin, pool, plan, n))
                rows[-1].rss_mb = vm_hwm_mb(redis_at[1])  # the peak so far
                log(f"Redis {FANOUT} N={n}: {rows[-1].p50_ms:.2f} ms p50")
                rows.append(await _redis_pubsub_fanout(admin, pool, plan, n))
                log(f"Redis {FANOUT_PUBSUB} N={n}: {rows[-1].p50_ms:.2f} ms p50")
        rows += await _core_floor(ctx, pool, plan, log)
        rows += await _nats_catchup(ctx, pool, plan, publisher, log)
        if admin is not None:
            rows += await _redis_catchup(admin, redis_at, pool, plan, log)
        for writers in plan.writers:
            rows.append(await _nats_publish(ctx, pool, plan, writers))
            log(f"tricks-nats {PUBLISH} x{writers}: {rows[-1].ops_per_s:.0f}/s")
            if admin is not None and redis_at is not None:
                rows.append(await _redis_publish(redis_at[1], pool, plan, writers))
                log(f"Redis {PUBLISH} x{writers}: {rows[-1].ops_per_s:.0f}/s")
    finally:
        await publisher.close()
        await pool.call("nats_close", [{}] * len(groups))
        if admin is not None:
            await pool.call("redis_close", [{}] * len(groups))
            await admin.aclose()
    _ratios(rows)
    return rows


# -- fan-out --------------------------------------------------------------------------------


async def _nats_fanout(ctx: NatsCtx, pool: Pool, plan: Plan, publisher: Any, n: int) -> Row:
    """N drivers listen on a fresh topic; per round, each waits for its next message and the
    parent's driver publishes one."""
    per = [len(g) for g in split(n, pool.size)]
    topic = f"fan{n}"
    await pool.call("topic_listen", [{"topic": topic, "count": c} for c in per])
    lat, acked, deliveries = [], [], []
    meter = CpuMeter(ctx.server.pid, pool)
    try:
        for rep in range(plan.warmup + plan.fanout_repeats):
            await pool.call("topic_arm", [{"timeout": TIMEOUT_S}] * len(per))
            before = await ctx.out_msgs()
            meter.begin()
            sent = now()
            seq = await publisher.publish(topic, PAYLOAD)
            ack = now()
            got = _flat(await pool.call("collect", [{}] * len(per)))
            meter.end()
            if len(got) != n or any(s != seq for _, s in got):
                raise RuntimeError(f"fan-out N={n}: {len(got)} receipts, not all of seq {seq}")
            await asyncio.sleep(0.02)
            if rep >= plan.warmup:
                lat.append(max(t for t, _ in got) - sent)
                acked.append(ack - sent)
                deliveries.append(await ctx.out_msgs() - before)
    finally:
        await pool.call("topic_unlisten", [{}] * len(per))
    rounds = len(lat)
    return latency_row(
        NATS,
        FANOUT,
        n,
        lat,
        f"{len(per)} procs, {rounds} rounds; N listening Driver.subscribe, one "
        f"Driver.publish of {len(PAYLOAD)} B: from the publish sent to the last subscriber's "
        f"next() returned; the publish's ack p50 {statistics.median(acked) * 1e3:.2f} ms; "
        f"{(statistics.median(deliveries) - 1) / n:.2f} deliveries per subscriber (+1 ack); "
        f"{meter.per_op(rounds + plan.warmup, 'ms', 1e3).replace('/op', '/publish')}",
        deliveries=statistics.median(deliveries),
        rss_mb=ctx.rss(),
    )


async def _redis_fanout(admin: Any, pool: Pool, plan: Plan, n: int) -> Row:
    """N clients each block in XREAD after the stream's last entry; per round one XADD."""
    per = [len(g) for g in split(n, pool.size)]
    key = f"fan{n}"
    after = "0-0"
    lat, acked = [], []
    for rep in range(plan.warmup + plan.fanout_repeats):
        await pool.call(
            "redis_xread_arm",
            [
                {"key": key, "after": after, "count": c, "block_ms": int(TIMEOUT_S * 1e3)}
                for c in per
            ],
        )
        await _until(lambda: _blocked(admin), n, f"{n} XREAD BLOCK on {key}")
        sent = now()
        after = (await admin.xadd(key, {"d": PAYLOAD})).decode()
        ack = now()
        got = _flat(await pool.call("collect", [{}] * len(per)))
        if len(got) != n or any(i != after for _, i in got):
            raise RuntimeError(f"Redis fan-out N={n}: {len(got)} receipts, not all of {after}")
        if rep >= plan.warmup:
            lat.append(max(t for t, _ in got) - sent)
            acked.append(ack - sent)
    return latency_row(
        REDIS,
        FANOUT,
        n,
        lat,
        f"{len(per)} procs, {len(lat)} rounds; Testground's sync service: N clients blocked in "
        f"XREAD BLOCK, one XADD of {len(PAYLOAD)} B: from the XADD sent to the last XREAD "
        f"returned; the XADD's reply p50 {statistics.median(acked) * 1e3:.2f} ms",
    )


async def _redis_pubsub_fanout(admin: Any, pool: Pool, plan: Plan, n: int) -> Row:
    """N clients SUBSCRIBEd to a channel; per round one PUBLISH (nothing is kept)."""
    per = [len(g) for g in split(n, pool.size)]
    channel = f"fan{n}:live"
    await pool.call("redis_sub_listen", [{"channel": channel, "count": c} for c in per])
    lat = []
    try:

        async def subscribed() -> int:
            got = dict(await admin.pubsub_numsub(channel))
            return int(got.get(channel.encode(), 0))

        await _until(subscribed, n, f"{n} SUBSCRIBE to {channel}")
        for rep in range(plan.warmup + plan.fanout_repeats):
            await pool.call("redis_sub_arm", [{"channel": channel, "count": c} for c in per])
            sent = now()
            await admin.publish(channel, PAYLOAD)
            got = _flat(await pool.call("collect", [{}] * len(per)))
            if rep >= plan.warmup:
                lat.append(max(got) - sent)
    finally:
        await pool.call("redis_sub_unlisten", [{"channel": channel, "count": c} for c in per])
    return latency_row(
        REDIS,
        FANOUT_PUBSUB,
        n,
        lat,
        f"{len(per)} procs, {len(lat)} rounds; N SUBSCRIBE, one PUBLISH (kept nowhere: a "
        f"late subscriber misses it): from the PUBLISH sent to the last subscriber's message",
    )


async def _core_floor(ctx: NatsCtx, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    """Core NATS publish to N callback subscribers on their own connections (nothing stored):
    the floor a republished message rides on (measures._fan_out, renamed)."""
    import nats

    rows = []
    publisher = await nats.connect(ctx.url, name="bench-topics-core")
    try:
        for n in FANOUT_SIZES:
            row = await _fan_out(ctx, pool, plan, publisher, n, oneshot=False)
            row.measure = FANOUT_CORE
            row.note += "; core NATS, nothing stored"
            rows.append(row)
            log(f"raw NATS {FANOUT_CORE} N={n}: {row.p50_ms:.2f} ms p50")
    finally:
        await publisher.close()
    return rows


# -- catch-up -------------------------------------------------------------------------------


async def _nats_catchup(
    ctx: NatsCtx, pool: Pool, plan: Plan, publisher: Any, log: Log
) -> list[Row]:
    """A topic holding M messages; K drivers subscribe and read it whole (each a fresh
    subscription: M reads from the stream's leader)."""
    topic = "backlog"
    t0 = now()
    sem = asyncio.Semaphore(64)

    async def put(i: int) -> int:
        async with sem:
            seq: int = await publisher.publish(topic, PAYLOAD)
            return seq

    await asyncio.gather(*(put(i) for i in range(CATCHUP_M)))
    log(f"tricks-nats: {CATCHUP_M} messages on {topic!r} in {now() - t0:.2f} s")
    rows = []
    for k in CATCHUP_K:
        per = [len(g) for g in split(k, pool.size)]
        lat, deliveries = [], []
        meter = CpuMeter(ctx.server.pid, pool)
        rounds = plan.topic_catchup_repeats
        for _ in range(rounds):
            before = await ctx.out_msgs()
            meter.begin()
            go = now()
            done = _flat(
                await pool.call(
                    "topic_catchup",
                    [
                        {"topic": topic, "count": c, "m": CATCHUP_M, "timeout": TIMEOUT_S}
                        for c in per
                    ],
                )
            )
            lat.append(max(done) - go)
            meter.end()
            await asyncio.sleep(0.05)
            deliveries.append(await ctx.out_msgs() - before)
        mine = statistics.median(lat)
        rows.append(
            latency_row(
                NATS,
                CATCHUP,
                k,
                lat,
                f"{len(per)} procs, {rounds} rounds; K late Driver.subscribe + take(M), "
                f"M = {CATCHUP_M} messages of {len(PAYLOAD)} B: from the go to the last done; "
                f"one STREAM.MSG.GET per message: {k * CATCHUP_M / mine:,.0f} messages/s read, "
                f"{statistics.median(deliveries) / k / CATCHUP_M:.2f} deliveries per message "
                f"per subscriber; {meter.per_op(rounds * k * CATCHUP_M)} (a message read)",
                deliveries=statistics.median(deliveries) / k,
            )
        )
        log(f"tricks-nats {CATCHUP} K={k}: {rows[-1].p50_ms:.1f} ms p50")
    return rows


async def _redis_catchup(
    admin: Any, redis_at: tuple[int, int] | None, pool: Pool, plan: Plan, log: Log
) -> list[Row]:
    """A stream holding M entries; K clients read it from 0: XREAD as the sync service does
    (all there is a read), and, for K = 1, one entry a read (MSG.GET's access pattern)."""
    key = "backlog"
    for start in range(0, CATCHUP_M, PREFILL_BATCH):
        async with admin.pipeline(transaction=False) as pipe:
            for _ in range(start, min(CATCHUP_M, start + PREFILL_BATCH)):
                pipe.xadd(key, {"d": PAYLOAD})
            await pipe.execute()
    rows = []
    # One entry a read only for one reader: the per-round-trip cost, seen once, is enough.
    for batch, measure, readers in ((None, CATCHUP, CATCHUP_K), (1, CATCHUP_ONE, (1,))):
        for k in readers:
            per = [len(g) for g in split(k, pool.size)]
            meter = CpuMeter(redis_at[1] if redis_at else None, pool, coordinator=False)
            lat = []
            rounds = plan.topic_catchup_repeats
            for _ in range(rounds):
                meter.begin()
                go = now()
                done = _flat(
                    await pool.call(
                        "redis_catchup",
                        [
                            {
                                "key": key,
                                "count": c,
                                "m": CATCHUP_M,
                                "batch": batch,
                                "timeout": TIMEOUT_S,
                            }
                            for c in per
                        ],
                    )
                )
                lat.append(max(done) - go)
                meter.end()
            how = (
                "XREAD STREAMS key <last> (no COUNT: all there is)"
                if batch is None
                else (f"XREAD COUNT {batch} STREAMS key <last>, one round trip per entry")
            )
            rows.append(
                latency_row(
                    REDIS,
                    measure,
                    k,
                    lat,
                    f"{len(per)} procs, {rounds} rounds; K clients read M = {CATCHUP_M} entries "
                    f"from 0: {how}; from the go to the last done; "
                    f"{meter.per_op(rounds * k * CATCHUP_M)} (an entry read)",
                )
            )
            log(f"Redis {measure} K={k}: {rows[-1].p50_ms:.1f} ms p50")
    return rows


# -- publish rate ---------------------------------------------------------------------------


async def _nats_publish(ctx: NatsCtx, pool: Pool, plan: Plan, writers: int) -> Row:
    per = [len(g) for g in split(writers, pool.size)]
    topic = f"rate{writers}"
    before = await ctx.out_msgs()
    meter = CpuMeter(ctx.server.pid, pool)
    t0 = now()
    results = await pool.call(
        "topic_publish",
        [
            {"topic": topic, "writers": w, "seconds": plan.increment_seconds, "data": PAYLOAD}
            for w in per
        ],
    )
    await asyncio.sleep(0.05)
    delta = await ctx.out_msgs() - before
    row = _rate_row(
        NATS, writers, results, f"Driver.publish of {len(PAYLOAD)} B (JetStream, acked)"
    )
    done = max(1, sum(len(r["lat"]) for r in results))
    row.deliveries = delta / done
    row.note += f"; {meter.note(now() - t0)}; {meter.per_op(done)}"
    return row


async def _redis_publish(pid: int, pool: Pool, plan: Plan, writers: int) -> Row:
    per = [len(g) for g in split(writers, pool.size)]
    meter = CpuMeter(pid, pool, coordinator=False)
    t0 = now()
    results = await pool.call(
        "redis_xadd_loop",
        [
            {
                "key": f"rate{writers}",
                "writers": w,
                "seconds": plan.increment_seconds,
                "data": PAYLOAD,
            }
            for w in per
        ],
    )
    row = _rate_row(REDIS, writers, results, f"XADD of {len(PAYLOAD)} B")
    done = max(1, sum(len(r["lat"]) for r in results))
    row.note += f"; {meter.note(now() - t0)}; {meter.per_op(done)}"
    return row


def _rate_row(system: str, writers: int, results: list[dict[str, Any]], how: str) -> Row:
    lat = [x for r in results for x in r["lat"]]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    row = latency_row(system, PUBLISH, writers, lat or [0.0], f"{len(lat)} messages, {how}")
    row.ops_per_s = len(lat) / span if span > 0 else None
    return row


# -- helpers --------------------------------------------------------------------------------


async def _blocked(admin: Any) -> int:
    info = await admin.info("clients")
    return int(info.get("blocked_clients", 0))


async def _until(count: Callable[[], Any], n: int, what: str, timeout: float = 60) -> None:
    deadline = now() + timeout
    while await count() < n:
        if now() > deadline:
            raise TimeoutError(f"never all there: {what}")
        await asyncio.sleep(0.01)


def _ratios(rows: list[Row]) -> None:
    """Each tricks-nats row's ratio to its Redis peer (and floors), in its note."""
    for r in rows:
        if r.system != NATS:
            continue
        peer = find(rows, REDIS, r.measure, r.n)
        if peer is None:
            continue
        if r.measure == PUBLISH and r.ops_per_s and peer.ops_per_s:
            r.note += f"; rate / Redis XADD: {r.ops_per_s / peer.ops_per_s:.2f}x"
        elif r.p50_ms and peer.p50_ms:
            r.note += f"; p50 / Redis: {r.p50_ms / peer.p50_ms:.2f}x"


def side_by_side(rows: list[Row]) -> str:
    """The topics measures, one line per measure and size: tricks-nats, Redis, the floors."""

    def cell(r: Row | None, rate: bool = False) -> str:
        if r is None:
            return "n/a"
        if rate:
            return f"{_fmt(r.ops_per_s, 0)}/s" if r.ops_per_s else "n/a"
        return f"{_fmt(r.p50_ms, 2)} ({_fmt(r.p99_ms, 2)})" if r.p50_ms is not None else "n/a"

    def ratio(a: Row | None, b: Row | None, rate: bool = False) -> str:
        if a is None or b is None:
            return "n/a"
        x, y = (a.ops_per_s, b.ops_per_s) if rate else (a.p50_ms, b.p50_ms)
        return f"{x / y:.2f}x" if x and y else "n/a"

    lines = [
        "| measure | n | tricks-nats | Redis (streams) | tricks-nats / Redis | floor: Redis "
        "pub/sub, or 1 entry a read | floor: core NATS |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for measure, sizes, other, rate in (
        (FANOUT, FANOUT_SIZES, FANOUT_PUBSUB, False),
        (CATCHUP, CATCHUP_K, CATCHUP_ONE, False),
        (PUBLISH, sorted({r.n for r in rows if r.measure == PUBLISH}), None, True),
    ):
        for n in sizes:
            ours, redis = find(rows, NATS, measure, n), find(rows, REDIS, measure, n)
            if ours is None and redis is None:
                continue
            floor = find(rows, REDIS, other, n) if other else None
            core = find(rows, FLOOR, FANOUT_CORE, n) if measure == FANOUT else None
            lines.append(
                f"| {measure} | {n} | {cell(ours, rate)} | {cell(redis, rate)} "
                f"| {ratio(ours, redis, rate)} | {cell(floor) if other else '-'} "
                f"| {cell(core) if measure == FANOUT else '-'} |"
            )
    return "\n".join(lines)
