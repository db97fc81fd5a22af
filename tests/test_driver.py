"""The Python driver against a real nats-server: config, discover, exactly-once, waits."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tricks_nats import env as E
from tricks_nats import protocol as p
from tricks_nats.driver import Config, ConfigError, Driver, NatsUnavailable, SyncDriver, WaitTimeout
from tricks_nats.errors import TricksError, UnknownTag
from tricks_nats.natsserver import EmbeddedServer, User

from .helpers import experiment, two_experiments


def test_config_from_env_reads_every_variable() -> None:
    cfg = Config.from_env(
        {
            E.TAG: "server",
            E.REPLICAS: "6",
            E.POD_ID: "3",
            E.EXP_ID: "x-1",
            E.POD_IP: "127.0.0.5",
            E.NATS_URL: "nats://127.0.0.1:4222",
            E.NATS_USER: "u",
            E.NATS_PASSWORD: "p",
        }
    )
    assert (cfg.tag, cfg.replicas, cfg.pod_id, cfg.experiment, cfg.pod_ip) == (
        "server",
        6,
        3,
        "x-1",
        "127.0.0.5",
    )
    assert (cfg.nats_url, cfg.nats_user, cfg.nats_password) == ("nats://127.0.0.1:4222", "u", "p")
    assert cfg.pod == "server-3"
    assert cfg.tags is None  # TRICKS_TAGS unset: discover checks no tag


async def test_discover_of_a_tag_the_experiment_lacks_is_said_at_once(nats_server) -> None:
    async with experiment(nats_server) as ex:
        cfg = dataclasses.replace(ex.config(), tags=("server", "client"))
        async with Driver(cfg) as d:
            await ex.run_pod("server", 0, "127.0.0.10")
            assert [p.pod_id for p in await d.discover("server")] == [0]
            for call in (d.discover("sever"), d.discover("sever", 3, timeout=None)):
                with pytest.raises(UnknownTag) as caught:
                    await call  # never waits: the wait could not end
            assert str(caught.value) == (
                f"no tag 'sever' in experiment {ex.exp} (its tags: server, client)"
            )
            assert caught.value.exit_code == 2


def test_config_falls_back_to_tricks_ip_and_port() -> None:
    cfg = Config.from_env(
        {
            E.TAG: "a",
            E.REPLICAS: "1",
            E.POD_ID: "0",
            E.EXP_ID: "e",
            E.TRICKS_IP: "10.0.0.1",
            E.TRICKS_PORT: "4333",
        }
    )
    assert cfg.nats_url == "nats://10.0.0.1:4333"


@pytest.mark.parametrize(
    ("missing", "bad", "expect"),
    [
        (E.TAG, {}, "TAG is not set"),
        (E.EXP_ID, {}, "EXP_ID is not set"),
        (None, {E.POD_ID: "zero"}, "POD_ID must be an integer"),
        (E.NATS_URL, {}, "TRICKS_NATS_URL"),
        (None, {E.PROTOCOL: "1"}, "this driver speaks protocol 2"),
    ],
)
def test_config_errors_name_the_variable(
    missing: str | None, bad: dict[str, str], expect: str
) -> None:
    env = {E.TAG: "a", E.REPLICAS: "1", E.POD_ID: "0", E.EXP_ID: "e", E.NATS_URL: "nats://x:1"}
    if missing:
        env.pop(missing)
    env.update(bad)
    with pytest.raises(ConfigError, match=expect):
        Config.from_env(env)


async def test_unreachable_nats_is_a_clear_error() -> None:
    cfg = Config(
        tag="a", replicas=1, pod_id=0, experiment="e", pod_ip="", nats_url="nats://127.0.0.1:1"
    )
    with pytest.raises(NatsUnavailable, match=r"cannot reach NATS at nats://127\.0\.0\.1:1"):
        await Driver.connect(cfg)


async def test_wrong_credentials_are_refused_clearly(tmp_path) -> None:
    async with EmbeddedServer(users=[User("pod", "right")], store_dir=tmp_path) as server:
        cfg = Config(
            tag="a",
            replicas=1,
            pod_id=0,
            experiment="e",
            pod_ip="",
            nats_url=server.url,
            nats_user="pod",
            nats_password="wrong",
        )
        with pytest.raises(NatsUnavailable, match="credentials refused"):
            await Driver.connect(cfg)


async def test_register_event_counts_and_returns_the_new_total(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        assert await d.count("ready") == 0
        assert await d.register_event("ready") == 1
        assert await d.register_event("ready") == 2
        assert await d.count("ready") == 2


async def test_a_retried_publish_counts_once(nats_server) -> None:
    async with experiment(nats_server) as ex:
        first = await ex.bus.increment("ev", msg_id="pod-0.ev.abc")
        retried = await ex.bus.increment("ev", msg_id="pod-0.ev.abc")
        assert (first, retried) == (1, 1)  # the duplicate reports the original's total
        assert await ex.bus.increment("ev", msg_id="pod-0.ev.def") == 2
        assert await ex.bus.count("ev") == 2


async def test_concurrent_drivers_count_exactly(nats_server) -> None:
    async with experiment(nats_server) as ex:
        drivers = [await Driver.connect(ex.config("w", i, 8)) for i in range(8)]
        try:
            totals = await asyncio.gather(
                *(d.register_event("hit") for d in drivers for _ in range(25))
            )
            assert sorted(totals) == list(range(1, 201))
            assert await drivers[0].count("hit") == 200
        finally:
            await asyncio.gather(*(d.close() for d in drivers))


async def test_wait_event_resolves_when_the_count_is_reached(nats_server) -> None:
    async with experiment(nats_server) as ex:
        waiter = await Driver.connect(ex.config("a", 0))
        others = [await Driver.connect(ex.config("b", i)) for i in range(3)]
        try:
            waiting = asyncio.create_task(waiter.wait_event("go", 3, timeout=30))
            await others[0].register_event("go")
            await others[1].register_event("go")
            assert not waiting.done()
            await others[2].register_event("go")
            assert await waiting >= 3
        finally:
            await asyncio.gather(waiter.close(), *(o.close() for o in others))


async def test_wait_event_already_met_returns_at_once(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        await d.register_event("done")
        assert await d.wait_event("done", 1, timeout=5) == 1


async def test_wait_event_times_out(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        await d.register_event("half")
        with pytest.raises(WaitTimeout, match="'half' to reach 2 \\(it is 1\\)"):
            await d.wait_event("half", 2, timeout=0.2)


async def test_waiters_get_one_notification_not_every_increment(nats_server) -> None:
    """The O(N) barrier: each waiter is released by one message for its own threshold."""
    async with experiment(nats_server) as ex:
        nc = ex.bus.nc
        seen: list[str] = []

        async def record(msg) -> None:
            seen.append(msg.subject)

        sub = await nc.subscribe(f"tricks.{ex.exp}.reached.>", cb=record)
        async with Driver(ex.config()) as d:
            for _ in range(5):
                await d.register_event("b")
            await d.wait_event("b", 5, timeout=5)
        await nc.flush()
        await sub.unsubscribe()
        assert [s.rsplit(".", 1)[1] for s in seen] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("whole_tag_known", [True, False])
async def test_a_blocking_discover_of_a_whole_tag_ends_with_its_notification(
    nats_server, whole_tag_known: bool
) -> None:
    """Once all of a tag's pods run, the notification of its start count carries the roster:
    a discover waiting for the whole tag takes it from there, with no read after its first
    look. Without the tag's size (`replicas`) the coordinator attaches none, and discover
    reads the roster again: the same answer."""
    from tricks_nats.registrar import Rosters

    async with experiment(nats_server) as ex:
        rosters = Rosters(ex.bus, ex.watcher, {"server": 3} if whole_tag_known else None)
        stream = p.stream_of(p.pods_bucket(ex.exp))
        spy = await ex.bus.nc.subscribe("$JS.API.DIRECT.GET.>")  # every read
        await ex.bus.nc.flush()  # registered at the server before any read
        try:
            async with Driver(ex.config("client")) as d:
                waiting = asyncio.create_task(d.discover("server", 3, timeout=60))
                # It reads the count, the roster (empty), then subscribes to the notification
                # and reads the count again: from then on only a notification ends its wait.
                first_look = await spy.next_msg(timeout=30)
                while stream not in first_look.subject:
                    first_look = await spy.next_msg(timeout=30)
                mine = first_look.reply.rsplit(".", 1)[0]
                count = await spy.next_msg(timeout=30)
                while not count.reply.startswith(mine) or stream in count.subject:
                    count = await spy.next_msg(timeout=30)
                for i in range(3):
                    await rosters.started("server", i, f"127.0.0.{10 + i}")
                peers = await waiting
                assert [(x.pod_id, x.ip) for x in peers] == [
                    (i, f"127.0.0.{10 + i}") for i in range(3)
                ]
                await ex.bus.roster("server")  # a read of ours, after discover returned
                after = await spy.next_msg(timeout=30)
                while stream not in after.subject:  # count reads (the driver's, ours)
                    after = await spy.next_msg(timeout=30)
                read_again = after.reply.startswith(mine)  # the driver's, sent before ours
                assert read_again is not whole_tag_known
        finally:
            await spy.unsubscribe()


async def test_barrier_releases_everyone_with_one_request_and_one_notification(
    nats_server,
) -> None:
    """`barrier` = register + wait in one request: each participant gets a count >= n, the
    counts registered are exactly n, and JetStream is read by nobody (the registration's
    reply is the first read, the notification the last)."""
    n = 12
    async with experiment(nats_server) as ex:
        reads = await ex.bus.nc.subscribe("$JS.API.DIRECT.GET.>")
        await ex.bus.nc.flush()  # registered at the server before any read
        drivers = [await Driver.connect(ex.config("t", i, n)) for i in range(n)]
        try:
            reached = await asyncio.gather(*(d.barrier("line", n, timeout=60) for d in drivers))
            assert all(r >= n for r in reached)
            assert await ex.bus.count("line") == n
            await ex.bus.nc.flush()
            assert reads.pending_msgs == 1  # only the count read of the line above
            late = await drivers[0].barrier("line", n, timeout=5)  # met already: at once
            assert late == n + 1
        finally:
            await reads.unsubscribe()
            await asyncio.gather(*(d.close() for d in drivers))


async def test_barrier_times_out_saying_the_count(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        with pytest.raises(WaitTimeout, match="'pair' to reach 2 \\(it is 1\\)"):
            await d.barrier("pair", 2, timeout=2)
        assert await d.count("pair") == 1  # the arrival itself was counted
        with pytest.raises(TricksError, match="bad event name"):
            await d.barrier("no spaces", 1)


async def test_discover_now_and_blocking(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config("c", 0)) as d:
        assert await d.discover("server") == []
        await ex.run_pod("server", 0, "127.0.0.10")
        blocked = asyncio.create_task(d.discover("server", 3, timeout=30))
        await ex.run_pod("server", 1, "127.0.0.11")
        await ex.run_pod("other", 0, "127.0.0.99")
        await asyncio.sleep(0)
        assert not blocked.done()
        await ex.run_pod("server", 2, "127.0.0.12")
        peers = await blocked
        assert [(p.pod_id, p.ip) for p in peers] == [
            (0, "127.0.0.10"),
            (1, "127.0.0.11"),
            (2, "127.0.0.12"),
        ]
        await ex.stop_pod("server", 1)
        assert [p.pod_id for p in await d.discover("server")] == [0, 2]


async def test_discover_times_out(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        await ex.run_pod("server", 0, "127.0.0.10")
        with pytest.raises(WaitTimeout, match="discovering 2 pods of 'server' \\(1 running\\)"):
            await d.discover("server", 2, timeout=0.2)


async def test_bad_names_are_refused_before_the_wire(nats_server) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        with pytest.raises(TricksError, match="bad event name"):
            await d.register_event("has space")
        with pytest.raises(TricksError, match="bad tag"):
            await d.discover("a.b")


async def test_driver_for_an_experiment_that_does_not_exist(nats_server) -> None:
    cfg = Config(
        tag="a", replicas=1, pod_id=0, experiment="nope-1", pod_ip="", nats_url=nats_server.url
    )
    async with Driver(cfg) as d:
        with pytest.raises(TricksError, match="not running on this NATS"):
            await d.register_event("x")


async def test_sync_driver_blocking_facade(nats_server) -> None:
    async with experiment(nats_server) as ex:
        await ex.run_pod("server", 0, "127.0.0.10")

        def blocking() -> tuple[int, int, list[int]]:
            with SyncDriver(ex.config()) as d:
                n = d.register_event("s")
                reached = d.wait_event("s", 1, timeout=5)
                return n, reached, [p.pod_id for p in d.discover("server", 1, timeout=5)]

        assert await asyncio.to_thread(blocking) == (1, 1, [0])


async def test_pod_permissions_reach_only_their_experiment(tmp_path) -> None:
    async with two_experiments(tmp_path) as two:
        async with Driver(two.own) as d:
            assert await d.register_event("x") == 1
            assert await d.discover("t") == []
        async with Driver(two.other) as d2:
            with pytest.raises(TricksError, match="permissions violation"):
                await d2.register_event("x")
        assert await two.buses[1].count("x") == 0


async def test_a_timeout_of_zero_looks_once_and_leaves_the_driver_working(nats_server) -> None:
    """timeout=0: the count (or the roster) as it is now, or WaitTimeout at once; the driver
    goes on working (a wait cancelled inside the client's flush used to break the connection)."""
    async with experiment(nats_server) as ex, Driver(ex.config()) as d:
        await d.register_event("e")
        assert await d.wait_event("e", 1, timeout=0) == 1
        with pytest.raises(
            WaitTimeout, match=r"timed out after 0s waiting for 'e' to reach 2 \(it is 1\)"
        ):
            await d.wait_event("e", 2, timeout=0)
        await ex.run_pod("server", 0, "127.0.0.10")
        assert [p.pod_id for p in await d.discover("server", 1, timeout=0)] == [0]
        with pytest.raises(WaitTimeout, match=r"discovering 2 pods of 'server' \(1 running\)"):
            await d.discover("server", 2, timeout=0)
        assert await d.register_event("e") == 2  # still connected
        assert await d.wait_event("e", 2, timeout=5) == 2
