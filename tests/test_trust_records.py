"""The verdict and summary.json are written on every path out of `up`: a closed output pipe,
an exception of ours, NATS gone for good or frozen, a full disk; bad run directories are one
line and exit 2."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tricks_nats import bus as bus_module
from tricks_nats import natsserver
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.collector import Collector
from tricks_nats.entries import Entry, EventEntry, PodEntry
from tricks_nats.errors import RuntimeFailure
from tricks_nats.records import PodSummary, RunRecords, Summary
from tricks_nats.running import UpOptions, up
from tricks_nats.runtimes import PodPlan
from tricks_nats.runtimes.fake import exit_on_term
from tricks_nats.spec import parse

from .conftest import ROOT, cli_env

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]


def summary(runs: Path) -> dict[str, Any]:
    (run,) = runs.iterdir()
    data: dict[str, Any] = json.loads((run / "summary.json").read_text())
    return data


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Exception ignored" not in text, text


# -- a closed pipe -----------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "lines"), [((), 1), (("--json",), 4)])
def test_a_reader_that_goes_away_does_not_stop_the_run(tmp_path, flags, lines) -> None:
    """`up ring.yaml | head -1`: printing stops, the run goes on to its verdict."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [*TRICKS, "up", "examples/ring/ring.yaml", "--runs-dir", str(runs), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(lines):
        assert proc.stdout.readline()
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=180) == 0, err
    no_traceback(err)
    assert summary(runs)["verdict"] == "succeeded"


# -- exceptions inside the coordinator ----------------------------------------------------------


class Boom(Exception):
    pass


async def test_an_exception_in_the_runtime_still_gives_a_verdict_and_summary(make_run) -> None:
    run = await make_run(
        "experiment:\n- {tag: a, command: x}\n- {tag: b, command: x}\n",
        {"a": exit_on_term, "b": exit_on_term},
    )

    async def broken_launch(plan: PodPlan) -> None:
        if plan.tag == "b":
            raise Boom("the runtime broke")
        await original(plan)

    original = run.runtime.launch
    run.runtime.launch = broken_launch  # type: ignore[method-assign]
    outcome = await run.outcome()
    assert outcome.verdict == "error"
    assert outcome.reason == "Boom: the runtime broke"
    written = json.loads((run.records.root / "summary.json").read_text())
    assert (written["verdict"], written["reason"]) == ("error", "Boom: the runtime broke")
    assert run.runtime.terminated == ["a-0"], "the pod that did start was stopped"
    assert run.journal()[-1]["kind"] == "verdict"


async def test_a_nats_error_while_recording_a_pod_ends_the_run_with_its_cause(make_run) -> None:
    run = await make_run("experiment:\n- {tag: a, command: x}\n", {"a": exit_on_term})

    async def failing(*args: Any, **kw: Any) -> None:
        raise bus_module.NatsUnavailable("cannot record the pods of 'a': NATS did not answer")

    run.coordinator.bus.put_roster = failing  # type: ignore[method-assign]
    outcome = await run.outcome()
    assert outcome.verdict == "error"
    assert outcome.reason is not None and "NATS" in outcome.reason
    assert (run.records.root / "summary.json").exists()


async def test_closing_the_bus_after_the_server_died_raises_nothing(tmp_path) -> None:
    server = natsserver.EmbeddedServer(store_dir=tmp_path / "js", supervise=False)
    await server.start()
    bus = await Bus.open(Endpoint(server.url), "x", name="t")
    try:
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
    finally:
        await server.stop()
    await bus.close()  # a reset connection on the way out is logged, not raised


# -- NATS gone for good, or frozen ----------------------------------------------------------------

SLEEPERS = """\
name: sleepers
experiment:
- tag: s
  replicas: 3
  command: sleep 1000
- tag: later
  command: "true"
  workflow: {start: {name: never, value: 1}}
"""


def nats_server_of_this_process() -> psutil.Process:
    (server,) = [p for p in psutil.Process().children(recursive=True) if p.name() == "nats-server"]
    return server


async def start_up(tmp_path: Path, spec_text: str, **kw: Any) -> tuple[asyncio.Task[Any], Path]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    running = asyncio.Event()
    seen: list[str] = []

    def on_journal(entry: Entry) -> None:
        if isinstance(entry, PodEntry) and entry.state == "running":
            seen.append(entry.tag)
            if len(seen) == 3:
                running.set()

    runs = tmp_path / "runs"
    opts = UpOptions(runs_dir=runs, on_journal=on_journal, grace=1, **kw)
    task = asyncio.create_task(up(parse(spec_text, str(spec)), opts))
    await running.wait()
    return task, runs


async def test_a_server_given_up_on_ends_the_run_at_once_with_its_cause(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(natsserver, "MAX_RESTARTS", 0)
    task, runs = await start_up(tmp_path, SLEEPERS)
    nats_server_of_this_process().kill()
    outcome = await task  # no timeout in the spec: only giving up can end this run
    assert outcome.verdict == "error"
    assert "gave up" in (outcome.reason or "")
    s = summary(runs)
    assert s["verdict"] == "error" and "gave up" in s["reason"]
    assert {p["state"] for p in s["pods"] if p["tag"] == "s"} == {"stopped"}


async def test_a_frozen_server_still_ends_with_a_verdict_and_summary(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bus_module, "RECOVERY_S", 1.0)
    task, runs = await start_up(
        tmp_path, SLEEPERS.replace("name: sleepers", "name: sleepers\ntimeout: 2")
    )
    server = nats_server_of_this_process()
    server.suspend()  # SIGSTOP: alive, silent
    try:
        outcome = await task
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            server.resume()
    assert outcome.verdict == "timed_out"
    s = summary(runs)
    assert s["verdict"] == "timed_out"
    assert {p["state"] for p in s["pods"] if p["tag"] == "s"} == {"stopped"}


# -- a full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_disk(where: Path, size: str = "256k") -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path) -> None:
    with contextlib.suppress(OSError), (disk / "filler").open("wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()


def test_the_summary_is_written_on_a_disk_that_filled_up(tmp_path) -> None:
    with tiny_disk(tmp_path / "disk") as disk:
        records = RunRecords.create(disk, "exp-1", "spec: text\n", pods=3)
        records.write(PodEntry(tag="a", pod_id=0, state="running"))
        fill(disk)
        for i in range(100):  # the journal cannot be written any more: counted, not raised
            records.write(EventEntry(name="e", count=i))
        assert records.journal_lost > 0
        pods = [PodSummary(tag="a", pod_id=i, state="exited", exit_code=0) for i in range(3)]
        now = time.time()
        written = records.write_summary(
            Summary(
                experiment="exp-1",
                name="x",
                verdict="succeeded",
                started_at=now,
                ended_at=now,
                pods=pods,
                events={"a_start": 3},
                journal_lost=records.journal_lost,
            )
        )
        records.close()
        assert written is not None
        data = json.loads((disk / "exp-1" / "summary.json").read_text())
        assert data["verdict"] == "succeeded" and len(data["pods"]) == 3
        assert data["journal_lost"] == records.journal_lost


def test_samples_on_a_full_disk_are_counted_and_still_summarised(tmp_path) -> None:
    exp = parse("experiment: [{tag: t, command: 'true'}]", "t.yaml")
    with tiny_disk(tmp_path / "disk") as disk:
        collector = Collector(disk, exp)
        tap = collector.tap("t", 0, disk / "logs" / "t-0.log")
        collector.add([(1.0, "t", 0, "n", 1.0, None)])
        fill(disk)
        for i in range(200):  # metrics.csv cannot take these: counted, never raised
            collector.add([(float(i), "t", 0, "n", float(i), {"k": "v" * 100})] * 50)
        tap(b"a line the index cannot time\n")  # nor can the log's index: no exception
        collector.close()
        assert collector.lost > 0
        (figures,) = collector.stats()
        assert figures.count == 1 + 200 * 50  # the summary still has every sample


# -- run directories that cannot be written ------------------------------------------------------


def up_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRICKS, "up", "examples/ring/ring.yaml", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        cwd=ROOT,
    )


def test_a_runs_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path) -> None:
    plain = tmp_path / "runs"
    plain.write_text("not a directory")
    result = up_cli("--runs-dir", str(plain))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(plain) in lines[0], result.stderr


def test_a_read_only_runs_dir_is_one_line_and_exit_2(tmp_path) -> None:
    with tiny_disk(tmp_path / "ro") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = up_cli("--runs-dir", str(disk / "runs"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(disk / "runs") in lines[0], result.stderr
    assert "Read-only" in lines[0]


def test_refused_runs_dir_fails_before_anything_starts(tmp_path) -> None:
    plain = tmp_path / "runs"
    plain.write_text("")
    up_cli("--runs-dir", str(plain / "deeper"))
    assert not [p for p in psutil.Process().children(recursive=True)]


_ = RuntimeFailure  # the documented runtime error type stays importable here


def test_metrics_csv_that_cannot_even_begin_refuses_every_row_with_the_cause() -> None:
    """/dev/full takes the file but not its header: rows are refused (and counted by the
    collector), never written without a header, never an exception at the start of a run."""
    from tricks_nats.metrics_csv import MetricsWriter

    writer = MetricsWriter(Path("/dev/full"), ["op"])
    assert writer.broken is not None and writer.broken.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        writer.write([(1.0, "t", 0, "n", 1.0, None)])
    assert info.value is writer.broken and writer.rows == 0
    writer.close()
