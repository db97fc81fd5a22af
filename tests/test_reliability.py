"""Faults and bad input: a dying NATS server, hostile wire messages, random specs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tricks_nats import bus as bus_module
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.natsserver import EmbeddedServer

from .conftest import ROOT, cli_env, exp_processes
from .helpers import DUMP_ENV, as_a_pod, experiment, kill_embedded_server

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]
PY = "from tricks_nats.driver import SyncDriver as D; d = D(); "

PHASES = f"""\
name: phases
experiment:
- tag: worker
  replicas: 4
  command: >-
    python -c "{DUMP_ENV}{PY}d.register_event('phase1'); d.wait_event('go', 1, timeout=120);
    d.register_event('phase2'); d.close()"
"""


async def test_calls_made_while_the_server_is_down_complete_once_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod that registers or reads an event while its server restarts gets its answer when
    the server is back, not an error, even when the restart outlasts a request's timeout (as
    on a loaded machine; shortened here so that every first attempt surely times out)."""
    monkeypatch.setattr(bus_module, "PUBLISH_TIMEOUT_S", 0.05)
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    await server.start()
    try:
        async with experiment(server) as ex:
            pod = await Bus.open(Endpoint(server.url), ex.exp, name="pod")
            try:
                assert await pod.increment("ready", pod="t-0") == 1
                await server.stop()  # the same port and store come back below
                calls = asyncio.gather(
                    pod.increment("ready", pod="t-1"),
                    pod.count("ready"),
                    pod.wait_count("ready", 2, timeout=60),
                )
                await server.start()
                registered, _read, reached = await calls
            finally:
                await pod.close()
            assert registered == 2  # counted once, though the first attempts went nowhere
            assert reached == 2
            assert await ex.bus.count("ready") == 2
    finally:
        await server.stop()


async def test_the_run_survives_its_nats_server_being_killed(tmp_path: Path) -> None:
    spec = tmp_path / "phases.yaml"
    spec.write_text(PHASES)
    up = await asyncio.create_subprocess_exec(
        *TRICKS,
        "up",
        str(spec),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        assert up.stdout is not None
        experiment = ""
        seen: list[bytes] = []
        while True:  # every worker registered phase1 and now waits for `go`
            line = await up.stdout.readline()
            if not line:
                _, err = await up.communicate()
                journal = b"".join(seen[-15:]).decode()
                raise AssertionError(f"up ended early: {err.decode()[-3000:]}\n{journal}")
            seen.append(line)
            entry: dict[str, Any] = json.loads(line)
            experiment = entry["experiment"]
            if entry["kind"] == "event" and (entry["name"], entry["count"]) == ("phase1", 4):
                break
        kill_embedded_server(up.pid)
        pod = await as_a_pod(tmp_path)  # connecting rides out the restart
        try:
            assert await pod.count("phase1") == 4  # the file store kept the counts
            await pod.register_event("go")
        finally:
            await pod.close()
        out, err = await up.communicate()
    finally:
        if up.returncode is None:
            up.kill()
            await up.communicate()
    assert up.returncode == 0, (out.decode()[-4000:], err.decode())
    run = tmp_path / "runs" / experiment
    summary = json.loads((run / "summary.json").read_text())
    assert summary["verdict"] == "succeeded"
    assert summary["events"] == {
        "phase1": 4,
        "go": 1,
        "phase2": 4,
        "worker_start": 4,
        "worker_stop": 4,
    }
    assert not exp_processes(experiment)


async def ring_through_a_server_kill(
    tmp_path: Path, when: str, kill: Callable[[int], Awaitable[None]], *options: str
) -> None:
    """Run the ring; once event `when` happens, `kill(pid of up)`; the run must still succeed
    with exact counts and leave no pod behind."""
    up = await asyncio.create_subprocess_exec(
        *TRICKS,
        "up",
        "examples/ring/ring.yaml",
        *options,
        "--runs-dir",
        str(tmp_path / "runs"),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        assert up.stdout is not None
        experiment = ""
        while True:
            entry: dict[str, Any] = json.loads(await up.stdout.readline())
            experiment = entry["experiment"]
            if entry["kind"] == "event" and entry["name"] == when:
                break
        await kill(up.pid)
        out, err = await up.communicate()
    finally:
        if up.returncode is None:
            up.kill()
            await up.communicate()
    assert up.returncode == 0, (out.decode()[-3000:], err.decode())
    summary = json.loads((tmp_path / "runs" / experiment / "summary.json").read_text())
    assert summary["verdict"] == "succeeded"
    assert summary["events"] == {
        "server_start": 6,
        "server-connected": 6,
        "client_start": 6,
        "client_stop": 6,
        "server_stop": 6,
    }
    assert not exp_processes(experiment)


@pytest.mark.parametrize("when", ["server_start", "server-connected", "client_start"])
async def test_the_ring_survives_a_server_kill_with_exact_counts(tmp_path: Path, when: str) -> None:
    async def kill_the_embedded_server(up: int) -> None:
        kill_embedded_server(up)

    await ring_through_a_server_kill(tmp_path, when, kill_the_embedded_server)


async def test_with_nats_url_the_ring_survives_that_server_restarting(tmp_path: Path) -> None:
    """The user's own server (--nats-url) crashes and its operator starts it again on the same
    port and store: coordinator and pods reconnect, the run completes with exact counts."""
    server = EmbeddedServer(store_dir=tmp_path / "js", supervise=False)

    async def crash_and_restart(_up: int) -> None:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        await server.stop()
        await server.start()

    await server.start()
    try:
        await ring_through_a_server_kill(
            tmp_path, "server-connected", crash_and_restart, "--nats-url", server.url
        )
    finally:
        await server.stop()


async def test_secrets_never_reach_the_records(tmp_path: Path) -> None:
    secret_file = tmp_path / "seen-by-the-pod"
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""\
experiment:
- tag: a
  command: printf %s "$TRICKS_NATS_PASSWORD" > {secret_file}
""")
    up = await asyncio.create_subprocess_exec(
        *TRICKS,
        "--verbose",
        "up",
        str(spec),
        "--runs-dir",
        str(tmp_path / "runs"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    out, err = await up.communicate()
    assert up.returncode == 0, err.decode()
    password = secret_file.read_text()
    assert len(password) >= 20  # the pods got a real per-run password ...
    records = [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]
    assert {f.name for f in records} >= {
        "journal.jsonl",
        "summary.json",
        "spec.yaml",
        "nats-server.log",
        "a-0.log",
    }
    for f in records:  # ... and no record, not even the server's log, contains it
        assert password.encode() not in f.read_bytes(), f
    assert password.encode() not in out + err  # nor the console, even with --verbose
    state = list((tmp_path / "state").glob("*.json"))
    assert state and all(password.encode() not in f.read_bytes() for f in state)


async def test_two_experiments_on_one_server_stay_isolated(tmp_path: Path, nats_server) -> None:
    spec = tmp_path / "big.yaml"
    spec.write_text("""\
experiment:
- tag: many
  replicas: 200
  command: [sleep, "300"]
  workflow: {stop: {name: last_stop, value: 1}}
- tag: last
  command: "true"
  workflow: {start: {name: many_start, value: 200}}
""")
    runs = [tmp_path / "runs-a", tmp_path / "runs-b"]
    ups = [
        await asyncio.create_subprocess_exec(
            *TRICKS,
            "up",
            str(spec),
            "--runs-dir",
            str(r),
            "--nats-url",
            nats_server.url,
            "-q",
            "--grace",
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
            cwd=ROOT,
        )
        for r in runs
    ]
    results = [await u.communicate() for u in ups]
    for u, (_, err) in zip(ups, results, strict=True):
        assert u.returncode == 0, err.decode()
    summaries = [json.loads(next(r.iterdir()).joinpath("summary.json").read_text()) for r in runs]
    assert summaries[0]["experiment"] != summaries[1]["experiment"]
    for s in summaries:
        assert s["verdict"] == "succeeded"
        assert s["events"] == {"many_start": 200, "last_start": 1, "last_stop": 1, "many_stop": 200}
        assert not exp_processes(s["experiment"])
