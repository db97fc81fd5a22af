"""The one boundary to kubernetes-asyncio: configuration, error translation, deleting by label.

Imported only when the kubernetes runtime (or `tricks-nats down`) is used: kubernetes_asyncio
costs about a second to import. Library errors become `UsageError` (bad kubeconfig, unknown
context) or `RuntimeFailure` (the API said no, or cannot be reached), each with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable
from pathlib import Path
from typing import Any, cast

import aiohttp
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from tricks_nats import __version__
from tricks_nats.errors import RuntimeFailure, UsageError
from tricks_nats.runtimes import kube_objects as ko

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
USER_AGENT = f"tricks-nats/{__version__}"

#: HTTP statuses the API server answers with, by the name its Status objects use.
STATUS_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    410: "Gone",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}
GONE = 410
NOT_FOUND = 404
CONFLICT = 409
#: Answers that say "not now" (throttled, restarting, overloaded): worth asking again.
RETRYABLE = frozenset({429, 500, 502, 503, 504})
#: Answers after which deleting pod by pod may still work (RBAC without deletecollection, an
#: API that lacks it).
_REFUSED = frozenset(range(400, 500)) - RETRYABLE

#: Transport failures: the API server is unreachable or the connection broke.
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)

#: How long one call (a create, a delete, a list) keeps being retried through an API outage.
RETRY_BUDGET = 30.0
#: Seconds one plain request may take (log streams and watches set their own).
REQUEST_TIMEOUT = 60


async def raw(call: Awaitable[Any]) -> aiohttp.ClientResponse:
    """kubernetes-asyncio hands back the aiohttp response itself with `_preload_content=False`
    (whatever its stubs say): we stream and parse it ourselves, and must check its status."""
    return cast(aiohttp.ClientResponse, await call)


def _exists(path: str) -> bool:
    return any(Path(p).expanduser().is_file() for p in path.split(os.pathsep) if p)


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT / "token").is_file()


def _kubeconfig_path(kubeconfig: str | None) -> str:
    return kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")


async def connect(
    kubeconfig: str | None = None, context: str | None = None, *, pool: int = 100
) -> tuple[client.ApiClient, str | None]:
    """An ApiClient for `--kubeconfig`/`--context`, or in-cluster inside a pod when neither is
    given and no kubeconfig exists; also the namespace that configuration implies, if any."""
    cfg = client.Configuration()
    namespace: str | None = None
    path = _kubeconfig_path(kubeconfig)
    exists = _exists(path)
    if kubeconfig is None and context is None and not exists and in_cluster():
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except ConfigException as exc:
            raise UsageError(f"in-cluster Kubernetes configuration: {exc}") from exc
        with contextlib.suppress(OSError):
            namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip() or None
    else:
        if not exists:
            raise UsageError(
                f"no kubeconfig at {path}: pass --kubeconfig FILE (or set KUBECONFIG), "
                "or run inside a cluster"
            )
        try:
            await config.load_kube_config(
                config_file=path, context=context, client_configuration=cfg, persist_config=False
            )
        except (ConfigException, KeyError, TypeError, AssertionError, ValueError) as exc:
            raise UsageError(_config_problem(path, context, exc)) from exc
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read kubeconfig {path}: {exc}") from exc
    cfg.connection_pool_maxsize = pool
    api = client.ApiClient(configuration=cfg)
    api.user_agent = USER_AGENT
    return api, namespace


def sibling(api: client.ApiClient, *, pool: int) -> client.ApiClient:
    """A client of the same cluster and credentials with its own connection pool (`pool`
    connections at most, 0: no bound), so one kind of request cannot starve another."""
    cfg = copy.deepcopy(api.configuration)
    cfg.connection_pool_maxsize = pool
    other = client.ApiClient(configuration=cfg)
    other.user_agent = USER_AGENT
    return other


def _config_problem(path: str, context: str | None, exc: Exception) -> str:
    if context is not None:
        try:
            contexts, _ = config.list_kube_config_contexts(path)
            names = [c["name"] for c in contexts]
        except Exception:  # the file is broken in some other way: report that below
            names = []
        if names and context not in names:
            return f"context {context!r} not found in {path} (known: {', '.join(names)})"
    return f"kubeconfig {path} is not usable: {exc or type(exc).__name__}"


def api_failure(exc: BaseException, doing: str) -> RuntimeFailure:
    """One line for a failed API call: what we did, the status by name, the server's message."""
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message = str(exc.reason or "")
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(exc.body or b"").get("message") or message
        name = STATUS_NAMES.get(status, f"HTTP {status}")
        failure = RuntimeFailure(f"{doing}: {name}: {message}".rstrip(": "))
        failure.status = status  # type: ignore[attr-defined]
        return failure
    return RuntimeFailure(f"{doing}: cannot reach the Kubernetes API: {exc or type(exc).__name__}")


def status_of(exc: BaseException) -> int:
    return int(getattr(exc, "status", 0) or 0)


def _retry_after(resp: aiohttp.ClientResponse) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "")))
    except ValueError:
        return 0.0


async def call(
    make: Callable[[], Awaitable[Any]],
    doing: str,
    *,
    budget: float = RETRY_BUDGET,
    accept: Container[int] = (),
    give_up: Callable[[], bool] = lambda: False,
) -> aiohttp.ClientResponse:
    """One API call with a raw response (`make` starts one attempt), retried with backoff on a
    connection error or a "not now" answer (429, 5xx; Retry-After honoured) for up to `budget`
    seconds, or until `give_up()`. Returns the response, unread, when it succeeded or its status
    is in `accept` (the caller releases it); otherwise raises RuntimeFailure saying why and,
    after retries, how long it tried."""
    started = time.monotonic()
    attempts = 0
    delay = 0.2
    while True:
        attempts += 1
        wait = delay
        try:
            resp = await raw(make())
            if resp.status < 400 or resp.status in accept:
                return resp
            if resp.status in RETRYABLE:
                wait = max(delay, _retry_after(resp))
            await checked(resp, doing)  # raises: the status and the server's message
        except NETWORK_ERRORS as exc:
            failure = api_failure(exc, doing)
        except RuntimeFailure as exc:
            if status_of(exc) not in RETRYABLE:
                raise
            failure = exc
        spent = time.monotonic() - started
        left = budget - spent
        if left <= 0 or give_up():
            if attempts > 1:
                last = failure
                failure = RuntimeFailure(
                    f"{last} (gave up after {attempts} attempts in {spent:.0f}s)"
                )
                failure.status = status_of(last)  # type: ignore[attr-defined]
            raise failure
        await asyncio.sleep(min(wait, left))
        delay = min(5.0, delay * 2)


async def checked(resp: aiohttp.ClientResponse, doing: str) -> aiohttp.ClientResponse:
    """Raise for a raw (not preloaded) response that failed; return it otherwise."""
    if resp.status >= 400:
        body = await resp.read()
        resp.release()
        failure = ApiException(status=resp.status, reason=resp.reason)
        failure.body = body
        raise api_failure(failure, doing)
    return resp


async def list_pods(
    core: client.CoreV1Api, namespace: str, exp_id: str, *, budget: float = 0.0
) -> tuple[list[Any], str]:
    """The experiment's pods as plain dicts, and the list's resourceVersion (retried through
    an outage for up to `budget` seconds)."""
    doing = f"listing pods in namespace {namespace}"
    try:
        resp = await call(
            lambda: core.list_namespaced_pod(
                namespace,
                label_selector=ko.selector(exp_id),
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
            doing,
            budget=budget,
        )
        try:
            data = await resp.json(content_type=None)
        finally:
            resp.release()
    except ApiException as exc:
        raise api_failure(exc, doing) from exc
    except NETWORK_ERRORS as exc:
        raise api_failure(exc, doing) from exc
    items = [i for i in data.get("items") or [] if ko.is_ours(i, exp_id)]
    return items, str((data.get("metadata") or {}).get("resourceVersion") or "")


def _seconds(grace: float) -> int:
    return max(0, math.ceil(grace))


async def delete_pod(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    grace: float,
    *,
    budget: float = RETRY_BUDGET,
) -> bool:
    """Delete one pod, retried through an outage or throttling (429, 5xx) for up to `budget`
    seconds; False if it was already gone."""
    doing = f"deleting pod {name}"
    try:
        resp = await call(
            lambda: core.delete_namespaced_pod(
                name,
                namespace,
                grace_period_seconds=_seconds(grace),
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
            doing,
            budget=budget,
            accept={NOT_FOUND},
        )
    except ApiException as exc:
        raise api_failure(exc, doing) from exc
    resp.release()
    return resp.status != NOT_FOUND


async def delete_experiment(
    core: client.CoreV1Api,
    namespace: str,
    exp_id: str,
    grace: float,
    *,
    known: Iterable[str] = (),
    concurrency: int = 20,
    budget: float = RETRY_BUDGET,
) -> list[str]:
    """Delete every pod of the experiment: one deletecollection by label, or, where the server
    (or RBAC) does not allow that, a list by label and one delete per pod. Each call is retried
    through an outage or throttling for up to `budget` seconds. Returns the names."""
    doing = f"deleting the pods of {exp_id}"
    try:
        resp = await call(
            lambda: core.delete_collection_namespaced_pod(
                namespace,
                label_selector=ko.selector(exp_id),
                grace_period_seconds=_seconds(grace),
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
            doing,
            budget=budget,
            accept=_REFUSED,
        )
    except ApiException as exc:
        raise api_failure(exc, doing) from exc
    if resp.status < 400:
        try:
            data = await resp.json(content_type=None)
        except (*NETWORK_ERRORS, ValueError):
            data = None
        finally:
            resp.release()
        items = data.get("items") if isinstance(data, dict) else None
        if isinstance(items, list):
            return [i["metadata"]["name"] for i in items if ko.is_ours(i, exp_id)]
        return sorted(set(known))
    resp.release()
    items, _ = await list_pods(core, namespace, exp_id, budget=budget)
    names = sorted({i["metadata"]["name"] for i in items} | set(known))
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str) -> bool:
        async with gate:
            return await delete_pod(core, namespace, name, grace, budget=budget)

    done = await asyncio.gather(*(one(n) for n in names))
    return [n for n, ok in zip(names, done, strict=True) if ok]


@contextlib.asynccontextmanager
async def session(
    kubeconfig: str | None, context: str | None, *, pool: int = 100
) -> AsyncIterator[tuple[client.CoreV1Api, str | None]]:
    api, namespace = await connect(kubeconfig, context, pool=pool)
    try:
        yield client.CoreV1Api(api), namespace
    finally:
        await api.close()


# -- Chaos Mesh objects (faults) ---------------------------------------------------------------

#: Chaos Mesh's group and version, and the resources a run's faults create.
CHAOS_GROUP, CHAOS_VERSION = "chaos-mesh.org", "v1alpha1"
CHAOS_PLURALS = ("networkchaos", "podchaos")


def custom_api(core: client.CoreV1Api) -> client.CustomObjectsApi:
    """The custom objects API on the same connection as `core`."""
    return client.CustomObjectsApi(cast(Any, core).api_client)


async def delete_custom(
    custom: client.CustomObjectsApi, namespace: str, plural: str, name: str, *, budget: float
) -> None:
    """Delete one Chaos Mesh object; one already gone is fine."""
    resp = await call(
        lambda: custom.delete_namespaced_custom_object(
            CHAOS_GROUP,
            CHAOS_VERSION,
            namespace,
            plural,
            name,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        ),
        f"deleting {plural} {name}",
        budget=budget,
        accept={NOT_FOUND},
    )
    resp.release()


async def list_custom(
    custom: client.CustomObjectsApi, namespace: str, plural: str, exp_id: str, *, budget: float
) -> list[str]:
    """The names of the experiment's objects of one Chaos Mesh resource (none where the
    cluster does not serve it)."""
    resp = await call(
        lambda: custom.list_namespaced_custom_object(
            CHAOS_GROUP,
            CHAOS_VERSION,
            namespace,
            plural,
            label_selector=ko.selector(exp_id),
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        ),
        f"listing {plural} in namespace {namespace}",
        budget=budget,
        accept={NOT_FOUND},
    )
    try:
        found = {} if resp.status >= 400 else await resp.json(content_type=None)
    finally:
        resp.release()
    items = found.get("items") or [] if isinstance(found, dict) else []
    return [i["metadata"]["name"] for i in items if ko.is_ours(i, exp_id)]


async def delete_chaos(
    custom: client.CustomObjectsApi,
    namespace: str,
    exp_id: str,
    plurals: Iterable[str] = CHAOS_PLURALS,
    *,
    known: Iterable[tuple[str, str]] = (),
    budget: float = RETRY_BUDGET,
) -> list[str]:
    """Delete every Chaos Mesh object of the experiment (found by label, plus `known`
    (plural, name) pairs); returns `plural/name` of each. The first failure is raised once
    every other object has been tried."""
    known = list(known)
    deleted: list[str] = []
    failures: list[BaseException] = []
    for plural in plurals:
        names = {n for p, n in known if p == plural}
        try:
            names |= set(await list_custom(custom, namespace, plural, exp_id, budget=budget))
        except (RuntimeFailure, *NETWORK_ERRORS, ValueError) as exc:
            failures.append(exc)
        done = await asyncio.gather(
            *(delete_custom(custom, namespace, plural, n, budget=budget) for n in sorted(names)),
            return_exceptions=True,
        )
        for name, result in zip(sorted(names), done, strict=True):
            if isinstance(result, BaseException):
                failures.append(result)
            else:
                deleted.append(f"{plural}/{name}")
    for failure in failures:
        if not isinstance(failure, Exception):  # cancelled
            raise failure
    if failures:
        raise failures[0]
    return deleted
