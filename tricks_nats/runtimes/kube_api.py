"""The one boundary to kubernetes-asyncio: configuration, error translation, deleting by label.

Imported only when the kubernetes runtime (or `tricks-nats down`) is used: kubernetes_asyncio
costs about a second to import. Library errors become `UsageError` (bad kubeconfig, unknown
context) or `RuntimeFailure` (the API said no, or cannot be reached), each with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Iterable
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

#: Transport failures: the API server is unreachable or the connection broke.
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


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


async def checked(resp: aiohttp.ClientResponse, doing: str) -> aiohttp.ClientResponse:
    """Raise for a raw (not preloaded) response that failed; return it otherwise."""
    if resp.status >= 400:
        body = await resp.read()
        resp.release()
        failure = ApiException(status=resp.status, reason=resp.reason)
        failure.body = body
        raise api_failure(failure, doing)
    return resp


async def list_pods(core: client.CoreV1Api, namespace: str, exp_id: str) -> tuple[list[Any], str]:
    """The experiment's pods as plain dicts, and the list's resourceVersion."""
    try:
        resp = await raw(
            core.list_namespaced_pod(
                namespace, label_selector=ko.selector(exp_id), _preload_content=False
            )
        )
        await checked(resp, f"listing pods in namespace {namespace}")
        data = await resp.json(content_type=None)
        resp.release()
    except ApiException as exc:
        raise api_failure(exc, f"listing pods in namespace {namespace}") from exc
    except NETWORK_ERRORS as exc:
        raise api_failure(exc, f"listing pods in namespace {namespace}") from exc
    items = [i for i in data.get("items") or [] if ko.is_ours(i, exp_id)]
    return items, str((data.get("metadata") or {}).get("resourceVersion") or "")


def _seconds(grace: float) -> int:
    return max(0, math.ceil(grace))


async def delete_pod(core: client.CoreV1Api, namespace: str, name: str, grace: float) -> bool:
    """Delete one pod; False if it was already gone."""
    try:
        resp = await raw(
            core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=_seconds(grace), _preload_content=False
            )
        )
        if resp.status == NOT_FOUND:
            resp.release()
            return False
        await checked(resp, f"deleting pod {name}")
        resp.release()
        return True
    except NETWORK_ERRORS as exc:
        raise api_failure(exc, f"deleting pod {name}") from exc


async def delete_experiment(
    core: client.CoreV1Api,
    namespace: str,
    exp_id: str,
    grace: float,
    *,
    known: Iterable[str] = (),
    concurrency: int = 20,
) -> list[str]:
    """Delete every pod of the experiment: one deletecollection by label, or, where the server
    (or RBAC) does not allow that, a list by label and one delete per pod. Returns the names."""
    doing = f"deleting the pods of {exp_id}"
    try:
        resp = await raw(
            core.delete_collection_namespaced_pod(
                namespace,
                label_selector=ko.selector(exp_id),
                grace_period_seconds=_seconds(grace),
                _preload_content=False,
            )
        )
    except NETWORK_ERRORS as exc:
        raise api_failure(exc, doing) from exc
    if resp.status < 400:
        data = await resp.json(content_type=None)
        resp.release()
        items = data.get("items") if isinstance(data, dict) else None
        if isinstance(items, list):
            return [i["metadata"]["name"] for i in items if ko.is_ours(i, exp_id)]
        return sorted(set(known))
    resp.release()
    items, _ = await list_pods(core, namespace, exp_id)
    names = sorted({i["metadata"]["name"] for i in items} | set(known))
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str) -> bool:
        async with gate:
            return await delete_pod(core, namespace, name, grace)

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
