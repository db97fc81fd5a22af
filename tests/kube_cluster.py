"""A Kubernetes API over real HTTP for the kubernetes runtime's tests: kmock's KubernetesEmulator
plus a fake kubelet that plays the nodes.

kmock stores objects and streams watch events but sets no status, serves no logs and has no
nodes. `Cluster` adds what the kubelet would do, through the API like the real one (status
patches, finalizer release), so the runtime sees the same stream of events as on a cluster:

- a created pod gets the kubelet's finalizer (so a delete is graceful: deletionTimestamp first,
  the object goes once the container has stopped), is scheduled, gets an IP, runs its tag's
  program (a coroutine; it can use the real driver over NATS) and ends with its exit code;
- `processes(workdir)` is a program that runs the pod's container command as a real local
  process (on a loopback pod IP, see `pod_ips`), so a whole example runs as on a node;
- tags can instead fail to pull their image, fail their container config, stay unschedulable,
  or stay pending until the test moves them by hand (`set_running`, `set_status`);
- `pods/<name>/log` serves what the program printed (`follow` waits for the container's end);
- `drop_watches()` cuts every open watch; `expire_next_watch()` answers the next watch with
  410 Gone; `watch_gate` holds new watches back until it is set.

Requests are recorded by kmock; `runtime_requests()` keeps those of tricks-nats (by User-Agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from tricks_nats.runtimes import kube_objects as ko

FINALIZER = "fake-kubelet/container"


@dataclass
class PodContext:
    """What a fake pod's program gets: its resolved environment, a stop signal, a printer."""

    name: str
    env: dict[str, str]
    stop: asyncio.Event
    lines: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)  # the container's command + args

    def print(self, line: str) -> None:
        self.lines.append(line)


Program = Callable[[PodContext], Awaitable[int]]


async def until_stopped(ctx: PodContext) -> int:
    ctx.print(f"{ctx.name} waiting to be stopped")
    await ctx.stop.wait()
    ctx.print(f"{ctx.name} got SIGTERM")
    return 143


def processes(workdir: Path, grace: float = 10.0) -> Program:
    """A program that runs the container's command in `workdir` as a local process (the
    image's WORKDIR, with this machine's Python for `python`), with the pod's environment on
    top of ours; a pod deletion sends SIGTERM, then SIGKILL after `grace`, like a kubelet."""

    async def run(ctx: PodContext) -> int:
        argv = [sys.executable if a == "python" else a for a in ctx.argv]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=workdir,
            env={**os.environ, **ctx.env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None

        async def pump() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                ctx.print(raw.decode(errors="replace").rstrip("\n"))

        output = asyncio.create_task(pump())
        stopping = asyncio.create_task(ctx.stop.wait())
        ended = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not ended.done():
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(ended), grace)
                except TimeoutError:
                    proc.kill()
            code = await ended
            await output
            return code if code >= 0 else 128 - code
        finally:
            stopping.cancel()
            if proc.returncode is None:  # cancelled: the emulator is shutting down
                proc.kill()
                await proc.wait()
            output.cancel()
            await asyncio.gather(output, stopping, ended, return_exceptions=True)

    return run


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    programs: dict[str, Program] = attrs.field(factory=dict)
    failures: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    manual: set[str] = attrs.field(factory=set)
    #: Pod IPs, `{}` being 2, 3, ...; loopback ones let `processes` pods listen on them.
    pod_ips: str = "10.244.0.{}"
    logs: dict[str, PodContext] = attrs.field(factory=dict)
    finished: dict[str, asyncio.Event] = attrs.field(factory=dict)
    stops: dict[str, asyncio.Event] = attrs.field(factory=dict)
    created: asyncio.Queue[str] = attrs.field(factory=asyncio.Queue)
    watch_gate: asyncio.Event = attrs.field(factory=asyncio.Event)
    watches: asyncio.Queue[int] = attrs.field(factory=asyncio.Queue)
    _drop: asyncio.Event = attrs.field(factory=asyncio.Event)
    _expire: bool = False
    _lives: set[asyncio.Task[None]] = attrs.field(factory=set)
    _ips: Any = attrs.field(factory=lambda: itertools.count(2))
    _watch_count: int = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        self.watch_gate.set()

    # -- test controls ------------------------------------------------------------------

    def drop_watches(self) -> None:
        self._drop.set()
        self._drop = asyncio.Event()

    def expire_next_watch(self) -> None:
        self._expire = True

    def pods(self, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        """Pods that exist now, by name."""
        out = {}
        for (res, ns, name), obj in self.objects.items():
            if res.plural == "pods" and not obj.deleted and namespace in (None, ns):
                out[name] = dict(obj.raw)
        return out

    def runtime_requests(self) -> list[kmock.Request]:
        return [r for r in self if r.headers.get("User-Agent", "").startswith("tricks-nats/")]

    async def stop_lives(self) -> None:
        for task in self._lives:
            task.cancel()
        await asyncio.gather(*self._lives, return_exceptions=True)

    async def set_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        async with self.patch(
            f"/api/v1/namespaces/{namespace}/pods/{name}/status", json={"status": status}
        ) as resp:
            if resp.status != 404:  # gone already: nothing to report on
                resp.raise_for_status()

    async def set_running(self, namespace: str, name: str) -> str:
        ip = self.pod_ips.format(next(self._ips))
        await self.set_status(
            namespace,
            name,
            {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": ko.CONTAINER,
                        "ready": True,
                        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    }
                ],
            },
        )
        return ip

    async def set_terminated(self, namespace: str, name: str, code: int) -> None:
        await self.set_status(
            namespace,
            name,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": ko.CONTAINER,
                        "ready": False,
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": "Completed" if code == 0 else "Error",
                                "startedAt": "2026-01-01T00:00:00Z",
                            }
                        },
                    }
                ],
            },
        )

    async def release(self, namespace: str, name: str) -> None:
        """The kubelet is done with the pod: drop its finalizer so a deletion completes."""
        async with self.patch(
            f"/api/v1/namespaces/{namespace}/pods/{name}", json={"metadata": {"finalizers": []}}
        ) as resp:
            if resp.status != 404:
                resp.raise_for_status()

    # -- the API, with a kubelet behind it ----------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        pods = request.resource is not None and request.resource.plural == "pods"
        if pods and request.subresource == "log":
            return await self._serve_log(request)
        creating = pods and request.action == kmock.action.CREATE
        if creating and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["finalizers"] = [FINALIZER]
        response = await super()._handle(request)
        if response.status >= 300:
            return response
        if creating:
            meta = request.data["metadata"]
            name, ns = meta["name"], request.namespace or meta.get("namespace")
            self.stops[name] = asyncio.Event()
            self.finished[name] = asyncio.Event()
            task = asyncio.create_task(self._life(ns, name, meta.get("labels") or {}, request.data))
            self._lives.add(task)
            task.add_done_callback(self._lives.discard)
            self.created.put_nowait(name)
        elif pods and request.action == kmock.action.DELETE and request.name in self.stops:
            self.stops[request.name].set()
        return response

    async def _serve_log(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        name = request.name or ""
        if name not in self.pods(request.namespace):
            return aiohttp.web.json_response(
                {"kind": "Status", "code": 404, "reason": "NotFound", "message": f"{name} gone"},
                status=404,
            )
        if request.params.get("follow") in ("true", "True", "1"):
            await self.finished[name].wait()
        ctx = self.logs.get(name)
        text = "".join(f"{line}\n" for line in ctx.lines) if ctx else ""
        return aiohttp.web.Response(text=text)

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        self._watch_count += 1
        self.watches.put_nowait(self._watch_count)
        await self.watch_gate.wait()
        if self._expire:
            self._expire = False
            yield b""
            yield {
                "type": "ERROR",
                "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "old"},
            }
            return
        drop = self._drop
        stream = self._events(request).__aiter__()
        dropped = asyncio.ensure_future(drop.wait())
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                await asyncio.wait({step, dropped}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            for pending in (step, dropped):
                if pending is not None and not pending.done():
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await pending
            with contextlib.suppress(RuntimeError):
                await stream.aclose()

    async def _events(self, request: kmock.Request) -> AsyncIterator[Any]:
        """kmock's own watch takes its snapshot before it subscribes, so an event between the
        two is lost (a quirk of kmock 0.8); here both happen under the emulator's lock."""
        assert request.resource is not None
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            snapshot = [
                obj.raw
                for (res, ns, _), obj in self.objects.items()
                if res == request.resource and not obj.deleted and request.namespace in (None, ns)
            ]
        try:
            for raw in snapshot:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                ns = event.get("object", {}).get("metadata", {}).get("namespace")
                if request.namespace in (None, ns):
                    yield event
        finally:
            await bus.unmark(marker)

    async def _life(self, ns: str, name: str, labels: dict[str, str], pod: dict[str, Any]) -> None:
        tag = labels.get(ko.TAG, "")
        stop = self.stops[name]
        try:
            await self.set_status(ns, name, {"phase": "Pending"})
            if tag in self.failures:
                reason, message = self.failures[tag]
                if reason == "Unschedulable":
                    cond = {"type": "PodScheduled", "status": "False"}
                    cond |= {"reason": reason, "message": message}
                    await self.set_status(ns, name, {"phase": "Pending", "conditions": [cond]})
                else:
                    waiting = {"waiting": {"reason": reason, "message": message}}
                    await self.set_status(
                        ns,
                        name,
                        {
                            "phase": "Pending",
                            "containerStatuses": [{"name": ko.CONTAINER, "state": waiting}],
                        },
                    )
            elif tag not in self.manual:
                ip = await self.set_running(ns, name)
                container = pod["spec"]["containers"][0]
                argv = [*(container.get("command") or []), *(container.get("args") or [])]
                ctx = PodContext(name, _environment(pod, ip), stop, argv=argv)
                self.logs[name] = ctx
                program = self.programs.get(tag, until_stopped)
                try:
                    code = await program(ctx)
                except Exception as exc:
                    ctx.print(f"crashed: {exc!r}")
                    code = 1
                await self.set_terminated(ns, name, code)
                self.finished[name].set()
            await stop.wait()
            self.finished[name].set()
            await self.release(ns, name)
        except aiohttp.ClientError:  # the emulator is shutting down
            pass


def _environment(pod: dict[str, Any], ip: str) -> dict[str, str]:
    env = {}
    for item in pod["spec"]["containers"][0].get("env") or []:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[item["name"]] = ip
    return env


def kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig with two contexts: `emulator` (the test's) and `dead` (the current one,
    pointing at a closed port), so tests show `--context` is honoured."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dead",
        "clusters": [
            {"name": "emulator", "cluster": {"server": url}},
            {"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}},
        ],
        "users": [{"name": "tester", "user": {"token": "not-checked"}}],
        "contexts": [
            {"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}},
            {"name": "dead", "context": {"cluster": "dead", "user": "tester"}},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
