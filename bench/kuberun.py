"""`tricks-nats up --runtime kubernetes` of many pods against the API emulator of the tests
(tests/kube_cluster.py: kmock plus a fake kubelet; a pod's program is a coroutine, here one
that exits 0 at once, like the `true` pods of the local `up` rows).

The emulator runs in a process of its own, as an API server runs on a machine of its own: the
coordinator does not share its event loop. The same pods are first run without tricks-nats by
a bare client (creates at the same concurrency, one watch until every pod has run, one
deletecollection, until every pod is gone): what the emulator itself costs. Then `tricks-nats
up` runs them, with a workflow barrier (one more pod starts once every pod has run) as in the
local rows. overhead = up's wall time - that baseline. Needs the test extra (kmock, pytest).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.localrun import up_once
from bench.report import NATS, Row, latency_row

NS = "bench"
CONCURRENCY = 20  # the runtime's default (--kube-concurrency)
IMAGE = "example/true:latest"
ROOT = Path(__file__).resolve().parent.parent


def spec_json(n: int) -> str:
    start = {"name": "pod_start", "value": n}
    tags = [
        {"tag": "pod", "image": IMAGE, "command": ["true"], "replicas": n},
        {"tag": "after", "image": IMAGE, "command": ["true"], "workflow": {"start": start}},
    ]
    spec = {"apiVersion": "v1", "name": "bench-kube", "timeout": 600, "experiment": tags}
    return json.dumps(spec)


# -- the emulator's process ---------------------------------------------------------------------


def serve(kubeconfig: str) -> None:
    """The emulator's process: writes `kubeconfig`, says `ready`, answers `stats` on stdin
    with one JSON line, ends at end of input."""
    asyncio.run(_serve(Path(kubeconfig)))


async def _serve(path: Path) -> None:
    import kmock

    from tests.kube_cluster import Cluster, PodContext, kubeconfig

    async def done(ctx: PodContext) -> int:
        return 0

    async with Cluster() as cluster, kmock.Server(cluster):
        cluster.programs.update(pod=done, after=done)
        kubeconfig(path, str(cluster.url).rstrip("/"))
        print("ready", flush=True)
        try:
            while line := await asyncio.to_thread(sys.stdin.readline):
                if line.strip() == "stats":
                    print(json.dumps(_stats(cluster)), flush=True)
        finally:
            await cluster.stop_lives()


def _stats(cluster: Any) -> dict[str, Any]:
    """What tricks-nats asked (requests by User-Agent, by kind), and the most creates and
    watches the emulator served at once."""
    kinds: collections.Counter[str] = collections.Counter()
    for r in cluster.runtime_requests():
        watch = r.params.get("watch")
        kinds["log" if r.subresource == "log" else "watch" if watch else r.method.value] += 1
    return {
        "kinds": dict(kinds),
        "max_creating": cluster.max_creating,
        "max_watching": cluster.max_watching,
    }


def api_note(stats: dict[str, Any], pods: int) -> str:
    kinds = stats["kinds"]
    besides_logs = sum(v for k, v in kinds.items() if k != "log")
    calls = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    return (
        f"{besides_logs / pods:.3f} API requests/pod besides logs ({calls}); at most "
        f"{stats['max_creating']} creates and {stats['max_watching']} watches at once"
    )


class Emulator:
    """The emulator's process, from this one."""

    def __init__(self, work: Path) -> None:
        self.kubeconfig = work / "kubeconfig"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Emulator:
        code = f"import bench.kuberun as k; k.serve({str(self.kubeconfig)!r})"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        if await self._line() != "ready":
            raise RuntimeError("the API emulator did not start")
        return self

    async def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode().strip()

    async def stats(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        return dict(json.loads(await self._line()))

    def url(self) -> str:
        import yaml

        config = yaml.safe_load(self.kubeconfig.read_text())
        return str(config["clusters"][0]["cluster"]["server"])

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# -- the pods without tricks-nats -------------------------------------------------------------


async def pods_alone(url: str, n: int) -> dict[str, float]:
    """A bare client: n creates, CONCURRENCY in flight, one watch until every pod has run,
    one deletecollection, until every pod is gone. Times from the first create."""
    import aiohttp

    from tricks_nats import env as E
    from tricks_nats.runtimes import PodPlan
    from tricks_nats.runtimes import kube_objects as ko

    exp = "bench-alone-20260101-000000-0000"
    path = f"/api/v1/namespaces/{NS}/pods"
    ran: set[str] = set()
    gone: set[str] = set()
    all_ran, all_gone = asyncio.Event(), asyncio.Event()

    async def watch(http: aiohttp.ClientSession) -> None:
        params = {"watch": "true", "labelSelector": ko.selector(exp)}
        async with http.get(path, params=params, timeout=aiohttp.ClientTimeout()) as resp:
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event["object"]
                name = obj["metadata"]["name"]
                if event["type"] == "DELETED":
                    gone.add(name)
                elif ko.interpret(obj).kind in ("running", "exited"):
                    ran.add(name)
                if len(ran) == n:
                    all_ran.set()
                if len(gone) == n:
                    all_gone.set()
                    return

    def body(i: int) -> dict[str, Any]:
        env = {E.TAG: "pod", E.REPLICAS: str(n), E.POD_ID: str(i), E.EXP_ID: exp}
        plan = PodPlan("pod", i, n, ("true",), IMAGE, env, Path("/dev/null"))
        return ko.pod_manifest(plan, namespace=NS)

    bodies = [body(i) for i in range(n)]
    gate = asyncio.Semaphore(CONCURRENCY)
    headers = {"User-Agent": "tricks-nats/bench-alone"}
    async with aiohttp.ClientSession(url, headers=headers) as http:
        watcher = asyncio.create_task(watch(http))
        try:

            async def create(b: dict[str, Any]) -> None:
                async with gate, http.post(path, json=b) as resp:
                    resp.raise_for_status()

            start = time.monotonic()
            await asyncio.gather(*(create(b) for b in bodies))
            await all_ran.wait()
            running = time.monotonic() - start
            params = {"labelSelector": ko.selector(exp)}
            async with http.delete(path, params=params) as resp:
                resp.raise_for_status()
            await all_gone.wait()
            total = time.monotonic() - start
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return {"all_running": running, "total": total}


# -- the section ---------------------------------------------------------------------------------


async def kube_runtime(n: int, log: Callable[[str], None]) -> list[Row]:
    from tricks_nats.natsserver import EmbeddedServer

    with tempfile.TemporaryDirectory(prefix="bench-kube-") as tmp:
        work = Path(tmp)
        async with Emulator(work) as emulator:
            alone_t = await pods_alone(emulator.url(), n)
            floor = await emulator.stats()
        log(
            f"kube pods alone: running at {alone_t['all_running']:.2f} s, "
            f"total {alone_t['total']:.2f} s"
        )
        async with Emulator(work) as emulator, EmbeddedServer() as nats:
            args = [
                "--runtime",
                "kubernetes",
                "--kubeconfig",
                str(emulator.kubeconfig),
                "--context",
                "emulator",
                "--namespace",
                NS,
                "--nats-url",
                nats.url,
                "--pod-nats-url",
                nats.url,
            ]
            got = await up_once(n, ["true"], work, True, spec_json=spec_json(n), args=args)
            stats = await emulator.stats()
        log(f"kube up: running at {got['all_running']:.2f} s, total {got['total']:.2f} s")
    note = "true pods + workflow barrier on pod_start; API emulator in its own process"
    alone = f"bare client, no coordinator: {api_note(floor, n)}"
    return [
        latency_row(NATS, "kube pods alone, all running", n, [alone_t["all_running"]], alone),
        latency_row(NATS, "kube pods alone", n, [alone_t["total"]], "to every pod gone"),
        latency_row(NATS, "kube up all running", n, [got["all_running"]], "from CLI launch"),
        latency_row(NATS, "kube up total", n, [got["total"]], note, rss_mb=got["rss"]),
        latency_row(NATS, "kube up overhead", n, [got["total"] - alone_t["total"]], "up - alone"),
        Row(NATS, "kube up API requests", n + 1, note=api_note(stats, n + 1)),
    ]
