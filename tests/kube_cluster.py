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
- `pods/<name>/log` serves what the program printed; `follow` streams it line by line as it
  is printed, to the container's end;
- `drop_watches()` cuts every open watch; `expire_next_watch()` answers the next watch with
  410 Gone (in the stream, or as the answer); `watch_gate` holds new watches back until set;
- like an API server that restarts or a proxy that drops connections: `drop_logs()` cuts every
  open log stream, `logs_down` answers log reads 503, `lose_creates(n)` drops the connection of
  the next n pod creations (`after=True`: once the pod exists, so the reply is lost),
  `delete_errors` answers the next deletions with these statuses (429, 500, ...);
- `node_down` tags run on a node that goes away: their pods stay Terminating when deleted;
- a DELETE on the pod collection (deletecollection) deletes the pods its label selector picks
  (kmock lacks it); `delete_collection = False` plays an API or RBAC without it (405);
- `max_creating` and `max_watching` are the most pod creations and pod watches the API served
  at once; `hold_creates = n` holds the first creations until n are in flight together (so a
  client's concurrency is seen to reach its bound, not just to stay under it);
- `restart_policy` plays an admission webhook that changes a tag's restartPolicy: the kubelet
  then reports an exit as CrashLoopBackOff (`lastState.terminated`, `restartCount`).
- `chaos_mesh` (default on) serves Chaos Mesh's `chaos-mesh.org/v1alpha1` resources (podchaos,
  networkchaos) in discovery and stores their objects (`chaos_objects()`); off, the cluster has
  no Chaos Mesh (discovery of the group answers 404).

Requests are recorded by kmock; `runtime_requests()` keeps those of tricks-nats (by User-Agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import pytest
import yaml

from tricks_nats.runtimes import kube_objects as ko
from tricks_nats.runtimes.kubernetes import KubernetesRuntime

FINALIZER = "fake-kubelet/container"
PODS = kmock.resource("v1/pods")
#: Chaos Mesh's resources (kind: plural), served when `Cluster.chaos_mesh`.
CHAOS_MESH = {"PodChaos": "podchaos", "NetworkChaos": "networkchaos"}

#: The request kmock is matching against its reactions (see `Cluster.__iter__`).
_matching: contextvars.ContextVar[kmock.Request | None] = contextvars.ContextVar(
    "matching", default=None
)


@dataclass
class PodContext:
    """What a fake pod's program gets: its resolved environment, a stop signal, a printer."""

    name: str
    env: dict[str, str]
    stop: asyncio.Event
    lines: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)  # the container's command + args
    printed: Callable[[], None] | None = None  # called at each line (wakes log streams)

    def print(self, line: str) -> None:
        self.lines.append(line)
        if self.printed is not None:
            self.printed()


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
    #: Tags whose pods run on a node that then goes down: nothing reports on them any more.
    node_down: set[str] = attrs.field(factory=set)
    #: Pod IPs, `{}` being 2, 3, ...; loopback ones let `processes` pods listen on them.
    pod_ips: str = "10.244.0.{}"
    logs: dict[str, PodContext] = attrs.field(factory=dict)
    finished: dict[str, asyncio.Event] = attrs.field(factory=dict)
    stops: dict[str, asyncio.Event] = attrs.field(factory=dict)
    created: asyncio.Queue[str] = attrs.field(factory=asyncio.Queue)
    watch_gate: asyncio.Event = attrs.field(factory=asyncio.Event)
    watches: asyncio.Queue[int] = attrs.field(factory=asyncio.Queue)
    #: How each pod creation was answered, in order: its status, or 0 for a dropped connection.
    create_answers: asyncio.Queue[int] = attrs.field(factory=asyncio.Queue)
    #: Names of pods whose log stream (follow) opened, as they open.
    log_streams: asyncio.Queue[str] = attrs.field(factory=asyncio.Queue)
    #: (name, lines) each time a log stream has sent a pod's lines up to `lines`.
    log_sent: asyncio.Queue[tuple[str, int]] = attrs.field(factory=asyncio.Queue)
    logs_down: bool = False
    #: Names of pods whose log was asked for while `logs_down`, as they are refused.
    log_refusals: asyncio.Queue[str] = attrs.field(factory=asyncio.Queue)
    restart_policy: dict[str, str] = attrs.field(factory=dict)
    chaos_mesh: bool = True
    delete_errors: list[int] = attrs.field(factory=list)
    delete_collection: bool = True
    hold_creates: int = 0
    max_creating: int = 0
    max_watching: int = 0
    _creating: int = 0
    _watching: int = 0
    _creates_held: asyncio.Event = attrs.field(factory=asyncio.Event)
    _lost_creates: list[bool] = attrs.field(factory=list)
    _log_wakers: set[asyncio.Event] = attrs.field(factory=set)
    _drop_logs: asyncio.Event = attrs.field(factory=asyncio.Event)
    _drop: asyncio.Event = attrs.field(factory=asyncio.Event)
    _expire: str | None = None
    _lives: set[asyncio.Task[None]] = attrs.field(factory=set)
    _ips: Any = attrs.field(factory=lambda: itertools.count(2))
    _watch_count: int = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        if self.chaos_mesh:
            for kind, plural in CHAOS_MESH.items():
                self.resources[f"chaos-mesh.org/v1alpha1/{plural}"] = kmock.ResourceInfo(
                    kind=kind, namespaced=True
                )
        self.watch_gate.set()

    # -- test controls ------------------------------------------------------------------

    def drop_watches(self) -> None:
        self._drop.set()
        self._drop = asyncio.Event()

    def expire_next_watch(self, *, http: bool = False) -> None:
        """The next watch is told its resource version is too old: by an ERROR event in the
        stream, or (`http`) by answering 410 Gone before it starts."""
        self._expire = "http" if http else "event"

    def drop_logs(self) -> None:
        self._drop_logs.set()
        self._drop_logs = asyncio.Event()

    def lose_creates(self, n: int, *, after: bool = False) -> None:
        self._lost_creates.extend([after] * n)

    def pods(self, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        """Pods that exist now, by name."""
        out = {}
        for (res, ns, name), obj in self.objects.items():
            if res.plural == "pods" and not obj.deleted and namespace in (None, ns):
                out[name] = dict(obj.raw)
        return out

    def chaos_objects(self, plural: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """Chaos Mesh objects that exist now, by (plural, name)."""
        out = {}
        for (res, _, name), obj in self.objects.items():
            if res.group == "chaos-mesh.org" and not obj.deleted and plural in (None, res.plural):
                out[(res.plural, name)] = dict(obj.raw)
        return out

    def __iter__(self) -> Iterator[kmock.Request]:
        """Every request so far; but while kmock matches a new request against its reactions,
        only that one: kmock 0.8 tests `request in reaction` by filtering every request it has
        recorded, so each request cost O(requests so far) and a 1000-pod run took minutes."""
        one = _matching.get()
        if one is not None:
            yield one
        else:
            yield from super().__iter__()

    def exists(self, namespace: str | None, name: str) -> bool:
        obj = self.objects._objects.get((PODS, namespace, name))
        return obj is not None and not obj.deleted

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[Any]:
        """kmock 0.8 looks for a named object by scanning them all (O(pods) a request)."""
        if request.resource is not None and request.namespace and request.name:
            obj = self.objects._objects.get((request.resource, request.namespace, request.name))
            return [] if obj is None else [obj]
        return super()._KubernetesEmulator__get_objs(request, strict)  # type: ignore[misc,no-any-return]

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
        if status.get("phase") in ("Succeeded", "Failed") and name in self.finished:
            self.finished[name].set()  # the container has ended: so do its log streams

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

    async def set_crash_looping(self, namespace: str, name: str, code: int, ip: str) -> None:
        """What a kubelet reports once it restarted a container that exited (restartPolicy
        Always, or OnFailure and a failure) and now backs off before the next try."""
        ended = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": "2026-01-01T00:00:00Z",
            "finishedAt": "2026-01-01T00:00:01Z",
        }
        waiting = {
            "reason": "CrashLoopBackOff",
            "message": f"back-off 10s restarting failed container={ko.CONTAINER} pod={name}",
        }
        await self.set_status(
            namespace,
            name,
            {
                "phase": "Running",
                "podIP": ip,
                "containerStatuses": [
                    {
                        "name": ko.CONTAINER,
                        "ready": False,
                        "restartCount": 1,
                        "state": {"waiting": waiting},
                        "lastState": {"terminated": ended},
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
        if pods and request.method == kmock.method.DELETE and request.name is None:
            return await self._delete_collection(request)
        if pods and request.action == kmock.action.CREATE:
            self._creating += 1
            self.max_creating = max(self.max_creating, self._creating)
            try:
                if self.hold_creates:
                    if self._creating >= self.hold_creates:
                        self.hold_creates = 0
                        self._creates_held.set()
                    await self._creates_held.wait()
                return await self._answer(request)
            finally:
                self._creating -= 1
        return await self._answer(request)

    async def _answer(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        pods = request.resource is not None and request.resource.plural == "pods"
        if pods and request.action == kmock.action.WATCH:
            self._watch_count += 1
            self.watches.put_nowait(self._watch_count)
            await self.watch_gate.wait()
            if self._expire == "http":
                self._expire = None
                return _status(410, "too old resource version")
        creating = pods and request.action == kmock.action.CREATE
        lost: bool | None = None
        if creating and self._lost_creates:
            lost = self._lost_creates.pop(0)
            if not lost:  # the connection drops before the API server saw the request
                self.create_answers.put_nowait(0)
                return self._hang_up(request)
        deleting = pods and request.action == kmock.action.DELETE
        if deleting and self.delete_errors:
            return _status(self.delete_errors.pop(0), "try again later")
        if creating and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["finalizers"] = [FINALIZER]
            tag = (request.data["metadata"].get("labels") or {}).get(ko.TAG, "")
            if tag in self.restart_policy:  # an admission webhook at work
                request.data.setdefault("spec", {})["restartPolicy"] = self.restart_policy[tag]
        matching = _matching.set(request)
        try:
            response = await super()._handle(request)
        except kmock.KubernetesError as exc:  # e.g. 409: it exists
            if creating:
                self.create_answers.put_nowait(exc.status)
            raise
        finally:
            _matching.reset(matching)
        if creating:
            self.create_answers.put_nowait(0 if lost else response.status)
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
            if lost:  # the pod exists, the reply is lost
                return self._hang_up(request)
        elif deleting and request.name in self.stops:
            self.stops[request.name].set()
        return response

    async def _delete_collection(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """deletecollection as an API server does it: each pod the selector picks is deleted
        (gracefully: it has the kubelet's finalizer) and the answer lists them."""
        if self.delete_errors:
            return _status(self.delete_errors.pop(0), "try again later")
        if not self.delete_collection:
            return _status(405, "deletecollection is not allowed")
        wanted = _selector(request.params.get("labelSelector", ""))
        if wanted is None:
            return _status(400, "only equality label selectors are understood here")
        items = []
        async with self._lock:
            for (res, ns, _), obj in self.objects.items():
                labels = obj.get("metadata", {}).get("labels") or {}
                if res != PODS or ns != request.namespace or obj.deleted:
                    continue
                if any(labels.get(k) != v for k, v in wanted.items()):
                    continue
                meta = obj.get("metadata", {})
                if meta.get("finalizers"):
                    if not meta.get("deletionTimestamp"):
                        now = datetime.datetime.now(tz=datetime.UTC).isoformat()
                        obj.patch({"metadata": {"deletionTimestamp": now}})
                        await self._buses[PODS].put({"type": "MODIFIED", "object": obj.raw})
                    items.append(obj.raw)
                else:
                    obj.delete()
                    items.append(obj.last.raw)
                    await self._buses[PODS].put({"type": "DELETED", "object": obj.last.raw})
        for item in items:
            stop = self.stops.get(item["metadata"]["name"])
            if stop is not None:
                stop.set()
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        return aiohttp.web.json_response(body)

    @staticmethod
    def _hang_up(request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Drop the connection without an answer (the client sees a disconnection)."""
        assert request._raw_request is not None
        transport = request._raw_request.transport
        if transport is not None:
            transport.close()
        return aiohttp.web.Response(status=503)

    async def _serve_log(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        name = request.name or ""
        if self.logs_down:
            self.log_refusals.put_nowait(name)
            return _status(503, "the API server is restarting")
        if not self.exists(request.namespace, name):
            return _status(404, f"{name} gone")
        if request.params.get("follow") not in ("true", "True", "1"):
            ctx = self.logs.get(name)
            text = "".join(f"{line}\n" for line in ctx.lines) if ctx else ""
            return aiohttp.web.Response(text=text)
        assert request._raw_request is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request._raw_request)
        self.log_streams.put_nowait(name)
        drop, finished, sent = self._drop_logs, self.finished[name], 0
        news = asyncio.Event()
        self._log_wakers.add(news)
        try:
            while True:
                news.clear()
                ctx = self.logs.get(name)
                lines = ctx.lines if ctx else []
                if len(lines) > sent:
                    await response.write("".join(f"{x}\n" for x in lines[sent:]).encode())
                    sent = len(lines)
                    self.log_sent.put_nowait((name, sent))
                    continue
                if finished.is_set():
                    await response.write_eof()
                    return response
                if drop.is_set():  # cut: what was written arrives, then the connection ends
                    return self._hang_up(request)
                await _first(news, finished, drop)
        except (ConnectionError, aiohttp.ClientConnectionResetError):  # the reader left
            return response
        finally:
            self._log_wakers.discard(news)

    def _printed(self) -> None:
        for news in self._log_wakers:
            news.set()

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        if self._expire == "event":
            self._expire = None
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
        self._watching += 1
        self.max_watching = max(self.max_watching, self._watching)
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
            self._watching -= 1
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
            elif tag in self.node_down:
                await self.set_running(ns, name)
                await asyncio.Event().wait()  # the node is gone: no status, no finalizer release
            elif tag not in self.manual:
                ip = await self.set_running(ns, name)
                container = pod["spec"]["containers"][0]
                argv = [*(container.get("command") or []), *(container.get("args") or [])]
                ctx = PodContext(name, _environment(pod, ip), stop, argv=argv)
                ctx.printed = self._printed
                self.logs[name] = ctx
                program = self.programs.get(tag, until_stopped)
                try:
                    code = await program(ctx)
                except Exception as exc:
                    ctx.print(f"crashed: {exc!r}")
                    code = 1
                policy = pod["spec"].get("restartPolicy", "Always")
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    await self.set_crash_looping(ns, name, code, ip)
                else:
                    await self.set_terminated(ns, name, code)
                self.finished[name].set()
            await stop.wait()
            self.finished[name].set()
            await self.release(ns, name)
        except aiohttp.ClientError:  # the emulator is shutting down
            pass


def _status(code: int, message: str) -> aiohttp.web.Response:
    reason = {
        400: "BadRequest",
        404: "NotFound",
        405: "MethodNotAllowed",
        410: "Expired",
        429: "TooManyRequests",
        500: "InternalError",
    }.get(code, "ServiceUnavailable")
    body = {"kind": "Status", "code": code, "reason": reason, "message": message}
    return aiohttp.web.json_response(body, status=code)


def _selector(text: str) -> dict[str, str] | None:
    """An equality-based label selector (`a=b,c==d`) as a dict; None for any other kind."""
    wanted = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = term.replace("==", "=").partition("=")
        if not eq or "!" in key:
            return None
        wanted[key.strip()] = value.strip()
    return wanted


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of `events` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


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


# -- fixtures (conftest.py makes them visible to every test module) ------------------------------
@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as emulator, kmock.Server(emulator):
        try:
            yield emulator
        finally:
            await emulator.stop_lives()


@pytest.fixture
def kubecfg(cluster: Cluster, tmp_path: Path) -> Path:
    return kubeconfig(tmp_path / "kubeconfig", str(cluster.url).rstrip("/"))


def emulator_runtime(
    kubecfg: Path, experiment: str, namespace: str, **more: Any
) -> KubernetesRuntime:
    """The kubernetes runtime on the emulator's context and namespace, as the tests use it:
    4 creates in flight, 10 s to settle; `more` overrides or adds options."""
    options: dict[str, Any] = {
        "experiment": experiment,
        "kubeconfig": str(kubecfg),
        "context": "emulator",
        "namespace": namespace,
        "concurrency": 4,
        "settle_timeout": 10.0,
    }
    return KubernetesRuntime(**(options | more))
