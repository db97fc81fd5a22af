"""`tricks-nats event/wait/discover` against a real nats-server: output, exit codes, one-line
errors (drivers/PROTOCOL.md section 10)."""

from __future__ import annotations

import asyncio
import json
import os

from tricks_nats import env as E
from tricks_nats.driver import Driver

from .conftest import cli_env
from .helpers import Experiment, experiment


def pod_env(ex: Experiment, tag: str = "sh", pod_id: int = 0, replicas: int = 1) -> dict[str, str]:
    env = cli_env()
    env.update(
        {
            E.TAG: tag,
            E.REPLICAS: str(replicas),
            E.POD_ID: str(pod_id),
            E.EXP_ID: ex.exp,
            E.POD_IP: f"127.0.0.{pod_id + 2}",
            E.NATS_URL: ex.url,
        }
    )
    return env


async def tricks(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "tricks-nats",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_error_line(err: str, expect: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tricks-nats: error: ")
    assert expect in lines[0]


async def test_event_prints_the_new_count(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        assert await tricks(env, "event", "ready") == (0, "1\n", "")
        assert await tricks(env, "event", "ready") == (0, "2\n", "")
        assert await ex.bus.count("ready") == 2
        assert ("ready", 2, "sh-0") in ex.changes


async def test_event_with_an_id_counts_once_when_retried(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        assert await tricks(env, "event", "once", "--id", "attempt-7") == (0, "1\n", "")
        assert await tricks(env, "event", "once", "--id", "attempt-7") == (0, "1\n", "")
        assert await tricks(env, "event", "once", "--id", "attempt-8") == (0, "2\n", "")
        assert await ex.bus.count("once") == 2


async def test_wait_resolves(nats_server) -> None:
    async with experiment(nats_server) as ex:
        waiting = asyncio.create_task(tricks(pod_env(ex), "wait", "go", "2", "--timeout", "60"))
        async with Driver(ex.config("other")) as d:
            await d.register_event("go")
            await d.register_event("go")
        assert await waiting == (0, "2\n", "")


async def test_wait_times_out_with_exit_code_1(nats_server) -> None:
    async with experiment(nats_server) as ex:
        await ex.bus.increment("half")
        code, out, err = await tricks(pod_env(ex), "wait", "half", "2", "--timeout", "0.2")
        assert (code, out) == (1, "")
        one_error_line(err, "'half' to reach 2 (it is 1)")


async def test_discover_plain_json_and_blocking(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        assert await tricks(env, "discover", "server") == (0, "", "")
        await ex.run_pod("server", 1, "127.0.0.11")
        await ex.run_pod("server", 0, "127.0.0.10")
        assert await tricks(env, "discover", "server") == (
            0,
            "0 127.0.0.10\n1 127.0.0.11\n",
            "",
        )
        blocked = asyncio.create_task(
            tricks(env, "discover", "server", "--count", "3", "--timeout", "60", "--json")
        )
        await ex.run_pod("server", 2, "127.0.0.12")
        code, out, err = await blocked
        assert (code, err) == (0, "")
        assert json.loads(out) == [
            {"tag": "server", "pod_id": i, "ip": f"127.0.0.1{i}", "name": f"server-{i}"}
            for i in range(3)
        ]


async def test_discover_times_out_with_exit_code_1(nats_server) -> None:
    async with experiment(nats_server) as ex:
        await ex.run_pod("server", 0, "127.0.0.10")
        code, out, err = await tricks(
            pod_env(ex), "discover", "server", "--count", "2", "--timeout", "0.2"
        )
        assert (code, out) == (1, "")
        one_error_line(err, "discovering 2 pods of 'server' (1 running)")


async def test_discover_of_a_tag_the_experiment_lacks_exits_2_at_once(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = {**pod_env(ex), E.TAGS: "server,client"}
        code, out, err = await tricks(env, "discover", "sever", "--count", "3")  # never waits
        assert (code, out) == (2, "")
        one_error_line(err, f"no tag 'sever' in experiment {ex.exp} (its tags: server, client)")
        assert (await tricks(env, "discover", "server"))[0] == 0


async def test_configuration_errors_exit_2(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        del env[E.EXP_ID]
        code, out, err = await tricks(env, "event", "x")
        assert (code, out) == (2, "")
        one_error_line(err, "EXP_ID is not set")
        env = pod_env(ex)
        env[E.POD_ID] = "zero"
        code, _, err = await tricks(env, "wait", "x", "1")
        assert code == 2
        one_error_line(err, "POD_ID must be an integer")


async def test_bad_names_and_options_exit_2(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        for args, expect in [
            (("event", "has space"), "bad event name"),
            (("discover", "a.b"), "bad tag"),
            (("event", "x", "--id", "a b"), "bad --id"),
        ]:
            code, out, err = await tricks(env, *args)
            assert (code, out) == (2, ""), args
            one_error_line(err, expect)
        code, _, _ = await tricks(env, "wait", "x", "many")
        assert code == 2  # typer's own usage error


async def test_unreachable_nats_exits_3() -> None:
    env = cli_env()
    env.update(
        {E.TAG: "a", E.REPLICAS: "1", E.POD_ID: "0", E.EXP_ID: "e-1"},
        **{E.NATS_URL: "nats://127.0.0.1:1"},
    )
    code, out, err = await tricks(env, "event", "x")
    assert (code, out) == (3, "")
    one_error_line(err, "cannot reach NATS at nats://127.0.0.1:1")


async def test_an_experiment_that_is_not_there_exits_1(nats_server) -> None:
    async with experiment(nats_server) as ex:
        env = pod_env(ex)
        env[E.EXP_ID] = "nope-1"
        code, out, err = await tricks(env, "event", "x")
        assert (code, out) == (1, "")
        one_error_line(err, "not running on this NATS")


def test_the_commands_import_nats_lazily() -> None:
    """`tricks-nats --help` and the command table must not pay for nats-py."""
    import subprocess
    import sys

    code = (
        "import sys; from tricks_nats.cli import app; "
        "print('nats' in sys.modules, 'tricks_nats.bus' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.split() == ["False", "False"]
