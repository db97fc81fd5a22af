"""Metrics end to end: pods record (Python, shell), logs match patterns, the coordinator writes
metrics.csv and the summary; nothing lost at exit, at SIGTERM, across a server restart."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint, StreamMsg
from tricks_nats.collector import Collector
from tricks_nats.natsserver import EmbeddedServer
from tricks_nats.spec import parse

from .conftest import ROOT, cli_env
from .helpers import kill_embedded_server
from .test_up import only_run, summary, up

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]


def spec(tmp_path: Path, text: str, **programs: str) -> Path:
    for name, source in programs.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def header(run: Path) -> list[str]:
    with (run / "metrics.csv").open(newline="") as f:
        return next(csv.reader(f))


def stats(s: dict[str, Any], name: str, tag: str) -> dict[str, Any]:
    (found,) = [m for m in s["metrics"] if (m["name"], m["tag"]) == (name, tag)]
    return found


def run_ok(tmp_path: Path, path: Path, *args: str) -> Path:
    runs = tmp_path / "runs"
    result = up(str(path), "--runs-dir", str(runs), *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return only_run(runs)


def test_python_pods_record_with_labels_into_csv_and_summary(tmp_path: Path) -> None:
    path = spec(
        tmp_path,
        """
        experiment:
        - tag: client
          command: [python, rec.py]
          replicas: 2
        """,
        **{
            "rec.py": """
            import os
            from tricks_nats.driver import SyncDriver
            with SyncDriver() as t:
                me = int(os.environ["POD_ID"])
                for i in range(1000):
                    t.record("request_ms", i / 10, op="get" if i % 2 else "put", pod=me)
                t.record("size_bytes", 1500)
            """
        },
    )
    run = run_ok(tmp_path, path)
    assert header(run) == ["ts", "tag", "pod_id", "name", "value", "op", "pod"]
    got = rows(run)
    requests = [r for r in got if r["name"] == "request_ms"]
    assert len(requests) == 2000 and len(got) == 2002
    for pod_id in ("0", "1"):
        mine = [r for r in requests if r["pod_id"] == pod_id]
        assert sorted(float(r["value"]) for r in mine) == [i / 10 for i in range(1000)]
        assert {r["pod"] for r in mine} == {pod_id}  # a label beside the pod_id column
        times = [float(r["ts"]) for r in mine]
        assert times == sorted(times)  # one pod's samples in the order recorded
    assert {r["op"] for r in requests} == {"get", "put"}
    assert all(r["tag"] == "client" for r in got)
    s = summary(run)
    m = stats(s, "request_ms", "client")
    assert m["count"] == 2000 and m["min"] == 0 and m["max"] == 99.9
    assert m["p50"] == 49.9 and m["p99"] == 98.9  # nearest rank, HdrHistogram's rounding
    assert abs(m["mean"] - 49.95) < 1e-9
    assert stats(s, "size_bytes", "client")["count"] == 2
    assert s["metrics_dropped"] == {} and s["metrics_rejected"] == 0


def test_samples_are_sent_at_exit_and_at_sigterm_without_close(tmp_path: Path) -> None:
    """`quitter` never closes its driver (atexit sends); `sleeper` is stopped by the workflow
    while its samples wait in the buffer (SIGTERM sends them within the grace period)."""
    path = spec(
        tmp_path,
        """
        experiment:
        - tag: quitter
          command: [python, quit.py]
        - tag: sleeper
          command: [python, sleep.py]
          workflow:
            stop: {name: quitter_stop, value: 1}
        """,
        **{
            "quit.py": """
            from tricks_nats.driver import SyncDriver
            t = SyncDriver()
            t.wait_event("sleeper-recorded", 1, timeout=60)
            for i in range(3000):
                t.record("q_ms", i)
            """,
            "sleep.py": """
            import time
            from tricks_nats.driver import SyncDriver
            t = SyncDriver()
            for i in range(5000):
                t.record("s_ms", i)
            t.register_event("sleeper-recorded")
            time.sleep(600)
            """,
        },
    )
    run = run_ok(tmp_path, path, "--grace", "20")
    got = rows(run)
    assert sorted(int(float(r["value"])) for r in got if r["name"] == "q_ms") == list(range(3000))
    assert sorted(int(float(r["value"])) for r in got if r["name"] == "s_ms") == list(range(5000))
    sleeper = next(x for x in summary(run)["pods"] if x["tag"] == "sleeper")
    assert sleeper["stopped_by_workflow"]


def test_a_full_buffer_drops_and_counts_and_loses_nothing_else(tmp_path: Path) -> None:
    path = spec(
        tmp_path,
        """
        experiment:
        - tag: flood
          command: [python, flood.py]
        """,
        **{
            "flood.py": """
            from tricks_nats.driver import SyncDriver
            with SyncDriver(record_buffer=100) as t:
                for i in range(20000):
                    t.record("f", i)
                print("dropped", t.dropped)
            """
        },
    )
    run = run_ok(tmp_path, path)
    s = summary(run)
    dropped = s["metrics_dropped"]["flood-0"]
    assert dropped > 0
    assert f"dropped {dropped}" in (run / "logs" / "flood-0.log").read_text()
    values = [int(float(r["value"])) for r in rows(run)]
    assert len(values) + dropped == 20000
    assert len(set(values)) == len(values)


def test_log_lines_become_samples_with_labels_and_times(tmp_path: Path) -> None:
    path = spec(
        tmp_path,
        r"""
        experiment:
        - tag: legacy
          command: |
            printf "%s\n" "GET took 12.5ms" "noise" "PUT took 3ms"
            printf "%s\n" "at=1700000000.25 PUT took 4ms"
            printf "GET took 1ms"
          replicas: 2
          metrics:
          - name: op_ms
            pattern: '(?:at=(?P<ts>[0-9.]+) )?(?P<op>[A-Z]+) took (?P<value>[0-9.]+)ms'
            expected_interval_ms: 100
        - tag: other
          command: [echo, "GET took 99ms"]
        """,
    )
    run = run_ok(tmp_path, path)
    assert header(run) == ["ts", "tag", "pod_id", "name", "value", "op"]
    got = rows(run)
    assert {r["tag"] for r in got} == {"legacy"}  # patterns are per tag
    for pod_id in ("0", "1"):
        mine = [r for r in got if r["pod_id"] == pod_id]
        assert sorted((float(r["value"]), r["op"]) for r in mine) == [
            (1.0, "GET"),  # the last line, without its newline
            (3.0, "PUT"),
            (4.0, "PUT"),
            (12.5, "GET"),
        ]
        stamped = [r for r in mine if r["value"] == "4.0"]
        assert float(stamped[0]["ts"]) == 1700000000.25
    s = summary(run)
    m = stats(s, "op_ms", "legacy")
    assert m["count"] == 8 and m["expected_interval_ms"] == 100
    assert m["corrected"]["count"] == 8  # no value above the interval: nothing added
    # the log stays plain text, with its time index beside it
    log = (run / "logs" / "legacy-0.log").read_text()
    assert log.startswith("GET took 12.5ms\nnoise\n")
    assert (run / "logs" / "legacy-0.ts").read_text().startswith("0 ")


def test_the_shell_records_one_sample_or_a_stream_of_them(tmp_path: Path) -> None:
    path = spec(
        tmp_path,
        """
        experiment:
        - tag: sh
          command: |
            tricks-nats record one_ms 3.5 --label op=get
            seq 1 3000 | awk '{print "bulk_ms", $1, "k=v"}' | tricks-nats record -
            printf '%s\\n' '{"name":"j","value":2,"ts":1000.5,"labels":{"a":"b"}}' 'x' \\
              | tricks-nats record -
            echo "bulk rc=$?"
            tricks-nats record 'bad name' 1; echo "name rc=$?"
            tricks-nats record x nan; echo "nan rc=$?"
        """,
    )
    run = run_ok(tmp_path, path)
    got = rows(run)
    one = [r for r in got if r["name"] == "one_ms"]
    assert [(r["value"], r["op"]) for r in one] == [("3.5", "get")]
    bulk = [r for r in got if r["name"] == "bulk_ms"]
    assert sorted(int(float(r["value"])) for r in bulk) == list(range(1, 3001))
    assert {r["k"] for r in bulk} == {"v"}
    (j,) = [r for r in got if r["name"] == "j"]
    assert (j["ts"], j["a"]) == ("1000.5", "b")
    log = (run / "logs" / "sh-0.log").read_text()
    assert "line 2: value" not in log  # 'x' is one word: not NAME VALUE
    assert "1 bad line(s) skipped; the first: line 2:" in log
    assert "bulk rc=2" in log and "name rc=2" in log and "nan rc=2" in log
    assert "Traceback" not in log


def test_garbage_batches_are_counted_and_ignored(tmp_path: Path) -> None:
    """A pod publishes malformed batches, samples of other shapes and a batch under another
    pod's name; the run succeeds, its good samples are all there, the rest is counted."""
    path = spec(
        tmp_path,
        """
        experiment:
        - tag: evil
          command: [python, evil.py]
        """,
        **{
            "evil.py": """
            import asyncio, json
            from tricks_nats.driver import Driver

            async def main():
                async with Driver() as d:
                    exp = d.config.experiment
                    subject = f"tricks.{exp}.metrics.evil-0"
                    for body in [b"not json", b"[]", b'{"samples": 5}',
                                 json.dumps({"samples": [[1, "ok", 1], [1, "bad name", 2],
                                   ["x", "n", 3], [1, "n", "3"], [1, "n"], [-1, "n", 1],
                                   [1, "n", 1, {"tag": "x"}], [1, "n", 1, {"k": 5}]],
                                   "dropped": -7, "intervals": {"n": -1}}).encode()]:
                        await d.bus.nc.request(subject, body, timeout=5)
                    await d.bus.nc.request(f"tricks.{exp}.metrics.nobody-3",
                                           json.dumps({"samples": [[1, "n", 1]]}).encode(),
                                           timeout=5)
                    d.record("good", 42)

            asyncio.run(main())
            """
        },
    )
    run = run_ok(tmp_path, path)
    got = rows(run)
    assert sorted((r["name"], r["value"]) for r in got) == [("good", "42"), ("ok", "1")]
    s = summary(run)
    assert s["metrics_rejected"] == 3 + 7 + 1
    assert s["metrics_dropped"] == {}
    assert s["verdict"] == "succeeded"


async def test_a_batch_stored_twice_is_written_once(tmp_path: Path) -> None:
    """A retried batch whose first copy was stored (its acknowledgement lost) and which the
    stream stored again after a restart: the coordinator writes it once, by message id."""
    exp = parse("experiment: [{tag: t, command: 'true'}]", "t.yaml")
    async with EmbeddedServer(store_dir=tmp_path / "js") as server:
        exp_id = p.new_experiment_id("dup")
        bus = await Bus.open(Endpoint(server.url), exp_id, name="test")
        collector = Collector(tmp_path, exp, bus)
        try:
            await bus.create_buckets()
            await collector.start()
            body = msgspec.json.encode({"samples": [[1.0, "n", 1], [2.0, "n", 2]]})
            for msg_id in ("a", "a", "b"):
                # the stream dedups "a" itself; a copy that reached the coordinator twice
                # (a redelivery, or a re-store after a purge and a restart) is handled here:
                await collector._on_batch(
                    StreamMsg(p.metrics_subject(exp_id, "t-0"), body, {p.MSG_ID_HEADER: msg_id}, 0)
                )
            for msg_id in ("c", "c"):
                await bus.nc.request(
                    p.metrics_subject(exp_id, "t-0"), body, headers={p.MSG_ID_HEADER: msg_id}
                )
            await collector.drain(30)
            await collector.stop()
        finally:
            collector.close()
            await bus.close()
    values = [r["value"] for r in rows(tmp_path)]
    assert values == ["1", "2"] * 3  # a, b, c


async def test_samples_survive_a_server_kill_exactly_once(tmp_path: Path) -> None:
    """The server is killed while a pod records (batches in flight); every sample is in
    metrics.csv exactly once."""
    path = spec(
        tmp_path,
        """
        experiment:
        - tag: rec
          command: [python, rec.py]
        """,
        **{
            "rec.py": """
            import time
            from tricks_nats.driver import SyncDriver
            with SyncDriver() as t:
                n = 0
                for round in range(60):
                    if round == 20:
                        t.flush()
                        t.register_event("recording")
                    for i in range(300):
                        t.record("v", n)
                        n += 1
                    time.sleep(0.02)
            """
        },
    )
    runs = tmp_path / "runs"
    proc = await asyncio.create_subprocess_exec(
        *TRICKS,
        "up",
        str(path),
        "--runs-dir",
        str(runs),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        while True:
            entry = json.loads(await proc.stdout.readline())
            if entry["kind"] == "event" and entry["name"] == "recording":
                break
        kill_embedded_server(proc.pid)
        _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    run = only_run(runs)
    values = sorted(int(float(r["value"])) for r in rows(run))
    assert values == list(range(60 * 300))
    assert summary(run)["metrics_dropped"] == {}
