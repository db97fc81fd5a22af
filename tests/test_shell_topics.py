"""`tricks-nats publish/subscribe` (PROTOCOL.md 10) against a real nats-server, on the fast path
(`synctopics` over `syncwire`) and on the full command alike: what they print, exactly once and
in order, live and across a server restart; bad input is one line and an exit code."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest

from tricks_nats.driver import Driver
from tricks_nats.natsserver import EmbeddedServer

from .helpers import experiment
from .test_shell_driver import one_error_line, pod_env
from .test_shell_fast import HEAVY, imported, run
from .test_trust_driver import HANG_GUARD_S, finish, spawn_shell

PATHS = [pytest.param("1", id="fast"), pytest.param("0", id="full")]


@pytest.mark.parametrize("fast", PATHS)
async def test_what_is_published_is_printed_once_in_order(nats_server, fast: str) -> None:
    async with experiment(nats_server) as ex:
        env = {**pod_env(ex), "TRICKS_SHELL_FAST": fast}
        seqs = []
        for args, stdin in (
            (("publish", "cfg", "10.0.0.1:7000"), b""),
            (("publish", "cfg", '{"leader": 2}', "--json"), b""),
            (("publish", "cfg", "--id", "try-1"), b"from stdin\xff"),
            (("publish", "cfg", "-", "--id", "try-1"), b"from stdin\xff"),  # the retry
            (("publish", "other", "elsewhere"), b""),
        ):
            code, out, err = await run(env, "tricks-nats", *args, stdin=stdin)
            assert (code, err) == (0, ""), args
            seqs.append(int(out))
        assert seqs[2] == seqs[3]  # the same --id: one message
        code, out, err = await run(env, "tricks-nats", "subscribe", "cfg", "--count", "3")
        assert (code, err) == (0, "")
        assert out == '10.0.0.1:7000\n{"leader": 2}\nfrom stdin\ufffd\n'
        code, out, _ = await run(env, "tricks-nats", "subscribe", "cfg", "--count=3", "--json")
        rows = [json.loads(line) for line in out.splitlines()]
        assert rows == [
            {"seq": seqs[0], "pod": "sh-0", "data": "10.0.0.1:7000"},
            {"seq": seqs[1], "pod": "sh-0", "data": {"leader": 2}},
            {
                "seq": seqs[2],
                "pod": "sh-0",
                "data_base64": base64.b64encode(b"from stdin\xff").decode(),
            },
        ]


async def test_the_plain_forms_import_nothing_heavy(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        code, out, modules = await imported(env, "publish", "t", "[1, 2]", "--json")
        assert code == 0 and int(out) > 0 and not modules & HEAVY, modules & HEAVY
        code, out, modules = await imported(env, "subscribe", "t", "--count", "1", "--json")
        assert code == 0 and json.loads(out)["data"] == [1, 2] and not modules & HEAVY


@pytest.mark.parametrize("fast", PATHS)
async def test_a_subscriber_waits_for_what_comes_and_times_out_saying_so(
    nats_server, fast: str
) -> None:
    async with experiment(nats_server) as ex, Driver(ex.config("leader")) as leader:
        env = {**pod_env(ex), "TRICKS_SHELL_FAST": fast}
        await leader.publish("t", "first")
        proc = await spawn_shell(env, "subscribe", "t", "--count", "2")
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"first\n"
        await leader.publish("t", "second")  # while it waits
        code, out, err = await finish(proc)
        assert (code, out, err) == (0, "second\n", "")
        code, out, err = await run(
            env, "tricks-nats", "subscribe", "t", "--count", "3", "--timeout", "0.5"
        )
        assert code == 1 and out == "first\nsecond\n"
        one_error_line(err, "timed out after 0.5s")
        assert "messages" in err


@pytest.mark.parametrize("fast", PATHS)
async def test_a_subscriber_whose_reader_goes_away_ends_quietly(nats_server, fast: str) -> None:
    """`tricks-nats subscribe t | head -1`, the reader gone: the first write that fails ends
    the command with exit 1 and nothing on stderr, as `cat` would, on either path."""
    async with experiment(nats_server) as ex, Driver(ex.config("leader")) as leader:
        await leader.publish("t", "m0")
        env = {**pod_env(ex), "TRICKS_SHELL_FAST": fast}
        read_end, write_end = os.pipe()
        os.close(read_end)  # a reader that has gone already: every write fails
        try:
            proc = await asyncio.create_subprocess_exec(
                "tricks-nats",
                "subscribe",
                "t",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_end,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            os.close(write_end)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), HANG_GUARD_S)
        finally:
            if proc.returncode is None:  # the test gave up on it: nothing outlives the test
                proc.kill()
                await proc.wait()
        assert (proc.returncode, err) == (1, b"")


@pytest.mark.parametrize("fast", PATHS)
async def test_bad_input_is_one_line_and_an_exit_code(nats_server, fast: str) -> None:
    async with experiment(nats_server) as ex:
        env = {**pod_env(ex), "TRICKS_SHELL_FAST": fast}
        for args, stdin, code, expect in (
            (("publish", "a.b", "x"), b"", 2, "bad topic 'a.b'"),
            (("subscribe", "a b"), b"", 2, "bad topic 'a b'"),
            (("publish", "t", "{not json", "--json"), b"", 2, "--json: the data is not JSON"),
            (("publish", "t", "--id", "no spaces"), b"x", 2, "bad --id"),
            (("publish", "t"), b"x" * 1_000_001, 1, "at most 1,000,000 bytes, got 1,000,001"),
        ):
            got, out, err = await run(env, "tricks-nats", *args, stdin=stdin)
            assert (got, out) == (code, ""), (args, err)
            one_error_line(err, expect)
        code, out, _ = await run(env, "tricks-nats", "publish", "t", stdin=b"x" * 1_000_000)
        assert code == 0 and int(out) > 0  # the largest one is fine


@pytest.mark.parametrize("fast", PATHS)
async def test_a_shell_subscriber_rides_out_a_server_restart(tmp_path: Path, fast: str) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    await server.start()
    try:
        async with experiment(server) as ex:
            env = {**pod_env(ex), "TRICKS_SHELL_FAST": fast}
            async with Driver(ex.config("leader")) as leader:
                await leader.publish("t", "0")
            proc = await spawn_shell(env, "subscribe", "t", "--count", "4")
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"0\n"
            await server.stop()
            await server.start()
            async with Driver(ex.config("leader")) as leader:
                for k in "123":
                    await leader.publish("t", k)
            code, out, err = await finish(proc)
            assert (code, out) == (0, "1\n2\n3\n"), err
    finally:
        await server.stop()
