"""A pod cannot fool the coordinator or other pods, nor read the coordinator's secrets.

Forged messages: a hostile pod (tests/pods/hostile.py, raw nats-py with its own credentials)
tries every wire-level trick; the counts, the verdict and other pods stay as they should.
Secrets: nothing a pod can read by default names the coordinator's credentials.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.natsserver import EmbeddedServer

from .conftest import ROOT, cli_env, exp_processes
from .helpers import experiment, wait_until

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]
PY = "from tricks_nats.driver import SyncDriver as D; d = D(); "


async def up(spec: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *TRICKS,
        "up",
        str(spec),
        "--runs-dir",
        str(spec.parent / "runs"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=spec.parent,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def summary_of(spec: Path) -> dict[str, Any]:
    (run,) = (spec.parent / "runs").iterdir()
    data: dict[str, Any] = json.loads((run / "summary.json").read_text())
    return data


# -- forged messages ---------------------------------------------------------------------------

HOSTILE = f"""\
name: hostile
timeout: 120
experiment:
- tag: victim
  command: python -c "{PY}d.wait_event('hostile-done', 1, timeout=100); print(d.count('go'))"
- tag: hostile
  command: [python, {ROOT / "tests" / "pods" / "hostile.py"}]
"""


async def test_a_hostile_pod_cannot_change_counts_notifications_or_streams(tmp_path) -> None:
    spec = tmp_path / "hostile.yaml"
    spec.write_text(HOSTILE)
    code, _, err = await up(spec, "--json")
    assert code == 0, err
    report = json.loads((tmp_path / "hostile.json").read_text())
    refused = [
        "incr_1000",
        "incr_minus",
        "forged_notification",
        "push_consumer",
        "durable_consumer",
        "purge",
        "delete",
        "roster_write",
        "other_experiment",
    ]
    assert {k: report[k] for k in refused} == dict.fromkeys(refused, True)
    # Through the coordinator a registration is +1, whatever the headers say; the message id
    # the coordinator uses for its own lifecycle counts cannot be reached from a pod.
    assert report["event_with_incr_1000"] == {"val": "1"}
    assert "counted by the coordinator" in report["lifecycle_event"]["error"]["description"]
    summary = summary_of(spec)
    assert summary["verdict"] == "succeeded"
    assert summary["events"]["go"] == 1
    assert summary["events"]["victim_stop"] == 1  # the real stop was not swallowed
    (victim_log,) = (tmp_path / "runs").glob("*/logs/victim-0.log")
    assert victim_log.read_text().split() == ["1"]


async def test_a_notification_that_does_not_state_the_count_does_not_release(
    nats_server,
) -> None:
    """Only the coordinator may publish notifications (the pods' permissions, tested above),
    and a waiter takes the count a well-formed one states. Garbage on that subject (sent here
    by an unrestricted user) never releases a waiter: it reads the count and waits on."""
    async with experiment(nats_server) as ex:
        pod = await Bus.open(Endpoint(nats_server.url), ex.exp, name="pod")
        spy = await ex.bus.nc.subscribe("$JS.API.DIRECT.GET.>")  # sees every count read
        await ex.bus.nc.flush()  # the server has the spy's SUB before the waiter reads
        waiter = asyncio.create_task(pod.wait_count("go", 3))
        try:
            await spy.next_msg(timeout=30)  # the waiter subscribed, then read 0
            for body in (
                b"\xff not json",
                json.dumps({"event": "other", "value": 3}).encode(),
                json.dumps({"event": "go", "value": 2}).encode(),
                json.dumps({"event": "go"}).encode(),
            ):
                await ex.bus.nc.publish(p.reached_subject(ex.exp, "go", 3), body)
                await spy.next_msg(timeout=30)  # it read the count (still 0)...
                await spy.next_msg(timeout=30)  # ...subscribed again and read it once more
                assert not waiter.done(), f"released by {body!r}"
            for _ in range(3):
                await ex.bus.increment("go")
            assert await waiter == 3
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            await spy.unsubscribe()
            await pod.close()


async def test_garbage_registrations_are_answered_and_counted_once(nats_server) -> None:
    async with experiment(nats_server) as ex:
        nc, subject = ex.bus.nc, p.event_subject(ex.exp, "junk")
        replies = [
            json.loads((await nc.request(subject, body, timeout=10, headers=h)).data)
            for body, h in [
                (b"\xff" * 5000, {"Nats-Incr": "1000"}),
                (b"", {"Nats-Msg-Id": "same"}),
                (b"", {"Nats-Msg-Id": "same"}),  # a retry: counted once
                (b"", {"Nats-Msg-Id": "x" * 500}),  # too long: refused
                (b"", {"Tricks-Pod": "\x00\x01 not a pod"}),
            ]
        ]
        assert [r.get("val") for r in replies] == ["1", "2", "2", None, "3"]
        assert "message id longer" in replies[3]["error"]["description"]
        assert await ex.bus.count("junk") == 3


async def test_pods_of_one_experiment_cannot_touch_another(tmp_path) -> None:
    """Two experiments on one server, pod users as `up` makes them: one's pods reach
    nothing of the other's."""
    from tricks_nats.natsserver import User

    a, b = p.new_experiment_id("a"), p.new_experiment_id("b")
    admin, pod_a = User.random("admin"), User.random("pod-a", p.pod_permissions(a))
    async with EmbeddedServer(users=[admin, pod_a], store_dir=tmp_path / "js") as server:
        adm = await Bus.open(Endpoint(server.url, admin.name, admin.password), b, name="a")
        hostile = await Bus.open(Endpoint(server.url, pod_a.name, pod_a.password), b, name="h")
        try:
            await adm.create_buckets()
            await adm.increment("go")
            subjects = [
                p.event_subject(b, "go"),
                p.count_subject(b, "go"),
                f"$JS.API.STREAM.PURGE.{p.stream_of(p.counts_bucket(b))}",
                f"$JS.API.STREAM.DELETE.{p.journal_stream(b)}",
                p.reached_subject(b, "go", 5),
            ]
            for subject in subjects:
                await hostile.nc.publish(subject, b"", headers={"Nats-Incr": "100"})
            await hostile.nc.flush()

            def refused() -> list[str]:
                text = [str(e).lower() for e in hostile.errors]
                return [s for s in subjects if any(s.lower() in t for t in text)]

            await wait_until(lambda: len(refused()) == len(subjects))  # -ERR, from a task
            assert all("permissions violation" in str(e).lower() for e in hostile.errors)
            assert await adm.count("go") == 1
        finally:
            await hostile.close()
            await adm.close()


# -- secrets -----------------------------------------------------------------------------------


async def test_no_credentials_a_pod_can_find_can_purge_the_counts(tmp_path) -> None:
    """The hostile pod looks in the state directory and the server's temporary directory:
    the state file holds only read-only observer credentials, the server's config file is
    gone once the server has read it, and the pod's environment has its own password only."""
    spec = tmp_path / "hostile.yaml"
    spec.write_text(HOSTILE)
    code, _, err = await up(spec)
    assert code == 0, err
    report = json.loads((tmp_path / "hostile.json").read_text())
    found = report["credentials_found"]
    assert found, "the state file should have been found (it is where `watch` looks)"
    assert not any(":coordinator" in k for k in found)
    assert not any(v == "purged" for v in found.values()), found
    assert report["secret_env"] == ["TRICKS_NATS_PASSWORD"]
    assert summary_of(spec)["events"]["go"] == 1


SLEEPER = """\
name: sleeper
experiment:
- tag: s
  command: sleep 1000
"""


async def test_after_up_is_killed_its_state_file_and_pods_are_gone(tmp_path, private_state_dir):
    spec = tmp_path / "sleeper.yaml"
    spec.write_text(SLEEPER)
    proc = await asyncio.create_subprocess_exec(
        *TRICKS,
        "up",
        str(spec),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    try:
        while True:  # the pod runs (and the state file was written before it started)
            entry = json.loads(await proc.stdout.readline())
            if entry["kind"] == "pod" and entry["state"] == "running":
                break
        experiment = entry["experiment"]
        state = private_state_dir / f"{experiment}.json"
        assert state.exists() and json.loads(state.read_text()).get("password")
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        # The watchdog notices the closed pipe.
        await wait_until(lambda: not state.exists() and not exp_processes(experiment))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- a shared server (--nats-url) ----------------------------------------------------------------

GATE = f"""\
name: shared
experiment:
- tag: t
  command: python -c "{PY}d.register_event('x')"
"""


async def test_a_shared_server_is_named_not_isolated_and_left_clean(tmp_path) -> None:
    spec = tmp_path / "shared.yaml"
    spec.write_text(GATE)
    async with EmbeddedServer(store_dir=tmp_path / "js") as server:
        code, _, err = await up(spec, "--nats-url", server.url, "--quiet")
        assert code == 0, err
        assert "not isolated" in err
        code, _, err = await up(spec, "--nats-url", server.url, "--quiet", "--keep")
        assert code == 0, err
        bus = await Bus.open(Endpoint(server.url), "x", name="check")
        try:
            names = [s.config.name for s in await bus.js.streams_info()]
        finally:
            await bus.close()
        runs = [
            (json.loads((d / "summary.json").read_text()), d.name)
            for d in (tmp_path / "runs").iterdir()
        ]
        kept = [name for _, name in sorted(runs, key=lambda r: r[0]["started_at"])]  # run order
        assert len(kept) == 2
        # The first run's streams are gone, the second's (--keep) are still there.
        assert not any(kept[0] in (n or "") for n in names), names
        assert sum(kept[1] in (n or "") for n in names) == 5, (
            names
        )  # counts, pods, journal, metrics, topics
