"""`tricks-nats up` of many trivial pods with one barrier, and the CLI's start-up time.

The `up` overhead is what the tool adds to the pods' own work: the same pods (same command,
same environment, same driver calls against an embedded NATS with the experiment's buckets,
count watcher and registrar, which answers the pods' registrations in protocol v2) are first
run by the benchmark itself, all at once, without the coordinator; then `tricks-nats up` runs
them. overhead = up's wall time - that baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.measures import vm_hwm_mb
from bench.report import NATS, Row, latency_row

BIN = Path(sys.executable).parent
TRICKS = str(BIN / "tricks-nats")
ROOT = Path(__file__).resolve().parent.parent
RING = ROOT / "examples" / "ring" / "ring.yaml"

PY_POD = (
    "from tricks_nats.driver import SyncDriver\n"
    "with SyncDriver() as d:\n"
    "    d.register_event('ready')\n"
    "    d.wait_event('ready', {n}, timeout=120)\n"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for name in ("EXP_ID", "TAG", "POD_ID", "REPLICAS", "TRICKS_NATS_URL"):
        env.pop(name, None)
    return env


def shell_driver_available() -> bool:
    for cmd in ("event", "wait"):
        try:
            done = subprocess.run(
                [TRICKS, cmd, "--help"], capture_output=True, env=_env(), timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode != 0:
            return False
    return True


def pod_command(n: int, shell: bool) -> list[str] | str:
    if shell:
        return f"tricks-nats event ready && tricks-nats wait ready {n}"
    return ["python", "-c", PY_POD.format(n=n)]


def spec_text(n: int, command: list[str] | str, workflow: bool) -> str:
    tags: list[dict[str, object]] = [{"tag": "pod", "command": command, "replicas": n}]
    if workflow:  # the barrier is the coordinator's: `after` starts once all n pods ran
        start = {"name": "pod_start", "value": n}
        tags.append({"tag": "after", "command": ["true"], "workflow": {"start": start}})
    spec = {"apiVersion": "v1", "name": "bench-up", "timeout": 600, "experiment": tags}
    return json.dumps(spec, indent=2)


async def baseline(n: int, command: list[str] | str) -> float:
    """Wall time of the n pods run all at once against a bare experiment (no coordinator:
    its NATS side only, the registrar included, as tests/helpers.experiment stands it up)."""
    from tricks_nats import env as E
    from tricks_nats import protocol as p
    from tricks_nats.bus import Bus, Endpoint
    from tricks_nats.counting import CountKeeper
    from tricks_nats.natsserver import EmbeddedServer
    from tricks_nats.registrar import Registrar

    async with EmbeddedServer() as server:
        exp = p.new_experiment_id("bench-baseline")
        bus = await Bus.open(Endpoint(server.url), exp, name="bench-baseline")
        watcher = CountKeeper(bus, lambda _e, _v, _pod: None)
        procs: list[asyncio.subprocess.Process] = []
        try:
            await bus.create_buckets()
            await watcher.start()
            await Registrar(bus, watcher).start()
            base = _env()
            start = time.monotonic()
            for i in range(n):
                env = {
                    **base,
                    E.TAG: "pod",
                    E.REPLICAS: str(n),
                    E.POD_ID: str(i),
                    E.EXP_ID: exp,
                    E.POD_IP: "127.0.0.1",
                    E.TRICKS_IP: server.host,
                    E.TRICKS_PORT: str(server.port),
                    E.NATS_URL: server.url,
                    E.PROTOCOL: p.VERSION,
                }
                kw = {
                    "env": env,
                    "stdin": subprocess.DEVNULL,
                    "stdout": subprocess.DEVNULL,
                    "stderr": subprocess.PIPE,
                    "start_new_session": True,
                }
                if isinstance(command, str):
                    procs.append(await asyncio.create_subprocess_shell(command, **kw))  # type: ignore[arg-type]
                else:
                    procs.append(await asyncio.create_subprocess_exec(*command, **kw))  # type: ignore[arg-type]
            results = await asyncio.gather(*(proc.communicate() for proc in procs))
            wall = time.monotonic() - start
            failed = [(pr.returncode, err) for pr, (_, err) in zip(procs, results, strict=True)]
            failed = [f for f in failed if f[0] != 0]
            if failed:
                code, err = failed[0]
                raise RuntimeError(
                    f"{len(failed)} baseline pods failed, e.g. exit {code}: "
                    f"{err.decode(errors='replace')[-300:]}"
                )
            return wall
        finally:
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            await watcher.stop()
            await bus.close()


async def up_once(
    n: int,
    command: list[str] | str,
    work: Path,
    workflow: bool,
    *,
    spec_json: str | None = None,
    args: Sequence[str] = (),
) -> dict[str, float]:
    """Run `tricks-nats up` (`spec_json` instead of the local spec, `args` added); return
    total wall, time to all running, coordinator peak RSS."""
    spec = work / "bench-up.yaml"
    spec.write_text(spec_json or spec_text(n, command, workflow))
    runs = work / "runs"
    wall_start = time.time()
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        TRICKS,
        "up",
        str(spec),
        "--runs-dir",
        str(runs),
        *args,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = 0.0

    async def watch_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, vm_hwm_mb(proc.pid) or 0.0)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_rss())
    try:
        _, err = await proc.communicate()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if proc.returncode is None:  # interrupted: let up stop its pods itself
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    total = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"tricks-nats up exited {proc.returncode}: {err.decode(errors='replace')[-400:]}"
            + _failed_pod_log(runs)
        )
    journal = next(runs.glob("*/journal.jsonl"))
    running = [
        e["ts"]
        for e in map(json.loads, journal.read_text().splitlines())
        if e.get("kind") == "pod" and e.get("state") == "running" and e.get("tag") == "pod"
    ]
    if len(running) != n:
        raise RuntimeError(f"journal shows {len(running)} of {n} pods running")
    return {"total": total, "all_running": max(running) - wall_start, "rss": peak}


def _failed_pod_log(runs: Path) -> str:
    """The end of the first failed pod's log, from the run's summary (it is gone with the
    temporary directory otherwise)."""
    for path in runs.glob("*/summary.json"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for pod in summary.get("pods", []):
            lines = pod.get("last_log_lines") or []
            if pod.get("state") == "failed" and lines:
                name = f"{pod.get('tag')}-{pod.get('pod_id')}"
                return f"; {name}'s log ends: " + " | ".join(lines[-4:])[-500:]
    return ""


async def local_runtime(kinds: dict[str, int], runs: int, log: Callable[[str], None]) -> list[Row]:
    """`kinds`, each with its number of pods n: "workflow" (n `true` pods, a workflow barrier
    on `pod_start` = n starts one more pod: the pods' own work is nil, what is left is the
    tool) and/or "driver" (n pods that register an event and wait for n, through the shell
    driver when it is installed, else a `python -c` SyncDriver one-liner: their own work is
    most of the run here)."""
    rows: list[Row] = []
    for kind, n in kinds.items():
        workflow = kind == "workflow"
        if workflow:
            command: list[str] | str = ["true"]
            label, suffix = "true pods + workflow barrier on pod_start", " (workflow barrier)"
        else:
            shell = shell_driver_available()
            command = pod_command(n, shell)
            label = "shell driver: tricks-nats event && wait" if shell else "python -c SyncDriver"
            suffix = " (driver barrier)"
        base, totals, running, rss = [], [], [], []
        try:
            for _ in range(runs):
                base.append(await baseline(n + (1 if workflow else 0), command))
                log(f"pods alone{suffix}: {base[-1]:.2f} s")
                with tempfile.TemporaryDirectory(prefix="bench-up-") as tmp:
                    got = await up_once(n, command, Path(tmp), workflow)
                totals.append(got["total"])
                running.append(got["all_running"])
                rss.append(got["rss"])
                log(
                    f"tricks-nats up{suffix}: {got['total']:.2f} s, "
                    f"running at {got['all_running']:.2f}"
                )
        except Exception as exc:  # this kind's rows say so; the other kinds' rows stay
            log(f"up{suffix} failed: {exc}")
            note = f"FAILED ({label}): {' '.join(str(exc).split())}"[:700]
            if base:
                rows.append(latency_row(NATS, "pods alone" + suffix, n, base, label))
            rows.append(Row(NATS, "up total" + suffix, n, note=note))
            continue
        overhead = [t - b for t, b in zip(totals, base, strict=True)]
        note = f"{label}; {runs} run(s)"
        rows += [
            latency_row(NATS, "pods alone" + suffix, n, base, note + "; no coordinator"),
            latency_row(NATS, "up all running" + suffix, n, running, note + "; from CLI launch"),
            latency_row(NATS, "up total" + suffix, n, totals, note, rss_mb=max(rss)),
            latency_row(NATS, "up overhead" + suffix, n, overhead, "up total - pods alone"),
        ]
    return rows


def cli_startup(runs: int) -> list[Row]:
    rows = []
    for name, args in (("cli --help", ["--help"]), ("cli validate", ["validate", str(RING)])):
        times = []
        env = _env()
        for _ in range(runs):
            start = time.perf_counter()
            done = subprocess.run([TRICKS, *args], capture_output=True, env=env, timeout=60)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                return [Row(NATS, name, 1, note=f"exit {done.returncode}: {done.stderr[-200:]!r}")]
        rows.append(latency_row(NATS, name, 1, times, f"{runs} runs, wall"))
    return rows
