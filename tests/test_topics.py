"""Topics (PROTOCOL.md 6.7, 6.8) against a real nats-server: publish and subscribe from the start
of the run, in order, exactly once, across a server restart and lost republished messages;
what a pod may not do (forge a stored message, read another experiment's topics)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from tricks_nats import protocol as p
from tricks_nats import topics
from tricks_nats.driver import Driver, SyncDriver, WaitTimeout
from tricks_nats.errors import PermissionDenied, TricksError
from tricks_nats.natsserver import EmbeddedServer

from .helpers import experiment, two_experiments, wait_until


async def test_a_subscriber_gets_every_message_from_the_start_in_order(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config("leader")) as d:
        seqs = [
            await d.publish("config", b"\x00raw bytes\xff"),
            await d.publish("config", "text é"),
            await d.publish("other", "not this topic"),
            await d.publish("config", {"peers": ["10.0.0.1"], "n": 3}),
        ]
        async with d.subscribe("config") as sub:
            got = await sub.take(3, timeout=30)
        assert [m.seq for m in got] == [seqs[0], seqs[1], seqs[3]]
        assert got[0].data == b"\x00raw bytes\xff" and not got[0].is_json
        assert got[1].text == "text é" and not got[1].is_json
        assert got[2].is_json and got[2].json() == {"peers": ["10.0.0.1"], "n": 3}
        assert {m.pod for m in got} == {"leader-0"} and {m.topic for m in got} == {"config"}
        with pytest.raises(TricksError, match="not JSON"):
            got[1].json()


async def test_subscribers_before_and_after_see_the_same_messages_once(nats_server) -> None:
    """Three pods publish at once while one subscriber listens live; one subscribing after
    them all gets the same sequence (read from the stream) as the live one (republished)."""
    async with experiment(nats_server) as ex:
        drivers = [Driver(ex.config("p", i, 3)) for i in range(3)]
        for d in drivers:
            await d.open()
        try:
            live = drivers[0].subscribe("t")
            first = asyncio.create_task(live.next(timeout=30))  # listening before any publish

            async def publish_all(d: Driver) -> list[int]:
                return [await d.publish("t", {"pod": d.config.pod_id, "k": k}) for k in range(20)]

            published = await asyncio.gather(*(publish_all(d) for d in drivers))
            seen_live = [await first, *await live.take(59, timeout=60)]
            async with drivers[1].subscribe("t") as late:
                seen_late = await late.take(60, timeout=60)
            await live.close()
        finally:
            for d in drivers:
                await d.close()
        every = sorted(s for seqs in published for s in seqs)
        assert [m.seq for m in seen_live] == every == [m.seq for m in seen_late]
        for pod_id, seqs in enumerate(published):  # each pod's messages, in its own order
            mine = [m.json()["k"] for m in seen_live if m.json()["pod"] == pod_id]
            assert mine == list(range(20)) and seqs == sorted(seqs)
        assert [m.data for m in seen_live] == [m.data for m in seen_late]


async def test_what_a_take_got_before_its_timeout_is_not_lost(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        await d.publish("t", b"1")
        await d.publish("t", b"2")
        async with d.subscribe("t") as sub:
            with pytest.raises(WaitTimeout, match="waiting for 3 messages on 't' \\(2 came\\)"):
                await sub.take(3, timeout=0)
            await d.publish("t", b"3")
            assert [m.data for m in await sub.take(3, timeout=30)] == [b"1", b"2", b"3"]


async def test_a_retried_publish_is_stored_once(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        first = await topics.publish(d.bus, "t", b"once", msg_id="x.t-0.topic.t.1", pod="t-0")
        again = await topics.publish(d.bus, "t", b"once", msg_id="x.t-0.topic.t.1", pod="t-0")
        after = await d.publish("t", b"after")
        assert first == again < after
        async with d.subscribe("t") as sub:
            assert [m.data for m in await sub.take(2, timeout=30)] == [b"once", b"after"]
            with pytest.raises(WaitTimeout, match=r"on 't' \(after seq"):
                await sub.next(timeout=0)


async def test_the_largest_message_goes_both_ways_and_a_larger_one_is_refused(
    nats_server,
) -> None:
    big = bytes(range(256)) * (p.MAX_TOPIC_BYTES // 256) + b"x" * (p.MAX_TOPIC_BYTES % 256)
    assert len(big) == p.MAX_TOPIC_BYTES
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        with pytest.raises(TricksError, match="at most 1,000,000 bytes, got 1,000,001"):
            await d.publish("t", big + b"!")
        with pytest.raises(TricksError, match="bad topic"):
            await d.publish("no.dots", b"")
        with pytest.raises(TricksError, match="cannot publish object"):
            await d.publish("t", object())
        await d.publish("t", big)  # before the subscription: read from the stream
        async with d.subscribe("t") as sub:
            assert (await sub.next(timeout=30)).data == big
            waiting = asyncio.create_task(sub.next(timeout=30))  # listening: republished
            await d.publish("t", big)
            assert (await waiting).data == big


async def test_messages_published_while_a_subscriber_is_away_come_once_in_order(
    tmp_path: Path,
) -> None:
    """The server restarts (republished messages in flight are lost): after the reconnect the
    subscriber reads what it missed from the stream; nothing twice, nothing out of order."""
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    await server.start()
    try:
        async with experiment(server) as ex, Driver(ex.config("a")) as d:
            sub = d.subscribe("t")
            await d.publish("t", b"0")
            assert (await sub.next(timeout=30)).data == b"0"
            reconnected = asyncio.Event()

            async def on_reconnect() -> None:
                reconnected.set()

            with d.bus.on_reconnect(on_reconnect):
                await server.stop()
                await server.start()
                publisher = await Driver.connect(ex.config("b"))  # while `d` is away
                try:
                    for k in range(1, 6):
                        await publisher.publish("t", str(k))
                finally:
                    await publisher.close()
                await reconnected.wait()
            got = await sub.take(5, timeout=60)
            await d.publish("t", b"6")
            got.append(await sub.next(timeout=30))
            await sub.close()
        assert [m.text for m in got] == ["1", "2", "3", "4", "5", "6"]
        assert [m.seq for m in got] == sorted({m.seq for m in got})
    finally:
        await server.stop()


async def test_republished_messages_past_the_buffer_are_read_from_the_stream(
    nats_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber that does not keep up drops republished messages past its buffer (here 3
    small ones) and reads them from the stream instead: memory bounded, nothing lost."""
    monkeypatch.setattr(topics, "BUFFER_BYTES", 30)
    async with experiment(nats_server) as ex, Driver(ex.config()) as d, d.subscribe("t") as sub:
        assert await sub.take(0) == []
        waiting = asyncio.create_task(sub.next(timeout=30))  # subscribed, caught up
        await d.publish("t", "message-00")
        assert (await waiting).text == "message-00"
        for k in range(1, 40):
            await d.publish("t", f"message-{k:02}")
        assert sub._overflow  # the buffer ran over while nobody read
        got = await sub.take(39, timeout=60)
        assert [m.text for m in got] == [f"message-{k:02}" for k in range(1, 40)]
        last = await d.publish("t", "last")  # and nothing twice before it
        assert (await sub.next(timeout=30)).seq == last


async def test_a_republished_message_that_skips_one_makes_the_subscriber_read_it(
    nats_server,
) -> None:
    """Lost on the way (a slow consumer cut off, say): the next republished message names a
    previous sequence the subscriber has not delivered, and it reads the stream first. A
    message without sequences (garbage) is ignored."""
    async with experiment(nats_server) as ex, Driver(ex.config()) as d, d.subscribe("t") as sub:
        waiting = asyncio.create_task(sub.next(timeout=30))
        first = await d.publish("t", b"one")
        assert (await waiting).seq == first
        admin = ex.bus.nc  # only the server (or an admin) may publish here
        stored = p.stored_subject(ex.exp, "t")
        await admin.publish(stored, b"garbage", headers={"Nats-Sequence": "x"})
        # the stream stores two more; the subscriber hears only a notice of the last
        second = await topics.publish(ex.bus, "t", b"two", msg_id="m2", pod="t-0")
        third = await topics.publish(ex.bus, "t", b"three", msg_id="m3", pod="t-0")
        got = await sub.take(2, timeout=30)
        assert [(m.seq, m.data) for m in got] == [(second, b"two"), (third, b"three")]
        fourth = await d.publish("t", b"four")  # and nothing twice before it
        assert (await sub.next(timeout=30)).seq == fourth


async def test_close_ends_a_pending_next_and_the_iteration(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        sub = d.subscribe("t")
        await d.publish("t", b"a")
        seen: list[bytes] = []
        both = asyncio.Event()

        async def iterate() -> None:
            async for msg in sub:
                seen.append(msg.data)
                if len(seen) == 1:
                    await d.publish("t", b"b")
                else:
                    both.set()

        task = asyncio.create_task(iterate())
        other = d.subscribe("t")
        assert [m.data for m in await other.take(2, timeout=30)] == [b"a", b"b"]
        await other.close()
        with pytest.raises(TricksError, match="closed"):
            await other.next()
        pending = asyncio.create_task(d.subscribe("t").take(3, timeout=60))
        await both.wait()  # the iteration waits for a third message now
        await d.close()  # the driver's close ends every wait
        await asyncio.wait_for(task, 30)  # the iteration ended, without an error
        assert seen == [b"a", b"b"]
        with pytest.raises(TricksError):
            await pending


async def test_the_blocking_driver_publishes_and_subscribes(nats_server) -> None:
    async with experiment(nats_server) as ex:
        config = ex.config()

        def blocking() -> list[tuple[int, str]]:
            with SyncDriver(config) as tricks:
                seq = tricks.publish("t", {"a": 1})
                with tricks.subscribe("t") as sub:
                    msg = next(iter(sub))
                    with pytest.raises(WaitTimeout):
                        sub.next(timeout=0.1)
                    tricks.publish("t", "two")
                    (second,) = sub.take(1, timeout=30)
                return [(seq, msg.json()["a"]), (second.seq, second.text)]

        (seq, a), (seq2, text) = await asyncio.to_thread(blocking)
        assert (a, text) == (1, "two") and seq2 > seq


async def test_a_pod_can_neither_forge_a_stored_message_nor_read_another_run(
    tmp_path: Path,
) -> None:
    async with two_experiments(tmp_path) as two:
        await topics.publish(two.buses[1], "t", b"secret of b", msg_id="b1", pod="x-0")
        async with Driver(two.own) as d:
            seq = await d.publish("t", b"mine")
            async with d.subscribe("t") as sub:
                assert (await sub.next(timeout=30)).data == b"mine"
                forged = msgspec.json.encode({"x": 1})
                headers = {"Nats-Sequence": str(seq + 1), "Nats-Last-Sequence": str(seq)}
                stored = p.stored_subject(two.own.experiment, "t")
                await d.bus.nc.publish(stored, forged, headers=headers)
                real = await d.publish("t", b"real")  # after the forgery, same connection
                got = await sub.next(timeout=30)
                assert (got.seq, got.data) == (real, b"real")  # the server dropped it
            # the server says so in its own time (maybe after later replies)
            await wait_until(lambda: any("stored.t" in str(e).lower() for e in d.bus.errors))
        async with Driver(two.other) as d2:
            with pytest.raises(PermissionDenied):
                await d2.subscribe("t").next(timeout=30)
            with pytest.raises(PermissionDenied):
                await d2.publish("t", b"into b")
