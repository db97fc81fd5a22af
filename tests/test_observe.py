"""Watching runs: `watch` beside `up`, replay of finished runs, `status`, `report`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tricks_nats import statefile

from .conftest import ROOT, cli_env, exp_processes
from .helpers import DUMP_ENV, as_a_pod

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]
PY = "from tricks_nats.driver import SyncDriver as D; d = D(); "

GATED = f"""\
name: gated
experiment:
- tag: gate
  command: python -c "{DUMP_ENV}{PY}d.wait_event('release', 1, timeout=120); d.close()"
- tag: worker
  replicas: 3
  command: python -c "{PY}d.register_event('ready'); d.close()"
  workflow:
    start: {{name: release, value: 1}}
"""


STARTED: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
async def reap() -> Any:
    """Whatever a test started is gone when it ends, even when it fails half-way."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def start(*args: str, cwd: Path = ROOT) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *TRICKS,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=cwd,
    )
    STARTED.append(proc)
    return proc


async def release(spec_dir: Path) -> None:
    """What a pod does: register `release` (with the gate pod's credentials)."""
    driver = await as_a_pod(spec_dir)
    try:
        await driver.register_event("release")
    finally:
        await driver.close()


async def gated_run(tmp_path: Path) -> tuple[asyncio.subprocess.Process, str, Path]:
    spec = tmp_path / "gated.yaml"
    spec.write_text(GATED)
    runs = tmp_path / "runs"
    up = await start("up", str(spec), "--runs-dir", str(runs), "--grace", "1")
    assert up.stdout is not None
    first = (await up.stdout.readline()).decode()
    assert first.startswith("experiment gated-"), first
    experiment = first.split()[1].rstrip(":")
    return up, experiment, runs / experiment


def journal(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "journal.jsonl").read_text().splitlines()]


async def test_watch_beside_up_sees_everything_and_exits_with_the_run(tmp_path: Path) -> None:
    up, experiment, run_dir = await gated_run(tmp_path)
    watch = await start("watch", "--json")  # no flags: finds the run by its state file
    assert watch.stdout is not None
    seen: list[dict[str, Any]] = []
    while not any(e["kind"] == "event" and e["name"] == "gate_start" for e in seen):
        seen.append(json.loads(await watch.stdout.readline()))
    await release(tmp_path)
    out, err = await watch.communicate()
    seen += [json.loads(line) for line in out.decode().splitlines()]
    up_out, up_err = await up.communicate()
    assert watch.returncode == 0, err.decode()
    assert up.returncode == 0, up_out.decode() + up_err.decode()
    assert b"\x1b" not in up_out  # a pipe gets plain lines, no terminal control characters
    assert {e["experiment"] for e in seen} == {experiment}
    running = [e for e in seen if e["kind"] == "pod" and e["state"] == "running"]
    assert len(running) == 4
    kinds = [
        (e["kind"], e.get("name") or e.get("tag"), e.get("count") or e.get("action")) for e in seen
    ]
    assert kinds.index(("workflow", "worker", "start")) > kinds.index(("event", "release", 1))
    assert seen[-1]["kind"] == "verdict" and seen[-1]["verdict"] == "succeeded"
    assert seen == journal(run_dir)  # the live stream and the journal agree, entry for entry
    assert not exp_processes(experiment)


async def test_status_lists_the_running_experiment(tmp_path: Path) -> None:
    up, experiment, _ = await gated_run(tmp_path)
    watch = await start("watch", experiment, "--json", "--kind", "event")
    assert watch.stdout is not None
    line = json.loads(await watch.stdout.readline())  # gate_start = 1: the gate runs
    assert (line["name"], line["count"]) == ("gate_start", 1)
    status = await start("status", "--json")
    out, err = await status.communicate()
    assert status.returncode == 0, err.decode()
    (row,) = json.loads(out)
    assert row["experiment"] == experiment
    assert (row["running"], row["stopped"], row["verdict"]) == (1, 0, None)
    assert row["directory"] == str(ROOT.resolve())
    # From another directory, `status` lists only what was started there, and says so.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status = await start("status", cwd=elsewhere)
    out, _ = await status.communicate()
    assert status.returncode == 0
    assert out.decode().splitlines() == [
        "no experiments started here",
        "(1 more running, started in other directories: `tricks-nats status --all`)",
    ]
    status = await start("status", "--all", cwd=elsewhere)
    out, _ = await status.communicate()
    assert experiment in out.decode()
    # `watch` from there follows it, saying where it was started.
    follower = await start("watch", "--kind", "verdict", cwd=elsewhere)
    assert follower.stderr is not None
    note = (await follower.stderr.readline()).decode()
    assert note == f"watching {experiment}, started in {ROOT.resolve()} (none was started here)\n"
    await release(tmp_path)
    await follower.communicate()
    await watch.communicate()
    await up.communicate()
    assert up.returncode == 0


async def test_watch_replays_a_finished_run_with_filters(tmp_path: Path) -> None:
    up, experiment, run_dir = await gated_run(tmp_path)
    await release(tmp_path)
    await up.communicate()
    assert up.returncode == 0
    everything = await start("watch", experiment, "--json")
    out, _ = await everything.communicate()
    assert everything.returncode == 0
    assert [json.loads(x) for x in out.decode().splitlines()] == journal(run_dir)
    workers = await start("watch", experiment, "--json", "--tag", "worker", "--kind", "pod")
    out, _ = await workers.communicate()
    entries = [json.loads(x) for x in out.decode().splitlines()]
    assert entries and all(e["kind"] == "pod" and e["tag"] == "worker" for e in entries)
    readable = await start("watch", str(run_dir))
    out, _ = await readable.communicate()
    text = out.decode()
    assert "release 1 -> starting worker" in text and "verdict succeeded" in text
    typo = await start("watch", experiment, "--tag", "wroker")
    out, err = await typo.communicate()
    assert typo.returncode == 2 and out == b""
    assert err.decode() == (
        "tricks-nats: error: --tag 'wroker': no such tag in this run (its tags: gate, worker)\n"
    )


@pytest.mark.parametrize(
    ("command", "verdict", "code"), [("exit 3", "failed", 1), ("exit 0", "succeeded", 0)]
)
async def test_watch_exit_status_is_the_verdicts(
    tmp_path: Path, command: str, verdict: str, code: int
) -> None:
    spec = tmp_path / "one.yaml"
    spec.write_text(f"experiment:\n- tag: one\n  command: {command}\n")
    up = await start("up", str(spec), "--runs-dir", str(tmp_path / "runs"), "--quiet")
    out, _ = await up.communicate()
    assert up.returncode == code
    (run_dir,) = (tmp_path / "runs").iterdir()
    plain = await start("watch", str(run_dir), "--kind", "verdict")
    out, _ = await plain.communicate()
    assert plain.returncode == 0 and f"verdict {verdict}" in out.decode()
    strict = await start("watch", str(run_dir), "--kind", "verdict", "--exit-status")
    await strict.communicate()
    assert strict.returncode == code


async def test_watch_with_nothing_running_says_so(tmp_path: Path) -> None:
    proc = await start("watch")
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip().startswith("tricks-nats: error: no experiment is running")


def make_run(tmp_path: Path) -> Path:
    """A finished run's records, as `up` writes them."""
    run = tmp_path / "runs" / "demo-1"
    (run / "logs").mkdir(parents=True)
    t0 = 1_700_000_000.0
    pods = [
        {
            "tag": "server",
            "pod_id": i,
            "started_at": t0 + 0.1,
            "stopped_at": t0 + 3,
            "exit_code": 143,
            "stopped_by_workflow": True,
            "state": "stopped",
        }
        for i in range(3)
    ]
    pods += [
        {
            "tag": "client",
            "pod_id": 0,
            "started_at": t0 + 1,
            "stopped_at": t0 + 2,
            "exit_code": 0,
            "stopped_by_workflow": False,
            "state": "exited",
        },
        {
            "tag": "client",
            "pod_id": 1,
            "started_at": t0 + 1,
            "stopped_at": t0 + 1.5,
            "exit_code": 2,
            "stopped_by_workflow": False,
            "state": "failed",
        },
    ]
    summary = {
        "experiment": "demo-1",
        "name": "demo",
        "verdict": "failed",
        "reason": "x",
        "started_at": t0,
        "ended_at": t0 + 3.2,
        "pods": pods,
        "events": {"ready": 3, "client_stop": 2},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    workflow = {
        "ts": t0 + 0.9,
        "experiment": "demo-1",
        "kind": "workflow",
        "tag": "client",
        "action": "start",
        "condition": {"name": "ready", "value": 3},
    }
    (run / "journal.jsonl").write_text(json.dumps(workflow) + "\n")
    return run


async def test_report_draws_png_and_html(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from tricks_nats.report import load_run
    from tricks_nats.timeline import DPI, figure_size

    run = make_run(tmp_path)
    png, html = tmp_path / "t.png", tmp_path / "t.html"
    for out in (png, html):
        proc = await start("report", str(run), "-o", str(out))
        stdout, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
    text = stdout.decode()
    assert "demo-1: failed in 3.20s" in text
    assert "server: 3 pods (3 stopped by workflow)" in text
    assert "client: 2 pods (1 succeeded, 1 failed)" in text
    assert "at 0.90s: ready 3 -> start client" in text
    image = imread(png)
    width, height = figure_size(load_run(run))
    assert image.shape[:2] == (round(height * DPI), round(width * DPI))
    assert image[..., :3].std() > 0.05  # not a blank canvas
    page = html.read_text()
    for pod in ("server-0", "server-1", "server-2", "client-0", "client-1"):
        assert f'"{pod}"' in page
    assert "ready 3 -\\u003e start client" in page or "ready 3 -> start client" in page


async def test_report_errors_are_one_line(tmp_path: Path) -> None:
    proc = await start("report", str(tmp_path / "nope"))
    _, err = await proc.communicate()
    assert proc.returncode == 2 and "no journal.jsonl or spec.yaml there" in err.decode()
    proc = await start("report", str(make_run(tmp_path)), "-o", str(tmp_path / "t.gif"))
    _, err = await proc.communicate()
    assert proc.returncode == 2 and ".gif" in err.decode()
    assert len(err.decode().strip().splitlines()) == 1


@pytest.mark.parametrize("output", ["t.png", "t.svg", "figures/"])
def test_report_without_the_report_extra_says_so_before_anything(
    tmp_path: Path, output: str
) -> None:
    """Without matplotlib (the `report` extra), `report -o` is one line naming the extra,
    not the whole report and then the error."""
    run = make_run(tmp_path)
    no_matplotlib = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from tricks_nats.cli.app import main; sys.argv[0] = 'tricks-nats'; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", no_matplotlib, "report", str(run), "-o", f"{tmp_path}/{output}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "tricks-nats: error: drawing needs matplotlib: pip install 'tricks-nats[report]'\n"
    )


def test_state_file_holds_secrets_only_while_running(tmp_path: Path) -> None:
    state = statefile.RunState(
        experiment="e-1",
        run_dir=str(tmp_path),
        pid=os.getpid(),
        started_at=time.time(),
        nats_url="nats://x:1",
        user="u",
        password="pw",
    )
    statefile.write(state)
    path = statefile.state_dir() / "e-1.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [s.experiment for s in statefile.running()] == ["e-1"]
    statefile.finish(state)
    saved = msgspec.json.decode(path.read_bytes())
    assert "password" not in saved and saved["finished"] is True
    assert statefile.running() == []


def test_state_files_of_ended_runs_go_after_a_day(tmp_path: Path) -> None:
    now = time.time()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    kept = {
        "live-old": statefile.RunState("live-old", "r", os.getpid(), now - 3 * 86400),
        "done-new": statefile.RunState("done-new", "r", 0, now - 3600, finished=True),
    }
    gone = {
        "done-old": statefile.RunState("done-old", "r", 0, now - 2 * 86400, finished=True),
        "dead-old": statefile.RunState("dead-old", "r", int(dead.stdout), now - 2 * 86400),
    }
    for state in [*kept.values(), *gone.values()]:
        statefile.write(state)
    statefile.prune(now)
    assert sorted(s.experiment for s in statefile.all_states()) == sorted(kept)
    for i in range(statefile.KEEP_FINISHED + 5):  # and at most KEEP_FINISHED ended runs
        statefile.write(statefile.RunState(f"e-{i}", "r", 0, now - i, finished=True))
    statefile.prune(now)
    ended = [s for s in statefile.all_states() if s.finished]
    assert len(ended) == statefile.KEEP_FINISHED
    assert max(int(s.experiment[2:]) for s in ended if s.experiment.startswith("e-")) < 20


def test_live_view_shows_pods_by_state_and_condition_progress(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from tricks_nats.entries import Condition, EventEntry, PodEntry, VerdictEntry, WorkflowEntry
    from tricks_nats.liveview import LiveView
    from tricks_nats.spec import load

    view = LiveView(load(ROOT / "examples/ring/ring.yaml"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "server-5.log").write_text("starting\nboom: address in use\n")
    view.on_start("ring-1", tmp_path)
    for i in range(6):
        view.on_journal(PodEntry(tag="server", pod_id=i, state="running"))
    view.on_journal(PodEntry(tag="server", pod_id=5, state="failed", exit_code=1, outcome="failed"))
    view.on_journal(EventEntry(name="server-connected", count=4))
    view.on_journal(EventEntry(name="token", count=17, pod="server-1"))

    def screen() -> str:
        out = io.StringIO()
        Console(file=out, width=140, color_system=None).print(view.render())
        return out.getvalue()

    def row(text: str, tag: str) -> list[str]:
        line = next(x for x in text.splitlines() if f"│ {tag} " in x)
        return [c.strip() for c in line.split("│")[1:6]]

    text = screen()
    assert "start when server-connected 4/6" in text
    assert "stop when client_stop 0/6" in text
    assert row(text, "server") == ["server", "", "5", "1 failed", "stop when client_stop 0/6"]
    assert "server-5 failed" in text and "boom: address in use" in text
    assert "events: server-connected=4, token=17" in text
    # The end: the workflow column keeps what happened, the clock stops at the verdict's figure.
    view.on_journal(EventEntry(name="server-connected", count=6))
    view.on_journal(
        WorkflowEntry(tag="client", action="start", condition=Condition("server-connected", 6))
    )
    for i in range(5):
        view.on_journal(
            PodEntry(tag="server", pod_id=i, state="stopped", outcome="stopped after a failure")
        )
    view.on_journal(VerdictEntry(verdict="failed", reason="server-5 failed (exit 1)"))
    view.on_end("3.2s")
    text = screen()
    assert text.splitlines()[0].strip() == "ring-1  3.2s  failed"
    assert row(text, "server")[3] == "5 stopped after a failure, 1 failed"
    assert row(text, "client")[4] == "started at server-connected 6"
    assert "events: server-connected=6, token=17" in text


def test_output_to_a_full_disk_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "tricks_nats.cli.app", "report", str(run)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == "tricks-nats: error: cannot write the output: No space left on device\n"
