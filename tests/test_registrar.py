"""The registrar's group commits: registrations that arrive while a write of their event is
under way are counted together in the next write, each pod still gets its own value, every
value once, and a retry (during the write or after it) gets the answer of its first send."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.helpers import experiment
from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint, Request
from tricks_nats.counting import CountKeeper
from tricks_nats.registrar import Registrar


class GatedBus(Bus):
    """A real bus whose first write of an event waits for the test's go (the write itself
    still goes to JetStream): what arrives meanwhile must queue behind it."""

    gate: asyncio.Event
    entered: asyncio.Event
    sizes: list[int]

    async def increment(self, event: str, **kw: Any) -> int:
        if not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        self.sizes.append(kw.get("by", 1))
        return await super().increment(event, **kw)


class CountingRegistrar(Registrar):
    """Tells the test when a number of requests has been taken in."""

    def __init__(self, *args: Any, expect: int) -> None:
        super().__init__(*args)
        self.taken = 0
        self.expect = expect
        self.all_taken = asyncio.Event()

    async def _take(self, msg: Request) -> None:
        await super()._take(msg)
        self.taken += 1
        if self.taken >= self.expect:
            self.all_taken.set()


async def _register(nc: Any, subject: str, msg_id: str) -> dict[str, Any]:
    reply = await nc.request(subject, b"", timeout=60, headers={p.MSG_ID_HEADER: msg_id})
    return dict(json.loads(reply.data))


async def test_arrivals_during_a_write_are_counted_together_each_with_its_own_value(
    nats_server,
) -> None:
    n = 200
    async with experiment(nats_server, "group") as ex:
        exp = p.new_experiment_id("grouped")
        # A second experiment with only the gated registrar answering it.
        bus = await GatedBus.open(Endpoint(nats_server.url), exp, name="gated")
        assert isinstance(bus, GatedBus)
        bus.gate, bus.entered, bus.sizes = asyncio.Event(), asyncio.Event(), []
        try:
            await bus.create_buckets()
            registrar = CountingRegistrar(bus, _keeper(bus), expect=n + 1)
            await registrar.start()
            subject = p.event_subject(exp, "ready")
            nc = ex.bus.nc
            first = asyncio.ensure_future(_register(nc, subject, "pod-0"))
            await bus.entered.wait()  # the first write is under way, held
            rest = [asyncio.ensure_future(_register(nc, subject, f"pod-{i}")) for i in range(1, n)]
            retry = asyncio.ensure_future(_register(nc, subject, "pod-7"))  # while queued
            await registrar.all_taken.wait()
            bus.gate.set()
            answers = await asyncio.gather(first, *rest)
            values = sorted(int(a["val"]) for a in answers)
            assert values == list(range(1, n + 1))  # each its own value, every value once
            assert (await retry)["val"] == answers[7]["val"]
            assert bus.sizes == [1, n - 1]  # two writes for 200 registrations
            assert (registrar.writes, registrar.registrations) == (2, n)
            again = await _register(nc, subject, "pod-3")  # a retry after its answer
            assert again["val"] == answers[3]["val"]
            assert await bus.count("ready") == n
            assert bus.sizes == [1, n - 1]  # the late retry wrote nothing
        finally:
            await bus.delete_buckets()
            await bus.close()


def _keeper(bus: Bus) -> CountKeeper:
    return CountKeeper(bus, lambda *_: None)


async def test_one_message_id_on_two_events_counts_on_each(nats_server) -> None:
    """Answers are remembered per event: an id reused on another event is another call (a
    JetStream-wide dedup would have silently dropped it)."""
    async with experiment(nats_server) as ex:
        nc = ex.bus.nc
        a = await _register(nc, p.event_subject(ex.exp, "a"), "same")
        b = await _register(nc, p.event_subject(ex.exp, "b"), "same")
        assert (a["val"], b["val"]) == ("1", "1")
        assert (await ex.bus.count("a"), await ex.bus.count("b")) == (1, 1)


async def test_a_write_whose_id_is_still_in_process_is_asked_again_under_the_same_id(
    nats_server,
) -> None:
    """JetStream answers 10158 while an earlier publish with the same id is not yet applied
    (a stream whose leader just changed, seen on a 3-server cluster): the count is not refused,
    the write is asked again with the same id and its outcome taken."""
    exp = p.new_experiment_id("inproc")
    bus = await Bus.open(Endpoint(nats_server.url), exp, name="coordinator")
    seen: list[str | None] = []

    async def fake_jetstream(msg: Any) -> None:  # stands in for the counts stream
        seen.append(msg.headers.get(p.MSG_ID_HEADER) if msg.headers else None)
        if len(seen) == 1:
            error = {"code": 503, "err_code": p.JS_ID_IN_PROCESS, "description": "in process"}
            await msg.respond(json.dumps({"error": error}).encode())
        else:
            await msg.respond(json.dumps({"stream": "s", "seq": 9, "val": "4"}).encode())

    sub = await bus.nc.subscribe(p.count_subject(exp, "ready"), cb=fake_jetstream)
    try:
        assert await bus.increment("ready", msg_id="b.abc", by=3) == 4
        assert seen == ["b.abc", "b.abc"]
    finally:
        await sub.unsubscribe()
        await bus.close()
