"""`python -m bench [--quick] [--json FILE] [--only ...]`: run every measure side by side."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import durability, kuberun, localrun, measures, metrics, peers, shellcalls, topics
from bench.measures import Plan
from bench.pool import Pool
from bench.report import (
    FLOOR,
    NATS,
    REDIS,
    ZK,
    Row,
    machine,
    nats_server_version,
    side_by_side,
    table,
    targets,
)

QUICK = Plan(
    procs=4,
    barrier_sizes=[10, 100, 1000],
    barrier_repeats={10: 5, 100: 5, 1000: 2},
    fanout_repeats=5,
    rtt_count=300,
    writers=[1, 50],
    increment_seconds=2.0,
    discovery_sizes=[100, 1000],
    discovery_repeats={100: 3, 1000: 1},
    up_runs=1,
    up_kinds={"workflow": 1000, "driver": 200},
    cli_runs=5,
)

FULL = Plan(
    procs=4,
    barrier_sizes=[10, 100, 1000],
    barrier_repeats={10: 30, 100: 20, 1000: 10},
    fanout_repeats=30,
    rtt_count=5000,
    writers=[1, 50],
    increment_seconds=5.0,
    discovery_sizes=[100, 1000],
    discovery_repeats={100: 5, 1000: 2},
    up_runs=1,
    up_kinds={"workflow": 1000, "driver": 200},
    cli_runs=20,
    topic_catchup_repeats=3,
)

SECTIONS = (
    "floor",
    "barrier",
    "increments",
    "durability",
    "discovery",
    "zookeeper",
    "redis",
    "topics",
    "up",
    "kube",
    "metrics",
    "cli",
    "shell",
)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def _guard(
    name: str, rows: list[Row], system: str, coro: Awaitable[list[Row]], pool: Pool | None
) -> None:
    """Run one section; a failure becomes a row that says so instead of stopping the run."""
    try:
        rows.extend(await coro)
    except Exception as exc:
        log(f"{name} failed: {exc}\n{traceback.format_exc(limit=4)}")
        rows.append(Row(system, name, 0, note=f"FAILED: {str(exc).strip().splitlines()[-1]}"))
        if pool is not None:
            try:
                await pool.call_all("close_all")
            except Exception as again:
                log(f"cleaning up the workers after {name}: {again}")


async def run(plan: Plan, only: set[str]) -> list[Row]:
    rows: list[Row] = []

    def want(section: str) -> bool:
        return not only or section in only

    log(f"{plan.procs} worker processes; sections: {', '.join(s for s in SECTIONS if want(s))}")
    async with Pool(plan.procs) as pool:
        if want("floor") or want("barrier") or want("increments") or want("discovery"):
            async with measures.nats_experiment() as ctx:
                steps: list[tuple[str, str, Callable[..., Awaitable[list[Row]]]]] = [
                    ("floor", FLOOR, measures.nats_floor),
                    ("barrier", NATS, measures.nats_barriers),
                    ("increments", NATS, measures.nats_increments),
                    ("discovery", NATS, measures.nats_discovery),
                ]
                for section, system, fn in steps:
                    if want(section):
                        await _guard(section, rows, system, fn(ctx, pool, plan, log), pool)
        if want("durability"):
            await _guard("durability", rows, NATS, durability.durability(pool, plan, log), pool)
        if want("zookeeper"):
            await _guard("zookeeper", rows, ZK, measures.zookeeper_all(pool, plan, log), pool)
        if want("redis"):
            await _guard("redis", rows, REDIS, measures.redis_all(pool, plan, log), pool)
        if want("topics"):
            await _guard("topics", rows, NATS, topics.topics_all(pool, plan, log), pool)
    if want("up"):
        await _guard(
            "up",
            rows,
            NATS,
            localrun.local_runtime(plan.up_kinds, plan.up_runs, log),
            None,
        )
    if want("kube"):
        await _guard("kube", rows, NATS, kuberun.kube_runtime(plan.kube_pods, log), None)
    if want("metrics"):
        quick = plan.cli_runs < FULL.cli_runs
        await _guard("metrics", rows, NATS, metrics.metrics_rows(quick, log), None)
    if want("cli"):
        rows.extend(await asyncio.to_thread(localrun.cli_startup, plan.cli_runs))
    if want("shell"):
        rows.extend(await asyncio.to_thread(shellcalls.shell_calls, plan.cli_runs * 3))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="tricks-nats coordination benchmarks, side by side with the raw NATS "
        "floor, ZooKeeper and Redis (run bench/setup.sh first for the peers).",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under 3 minutes)")
    parser.add_argument("--json", type=Path, help="write one JSON object per row to this file")
    parser.add_argument("--procs", type=int, help="worker processes hosting participants")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.procs:
        plan.procs = args.procs
    info = machine(nats_server_version(), peers.zookeeper_version(), peers.redis_version())
    started = time.monotonic()
    try:
        rows = asyncio.run(run(plan, set(args.only or ())))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    elapsed = time.monotonic() - started
    mode = "quick" if args.quick else "full"
    out = [
        f"## tricks-nats benchmarks ({mode}, {elapsed:.0f} s)",
        "",
        " | ".join(f"{k}: {v}" for k, v in info.items()),
        "",
        table(rows),
        "",
    ]
    if any(r.measure == "barrier release" for r in rows):
        out += [
            "### Barrier release side by side: p50 (p99) ms",
            "",
            side_by_side(rows),
            "",
            "### Barrier release from the last arrival sent, side by side: p50 (p99) ms",
            "",
            side_by_side(rows, "barrier release from send"),
            "",
        ]
    if any(r.measure.startswith("topic ") for r in rows):
        out += [
            "### Topics side by side: p50 (p99) ms, or messages/s",
            "",
            topics.side_by_side(rows),
            "",
        ]
    out += ["### Targets", "", *(v.line() for v in targets(rows))]
    print("\n".join(out))
    if args.json:
        args.json.write_text(json.dumps([r.as_json() for r in rows], indent=1) + "\n")
    return 0
