"""Pods on Kubernetes: one pod per replica, one label-selected watch for all of them.

Costs per pod: one create, one log stream (followed while the pod runs; once it has ended, the
same request returns its whole log), one delete (or a share of one deletecollection at the
end). Log streams have connections of their own: one stays open for a pod's whole life, and
all of them at the end, so they must not take those of creates, the watch and deletions.
Nothing polls: a single watch turns phases into `running`/`exited` events, resumes from
the last resource version when the connection drops, and relists when the server says the
version is gone (410).

Unlike Tricks, nothing hangs on a broken pod: an image that cannot be pulled, a bad container
config, a pod that stays unschedulable past `schedule_timeout` (with the scheduler's message),
a container the cluster restarts (its restartPolicy changed by an admission webhook:
CrashLoopBackOff), an eviction or a deletion by someone else (whatever the exit code) all end
as `exited` with a reason naming the pod and the cause.

A real cluster is not always there. Creates and deletes are retried through an API outage or
throttling (429, 5xx) for `api_retry_budget` seconds; pod names are deterministic, so a create
whose reply was lost answers 409 when retried: the pod exists. A log stream that breaks is
attached again (skipping what was copied), and always before tricks-nats deletes the pod, since
deleting a pod deletes its log; a copy that may lack part of the log says so in its last line
and in the pod's `exited` event (`log_incomplete`). Every pod of the experiment is deleted by
label at the end; `tricks-nats down EXPERIMENT` does the same after a killed run.

Faults: `kill` deletes pods (SIGKILL: grace 0; SIGTERM: the pod's grace period), and their
`exited` events say which fault killed them; a pod launched again (a restart) is created once
its previous pod is gone. `pause` and network faults are Chaos Mesh objects (kube_chaos.py),
deleted at `heal` and, whatever is left of them, by label at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import aiohttp
from kubernetes_asyncio import client

from tricks_nats import env as E
from tricks_nats.errors import RuntimeFailure, UsageError
from tricks_nats.runtimes import NatsRoute, PodEvent, PodPlan
from tricks_nats.runtimes import kube_api as kapi
from tricks_nats.runtimes import kube_chaos as kc
from tricks_nats.runtimes import kube_objects as ko
from tricks_nats.runtimes.kube_options import KubeOptions
from tricks_nats.tasks import Tasks

if TYPE_CHECKING:
    from tricks_nats.faults import Fault, FaultAction
    from tricks_nats.spec import Experiment

log = logging.getLogger(__name__)

#: Words of a pod's status reason that say the cluster took it back (a restart policy's
#: `preemption`): kubelet evictions, a node lost, a scheduler preemption.
PREEMPTED = ("Evicted", "NodeLost", "Preempt", "DisruptionTarget", "Terminated by node")

#: Exit code for a pod stopped before its pod object existed (it never ran).
NOT_CREATED: int | None = None
#: Seconds a deletion waits for a broken log stream to be attached again.
REATTACH_TIMEOUT = 10.0
#: Log streams: a bounded connect; no read timeout (a program may be quiet for hours).
LOG_TIMEOUT = aiohttp.ClientTimeout(sock_connect=15)
#: Connections beyond the creators' for the watch, lists and deletions (log reads have their own).
CONTROL_SPARE = 4
#: Answers after which reading a log again is pointless (gone, refused, never started).
_LOG_FINAL = frozenset({400, 401, 403, 404})


class _SinkError(Exception):
    """The log file cannot be written (a local problem, not the cluster's)."""


class _Pod:
    def __init__(self, plan: PodPlan, name: str) -> None:
        self.plan = plan
        self.name = name
        self.created = False
        self.stopping = False  # tricks-nats asked for its end (a stop, the teardown)
        self.announced = False
        self.restarted = False  # the cluster restarted its container
        self.ended = asyncio.Event()  # how it ended is known (exit_code, reason)
        self.reported = asyncio.Event()  # its `exited` event is on the queue
        self.gone = asyncio.Event()
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.scheduler: str | None = None  # the scheduler's latest word, while unschedulable
        # Its log: one task copies the container's log into the pod's log file.
        self.log_task: asyncio.Task[None] | None = None
        self.log_attached = False  # a stream is open: it carries the log to the container's end
        self.log_done = False  # the copy reached the end of the container's log
        self.log_written = 0  # bytes copied
        self.log_newline = True  # the copy ends with a whole line
        self.log_failures = 0  # log requests that failed or broke
        self.log_broke: str | None = None  # how the first of them failed
        self.log_problem: str | None = None  # why the copy may lack part of the log
        self.log_changed = asyncio.Event()  # any of the above changed
        self.log_retry = asyncio.Event()  # try again now (a deletion is coming, or it is gone)
        self.again = False  # launched again (a restart): its log file grows, not starts over
        self.fault: str | None = None  # why a fault deleted it (its `exited` reason)
        self.fault_code: int | None = None  # the exit code that fault implies (SIGKILL: 137)
        self.paused = False  # Chaos Mesh swaps its image: its container restarts are expected
        self.preempted = False  # evicted, its node lost, deleted by someone else


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
        schedule_timeout: float = 300.0,
        log_streams: int = 100,
        settle_timeout: float = 30.0,
        watch_give_up: float = 120.0,
        api_retry_budget: float = kapi.RETRY_BUDGET,
        pod_nats_url: str | None = None,
        faults: Iterable[Fault] = (),
    ) -> None:
        self.events: asyncio.Queue[PodEvent] = asyncio.Queue()
        self.experiment = experiment
        self.pod_nats_url = pod_nats_url
        self.kubeconfig = kubeconfig
        self.context = context
        self.namespace = namespace or ""
        self._namespace_given = namespace
        self.concurrency = max(1, concurrency)
        self.resources = resources or {}
        self.schedule_timeout = schedule_timeout
        self.log_streams = log_streams
        self.settle_timeout = settle_timeout
        self.watch_give_up = watch_give_up
        self.api_retry_budget = api_retry_budget
        self._api: client.ApiClient | None = None
        self._core: client.CoreV1Api | None = None
        self._log_api: client.ApiClient | None = None
        self._logs: client.CoreV1Api | None = None  # log reads, on their own connections
        self._pods: dict[tuple[str, int], _Pod] = {}
        self._by_name: dict[str, _Pod] = {}
        self._queue: asyncio.Queue[_Pod | None] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._helpers = Tasks()
        self._start_lock = asyncio.Lock()
        self._streams = 0
        self._rv = ""
        self._closing = False
        self._told: set[str] = set()  # warnings given once per run
        self.faults = tuple(faults)
        self._custom: client.CustomObjectsApi | None = None
        self._chaos: dict[str, tuple[str, str]] = {}  # action id: (plural, name) not yet healed

    # -- setup ----------------------------------------------------------------------------

    @classmethod
    def for_experiment(
        cls, exp: Experiment, exp_id: str, options: KubeOptions | None
    ) -> KubernetesRuntime:
        o = options or KubeOptions()
        return cls(
            experiment=exp_id,
            kubeconfig=o.kubeconfig,
            context=o.context,
            namespace=o.namespace,
            concurrency=o.concurrency,
            schedule_timeout=o.schedule_timeout,
            resources={t.tag: t.resources for t in exp.tags if t.resources},
            pod_nats_url=o.pod_nats_url,
            faults=exp.faults,
        )

    def nats_route(self, nats_url: str | None) -> NatsRoute:
        """Pods on a cluster cannot reach an embedded server on this machine: the
        coordinator uses --nats-url, or inside the cluster the NATS service of manifests/."""
        pods = self.pod_nats_url or ko.DEFAULT_POD_NATS_URL
        if nats_url:
            return NatsRoute(nats_url, pods)
        if kapi.in_cluster():
            return NatsRoute(pods, pods)
        raise UsageError(
            "the kubernetes runtime needs --nats-url: the NATS of manifests/ as this machine "
            "reaches it (e.g. `kubectl -n tricks-nats port-forward svc/nats 4222` and "
            "--nats-url nats://127.0.0.1:4222); pods use --pod-nats-url (default "
            f"{ko.DEFAULT_POD_NATS_URL})"
        )

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
            if kc.needs_chaos_mesh(self.faults):
                await self._check_chaos_mesh(cast(Any, core).api_client)

    async def _check_chaos_mesh(self, api: client.ApiClient) -> None:
        """Pause and network faults are Chaos Mesh objects: its resources must be served."""
        names = kc.needs_chaos_mesh(self.faults)
        wanted = {kc.PLURALS[kc.KIND_OF[f.kind]] for f in self.faults if f.kind in kc.KIND_OF}
        custom = client.CustomObjectsApi(api)
        doing = f"discovering {kc.API_VERSION}"
        try:
            resp = await kapi.call(
                lambda: custom.get_api_resources(
                    kc.GROUP,
                    kc.VERSION,
                    _preload_content=False,
                    _request_timeout=kapi.REQUEST_TIMEOUT,
                ),
                doing,
                budget=0.0,
                accept={kapi.NOT_FOUND},
            )
            try:
                found = {} if resp.status == kapi.NOT_FOUND else await resp.json(content_type=None)
            finally:
                resp.release()
        except (RuntimeFailure, *kapi.NETWORK_ERRORS, ValueError) as exc:
            raise UsageError(f"cannot use the Kubernetes cluster: {doing}: {exc}") from exc
        served = {r.get("name") for r in (found or {}).get("resources") or []}
        if not wanted <= served:
            raise UsageError(kc.missing(names))

    def fault_problems(self, faults: Iterable[Fault]) -> list[str]:
        return kc.problems(faults)

    async def _start(self, exp_id: str) -> client.CoreV1Api:
        async with self._start_lock:
            if self._core is not None:
                return self._core
            self.experiment = exp_id
            api, hinted = await kapi.connect(
                self.kubeconfig, self.context, pool=self.concurrency + CONTROL_SPARE
            )
            # A log stream holds its connection for its pod's life, and tricks-nats attaches
            # one to every pod still running before the deletion at the end: sharing one pool,
            # streams took every connection, and the deletion waited for one until it failed.
            log_api = kapi.sibling(api, pool=0)
            core = client.CoreV1Api(api)
            self.namespace = self._namespace_given or hinted or ko.DEFAULT_NAMESPACE
            try:
                _, self._rv = await kapi.list_pods(
                    core, self.namespace, exp_id, budget=self.api_retry_budget
                )
            except BaseException:
                await log_api.close()
                await api.close()
                raise
            self._api, self._core = api, core
            self._custom = client.CustomObjectsApi(api)
            self._log_api, self._logs = log_api, client.CoreV1Api(log_api)
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
        old = self._pods.get((plan.tag, plan.pod_id))
        self._pods[(plan.tag, plan.pod_id)] = pod
        if old is None:
            self._by_name[pod.name] = pod
            self._queue.put_nowait(pod)
            return
        # Launched again (a restart): the same name, so the previous pod must be gone first
        # (else its create answers 409, and the watch would give its last events to this one).
        pod.again = True
        if old.created and not old.gone.is_set():
            self._spawn(self._launch_after(old, pod))
        else:
            self._by_name[pod.name] = pod
            self._queue.put_nowait(pod)

    async def _launch_after(self, old: _Pod, pod: _Pod) -> None:
        try:
            await asyncio.wait_for(old.gone.wait(), self.settle_timeout)
        except TimeoutError:
            reason = (
                f"pod {pod.name} cannot start again: its previous pod was still Terminating "
                f"{self.settle_timeout:g}s after its deletion (is its node down?)"
            )
            _append(pod.plan.log_path, f"tricks-nats: {reason}\n".encode())
            self._exit(pod, ko.NEVER_RAN, reason)
            return
        self._by_name[pod.name] = pod
        if pod.stopping or self._closing:
            self._exit(pod, NOT_CREATED, None)
        else:
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
        """Create the pod, retried through an outage or throttling: the name is deterministic,
        so a 409 after a lost reply means the pod exists (ours)."""
        assert self._core is not None
        core = self._core
        body = ko.pod_manifest(
            pod.plan, namespace=self.namespace, resources=self.resources.get(pod.plan.tag)
        )
        try:
            resp = await kapi.call(
                lambda: core.create_namespaced_pod(
                    self.namespace,
                    cast(Any, body),
                    _preload_content=False,
                    _request_timeout=kapi.REQUEST_TIMEOUT,
                ),
                f"creating pod {pod.name}",
                budget=self.api_retry_budget,
                accept={kapi.CONFLICT},
                give_up=lambda: pod.stopping or self._closing,
            )
        except RuntimeFailure as exc:
            if pod.stopping or self._closing:
                self._exit(pod, NOT_CREATED, None)
            else:
                self._never_ran(pod, str(exc))
            return
        try:
            if resp.status != kapi.CONFLICT:
                self._check_restart_policy(pod, await resp.json(content_type=None))
        except (*kapi.NETWORK_ERRORS, ValueError):
            pass  # the pod exists; what the cluster made of it, the watch tells
        finally:
            resp.release()
        pod.created = True
        if pod.stopping:
            self._spawn(self._delete(pod, 0.0))

    def _check_restart_policy(self, pod: _Pod, created: Any) -> None:
        spec = (created.get("spec") if isinstance(created, dict) else None) or {}
        policy = spec.get("restartPolicy")
        if policy and policy != "Never" and "restart-policy" not in self._told:
            self._told.add("restart-policy")
            log.warning(
                "pod %s: the cluster changed its restartPolicy to %s (an admission webhook?); "
                "a pod whose container is restarted is reported at its first exit and deleted",
                pod.name,
                policy,
            )

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
        if pod.paused and seen.restarted:  # Chaos Mesh's pod-failure restarts the container
            seen = ko.interpret(ko.without_restarts(obj))
        deleted = kind == "DELETED" or bool(meta.get("deletionTimestamp"))
        if kind == "DELETED":
            pod.gone.set()
            pod.log_retry.set()  # its log went with it: a broken stream stops trying
            if seen.kind != "exited":
                seen = ko.Seen("exited", seen.ip, ko.KILLED, None, ran=pod.announced)
        if seen.kind != "unschedulable" and pod.deadline is not None:
            pod.deadline.cancel()
            pod.deadline = None
        if seen.kind == "running":
            self._running(pod, seen.ip)
        elif seen.kind == "unschedulable":
            self._unschedulable(pod, seen.reason)
        elif seen.kind == "exited" and not pod.ended.is_set():
            code, reason = seen.exit_code, seen.reason
            if not pod.stopping and any(word in (reason or "") for word in PREEMPTED):
                pod.preempted = True  # evicted, or its node lost: the cluster took it back
            if pod.stopping:
                reason = None  # we stopped it: no news
            elif pod.fault is not None and deleted:
                code = pod.fault_code if pod.fault_code is not None else code
                reason = f"pod {pod.name} {pod.fault}"
            elif deleted:
                # A deletion tricks-nats did not ask for fails the pod whatever its program
                # says: a program that exits 0 on SIGTERM would pass for a success. It is what
                # a drained or lost node does: a preemption, for a tag's restart policy.
                pod.preempted = True
                if code == 0:
                    code = ko.KILLED
                    reason = f"pod {pod.name} was deleted by someone else (its program exited 0)"
                elif reason:
                    reason = f"{reason} (the pod was deleted by someone else)"
                else:
                    reason = f"pod {pod.name} was deleted by someone else before it ended"
            pod.restarted = seen.restarted
            if seen.ran:
                self._running(pod, seen.ip)
            if seen.exit_code == ko.NEVER_RAN and not seen.ran:
                self._never_ran(pod, reason or f"pod {pod.name} cannot start")
            else:
                self._exit(pod, code, reason)
        if seen.restarted and not pod.stopping and not pod.gone.is_set():
            # The cluster runs the program again and again: its first end was reported.
            pod.restarted = pod.stopping = True
            self._spawn(self._delete(pod, 0.0))

    def _unschedulable(self, pod: _Pod, message: str | None) -> None:
        pod.scheduler = message or pod.scheduler
        if pod.deadline is not None or pod.ended.is_set():
            return
        if f"unschedulable:{pod.plan.tag}" not in self._told:
            self._told.add(f"unschedulable:{pod.plan.tag}")
            log.warning(
                "pod %s cannot be scheduled yet: %s (it fails after %gs: --schedule-timeout)",
                pod.name,
                pod.scheduler or "Unschedulable",
                self.schedule_timeout,
            )
        pod.deadline = asyncio.get_running_loop().call_later(
            max(0.0, self.schedule_timeout), self._not_scheduled, pod
        )

    def _not_scheduled(self, pod: _Pod) -> None:
        pod.deadline = None
        self._never_ran(
            pod,
            f"pod {pod.name} could not be scheduled within {self.schedule_timeout:g}s: "
            f"{pod.scheduler or 'Unschedulable'}",
        )

    def _lost(self, reason: str) -> None:
        for pod in self._everyone():
            if not pod.ended.is_set():
                self._exit(pod, ko.KILLED, f"pod {pod.name}: {reason}", wait_log=False)

    # -- lifecycle events -----------------------------------------------------------------

    def _running(self, pod: _Pod, ip: str | None) -> None:
        if pod.announced:
            return
        pod.announced = True
        self.events.put_nowait(PodEvent("running", pod.plan.tag, pod.plan.pod_id, ip=ip))
        if self._streams < self.log_streams:
            self._follow(pod, counted=True)

    def _exit(
        self, pod: _Pod, code: int | None, reason: str | None, *, wait_log: bool = True
    ) -> None:
        """The pod has ended: its `exited` event follows once its log is copied (bounded by
        `settle_timeout`), so the event can say whether the log is whole (`log_incomplete`)."""
        if pod.ended.is_set():
            return
        pod.ended.set()
        if pod.deadline is not None:
            pod.deadline.cancel()
            pod.deadline = None
        pod.exit_code, pod.reason = code, reason
        if pod.announced:
            task = self._follow(pod)  # an ended container: one request returns its whole log
            if not task.done():
                self._spawn(
                    self._report_after_log(pod, task, self.settle_timeout if wait_log else 0.0)
                )
                return
        self._report(pod)

    async def _report_after_log(self, pod: _Pod, task: asyncio.Task[None], timeout: float) -> None:
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if pod.log_problem is None:
                still = (
                    f"{timeout:g}s after the pod ended" if timeout else "when its pod was given up"
                )
                pod.log_problem = (
                    f"{pod.log_broke}; still unreadable {still}"
                    if pod.log_broke
                    else f"the log stream of pod {pod.name} had not ended {still}"
                )
        self._report(pod)

    def _report(self, pod: _Pod) -> None:
        if pod.reported.is_set():
            return
        pod.reported.set()
        why = None
        if pod.announced and (not pod.log_done or pod.log_problem is not None):
            why = pod.log_problem or f"the log of pod {pod.name} could not be read"
            note = f"tricks-nats: log may be incomplete: {why}\n"
            _append(pod.plan.log_path, (note if pod.log_newline else f"\n{note}").encode())
        self.events.put_nowait(
            PodEvent(
                "exited",
                pod.plan.tag,
                pod.plan.pod_id,
                exit_code=pod.exit_code,
                reason=pod.reason,
                log_incomplete=why,
                preempted=pod.preempted,
            )
        )

    def _never_ran(self, pod: _Pod, reason: str) -> None:
        """A pod that will never run: say why in its log, report it, and delete it now so the
        cluster stops retrying (pulling, scheduling)."""
        if pod.ended.is_set():
            return
        (_append if pod.again else _write)(pod.plan.log_path, f"tricks-nats: {reason}\n".encode())
        self._exit(pod, ko.NEVER_RAN, reason)
        if pod.created:
            self._spawn(self._delete(pod, 0.0))

    # -- logs -------------------------------------------------------------------------------

    def _follow(self, pod: _Pod, *, counted: bool = False) -> asyncio.Task[None]:
        if pod.log_task is None:
            if counted:
                self._streams += 1
            pod.log_task = self._spawn(self._copy_log(pod, counted=counted))
        return pod.log_task

    async def _copy_log(self, pod: _Pod, *, counted: bool) -> None:
        """The one writer of the pod's log file. It follows the container's log to its end;
        when the stream breaks (an API server restart, a dropped connection) it attaches again
        with backoff, skipping what it has, until the pod is gone. What it could not copy, it
        leaves in `log_problem`."""
        delay = 0.2
        try:
            while True:
                pod.log_retry.clear()
                try:
                    await self._read_log(pod)
                    return
                except _SinkError as exc:
                    pod.log_problem = str(exc)
                    return
                except (RuntimeFailure, *kapi.NETWORK_ERRORS) as exc:
                    doing = f"the log stream of pod {pod.name}"
                    failure = (
                        str(exc)
                        if isinstance(exc, RuntimeFailure)
                        else (f"{doing} broke: {exc or type(exc).__name__}")
                    )
                    pod.log_attached = False
                    pod.log_failures += 1
                    self._log_changed(pod)
                    broke = pod.log_broke = pod.log_broke or failure
                    if kapi.status_of(exc) in _LOG_FINAL or pod.gone.is_set():
                        pod.log_problem = (
                            broke if failure == broke else f"{broke}; read again: {failure}"
                        )
                        return
                    log.info("%s; reading it again", failure)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await pod.log_retry.wait()
                delay = min(5.0, delay * 2)
        finally:
            pod.log_attached = False
            if counted:
                self._streams -= 1
            self._log_changed(pod)

    async def _read_log(self, pod: _Pod) -> None:
        """One log request, followed to its end (the container's end): the log from its start,
        of which what the file already has is skipped."""
        assert self._logs is not None
        kwargs: dict[str, Any] = {"container": ko.CONTAINER, "_preload_content": False}
        if pod.restarted:
            kwargs["previous"] = "true"  # the container that ended, not its restart
        else:
            kwargs["follow"] = "true"
        resp = await kapi.raw(
            self._logs.read_namespaced_pod_log(
                pod.name, self.namespace, _request_timeout=LOG_TIMEOUT, **kwargs
            )
        )
        try:
            await kapi.checked(resp, f"reading the log of pod {pod.name}")
            pod.log_attached = True
            self._log_changed(pod)
            skip = pod.log_written
            sink = _open(pod.plan.log_path, append=pod.log_written > 0 or pod.again)
            try:
                async for chunk in resp.content.iter_any():
                    if skip:
                        n = min(skip, len(chunk))
                        skip, chunk = skip - n, chunk[n:]
                        if not chunk:
                            continue
                    if pod.plan.on_output is not None:
                        pod.plan.on_output(chunk)
                    _put(sink, chunk)
                    pod.log_written += len(chunk)
                    pod.log_newline = chunk.endswith(b"\n")
            finally:
                sink.close()
            if skip:
                pod.log_problem = (
                    f"read again, the log of pod {pod.name} was shorter than the part already "
                    "copied (rotated by the kubelet?)"
                )
            pod.log_done = True
        finally:
            resp.release()

    def _log_changed(self, pod: _Pod) -> None:
        pod.log_changed.set()

    async def _keep_log(self, pod: _Pod) -> None:
        """Deleting a pod deletes its log: unless a stream is open (it carries the log to the
        container's end), attach one first. If that fails, the deletion goes ahead (the log
        then says it may be incomplete)."""
        if not pod.announced or pod.log_done or pod.log_attached:
            return
        failures = pod.log_failures
        task = self._follow(pod)
        pod.log_retry.set()

        def settled() -> bool:
            return pod.log_attached or task.done() or pod.log_failures > failures

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(REATTACH_TIMEOUT, self.settle_timeout)):
                while not settled():
                    pod.log_changed.clear()
                    await pod.log_changed.wait()

    # -- faults ---------------------------------------------------------------------------

    async def inject(self, action: FaultAction) -> None:
        """`kill` deletes the pods (SIGKILL: at once; SIGTERM: with their grace period); their
        `exited` events follow from the watch. Pause and network faults are Chaos Mesh objects."""
        core = await self._start(self.experiment or "")
        if action.kind == "kill":
            await self._kill(core, action)
        elif action.kind in kc.KIND_OF:
            await self._create_chaos(action)
        else:
            raise RuntimeFailure(
                f"fault {action.id}: {action.kind} is the coordinator's (terminate, then launch)"
            )

    async def heal(self, action: FaultAction) -> None:
        """Delete the fault's Chaos Mesh object (gone already is fine). A kill has nothing to
        undo. If the API refuses, the object stays known and `aclose` deletes it."""
        entry = self._chaos.get(action.id)
        if entry is None or self._custom is None:
            return
        await self._delete_object(self._custom, *entry)
        self._chaos.pop(action.id, None)

    async def _kill(self, core: client.CoreV1Api, action: FaultAction) -> None:
        if action.signal not in kc.SIGNALS:
            raise RuntimeFailure(kc.signal_problem(action.id, action.signal))
        sig = signal.Signals(action.signal).name
        pods = [self._pods.get(p) for p in action.pods]
        victims = [p for p in pods if p is not None and p.created and not p.ended.is_set()]
        for pod in victims:
            pod.fault = f"killed by fault {action.id} ({sig})"
            pod.fault_code = ko.KILLED if action.signal == signal.SIGKILL else None
        # SIGKILL: grace 0; SIGTERM: no grace given, so the pod's own (30s by default).
        grace: dict[str, Any] = {"grace_period_seconds": 0} if sig == "SIGKILL" else {}

        async def kill(pod: _Pod) -> None:
            await self._keep_log(pod)
            resp = await kapi.call(
                lambda: core.delete_namespaced_pod(
                    pod.name,
                    self.namespace,
                    _preload_content=False,
                    _request_timeout=kapi.REQUEST_TIMEOUT,
                    **grace,
                ),
                f"deleting pod {pod.name} (fault {action.id})",
                budget=self.api_retry_budget,
                accept={kapi.NOT_FOUND},
            )
            resp.release()
            if resp.status == kapi.NOT_FOUND:
                pod.gone.set()
                pod.log_retry.set()
                self._exit(pod, pod.fault_code or ko.KILLED, f"pod {pod.name} {pod.fault}")

        await asyncio.gather(*(kill(p) for p in victims))

    async def _create_chaos(self, action: FaultAction) -> None:
        assert self._custom is not None
        custom, exp_id = self._custom, self.experiment or ""
        body = kc.manifest(
            action,
            exp_id=exp_id,
            namespace=self.namespace,
            pod_name=lambda tag, i: ko.pod_name(exp_id, tag, i),
        )
        plural, name = kc.PLURALS[body["kind"]], body["metadata"]["name"]
        self._chaos[action.id] = (plural, name)  # known before it exists: aclose deletes it
        if action.kind == "pause":
            for key in action.pods:
                if (pod := self._pods.get(key)) is not None:
                    pod.paused = True
        resp = await kapi.call(
            lambda: custom.create_namespaced_custom_object(
                kc.GROUP,
                kc.VERSION,
                self.namespace,
                plural,
                body,
                _preload_content=False,
                _request_timeout=kapi.REQUEST_TIMEOUT,
            ),
            f"creating {body['kind']} {name} (fault {action.id})",
            budget=self.api_retry_budget,
            accept={kapi.CONFLICT},  # a retry after a lost reply: it exists
        )
        resp.release()

    async def _delete_object(self, custom: client.CustomObjectsApi, plural: str, name: str) -> None:
        await kapi.delete_custom(custom, self.namespace, plural, name, budget=self.api_retry_budget)

    async def _delete_chaos(self) -> None:
        """Every Chaos Mesh object of the experiment: those this run made, and any other its
        label finds (a create whose reply was lost, an earlier attempt)."""
        custom, exp_id = self._custom, self.experiment or ""
        plurals = {p for p, _ in self._chaos.values()}
        plurals |= {kc.PLURALS[kc.KIND_OF[f.kind]] for f in self.faults if f.kind in kc.KIND_OF}
        if custom is None or not plurals:
            return
        try:
            await kapi.delete_chaos(
                custom,
                self.namespace,
                exp_id,
                sorted(plurals),
                known=self._chaos.values(),
                budget=self.api_retry_budget,
            )
        except (RuntimeFailure, *kapi.NETWORK_ERRORS, ValueError) as exc:
            log.error(
                "%s; run `tricks-nats down %s` or delete the Chaos Mesh objects labelled %s",
                exc,
                exp_id,
                ko.selector(exp_id),
            )
        self._chaos.clear()

    def _everyone(self) -> list[_Pod]:
        """Every pod, including one launched again that waits for its previous pod to go."""
        return list({id(p): p for p in (*self._by_name.values(), *self._pods.values())}.values())

    # -- stopping ---------------------------------------------------------------------------

    async def _delete(self, pod: _Pod, grace: float) -> None:
        assert self._core is not None
        core = self._core
        await self._keep_log(pod)
        try:
            existed = await kapi.delete_pod(
                core, self.namespace, pod.name, grace, budget=self.api_retry_budget
            )
        except RuntimeFailure as exc:
            log.warning("%s", exc)
            return
        if not existed:
            pod.gone.set()
            pod.log_retry.set()
            self._exit(pod, ko.KILLED, None if pod.stopping else f"pod {pod.name} vanished")

    async def terminate(self, tag: str, pod_id: int, grace: float) -> None:
        pod = self._pods.get((tag, pod_id))
        if pod is None:
            return
        if not pod.ended.is_set():
            pod.stopping = True
            if pod.created:
                await self._delete(pod, grace)
            try:
                await asyncio.wait_for(pod.ended.wait(), grace + self.settle_timeout)
            except TimeoutError:
                self._exit(
                    pod,
                    ko.KILLED,
                    f"pod {pod.name} was still Terminating {grace + self.settle_timeout:g}s "
                    "after its deletion (is its node down?)",
                    wait_log=False,
                )
        await pod.reported.wait()

    async def aclose(self, grace: float) -> None:
        """Delete every pod of the experiment (by label), wait until the cluster confirms,
        collect the logs, release the connection. Safe to call again (e.g. with grace 0)."""
        self._closing = True
        core = self._core
        if core is None:
            return
        for pod in self._everyone():
            pod.stopping = True
        for _ in self._workers:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._delete_chaos()
        alive = [p for p in self._everyone() if p.created and not p.gone.is_set()]
        await asyncio.gather(*(self._keep_log(p) for p in alive))
        try:
            await kapi.delete_experiment(
                core,
                self.namespace,
                self.experiment or "",
                grace,
                known=[p.name for p in alive],
                concurrency=self.concurrency,
                budget=self.api_retry_budget,
            )
        except RuntimeFailure as exc:
            log.error("%s; run `tricks-nats down %s` to remove what is left", exc, self.experiment)
        waiting = [p for p in self._everyone() if p.created and not p.gone.is_set()]
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
                log.warning(
                    "pods still Terminating %gs after their deletion (is their node down?): %s; "
                    "`tricks-nats down %s` deletes them again",
                    grace + self.settle_timeout,
                    ", ".join(left[:10]),
                    self.experiment,
                )
        for pod in self._everyone():
            self._exit(
                pod, ko.KILLED if pod.created else NOT_CREATED, None, wait_log=pod.gone.is_set()
            )
        unreported = [p for p in self._everyone() if not p.reported.is_set()]
        if unreported:  # each waits for its log for settle_timeout at most
            waits = [asyncio.create_task(p.reported.wait()) for p in unreported]
            _, pending = await asyncio.wait(waits, timeout=self.settle_timeout + 1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._release()

    async def _release(self) -> None:
        tasks = [t for t in (self._watcher, *self._workers, *self._helpers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pod in self._everyone():  # whatever was left waiting for its log
            if pod.ended.is_set():
                self._report(pod)
        for api in (self._api, self._log_api):
            if api is not None:
                await api.close()
        self._api = self._core = self._log_api = self._logs = None
        self._custom = None
        self._watcher, self._workers = None, []

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        return self._helpers.spawn(coro)


def _write(path: Path, data: bytes) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _append(path: Path, data: bytes) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(data)


def _open(path: Path, *, append: bool) -> IO[bytes]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("ab" if append else "wb")
    except OSError as exc:
        raise _SinkError(f"cannot write the log file {path}: {exc}") from exc


def _put(sink: IO[bytes], data: bytes) -> None:
    try:
        sink.write(data)
        sink.flush()
    except OSError as exc:
        raise _SinkError(f"cannot write the log file {sink.name}: {exc}") from exc
