"""Metrics: what `record()` costs a Python pod, and samples per second end to end (pods ->
metrics stream -> coordinator -> metrics.csv) with 1 and with 50 pods, through `tricks-nats up`.

Each pod first times a burst of record() calls that fits its buffer (the cost per call as the
program sees it, the sender thread running beside it), then records its share of the samples
in chunks of 20,000, waiting for each chunk to be stored (`flush`): the rate is what the
whole path sustains without dropping a sample. Pods start recording together (a barrier), so
the rate is not that of 50 Python processes starting on a small machine. End to end = samples
in metrics.csv / (the file's last write - the first sample's time). `list.append` of the same
tuple, timed in the same run, is the floor of any in-process buffer.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.localrun import TRICKS, _env
from bench.report import FLOOR, NATS, Row

POD = """
import json, time
from tricks_nats.driver import SyncDriver
burst, total = {burst}, {total}
with SyncDriver() as t:
    t.register_event("ready")
    t.wait_event("ready", {pods}, timeout=300)  # all pods up: the rate is not start-up's
    start = time.perf_counter()
    for i in range(burst):
        t.record("bench_ms", i * 0.001, op="get")
    cost = (time.perf_counter() - start) / burst
    t.flush()
    sent = burst
    while sent < total:
        for i in range(min(20000, total - sent)):
            t.record("bench_ms", i * 0.001, op="get")
        sent += min(20000, total - sent)
        t.flush()
    print(json.dumps({{"ns_per_call": cost * 1e9, "dropped": t.dropped}}), flush=True)
"""


def _append_floor(n: int) -> float:
    """ns per `list.append((time.time(), name, value, labels))`: any buffer's floor."""
    buf: list[object] = []
    now = time.time
    start = time.perf_counter()
    for i in range(n):
        buf.append((now(), "bench_ms", i * 0.001, {"op": "get"}))
    return (time.perf_counter() - start) / n * 1e9


async def _run(pods: int, per_pod: int, burst: int) -> tuple[list[float], float, int, int]:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        work = Path(tmp)
        (work / "pod.py").write_text(POD.format(burst=burst, total=per_pod, pods=pods))
        spec = {
            "name": "bench-metrics",
            "timeout": 600,
            "experiment": [{"tag": "rec", "command": ["python", "pod.py"], "replicas": pods}],
        }
        (work / "spec.yaml").write_text(json.dumps(spec))
        done = await asyncio.to_thread(
            subprocess.run,
            [TRICKS, "up", str(work / "spec.yaml"), "--runs-dir", str(work / "runs")],
            capture_output=True,
            env=_env(),
            cwd=work,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"up exited {done.returncode}: {done.stderr[-400:]!r}")
        (run,) = (work / "runs").iterdir()
        costs, dropped = [], 0
        for log in (run / "logs").glob("*.log"):
            lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
            got = json.loads(lines[-1])
            costs.append(got["ns_per_call"])
            dropped += got["dropped"]
        csv_path = run / "metrics.csv"
        with csv_path.open(newline="") as f:
            reader = csv.reader(f)
            next(reader)
            first, rows = float("inf"), 0
            for row in reader:
                first = min(first, float(row[0]))
                rows += 1
        span = csv_path.stat().st_mtime - first
        return costs, span, rows, dropped


async def metrics_rows(quick: bool, log: Callable[[str], None]) -> list[Row]:
    rows = []
    floor = _append_floor(200_000)
    rows.append(Row(FLOOR, "list.append of a sample tuple", 1, note=f"{floor:.0f} ns per call"))
    total = 400_000 if quick else 1_000_000
    for pods in (1, 50):
        per_pod = total // pods
        burst = min(50_000, per_pod)
        costs, span, got, dropped = await _run(pods, per_pod, burst)
        costs.sort()
        median = costs[len(costs) // 2]
        log(f"metrics, {pods} pod(s): {got} samples in {span:.2f} s; record() {median:.0f} ns")
        note = f"{got} of {total} samples in metrics.csv, {dropped} dropped"
        if pods == 1:
            rows.append(
                Row(
                    NATS,
                    "record() per call",
                    1,
                    note=f"{median:.0f} ns per call "
                    f"({median / floor:.1f}x list.append); burst of {burst}",
                )
            )
        rows.append(
            Row(NATS, "samples end to end into metrics.csv", pods, ops_per_s=got / span, note=note)
        )
    return rows
