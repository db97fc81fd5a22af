"""A benchmark worker process: hosts some of a measure's participants, each with its own client.

Real pods are separate processes with their own connections, so the benchmark never runs all
participants in one event loop: the parent starts a few of these workers (multiprocessing,
spawn) and sends each one command at a time over a pipe; a worker answers every command with
`("ok", result)` or `("err", text)`. Times are `time.monotonic()` (CLOCK_MONOTONIC, the same
clock in every process of the machine), so the parent can compare them across workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from bench.peers import die_with_parent

now = time.monotonic

#: Connections opened at once per worker (a burst of 250 connects is fine, 1000 is not).
OPEN_CONCURRENCY = 32


async def _bounded(coros: list[Awaitable[Any]], limit: int = OPEN_CONCURRENCY) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


class Worker:
    def __init__(self) -> None:
        self.drivers: list[Any] = []  # tricks_nats.driver.Driver
        self.raw: list[Any] = []  # nats.aio.client.Client (fan-out subscribers, rtt)
        self.fan_times: list[dict[int, float]] = []
        self.fan_arrived: dict[int, int] = {}  # seq -> subscribers that have it
        self.fan_all: dict[int, asyncio.Event] = {}  # seq -> set once all have it
        self.redis: list[tuple[Any, Any]] = []  # (command client, pubsub)
        self.zk: list[Any] = []  # kazoo.client.KazooClient
        self.subs: list[Any] = []  # tricks_nats.topics.Subscription (topics: listening)
        self.pending: list[asyncio.Task[Any]] = []
        self.pool: ThreadPoolExecutor | None = None

    # -- tricks-nats driver ---------------------------------------------------------------

    async def nats_open(self, url: str, exp: str, ids: list[int]) -> int:
        from tricks_nats.driver import Config, Driver

        def config(i: int) -> Config:
            return Config(
                tag="bench", replicas=0, pod_id=i, experiment=exp, pod_ip="127.0.0.1", nats_url=url
            )

        self.drivers = await _bounded([Driver.connect(config(i)) for i in ids])
        return len(self.drivers)

    # -- barriers, the same shape for every system ----------------------------------------

    def _members(self, system: str) -> int:
        return len({"nats": self.drivers, "redis": self.redis, "zk": self.zk}[system])

    async def _member(
        self, system: str, i: int, name: str, n: int, timeout: float, one_call: bool = False
    ) -> tuple[float, float, float]:
        """One participant: arrive (+1), then wait for n; (arrival sent, arrival
        acknowledged, released). `one_call`: tricks-nats arrives and waits with
        `Driver.barrier` (its acknowledgement is not seen apart: taken as the release)."""
        if system == "nats":
            d = self.drivers[i]
            t_sent = now()
            if one_call:
                await d.barrier(name, n, timeout=timeout)
                return t_sent, now(), now()
            # Protocol v2: a request to the coordinator's registrar, which does the JetStream
            # increment and answers with the count (Bus.register).
            await d.register_event(name)
            t_incr = now()
            await d.wait_event(name, n, timeout=timeout)
            return t_sent, t_incr, now()
        if system == "redis":
            r, ps = self.redis[i]
            channel = f"{name}:go"
            await ps.subscribe(channel)
            # The server's confirmation: subscribed strictly before our INCR.
            await _next_message(ps, "subscribe", channel.encode())
            t_sent = now()
            value = await r.incr(name)
            t_incr = now()
            if value >= n:
                await r.publish(channel, b"go")
            else:
                await _next_message(ps, "message", channel.encode())
            released = now()
            await ps.unsubscribe(channel)
            return t_sent, t_incr, released
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, _zk_enter, self.zk[i], f"/bench/{name}", n, i)
        return await asyncio.wait_for(future, timeout)

    async def barrier(
        self, system: str, name: str, n: int, timeout: float
    ) -> list[tuple[float, float, float]]:
        """Every participant of this worker arrives at once."""
        count = self._members(system)
        async with asyncio.timeout(timeout):
            return await asyncio.gather(
                *(self._member(system, i, name, n, timeout, True) for i in range(count))
            )

    async def barrier_arm(
        self, system: str, name: str, n: int, timeout: float, skip_last: bool
    ) -> int:
        """Start this worker's participants (all but its last with `skip_last`); `collect`."""
        count = self._members(system) - (1 if skip_last else 0)
        self.pending = [
            asyncio.create_task(self._member(system, i, name, n, timeout)) for i in range(count)
        ]
        return count

    async def barrier_last(
        self, system: str, name: str, n: int, timeout: float
    ) -> tuple[float, float, float]:
        """The last participant arrives (after `barrier_arm(skip_last=True)`)."""
        return await self._member(system, self._members(system) - 1, name, n, timeout)

    async def nats_increments(self, event: str, writers: int, seconds: float) -> dict[str, Any]:
        """`writers` of this worker's drivers increment `event` in a loop for `seconds`."""
        calls = [functools.partial(d.register_event, event) for d in self.drivers[:writers]]
        return await _in_a_loop(calls, seconds)

    async def nats_discover_arm(self, tag: str, n: int, timeout: float) -> int:
        """Every driver of this worker starts `discover(tag, n)` (before the pods run); each
        one's return time comes back through `collect`."""

        async def one(d: Any) -> float:
            peers = await d.discover(tag, n, timeout=timeout)
            assert len(peers) >= n, (len(peers), n)
            return now()

        self.pending = [asyncio.create_task(one(d)) for d in self.drivers]
        return len(self.pending)

    async def nats_discover_all(self, tag: str, n: int, timeout: float) -> list[float]:
        """Every driver of this worker calls `discover(tag, n)` at once, with the pods
        already running (a look at the roster); their return times."""

        async def one(d: Any) -> float:
            peers = await d.discover(tag, n, timeout=timeout)
            assert len(peers) >= n, (len(peers), n)
            return now()

        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(one(d) for d in self.drivers)))

    async def pending_failure(self) -> str | None:
        """The first error among this worker's started participants, if any failed."""
        for t in self.pending:
            if t.done() and not t.cancelled() and t.exception() is not None:
                return repr(t.exception())[:300]
        return None

    async def collect(self) -> list[Any]:
        tasks, self.pending = self.pending, []
        return list(await asyncio.gather(*tasks))

    async def nats_close(self) -> None:
        drivers, self.drivers = self.drivers, []
        await _bounded([d.close() for d in drivers])

    # -- tricks-nats topics (bench/topics.py) ---------------------------------------------

    async def topic_listen(self, topic: str, count: int) -> int:
        """The first `count` drivers subscribe to `topic` and listen: each has subscribed
        to the republished messages and read what the stream holds (nothing yet), so the
        next message reaches it as a republished one, the live path."""
        from tricks_nats.errors import WaitTimeout

        async def one(d: Any) -> Any:
            sub = d.subscribe(topic)
            with contextlib.suppress(WaitTimeout):
                got = await sub.next(timeout=0)  # opens; nothing is stored: WaitTimeout
                raise RuntimeError(f"{topic!r} already holds message {got.seq}")
            return sub

        self.subs = await _bounded([one(d) for d in self.drivers[:count]])
        return len(self.subs)

    async def topic_arm(self, timeout: float) -> int:
        """Every listening subscription waits for its next message (`collect`: when it had
        it, and its seq)."""

        async def one(sub: Any) -> tuple[float, int]:
            msg = await sub.next(timeout)
            return now(), int(msg.seq)

        self.pending = [asyncio.create_task(one(s)) for s in self.subs]
        await asyncio.sleep(0)  # each one waits on its subscription before we answer
        return len(self.pending)

    async def topic_unlisten(self) -> None:
        subs, self.subs = self.subs, []
        await _bounded([s.close() for s in subs])

    async def topic_catchup(self, topic: str, count: int, m: int, timeout: float) -> list[float]:
        """The first `count` drivers each subscribe late to `topic` (holding `m` messages)
        and read it whole; when each was done."""

        async def one(d: Any) -> float:
            async with d.subscribe(topic) as sub:
                got = await sub.take(m, timeout)
            seqs = [g.seq for g in got]
            if len(got) != m or seqs != sorted(set(seqs)):
                raise RuntimeError(f"catch-up on {topic!r}: {len(got)} messages, out of order")
            return now()

        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(one(d) for d in self.drivers[:count])))

    async def topic_publish(
        self, topic: str, writers: int, seconds: float, data: bytes
    ) -> dict[str, Any]:
        """`writers` of this worker's drivers publish `data` on `topic` in a loop."""
        calls = [functools.partial(d.publish, topic, data) for d in self.drivers[:writers]]
        return await _in_a_loop(calls, seconds)

    # -- raw NATS: fan-out subscribers and request/reply ----------------------------------

    async def raw_open(self, url: str, k: int, subject: str | None) -> int:
        """`k` connections; with `subject`, each subscribes to it with a callback (the usual
        nats-py subscriber); without, `fan_arm` gives each a one-shot subscription per round."""
        import nats

        async def one(i: int) -> Any:
            nc = await nats.connect(url, name=f"bench-raw-{i}")
            times: dict[int, float] = {}
            self.fan_times.append(times)

            async def on_msg(msg: Any, times: dict[int, float] = times) -> None:
                self._fan_got(times, int(msg.data))

            if subject is not None:
                await nc.subscribe(subject, cb=on_msg)
                await nc.flush()
            return nc

        self.raw = await _bounded([one(i) for i in range(k)])
        return len(self.raw)

    async def fan_arm(self, subject: str, seq: int) -> int:
        """Every connection subscribes once to `subject` for message `seq`, the way a waiter of
        the driver does: a future resolved by the connection's reader, auto-unsubscribed after
        one message (no task, no callback coroutine)."""
        loop = asyncio.get_running_loop()

        async def one(nc: Any, times: dict[int, float]) -> None:
            arrived = loop.create_future()
            arrived.add_done_callback(lambda _f: self._fan_got(times, seq))
            sub = await nc.subscribe(subject, future=arrived)
            await sub.unsubscribe(limit=1)
            await nc.flush()

        await _bounded([one(nc, t) for nc, t in zip(self.raw, self.fan_times, strict=True)])
        return len(self.raw)

    def _fan_got(self, times: dict[int, float], seq: int) -> None:
        times[seq] = now()
        self.fan_arrived[seq] = self.fan_arrived.get(seq, 0) + 1
        if self.fan_arrived[seq] == len(self.fan_times):
            self.fan_all.setdefault(seq, asyncio.Event()).set()

    async def fan_collect(self, seq: int, timeout: float) -> list[float]:
        """Wait (by event, not by polling: the measure must not compete for the CPU) until
        every subscriber of this worker has message `seq`; their receipt times."""
        done = self.fan_all.setdefault(seq, asyncio.Event())
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"fan-out {seq} did not reach every subscriber") from exc
        del self.fan_all[seq], self.fan_arrived[seq]
        return [t.pop(seq) for t in self.fan_times]

    async def rtt_serve(self, url: str, subject: str) -> None:
        import nats

        nc = await nats.connect(url, name="bench-rtt-server")

        async def on_req(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(subject, cb=on_req)
        await nc.flush()
        self.raw.append(nc)

    async def rtt_run(self, url: str, subject: str, count: int) -> dict[str, Any]:
        import nats

        nc = await nats.connect(url, name="bench-rtt-client")
        try:
            for _ in range(20):  # warm up
                await nc.request(subject, b"x", timeout=5)
            lat = []
            start = now()
            for _ in range(count):
                t = now()
                await nc.request(subject, b"x", timeout=5)
                lat.append(now() - t)
            return {"start": start, "end": now(), "lat": lat}
        finally:
            await nc.close()

    async def raw_close(self) -> None:
        clients, self.raw, self.fan_times = self.raw, [], []
        self.fan_arrived.clear()
        self.fan_all.clear()
        await _bounded([nc.close() for nc in clients])

    # -- Redis: INCR + pub/sub barrier ----------------------------------------------------

    async def redis_open(self, port: int, k: int) -> int:
        import redis.asyncio as aioredis

        async def one() -> tuple[Any, Any]:
            r = aioredis.Redis(host="127.0.0.1", port=port)
            await r.ping()
            ps = r.pubsub()
            await ps.subscribe("bench:hello")
            await _next_message(ps, "subscribe", b"bench:hello")
            return r, ps

        self.redis = await _bounded([one() for _ in range(k)])
        return len(self.redis)

    async def redis_increments(self, key: str, writers: int, seconds: float) -> dict[str, Any]:
        calls = [functools.partial(r.incr, key) for r, _ in self.redis[:writers]]
        return await _in_a_loop(calls, seconds)

    async def redis_close(self) -> None:
        clients, self.redis = self.redis, []
        await _bounded([ps.aclose() for _, ps in clients])
        await _bounded([r.aclose() for r, _ in clients])

    # -- Redis streams and pub/sub, the topics' peer (bench/topics.py) --------------------

    async def redis_xread_arm(self, key: str, after: str, count: int, block_ms: int) -> int:
        """The first `count` clients block in `XREAD BLOCK .. STREAMS key after` (Testground's
        sync service: one blocking XREAD per subscriber); `collect`: when each had the entry,
        and its id."""

        async def one(r: Any) -> tuple[float, str]:
            got = _stream_entries(await r.xread({key: after}, block=block_ms))
            if not got:
                raise TimeoutError(f"XREAD on {key} got nothing in {block_ms} ms")
            return now(), got[0][0]

        self.pending = [asyncio.create_task(one(r)) for r, _ in self.redis[:count]]
        await asyncio.sleep(0)
        return len(self.pending)

    async def redis_sub_listen(self, channel: str, count: int) -> int:
        """The first `count` clients SUBSCRIBE to `channel` (confirmed)."""

        async def one(ps: Any) -> None:
            await ps.subscribe(channel)
            await _next_message(ps, "subscribe", channel.encode())

        await _bounded([one(ps) for _, ps in self.redis[:count]])
        return count

    async def redis_sub_arm(self, channel: str, count: int) -> int:
        """The first `count` subscribers wait for the next message on `channel` (`collect`)."""

        async def one(ps: Any) -> float:
            await _next_message(ps, "message", channel.encode())
            return now()

        self.pending = [asyncio.create_task(one(ps)) for _, ps in self.redis[:count]]
        await asyncio.sleep(0)
        return len(self.pending)

    async def redis_sub_unlisten(self, channel: str, count: int) -> None:
        await _bounded([ps.unsubscribe(channel) for _, ps in self.redis[:count]])

    async def redis_catchup(
        self, key: str, count: int, m: int, batch: int | None, timeout: float
    ) -> list[float]:
        """The first `count` clients each read the stream `key` (holding `m` entries) from
        the start: `XREAD STREAMS key <last id>` until all came, `batch` entries a read at
        most (None: all there are); when each was done."""

        async def one(r: Any) -> float:
            last, n = "0-0", 0
            while n < m:
                got = _stream_entries(await r.xread({key: last}, count=batch))
                if not got:
                    raise RuntimeError(f"catch-up on {key}: {n} of {m} entries")
                n += len(got)
                last = got[-1][0]
            return now()

        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(one(r) for r, _ in self.redis[:count])))

    async def redis_xadd_loop(
        self, key: str, writers: int, seconds: float, data: bytes
    ) -> dict[str, Any]:
        """`writers` of this worker's clients XADD `data` to `key` in a loop."""
        calls = [functools.partial(r.xadd, key, {"d": data}) for r, _ in self.redis[:writers]]
        return await _in_a_loop(calls, seconds)

    # -- ZooKeeper: kazoo's DoubleBarrier (enter) -----------------------------------------

    async def zk_open(self, hosts: str, k: int) -> int:
        from kazoo.client import KazooClient

        self.pool = ThreadPoolExecutor(max_workers=max(k, 4), thread_name_prefix="zk")

        def one() -> Any:
            client = KazooClient(hosts=hosts, timeout=30.0)
            client.start(timeout=30)
            return client

        loop = asyncio.get_running_loop()
        self.zk = await _bounded([loop.run_in_executor(self.pool, one) for _ in range(k)], 8)
        return len(self.zk)

    async def zk_increments(self, path: str, writers: int, seconds: float) -> dict[str, Any]:
        """kazoo's Counter recipe (a get + versioned set, retried on conflict)."""

        def one(client: Any, deadline: float) -> list[float]:
            counter = client.Counter(path)
            lat = []
            while now() < deadline:
                t = now()
                counter += 1
                lat.append(now() - t)
            return lat

        loop = asyncio.get_running_loop()
        assert self.pool is not None
        start = now()
        deadline = start + seconds
        futures = [loop.run_in_executor(self.pool, one, c, deadline) for c in self.zk[:writers]]
        lats = await asyncio.gather(*futures)
        return {"start": start, "end": now(), "lat": [x for xs in lats for x in xs]}

    async def zk_close(self) -> None:
        clients, self.zk = self.zk, []

        def stop(c: Any) -> None:
            with contextlib.suppress(Exception):
                c.stop()
                c.close()

        if self.pool is not None:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self.pool, stop, c) for c in clients))
            self.pool.shutdown(wait=False)
            self.pool = None

    async def close_all(self) -> None:
        for t in self.pending:
            t.cancel()
        closers = (self.topic_unlisten, self.nats_close, self.raw_close, self.redis_close)
        for close in (*closers, self.zk_close):
            with contextlib.suppress(Exception):
                await close()


async def _next_message(ps: Any, kind: str, channel: bytes) -> None:
    while True:
        msg = await ps.get_message(timeout=None)
        if msg is not None and msg["type"] == kind and msg["channel"] == channel:
            return


def _stream_entries(reply: Any) -> list[tuple[str, Any]]:
    """The (id, fields) of an XREAD reply on one stream (RESP2 list or RESP3 map); ids as text."""
    if not reply:
        return []
    streams = list(reply.values()) if isinstance(reply, dict) else [s[1] for s in reply]
    entries = streams[0][0] if isinstance(reply, dict) and streams and streams[0] else streams[0]
    return [(i.decode() if isinstance(i, bytes) else str(i), f) for i, f in entries]


def _zk_enter(client: Any, path: str, n: int, i: int) -> tuple[float, float, float]:
    from kazoo.recipe.barrier import DoubleBarrier

    timed = _TimedCreate(client)
    barrier = DoubleBarrier(timed, path, n, identifier=f"bench-{i}")
    barrier.enter()
    if not barrier.participating:
        raise RuntimeError("kazoo DoubleBarrier.enter failed")
    return timed.sent_at, timed.created_at, now()


class _TimedCreate:
    """A KazooClient as DoubleBarrier sees it, noting when our node's create was sent and
    when it returned."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.sent_at = 0.0
        self.created_at = 0.0

    def create(self, *args: Any, **kwargs: Any) -> Any:
        self.sent_at = now()
        result = self._client.create(*args, **kwargs)
        self.created_at = now()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def _serve(conn: Connection) -> None:
    worker = Worker()
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(conn.fileno(), ready.set)
    try:
        while True:
            await ready.wait()
            ready.clear()
            while conn.poll():
                try:
                    op, kwargs = conn.recv()
                except EOFError:
                    return
                if op == "exit":
                    return
                handler: Callable[..., Awaitable[Any]] = getattr(worker, op)
                try:
                    reply: tuple[str, Any] = ("ok", await handler(**kwargs))
                except Exception:
                    reply = ("err", traceback.format_exc(limit=6))
                conn.send(reply)
    finally:
        loop.remove_reader(conn.fileno())
        await worker.close_all()


def main(conn: Connection) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes our pipe
    import logging

    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        asyncio.run(_serve(conn))


async def _in_a_loop(calls: list[Callable[[], Awaitable[Any]]], seconds: float) -> dict[str, Any]:
    """Each call made over and over, all at once, for `seconds`: when it started and ended,
    and the latency of every call (seconds)."""

    async def one(call: Callable[[], Awaitable[Any]], deadline: float) -> list[float]:
        lat = []
        while now() < deadline:
            t = now()
            await call()
            lat.append(now() - t)
        return lat

    start = now()
    deadline = start + seconds
    lats = await asyncio.gather(*(one(call, deadline) for call in calls))
    return {"start": start, "end": now(), "lat": [x for xs in lats for x in xs]}
