"""Pods on Kubernetes: one pod per replica, one label-selected watch for all of them.

Costs per pod: one create, one log read (a follow stream while it runs, or one read when it
ends), one delete (or a share of one deletecollection at the end). Nothing polls: a single
watch turns phases into `running`/`exited` events, resumes from the last resource version when
the connection drops, and relists when the server says the version is gone (410).

Unlike Tricks, nothing hangs on a broken pod: an image that cannot be pulled, a bad container
config, a pod that stays unschedulable past a deadline, an eviction or a deletion by someone
else all end as `exited` with a reason naming the pod and the cause. Every pod of the experiment
is deleted by label at the end; `tricks-nats down EXPERIMENT` does the same after a killed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from kubernetes_asyncio import client

from tricks_nats import env as E
from tricks_nats.errors import RuntimeFailure, UsageError
from tricks_nats.runtimes import PodEvent, PodPlan
from tricks_nats.runtimes import kube_api as kapi
from tricks_nats.runtimes import kube_objects as ko

log = logging.getLogger(__name__)

#: Exit code for a pod stopped before its pod object existed (it never ran).
NOT_CREATED: int | None = None


class _Pod:
    def __init__(self, plan: PodPlan, name: str) -> None:
        self.plan = plan
        self.name = name
        self.created = False
        self.stopping = False
        self.announced = False
        self.ended = asyncio.Event()
        self.gone = asyncio.Event()
        self.log_task: asyncio.Task[None] | None = None
        self.log_ok = False
        self.deadline: asyncio.TimerHandle | None = None


class KubernetesRuntime:
    name = "kubernetes"

    def __init__(
        self,
        *,
        experiment: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
        concurrency: int = 20,
        resources: dict[str, dict[str, dict[str, str]]] | None = None,
        unschedulable_timeout: float = 300.0,
        log_streams: int = 100,
        settle_timeout: float = 30.0,
        watch_give_up: float = 120.0,
    ) -> None:
        self.events: asyncio.Queue[PodEvent] = asyncio.Queue()
        self.experiment = experiment
        self.kubeconfig = kubeconfig
        self.context = context
        self.namespace = namespace or ""
        self._namespace_given = namespace
        self.concurrency = max(1, concurrency)
        self.resources = resources or {}
        self.unschedulable_timeout = unschedulable_timeout
        self.log_streams = log_streams
        self.settle_timeout = settle_timeout
        self.watch_give_up = watch_give_up
        self._api: client.ApiClient | None = None
        self._core: client.CoreV1Api | None = None
        self._pods: dict[tuple[str, int], _Pod] = {}
        self._by_name: dict[str, _Pod] = {}
        self._queue: asyncio.Queue[_Pod | None] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._helpers: set[asyncio.Task[Any]] = set()
        self._start_lock = asyncio.Lock()
        self._streams = 0
        self._rv = ""
        self._closing = False

    # -- setup ----------------------------------------------------------------------------

    def check(self, plans: Iterable[PodPlan]) -> list[str]:
        problems: dict[str, str] = {}
        for plan in plans:
            if not plan.image:
                problems[plan.tag] = (
                    f"tag {plan.tag!r} has no image: the kubernetes runtime needs one"
                )
        return list(problems.values())

    async def prepare(self) -> None:
        """Reach the cluster once, before anything starts: a bad kubeconfig, an unreachable
        API server or a missing permission is bad input (exit 2), not a failed run. The
        connection used for the run opens with the first launch."""
        async with kapi.session(self.kubeconfig, self.context) as (core, hinted):
            namespace = self._namespace_given or hinted or ko.DEFAULT_NAMESPACE
            try:
                await kapi.list_pods(core, namespace, self.experiment or "none")
            except RuntimeFailure as exc:
                raise UsageError(f"cannot use the Kubernetes cluster: {exc}") from exc

    async def _start(self, exp_id: str) -> client.CoreV1Api:
        async with self._start_lock:
            if self._core is not None:
                return self._core
            self.experiment = exp_id
            api, hinted = await kapi.connect(
                self.kubeconfig, self.context, pool=self.concurrency + self.log_streams + 4
            )
            core = client.CoreV1Api(api)
            self.namespace = self._namespace_given or hinted or ko.DEFAULT_NAMESPACE
            try:
                _, self._rv = await kapi.list_pods(core, self.namespace, exp_id)
            except BaseException:
                await api.close()
                raise
            self._api, self._core = api, core
            self._watcher = asyncio.create_task(self._watch(exp_id), name="kube-watch")
            self._workers = [
                asyncio.create_task(self._creator(), name=f"kube-create-{i}")
                for i in range(self.concurrency)
            ]
            return core

    # -- creating ---------------------------------------------------------------------------

    async def launch(self, plan: PodPlan) -> None:
        exp_id = plan.env[E.EXP_ID]
        await self._start(exp_id)
        pod = _Pod(plan, ko.pod_name(exp_id, plan.tag, plan.pod_id))
        self._pods[(plan.tag, plan.pod_id)] = pod
        self._by_name[pod.name] = pod
        self._queue.put_nowait(pod)

    async def _creator(self) -> None:
        while True:
            pod = await self._queue.get()
            if pod is None:
                return
            if pod.stopping or self._closing:
                self._exit(pod, NOT_CREATED, None)
                continue
            await self._create(pod)

    async def _create(self, pod: _Pod) -> None:
        assert self._core is not None
        body = ko.pod_manifest(
            pod.plan, namespace=self.namespace, resources=self.resources.get(pod.plan.tag)
        )
        try:
            resp = await kapi.raw(
                self._core.create_namespaced_pod(
                    self.namespace, cast(Any, body), _preload_content=False, _request_timeout=60
                )
            )
            if resp.status != kapi.CONFLICT:  # a retried create that had gone through
                await kapi.checked(resp, f"creating pod {pod.name}")
            resp.release()
        except kapi.NETWORK_ERRORS as exc:
            self._never_ran(pod, str(kapi.api_failure(exc, f"creating pod {pod.name}")))
            return
        except RuntimeFailure as exc:
            self._never_ran(pod, str(exc))
            return
        pod.created = True
        if pod.stopping:
            self._spawn(self._delete(pod, 0.0))

    # -- watching ---------------------------------------------------------------------------

    async def _watch(self, exp_id: str) -> None:
        """ONE label-selected watch for every pod of the experiment; resumes where it stopped."""
        assert self._core is not None
        failing_since: float | None = None
        delay = 0.0
        while True:
            try:
                expired, events = await self._stream(exp_id)
                if expired:
                    await self._relist(exp_id)
                failing_since = None
                # A stream that ends at once, again and again, must not spin.
                delay = 0.0 if events or expired else min(5.0, delay * 2 or 0.1)
            except (RuntimeFailure, *kapi.NETWORK_ERRORS, ValueError) as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if kapi.status_of(exc) in (401, 403) or now - failing_since > self.watch_give_up:
                    self._lost(f"lost the watch on the Kubernetes API: {exc}")
                    return
                log.warning("pod watch interrupted (%s); resuming", exc)
                delay = min(5.0, delay * 2 or 0.2)
            await asyncio.sleep(delay)

    async def _stream(self, exp_id: str) -> tuple[bool, int]:
        """Follow one watch connection to its end: (the version expired (410), events seen)."""
        assert self._core is not None
        params: dict[str, Any] = {
            "label_selector": ko.selector(exp_id),
            "watch": "true",  # the canonical spelling; a bool would be sent as "True"
            "allow_watch_bookmarks": "true",
            "timeout_seconds": 240,
            "_preload_content": False,
            "_request_timeout": (15, 300),
        }
        if self._rv:
            params["resource_version"] = self._rv
        resp = await kapi.raw(self._core.list_namespaced_pod(self.namespace, **params))
        seen = 0
        try:
            if resp.status == kapi.GONE:
                return True, seen
            await kapi.checked(resp, f"watching pods in namespace {self.namespace}")
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                seen += 1
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == kapi.GONE:
                        return True, seen
                    raise RuntimeFailure(f"pod watch: {obj.get('message') or obj}")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self._rv = str(rv)
                if kind != "BOOKMARK" and ko.is_ours(obj, exp_id):
                    self._observe(kind, obj)
            return False, seen
        finally:
            resp.release()

    async def _relist(self, exp_id: str) -> None:
        assert self._core is not None
        known = [p for p in self._by_name.values() if p.created and not p.gone.is_set()]
        items, self._rv = await kapi.list_pods(self._core, self.namespace, exp_id)
        present = {i["metadata"]["name"] for i in items}
        for item in items:
            self._observe("MODIFIED", item)
        for pod in known:
            if pod.name not in present:
                self._observe("DELETED", {"metadata": {"name": pod.name}})

    def _observe(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        pod = self._by_name.get(meta.get("name", ""))
        if pod is None:
            return
        seen = ko.interpret(obj)
        if kind == "DELETED":
            pod.gone.set()
            if seen.kind != "exited":
                why = None if pod.stopping else f"pod {pod.name} was deleted before it ended"
                seen = ko.Seen("exited", seen.ip, ko.KILLED, why, ran=pod.announced)
        if seen.kind != "unschedulable" and pod.deadline is not None:
            pod.deadline.cancel()
            pod.deadline = None
        if seen.kind == "running":
            self._running(pod, seen.ip)
        elif seen.kind == "unschedulable":
            if pod.deadline is None and not pod.ended.is_set():
                pod.deadline = asyncio.get_running_loop().call_later(
                    max(0.0, self.unschedulable_timeout),
                    self._unschedulable,
                    pod,
                    seen.reason,
                )
        elif seen.kind == "exited" and not pod.ended.is_set():
            reason = None if pod.stopping else seen.reason  # we stopped it: no news
            if meta.get("deletionTimestamp") and not pod.stopping and seen.exit_code != 0:
                reason = (
                    f"{reason or f'pod {pod.name} ended'} (the pod was deleted by someone else)"
                )
            if seen.ran:
                self._running(pod, seen.ip)
            if seen.exit_code == ko.NEVER_RAN and not seen.ran:
                self._never_ran(pod, reason or f"pod {pod.name} cannot start")
            else:
                self._exit(pod, seen.exit_code, reason)

    def _unschedulable(self, pod: _Pod, message: str | None) -> None:
        pod.deadline = None
        self._never_ran(
            pod,
            f"pod {pod.name} could not be scheduled within {self.unschedulable_timeout:g}s: "
            f"{message or 'Unschedulable'}",
        )

    def _lost(self, reason: str) -> None:
        for pod in self._by_name.values():
            if not pod.ended.is_set():
                self._exit(pod, ko.KILLED, f"pod {pod.name}: {reason}")

    # -- lifecycle events -----------------------------------------------------------------

    def _running(self, pod: _Pod, ip: str | None) -> None:
        if pod.announced:
            return
        pod.announced = True
        self.events.put_nowait(PodEvent("running", pod.plan.tag, pod.plan.pod_id, ip=ip))
        if self._streams < self.log_streams and pod.log_task is None:
            self._streams += 1
            pod.log_task = self._spawn(self._read_log(pod, follow=True))

    def _exit(self, pod: _Pod, code: int | None, reason: str | None) -> None:
        if pod.ended.is_set():
            return
        pod.ended.set()
        if pod.deadline is not None:
            pod.deadline.cancel()
            pod.deadline = None
        self.events.put_nowait(
            PodEvent("exited", pod.plan.tag, pod.plan.pod_id, exit_code=code, reason=reason)
        )
        if pod.announced and pod.log_task is None:
            pod.log_task = self._spawn(self._read_log(pod, follow=False))

    def _never_ran(self, pod: _Pod, reason: str) -> None:
        """A pod that will never run: say why in its log, report it, and delete it now so the
        cluster stops retrying (pulling, scheduling)."""
        if pod.ended.is_set():
            return
        _write(pod.plan.log_path, f"tricks-nats: {reason}\n".encode())
        self._exit(pod, ko.NEVER_RAN, reason)
        if pod.created:
            self._spawn(self._delete(pod, 0.0))

    # -- logs -------------------------------------------------------------------------------

    async def _read_log(self, pod: _Pod, *, follow: bool) -> None:
        """Copy the pod's log into its log file: a follow stream while it runs, or one read."""
        assert self._core is not None
        path = pod.plan.log_path
        try:
            kwargs: dict[str, Any] = {"container": ko.CONTAINER, "_preload_content": False}
            if follow:
                kwargs["follow"] = "true"
            resp = await kapi.raw(
                self._core.read_namespaced_pod_log(pod.name, self.namespace, **kwargs)
            )
            try:
                await kapi.checked(resp, f"reading the log of pod {pod.name}")
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("wb") as sink:
                    async for chunk in resp.content.iter_any():
                        sink.write(chunk)
                        sink.flush()
                pod.log_ok = True
            finally:
                resp.release()
        except (RuntimeFailure, *kapi.NETWORK_ERRORS) as exc:
            log.warning("no log for %s: %s", pod.name, exc)
        finally:
            if follow:
                self._streams -= 1
        if follow and not pod.log_ok:  # the stream broke: read it whole once the pod ended
            await pod.ended.wait()
            await self._read_log(pod, follow=False)
        if not pod.log_ok and not path.exists():
            _write(path, f"tricks-nats: the log of pod {pod.name} could not be read\n".encode())

    # -- stopping ---------------------------------------------------------------------------

    async def _delete(self, pod: _Pod, grace: float) -> None:
        assert self._core is not None
        try:
            existed = await kapi.delete_pod(self._core, self.namespace, pod.name, grace)
        except RuntimeFailure as exc:
            log.warning("%s", exc)
            return
        if not existed:
            pod.gone.set()
            self._exit(pod, ko.KILLED, None if pod.stopping else f"pod {pod.name} vanished")

    async def terminate(self, tag: str, pod_id: int, grace: float) -> None:
        pod = self._pods.get((tag, pod_id))
        if pod is None or pod.ended.is_set():
            return
        pod.stopping = True
        if pod.created:
            await self._delete(pod, grace)
        try:
            await asyncio.wait_for(pod.ended.wait(), grace + self.settle_timeout)
        except TimeoutError:
            self._exit(pod, ko.KILLED, f"pod {pod.name}: no word from the cluster after deletion")

    async def aclose(self, grace: float) -> None:
        """Delete every pod of the experiment (by label), wait until the cluster confirms,
        collect the logs, release the connection. Safe to call again (e.g. with grace 0)."""
        self._closing = True
        core = self._core
        if core is None:
            return
        for pod in self._by_name.values():
            pod.stopping = True
        for _ in self._workers:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._workers, return_exceptions=True)
        known = [p.name for p in self._by_name.values() if p.created and not p.gone.is_set()]
        try:
            await kapi.delete_experiment(
                core,
                self.namespace,
                self.experiment or "",
                grace,
                known=known,
                concurrency=self.concurrency,
            )
        except RuntimeFailure as exc:
            log.error("%s; run `tricks-nats down %s` to remove what is left", exc, self.experiment)
        waiting = [p for p in self._by_name.values() if p.created and not p.gone.is_set()]
        if waiting:
            _, pending = await asyncio.wait(
                [asyncio.create_task(p.gone.wait()) for p in waiting],
                timeout=grace + self.settle_timeout,
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            left = [p.name for p in waiting if not p.gone.is_set()]
            if left:
                log.warning("pods not confirmed gone: %s", ", ".join(left[:10]))
        for pod in self._by_name.values():
            self._exit(pod, ko.KILLED if pod.created else NOT_CREATED, None)
        logs = [p.log_task for p in self._by_name.values() if p.log_task is not None]
        if logs:
            await asyncio.wait(logs, timeout=self.settle_timeout)
        await self._release()

    async def _release(self) -> None:
        tasks = [t for t in (self._watcher, *self._workers, *self._helpers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._api is not None:
            await self._api.close()
        self._api = self._core = None
        self._watcher, self._workers = None, []

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)
        return task


def _write(path: Path, data: bytes) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
