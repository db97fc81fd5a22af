"""The measures, run from the parent: tricks-nats, the raw NATS floor, ZooKeeper and Redis.

The parent plays the coordinator's part for tricks-nats (the experiment's buckets and the
count watcher that releases waiters, as tests/helpers.py does) and times; the participants
live in the worker processes, each with its own connection.

Barrier release latency, for every system alike: from the last participant's increment being
acknowledged (NATS ack, Redis INCR reply, ZooKeeper create reply) to the last participant
released. "barrier total": from the parent's go (all participants arrive at once) to the last
released. Deliveries: the NATS server's `out_msgs` (from /varz) over the operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.peers import Unavailable
from bench.pool import Pool, split
from bench.report import FLOOR, NATS, REDIS, ZK, Row, latency_row

now = time.monotonic
BARRIER = "barrier release"
BARRIER_TOTAL = "barrier total"
INCREMENTS = "event increments"
TIMEOUT_S = 120.0
Log = Callable[[str], None]


@dataclass
class Plan:
    """What to run and how often; `quick` and `full` differ only here."""

    procs: int
    barrier_sizes: list[int]
    barrier_repeats: dict[int, int]
    fanout_repeats: int
    rtt_count: int
    writers: list[int]
    increment_seconds: float
    discovery_sizes: list[int]
    discovery_repeats: dict[int, int]
    up_pods: int
    up_runs: int
    up_kinds: list[str]  # "workflow" and/or "driver" (see localrun.local_runtime)
    cli_runs: int
    warmup: int = 1
    systems: set[str] = field(default_factory=lambda: {NATS, FLOOR, ZK, REDIS})


def vm_hwm_mb(pid: int | None) -> float | None:
    """Peak resident set of a process (VmHWM), in MB."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class CpuMeter:
    """CPU seconds spent by the server, the coordinator (this process) and the workers."""

    def __init__(self, server_pid: int | None, pool: Pool) -> None:
        import psutil

        self.procs = {"server": [], "coordinator": [psutil.Process()], "workers": []}
        if server_pid:
            self.procs["server"].append(psutil.Process(server_pid))
        self.procs["workers"] = [psutil.Process(p.pid) for p in pool.procs if p.pid]
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        out = {}
        for k, ps in self.procs.items():
            total = 0.0
            for proc in ps:
                with contextlib.suppress(Exception):
                    t = proc.cpu_times()
                    total += t.user + t.system
            out[k] = total
        return out

    def note(self, wall: float) -> str:
        end = self._read()
        used = {k: end[k] - self.start[k] for k in end}
        return "cpu s: " + ", ".join(f"{k} {v:.2f}" for k, v in used.items()) + f" in {wall:.2f} s"


def _release(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """(last increment acknowledged, last participant released)."""
    return max(t for t, _ in pairs), max(r for _, r in pairs)


def _flat(results: list[list[Any]]) -> list[Any]:
    return [x for xs in results for x in xs]


# -- tricks-nats and the raw NATS floor ---------------------------------------------------


@dataclass
class NatsCtx:
    server: Any  # EmbeddedServer
    bus: Any  # Bus, the coordinator's
    exp: str

    @property
    def url(self) -> str:
        return str(self.server.url)

    def monitor(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.server.monitor_url}{path}", timeout=5) as resp:
            result: dict[str, Any] = json.load(resp)
            return result

    async def out_msgs(self) -> int:
        varz = await asyncio.to_thread(self.monitor, "/varz")
        return int(varz["out_msgs"])

    def rss(self) -> float | None:
        return vm_hwm_mb(self.server.pid)


@contextlib.asynccontextmanager
async def nats_experiment() -> AsyncIterator[NatsCtx]:
    from tricks_nats import protocol as p
    from tricks_nats.bus import Bus, Endpoint
    from tricks_nats.counting import CountWatcher
    from tricks_nats.natsserver import EmbeddedServer

    async with EmbeddedServer(monitor=True) as server:
        exp = p.new_experiment_id("bench")
        bus = await Bus.open(Endpoint(server.url), exp, name="bench-coordinator")
        watcher = CountWatcher(bus, lambda _e, _v, _pod: None)
        try:
            await bus.create_buckets()
            await watcher.start()
            yield NatsCtx(server, bus, exp)
        finally:
            await watcher.stop()
            await bus.close()


@dataclass
class BarrierSystem:
    """How the generic barrier runner drives one system."""

    system: str  # row label
    kind: str  # worker-side name: nats, redis, zk
    open_op: str
    open_kwargs: Callable[[list[int]], dict[str, Any]]
    close_op: str
    waiting: Callable[[str, int], Awaitable[bool]]  # have n participants arrived and wait?
    prepare: Callable[[str], Awaitable[None]] | None = None
    out_msgs: Callable[[], Awaitable[int]] | None = None
    rss: Callable[[], float | None] = lambda: None
    note: str = ""


async def _waiting(bs: BarrierSystem, name: str, n: int, timeout: float = 60) -> None:
    deadline = now() + timeout
    while not await bs.waiting(name, n):
        if now() > deadline:
            raise TimeoutError(f"{bs.system}: {n} participants never all waited on {name}")
        await asyncio.sleep(0.02)


async def run_barriers(bs: BarrierSystem, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    """Per N: "barrier release" (N-1 participants arrived and wait, then the last arrives:
    from its arrival acknowledged to the last participant released) and "barrier total"
    (all N arrive at once: from the go to the last released)."""
    rows = []
    for n in plan.barrier_sizes:
        groups = split(n, pool.size)
        last = len(groups) - 1
        await pool.call(bs.open_op, [bs.open_kwargs(g) for g in groups])
        release, total, deliveries = [], [], []
        for rep in range(plan.warmup + plan.barrier_repeats[n]):
            name = f"r{n}-{rep}"
            if bs.prepare:
                await bs.prepare(name)
            common = {"system": bs.kind, "name": name, "n": n, "timeout": TIMEOUT_S}
            await pool.call(
                "barrier_arm", [{**common, "skip_last": i == last} for i in range(len(groups))]
            )
            if n > 1:
                await _waiting(bs, name, n - 1)
                await asyncio.sleep(0.1 + n * 0.0003)  # let the waiters go idle
            t_incr, t_out = await pool.call_one(last, "barrier_last", **common)
            others = _flat(await pool.call("collect", [{}] * len(groups)))
            last_out = max([t_out, *(r for _, r in others)])
            # Deliveries are counted on the all-at-once barrier: no probe of ours runs then.
            name = f"t{n}-{rep}"
            if bs.prepare:
                await bs.prepare(name)
            before = await bs.out_msgs() if bs.out_msgs else 0
            go = now()
            pairs = _flat(await pool.call("barrier", [{**common, "name": name}] * len(groups)))
            if bs.out_msgs:
                await asyncio.sleep(0.05)
                delta = await bs.out_msgs() - before
            if rep >= plan.warmup:
                release.append(last_out - t_incr)
                total.append(max(r for _, r in pairs) - go)
                if bs.out_msgs:
                    deliveries.append(delta)
        await pool.call(bs.close_op, [{}] * len(groups))
        note = f"{len(groups)} procs, {len(release)} barriers" + (f", {bs.note}" if bs.note else "")
        rows.append(
            latency_row(
                bs.system,
                BARRIER,
                n,
                release,
                note + "; N-1 wait, then the last arrives",
                deliveries=statistics.median(deliveries) if deliveries else None,
                rss_mb=bs.rss(),
            )
        )
        rows.append(latency_row(bs.system, BARRIER_TOTAL, n, total, note + "; all arrive at once"))
        log(
            f"{bs.system} barrier N={n}: release {rows[-2].p50_ms:.1f} ms p50, "
            f"total {rows[-1].p50_ms:.1f} ms, deliveries {rows[-2].deliveries}"
        )
    return rows


async def nats_barriers(ctx: NatsCtx, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    from tricks_nats import protocol as p

    async def waiting(name: str, n: int) -> bool:
        subject = p.reached_subject(ctx.exp, name, n + 1)
        subs = await asyncio.to_thread(ctx.monitor, f"/subsz?subs=1&limit=1&test={subject}")
        return int(subs.get("total", 0)) >= n and await ctx.bus.count(name) >= n

    bs = BarrierSystem(
        NATS,
        "nats",
        "nats_open",
        lambda g: {"url": ctx.url, "exp": ctx.exp, "ids": g},
        "nats_close",
        waiting,
        out_msgs=ctx.out_msgs,
        rss=ctx.rss,
        note="Driver.register_event + wait_event",
    )
    return await run_barriers(bs, pool, plan, log)


async def nats_increments(ctx: NatsCtx, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    rows = []
    most = max(plan.writers)
    groups = split(most, pool.size)
    await pool.call("nats_open", [{"url": ctx.url, "exp": ctx.exp, "ids": g} for g in groups])
    for writers in plan.writers:
        event = f"inc-{writers}"
        per = [len(g) for g in split(writers, pool.size)]
        before = await ctx.out_msgs()
        meter = CpuMeter(ctx.server.pid, pool)
        t0 = now()
        results = await pool.call(
            "nats_increments",
            [{"event": event, "writers": w, "seconds": plan.increment_seconds} for w in per],
        )
        await asyncio.sleep(0.05)
        delta = await ctx.out_msgs() - before
        cpu = meter.note(now() - t0)
        rows.append(_throughput_row(NATS, writers, results, deliveries=delta))
        rows[-1].note += f"; {cpu}"
        counted = await ctx.bus.count(event)
        done = sum(len(r["lat"]) for r in results)
        if counted != done:
            rows[-1].note += f"; COUNT MISMATCH: {counted} counted, {done} acknowledged"
        log(f"tricks-nats increments x{writers}: {rows[-1].ops_per_s:.0f}/s")
    await pool.call("nats_close", [{}] * len(groups))
    return rows


def _throughput_row(
    system: str, writers: int, results: list[dict[str, Any]], deliveries: int | None = None
) -> Row:
    lat = [x for r in results for x in r["lat"]]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    row = latency_row(system, INCREMENTS, writers, lat or [0.0], f"{len(lat)} increments")
    row.ops_per_s = len(lat) / span if span > 0 else None
    if deliveries is not None and lat:
        row.deliveries = deliveries / len(lat)
    return row


async def nats_discovery(ctx: NatsCtx, pool: Pool, plan: Plan, log: Log) -> list[Row]:

    rows = []
    for n in plan.discovery_sizes:
        try:
            rows.append(await _discovery(ctx, pool, plan, n))
        except Exception as exc:
            log(f"tricks-nats discovery N={n} failed: {exc!r}")
            rows.append(Row(NATS, "discovery", n, note=f"FAILED: {exc!r}"[:300]))
            await pool.call_all("close_all")
            continue
        log(f"tricks-nats discovery N={n}: {rows[-1].p50_ms:.1f} ms p50")
    return rows


async def _discovery(ctx: NatsCtx, pool: Pool, plan: Plan, n: int) -> Row:
    """Each round uses a fresh experiment: nats-server allows 1000 consumers per stream, and
    the watchers of a finished discover linger as consumers for a while."""
    from tricks_nats import protocol as p
    from tricks_nats.bus import Bus, Endpoint

    groups = split(n, pool.size)
    lat, deliveries, setup = [], [], []
    for rep in range(plan.discovery_repeats[n]):
        exp = p.new_experiment_id(f"bench-d{n}-{rep}")
        bus = await Bus.open(Endpoint(ctx.url), exp, name="bench-coordinator-d")
        stream = p.stream_of(p.pods_bucket(exp))
        try:
            await bus.create_buckets()
            await pool.call("nats_open", [{"url": ctx.url, "exp": exp, "ids": g} for g in groups])
            tag = "pod"
            before = await ctx.out_msgs()
            t0 = now()
            # N waiters discover while the pods start (the first N-1 run one by one, the
            # waiters see each), then the N-th pod runs. (With the N-1 pods running first,
            # 1000 discovers at once fail: their consumer creation times out.)
            await pool.call(
                "nats_discover_arm", [{"tag": tag, "n": n, "timeout": TIMEOUT_S}] * len(groups)
            )
            filt = f"$KV.{p.pods_bucket(exp)}.{tag}.*"
            await _consumers_settled(bus, pool, stream, filt, n, 0)
            for i in range(n - 1):
                await bus.put_pod(p.PodRecord(tag=tag, pod_id=i, ip="127.0.0.1"))
            last_seq = int((await bus.js.stream_info(stream)).state.last_seq)
            await _consumers_settled(bus, pool, stream, filt, n, last_seq)
            await asyncio.sleep(0.3)  # let the waiters digest what the server sent them
            setup.append(now() - t0)
            await bus.put_pod(p.PodRecord(tag=tag, pod_id=n - 1, ip="127.0.0.1"))
            put = now()
            released = _flat(await pool.call("collect", [{}] * len(groups)))
            lat.append(max(released) - put)
            await asyncio.sleep(0.05)
            deliveries.append(await ctx.out_msgs() - before)
            await pool.call("nats_close", [{}] * len(groups))
        finally:
            await bus.delete_buckets()
            await bus.close()
    return latency_row(
        NATS,
        "discovery",
        n,
        lat,
        f"{len(groups)} procs, {len(lat)} rounds; from the N-th record put; deliveries: "
        f"the whole round (N waiters x N records); a round took {statistics.median(setup):.1f} s",
        deliveries=statistics.median(deliveries),
        rss_mb=ctx.rss(),
    )


async def _consumers_settled(
    bus: Any, pool: Pool, stream: str, filt: str, n: int, seq: int, timeout: float = 300
) -> None:
    """Wait until `n` consumers filter on `filt` and were all sent everything up to `seq`."""
    deadline = now() + timeout
    while now() < deadline:
        failed = [f for f in await pool.call_all("pending_failure") if f]
        if failed:
            raise RuntimeError(f"a discover failed: {failed[0]}")
        info = await bus.js.stream_info(stream)
        if info.state.consumer_count < n:  # cheap, before listing them all
            await asyncio.sleep(0.1)
            continue
        found = []
        offset = 0
        while True:
            reply = await bus.nc.request(
                f"$JS.API.CONSUMER.LIST.{stream}", json.dumps({"offset": offset}).encode(), 5
            )
            page = json.loads(reply.data)
            consumers = page.get("consumers") or []
            for c in consumers:
                cfg = c.get("config", {})
                if cfg.get("filter_subject") == filt or filt in (cfg.get("filter_subjects") or []):
                    found.append(c)
            offset += len(consumers)
            if not consumers or offset >= page.get("total", 0):
                break
        if len(found) >= n and all(
            c.get("delivered", {}).get("stream_seq", 0) >= seq and not c.get("num_pending")
            for c in found
        ):
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{n} discover watchers did not settle on {filt}")


async def nats_floor(ctx: NatsCtx, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    import nats

    rows = []
    subject = "bench.rtt"
    await pool.call_one(0, "rtt_serve", url=ctx.url, subject=subject)
    client = 1 if pool.size > 1 else 0
    result = await pool.call_one(
        client, "rtt_run", url=ctx.url, subject=subject, count=plan.rtt_count
    )
    rows.append(latency_row(FLOOR, "request/reply rtt", 1, result["lat"], "2 procs, sequential"))
    rows[-1].ops_per_s = len(result["lat"]) / (result["end"] - result["start"])
    await pool.call_one(0, "raw_close")
    log(f"raw NATS rtt: {rows[-1].p50_ms:.3f} ms p50")

    publisher = await nats.connect(ctx.url, name="bench-publisher")
    try:
        for n in plan.barrier_sizes:
            for oneshot in (False, True):
                rows.append(await _fan_out(ctx, pool, plan, publisher, n, oneshot))
                log(f"raw NATS {rows[-1].measure} N={n}: {rows[-1].p50_ms:.2f} ms p50")
    finally:
        await publisher.close()
    return rows


async def _fan_out(
    ctx: NatsCtx, pool: Pool, plan: Plan, publisher: Any, n: int, oneshot: bool
) -> Row:
    """One publish reaching N subscribers on N connections: persistent callback subscribers,
    or (`oneshot`) one-shot future subscriptions armed before every round, the receive path a
    waiting driver uses; from the publish to the last subscriber's receipt."""
    groups = split(n, pool.size)
    subject = f"bench.fan.{n}.{int(oneshot)}"
    await pool.call(
        "raw_open",
        [{"url": ctx.url, "k": len(g), "subject": None if oneshot else subject} for g in groups],
    )
    lat, deliveries = [], []
    try:
        for seq in range(plan.warmup + plan.fanout_repeats):
            target = f"{subject}.{seq}" if oneshot else subject
            if oneshot:
                await pool.call("fan_arm", [{"subject": target, "seq": seq}] * len(groups))
            before = await ctx.out_msgs()
            sent = now()
            await publisher.publish(target, str(seq).encode())
            await publisher.flush()
            got = _flat(await pool.call("fan_collect", [{"seq": seq, "timeout": 30}] * len(groups)))
            await asyncio.sleep(0.02)
            if seq >= plan.warmup:
                lat.append(max(got) - sent)
                deliveries.append(await ctx.out_msgs() - before)
    finally:
        await pool.call("raw_close", [{}] * len(groups))
    how = "one-shot future subscribers (the waiter's path)" if oneshot else "callback subscribers"
    return latency_row(
        FLOOR,
        "one-shot fan-out" if oneshot else "publish fan-out",
        n,
        lat,
        f"{len(groups)} procs; {how}; publish to the last of N",
        deliveries=statistics.median(deliveries),
    )


# -- ZooKeeper ------------------------------------------------------------------------------


async def zookeeper_all(pool: Pool, plan: Plan, log: Log) -> list[Row]:
    from bench.peers import zookeeper

    try:
        with zookeeper() as (hosts, pid):
            return await _zookeeper(hosts, pid, pool, plan, log)
    except Unavailable as exc:
        log(f"ZooKeeper unavailable: {exc}")
        return _unavailable(ZK, plan, f"unavailable: {exc}")
    except ImportError as exc:
        return _unavailable(ZK, plan, f"unavailable: {exc} (pip install -e '.[bench]')")


async def _zookeeper(hosts: str, pid: int, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    from kazoo.client import KazooClient

    from bench.peers import zk_watches

    admin = KazooClient(hosts=hosts, timeout=30.0)
    admin.start(timeout=30)
    port = int(hosts.rsplit(":", 1)[1])

    async def prepare(name: str) -> None:
        admin.ensure_path(f"/bench/{name}")

    async def waiting(name: str, n: int) -> bool:
        children = admin.get_children(f"/bench/{name}")
        return len(children) >= n and zk_watches(port) >= n

    bs = BarrierSystem(
        ZK,
        "zk",
        "zk_open",
        lambda g: {"hosts": hosts, "k": len(g)},
        "zk_close",
        waiting,
        prepare=prepare,
        rss=lambda: vm_hwm_mb(pid),
        note="kazoo DoubleBarrier.enter, forceSync=no",
    )
    try:
        rows = await run_barriers(bs, pool, plan, log)
        most = max(plan.writers)
        groups = split(most, pool.size)
        await pool.call("zk_open", [{"hosts": hosts, "k": len(g)} for g in groups])
        for writers in plan.writers:
            per = [len(g) for g in split(writers, pool.size)]
            results = await pool.call(
                "zk_increments",
                [
                    {
                        "path": f"/bench/inc-{writers}",
                        "writers": w,
                        "seconds": plan.increment_seconds,
                    }
                    for w in per
                ],
            )
            rows.append(_throughput_row(ZK, writers, results))
            rows[-1].note += " (kazoo Counter: get + versioned set)"
            log(f"ZooKeeper increments x{writers}: {rows[-1].ops_per_s:.0f}/s")
        await pool.call("zk_close", [{}] * len(groups))
    finally:
        admin.stop()
        admin.close()
    return rows


# -- Redis ----------------------------------------------------------------------------------


async def redis_all(pool: Pool, plan: Plan, log: Log) -> list[Row]:
    from bench.peers import redis_server

    try:
        import redis  # noqa: F401

        with redis_server() as (port, pid):
            return await _redis(port, pid, pool, plan, log)
    except Unavailable as exc:
        log(f"Redis unavailable: {exc}")
        return _unavailable(REDIS, plan, f"unavailable: {exc}")
    except ImportError as exc:
        return _unavailable(REDIS, plan, f"unavailable: {exc} (pip install -e '.[bench]')")


async def _redis(port: int, pid: int, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    import redis.asyncio as aioredis

    admin = aioredis.Redis(host="127.0.0.1", port=port)

    async def waiting(name: str, n: int) -> bool:
        subs = dict(await admin.pubsub_numsub(f"{name}:go"))
        count = int(await admin.get(name) or 0)
        return int(subs.get(f"{name}:go".encode(), 0)) >= n and count >= n

    bs = BarrierSystem(
        REDIS,
        "redis",
        "redis_open",
        lambda g: {"port": port, "k": len(g)},
        "redis_close",
        waiting,
        rss=lambda: vm_hwm_mb(pid),
        note="INCR + SUBSCRIBE/PUBLISH",
    )
    try:
        rows = await run_barriers(bs, pool, plan, log)
    finally:
        await admin.aclose()
    most = max(plan.writers)
    groups = split(most, pool.size)
    await pool.call("redis_open", [{"port": port, "k": len(g)} for g in groups])
    for writers in plan.writers:
        per = [len(g) for g in split(writers, pool.size)]
        results = await pool.call(
            "redis_increments",
            [
                {"key": f"inc-{writers}", "writers": w, "seconds": plan.increment_seconds}
                for w in per
            ],
        )
        rows.append(_throughput_row(REDIS, writers, results))
        log(f"Redis increments x{writers}: {rows[-1].ops_per_s:.0f}/s")
    await pool.call("redis_close", [{}] * len(groups))
    return rows


def _unavailable(system: str, plan: Plan, note: str) -> list[Row]:
    rows = []
    for n in plan.barrier_sizes:
        rows.append(Row(system, BARRIER, n, note=note))
        rows.append(Row(system, BARRIER_TOTAL, n, note=note))
    rows.extend(Row(system, INCREMENTS, w, note=note) for w in plan.writers)
    return rows
