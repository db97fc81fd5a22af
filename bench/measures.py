"""The measures, run from the parent: tricks-nats, the raw NATS floor, ZooKeeper and Redis.

The parent plays the coordinator's part for tricks-nats, as tests/helpers.py does: the
experiment's buckets, the count watcher that releases waiters, the `Registrar` that answers the
pods' registrations (protocol v2: a pod's `register_event` is a request to the coordinator,
which does the JetStream increment and replies with the count) and the `Rosters` that
`discover` reads. The participants (the pods) live in the worker processes, each with its own
connection.

Barrier release latency, for every system alike: from the last participant's increment being
acknowledged (tricks-nats: the registrar's reply; Redis: the INCR reply; ZooKeeper: the create
reply) to the last participant released. "barrier release from send": the same, from the last
participant's increment being sent. "barrier total": from the parent's go (all participants
arrive at once) to the last released. Deliveries: the NATS server's `out_msgs` (from /varz)
over the operation.
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
BARRIER_FROM_SEND = "barrier release from send"
DISCOVERY = "discovery"
DISCOVERY_RUNNING = "discovery, all running"
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
    up_runs: int
    up_kinds: dict[str, int]  # pods per kind: "workflow", "driver" (see localrun.local_runtime)
    cli_runs: int
    kube_pods: int = 1000  # pods of the kubernetes runtime's run on the API emulator
    topic_catchup_repeats: int = 1  # rounds of each topics catch-up (bench/topics.py)
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
    """CPU seconds spent by the server, the coordinator (this process, which hosts the
    registrar and the count watcher for tricks-nats) and the pods (the worker processes).
    Usable as a running sum over several windows (`begin` / `end`)."""

    def __init__(self, server_pid: int | None, pool: Pool, coordinator: bool = True) -> None:
        import psutil

        self.procs: dict[str, list[Any]] = {"server": [], "coordinator": [], "pods": []}
        if server_pid:
            self.procs["server"].append(psutil.Process(server_pid))
        if coordinator:
            self.procs["coordinator"].append(psutil.Process())
        else:
            del self.procs["coordinator"]
        self.procs["pods"] = [psutil.Process(p.pid) for p in pool.procs if p.pid]
        self.used = dict.fromkeys(self.procs, 0.0)
        self.wall = 0.0
        self.begin()

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

    def begin(self) -> None:
        self._start, self._t0 = self._read(), now()

    def end(self) -> None:
        stop = self._read()
        for k in stop:
            self.used[k] += stop[k] - self._start[k]
        self.wall += now() - self._t0

    def note(self, wall: float | None = None) -> str:
        """CPU seconds by process over the whole measure (ends the current window)."""
        self.end()
        wall = self.wall if wall is None else wall
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.used.items())
        return f"cpu s: {parts} in {wall:.2f} s"

    def per_op(self, ops: int, unit: str = "us", scale: float = 1e6) -> str:
        """CPU per operation by process, from the windows summed so far."""
        total = sum(self.used.values())
        parts = ", ".join(f"{k} {v / ops * scale:.0f}" for k, v in self.used.items())
        return f"cpu {unit}/op: {parts} (all {total / ops * scale:.0f})"


def _flat(results: list[list[Any]]) -> list[Any]:
    return [x for xs in results for x in xs]


# -- tricks-nats and the raw NATS floor ---------------------------------------------------


@dataclass
class NatsCtx:
    server: Any  # EmbeddedServer
    bus: Any  # Bus, the coordinator's
    exp: str
    watcher: Any  # CountKeeper, the coordinator's
    rosters: Any  # Rosters, the coordinator's

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

    async def out_totals(self) -> tuple[int, int]:
        """(messages, bytes) the server has sent so far."""
        varz = await asyncio.to_thread(self.monitor, "/varz")
        return int(varz["out_msgs"]), int(varz["out_bytes"])

    def rss(self) -> float | None:
        return vm_hwm_mb(self.server.pid)


@contextlib.asynccontextmanager
async def nats_experiment() -> AsyncIterator[NatsCtx]:
    """An experiment's NATS side as the coordinator stands it up (tests/helpers.experiment):
    buckets, the count watcher, the registrar answering the pods, the rosters."""
    from tricks_nats import protocol as p
    from tricks_nats.bus import Bus, Endpoint
    from tricks_nats.counting import CountKeeper
    from tricks_nats.natsserver import EmbeddedServer
    from tricks_nats.registrar import Registrar, Rosters

    async with EmbeddedServer(monitor=True) as server:
        exp = p.new_experiment_id("bench")
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
    server_pid: int | None = None  # for the CPU split of the all-at-once barriers
    coordinator: bool = False  # this process does the system's work (tricks-nats)


async def _waiting(bs: BarrierSystem, name: str, n: int, timeout: float = 60) -> None:
    deadline = now() + timeout
    while not await bs.waiting(name, n):
        if now() > deadline:
            raise TimeoutError(f"{bs.system}: {n} participants never all waited on {name}")
        await asyncio.sleep(0.02)


async def run_barriers(bs: BarrierSystem, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    """Per N: "barrier release" (N-1 participants arrived and wait, then the last arrives:
    from its arrival acknowledged to the last participant released), "barrier release from
    send" (the same, from its arrival sent) and "barrier total" (all N arrive at once: from
    the go to the last released; with the CPU each process spent on it)."""
    rows = []
    for n in plan.barrier_sizes:
        groups = split(n, pool.size)
        last = len(groups) - 1
        await pool.call(bs.open_op, [bs.open_kwargs(g) for g in groups])
        release, from_send, total, deliveries = [], [], [], []
        meter = CpuMeter(bs.server_pid, pool, bs.coordinator)
        measured = 0
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
            t_sent, t_incr, t_out = await pool.call_one(last, "barrier_last", **common)
            others = _flat(await pool.call("collect", [{}] * len(groups)))
            last_out = max([t_out, *(r for _, _, r in others)])
            # Deliveries are counted on the all-at-once barrier: no probe of ours runs then.
            name = f"t{n}-{rep}"
            if bs.prepare:
                await bs.prepare(name)
            before = await bs.out_msgs() if bs.out_msgs else 0
            if rep >= plan.warmup:
                meter.begin()
            go = now()
            triples = _flat(await pool.call("barrier", [{**common, "name": name}] * len(groups)))
            if rep >= plan.warmup:
                meter.end()
                measured += 1
            if bs.out_msgs:
                await asyncio.sleep(0.05)
                delta = await bs.out_msgs() - before
            if rep >= plan.warmup:
                release.append(last_out - t_incr)
                from_send.append(last_out - t_sent)
                total.append(max(r for _, _, r in triples) - go)
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
        rows.append(
            latency_row(
                bs.system,
                BARRIER_FROM_SEND,
                n,
                from_send,
                note + "; as barrier release, from the last arrival sent",
            )
        )
        cpu = meter.per_op(measured * n, "us", 1e6).replace("/op", "/participant")
        rows.append(
            latency_row(bs.system, BARRIER_TOTAL, n, total, note + f"; all arrive at once; {cpu}")
        )
        log(
            f"{bs.system} barrier N={n}: release {rows[-3].p50_ms:.1f} ms p50, from send "
            f"{rows[-2].p50_ms:.1f}, total {rows[-1].p50_ms:.1f} ms, "
            f"deliveries {rows[-3].deliveries}; {cpu}"
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
        note="Driver.register_event (via the registrar) + wait_event; all at once: Driver.barrier",
        server_pid=ctx.server.pid,
        coordinator=True,
    )
    return await run_barriers(bs, pool, plan, log)


async def nats_increments(ctx: NatsCtx, pool: Pool, plan: Plan, log: Log) -> list[Row]:
    """Pods register an event in a loop: pod -> coordinator (registrar) -> JetStream counter
    -> coordinator -> pod, one request per increment (Driver.register_event)."""
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
        done = sum(len(r["lat"]) for r in results)
        rows.append(_throughput_row(NATS, writers, results, deliveries=delta))
        rows[-1].note += f" via the registrar; {cpu}; {meter.per_op(max(done, 1))}"
        counted = await ctx.bus.count(event)
        if counted != done:
            rows[-1].note += f"; COUNT MISMATCH: {counted} counted, {done} acknowledged"
        log(f"tricks-nats increments x{writers}: {rows[-1].ops_per_s:.0f}/s; {rows[-1].note}")
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
            got = await _discovery(ctx, pool, plan, n)
        except Exception as exc:
            log(f"tricks-nats discovery N={n} failed: {exc!r}")
            rows.append(Row(NATS, DISCOVERY, n, note=f"FAILED: {exc!r}"[:300]))
            await pool.call_all("close_all")
            continue
        rows.extend(got)
        log(
            f"tricks-nats discovery N={n}: {got[0].p50_ms:.1f} ms p50, "
            f"{got[0].deliveries} deliveries a round; all running: {got[1].p50_ms:.1f} ms p50"
        )
        # the same with the roster read after the notification (drivers that ignore it)
        try:
            (read,) = await _discovery(ctx, pool, plan, n, carried=False)
        except Exception as exc:
            log(f"tricks-nats discovery N={n}, roster read, failed: {exc!r}")
            await pool.call_all("close_all")
            continue
        rows.append(read)
        log(f"tricks-nats discovery N={n}, roster read: {read.p50_ms:.1f} ms p50")
    return rows


async def _discovery(
    ctx: NatsCtx, pool: Pool, plan: Plan, n: int, *, carried: bool = True
) -> list[Row]:
    """N pods call `discover(tag, N)` before any pod of the tag runs; the coordinator then
    runs the N pods one by one (`Rosters.started`: the roster, then `<tag>_start`). From the
    N-th pod's start being recorded to the last discover returned. Then the same N pods call
    `discover(tag, N)` again at once, all pods running (one look at the roster each).
    A fresh tag per round (one roster each) on the bench's experiment."""
    from tricks_nats import protocol as p

    groups = split(n, pool.size)
    lat, deliveries, sent_bytes, setup = [], [], [], []
    look, look_deliveries, look_bytes = [], [], []
    meter = CpuMeter(ctx.server.pid, pool)
    rounds = plan.discovery_repeats[n]
    await pool.call("nats_open", [{"url": ctx.url, "exp": ctx.exp, "ids": g} for g in groups])
    try:
        for rep in range(rounds):
            tag = f"d{n}-{rep}" + ("" if carried else "-read")
            if carried:  # the coordinator knows the tag's size: the roster rides along
                ctx.rosters.expect(tag, n)
            msgs0, bytes0 = await ctx.out_totals()
            meter.begin()
            t0 = now()
            await pool.call(
                "nats_discover_arm", [{"tag": tag, "n": n, "timeout": TIMEOUT_S}] * len(groups)
            )
            await _discoverers_waiting(ctx, pool, p.start_event(tag), n)
            for i in range(n - 1):
                await ctx.rosters.started(tag, i, _pod_ip(i))
            await asyncio.sleep(0.1 + n * 0.0003)  # nothing reaches the waiters meanwhile
            setup.append(now() - t0)
            started = now()
            await ctx.rosters.started(tag, n - 1, _pod_ip(n - 1))
            released = _flat(await pool.call("collect", [{}] * len(groups)))
            lat.append(max(released) - started)
            meter.end()
            await asyncio.sleep(0.05)
            msgs1, bytes1 = await ctx.out_totals()
            deliveries.append(msgs1 - msgs0)
            sent_bytes.append(bytes1 - bytes0)
            # All running: N discovers at once, each a count read and a roster read.
            go = now()
            done = _flat(
                await pool.call(
                    "nats_discover_all", [{"tag": tag, "n": n, "timeout": TIMEOUT_S}] * len(groups)
                )
            )
            look.append(max(done) - go)
            await asyncio.sleep(0.05)
            msgs2, bytes2 = await ctx.out_totals()
            look_deliveries.append(msgs2 - msgs1)
            look_bytes.append(bytes2 - bytes1)
    finally:
        await pool.call("nats_close", [{}] * len(groups))
    mb = statistics.median(sent_bytes) / 1e6
    wait_row = latency_row(
        NATS,
        DISCOVERY,
        n,
        lat,
        f"{len(groups)} procs, {len(lat)} rounds; "
        + ("roster in the notification" if carried else "roster read after the notification")
        + "; N discover(tag, N) wait, then "
        f"the coordinator runs the N pods one by one; from the N-th pod's start recorded to "
        f"the last discover returned; deliveries: the whole round (coordinator's writes "
        f"included), {statistics.median(deliveries) / n:.1f} per pod, {mb:.1f} MB sent; "
        f"a round took {statistics.median(setup):.1f} s; "
        f"{meter.per_op(rounds * n, 'ms', 1e3).replace('/op', '/pod')}",
        deliveries=statistics.median(deliveries),
        rss_mb=ctx.rss(),
    )
    if not carried:
        wait_row.measure = f"{DISCOVERY}, roster read"
        return [wait_row]
    look_row = latency_row(
        NATS,
        DISCOVERY_RUNNING,
        n,
        look,
        f"{len(groups)} procs, {len(look)} rounds; N discover(tag, N) at once, all N running: "
        f"from the go to the last returned; {statistics.median(look_deliveries) / n:.1f} "
        f"deliveries per call, {statistics.median(look_bytes) / 1e6:.1f} MB sent",
        deliveries=statistics.median(look_deliveries),
    )
    return [wait_row, look_row]


def _pod_ip(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"


async def _discoverers_waiting(ctx: NatsCtx, pool: Pool, start: str, n: int) -> None:
    """Until the `n` discovers all wait for `<tag>_start` to reach `n` (their subscriptions
    are on the server); a discover that failed fails the round."""
    from tricks_nats import protocol as p

    subject = p.reached_subject(ctx.exp, start, n)
    deadline = now() + 120
    while now() < deadline:
        failed = [f for f in await pool.call_all("pending_failure") if f]
        if failed:
            raise RuntimeError(f"a discover failed: {failed[0]}")
        subs = await asyncio.to_thread(ctx.monitor, f"/subsz?subs=1&limit=1&test={subject}")
        if int(subs.get("total", 0)) >= n:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{n} discovers never all waited on {start}")


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
        server_pid=pid,
    )
    try:
        rows = await run_barriers(bs, pool, plan, log)
        most = max(plan.writers)
        groups = split(most, pool.size)
        await pool.call("zk_open", [{"hosts": hosts, "k": len(g)} for g in groups])
        for writers in plan.writers:
            per = [len(g) for g in split(writers, pool.size)]
            meter = CpuMeter(pid, pool, coordinator=False)
            t0 = now()
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
            done = max(1, sum(len(r["lat"]) for r in results))
            rows[-1].note += (
                f" (kazoo Counter: get + versioned set); {meter.note(now() - t0)}; "
                f"{meter.per_op(done)}"
            )
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
        server_pid=pid,
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
        meter = CpuMeter(pid, pool, coordinator=False)
        t0 = now()
        results = await pool.call(
            "redis_increments",
            [
                {"key": f"inc-{writers}", "writers": w, "seconds": plan.increment_seconds}
                for w in per
            ],
        )
        rows.append(_throughput_row(REDIS, writers, results))
        done = max(1, sum(len(r["lat"]) for r in results))
        rows[-1].note += f"; {meter.note(now() - t0)}; {meter.per_op(done)}"
        log(f"Redis increments x{writers}: {rows[-1].ops_per_s:.0f}/s")
    await pool.call("redis_close", [{}] * len(groups))
    return rows


def _unavailable(system: str, plan: Plan, note: str) -> list[Row]:
    rows = []
    for n in plan.barrier_sizes:
        rows.append(Row(system, BARRIER, n, note=note))
        rows.append(Row(system, BARRIER_FROM_SEND, n, note=note))
        rows.append(Row(system, BARRIER_TOTAL, n, note=note))
    rows.extend(Row(system, INCREMENTS, w, note=note) for w in plan.writers)
    return rows
