"""Kubernetes objects for the kubernetes runtime, as plain dicts: names, labels, the pod manifest,
and what a pod's status means for its lifecycle. Pure (no I/O, no kubernetes_asyncio), so it is
cheap to import and tested with tables.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

from tricks_nats import env as E
from tricks_nats.runtimes import PodPlan

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "tricks-nats"
EXPERIMENT = "tricks-nats/experiment"
TAG = "tricks-nats/tag"
POD_ID = "tricks-nats/pod-id"
TAG_ANNOTATION = "tricks-nats/tag"
CONTAINER = "main"

#: The in-cluster NATS of manifests/ (Service `nats` in namespace `tricks-nats`).
DEFAULT_NAMESPACE = "tricks-nats"
DEFAULT_POD_NATS_URL = "nats://nats.tricks-nats.svc:4222"

#: Waiting reasons after which the container will never run without someone changing something.
FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)

#: Exit code reported for a pod whose program never ran (as a shell reports "cannot run").
NEVER_RAN = 127
#: Exit code reported for a pod that vanished without a container exit code (SIGKILL's).
KILLED = 137

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def pod_name(exp_id: str, tag: str, pod_id: int) -> str:
    """`<experiment>-<tag>-<pod_id>` as a DNS-1123 label (lowercase, at most 63).

    When the plain name does not fit (uppercase or `_` in a tag, or too long), a short hash of
    the exact experiment and tag keeps names distinct ("Server" and "server" are two tags).
    """
    plain = f"{exp_id}-{tag}-{pod_id}"
    if len(plain) <= 63 and _DNS_LABEL.match(plain):
        return plain
    suffix = f"-{hashlib.sha256(f'{exp_id}/{tag}'.encode()).hexdigest()[:6]}-{pod_id}"
    stem = re.sub(r"[^a-z0-9]+", "-", f"{exp_id}-{tag}".lower()).strip("-")
    stem = stem[: 63 - len(suffix)].rstrip("-") or "pod"
    return stem + suffix


def label_value(value: str) -> str:
    """A valid label value (at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


def selector(exp_id: str) -> str:
    return f"{EXPERIMENT}={label_value(exp_id)},{MANAGED_BY}={MANAGER}"


def is_ours(pod: dict[str, Any], exp_id: str) -> bool:
    """Check labels ourselves too: an API server (or an emulator) may ignore a selector."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(EXPERIMENT) == label_value(exp_id) and labels.get(MANAGED_BY) == MANAGER)


def pod_manifest(
    plan: PodPlan,
    *,
    namespace: str,
    resources: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The Pod for one replica: `restartPolicy: Never`, `POD_IP` from the downward API."""
    exp_id = plan.env[E.EXP_ID]
    env: list[dict[str, Any]] = [
        {"name": k, "value": v} for k, v in plan.env.items() if k != E.POD_IP
    ]
    env.append({"name": E.POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": plan.image,
        "env": env,
    }
    if plan.command:
        container["command"] = list(plan.command)
    if resources:
        container["resources"] = {k: dict(v) for k, v in resources.items() if v}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(exp_id, plan.tag, plan.pod_id),
            "namespace": namespace,
            "labels": {
                MANAGED_BY: MANAGER,
                EXPERIMENT: label_value(exp_id),
                TAG: label_value(plan.tag),
                POD_ID: str(plan.pod_id),
            },
            "annotations": {TAG_ANNOTATION: plan.tag},
        },
        "spec": {
            "restartPolicy": "Never",
            "enableServiceLinks": False,
            "containers": [container],
        },
    }


@dataclass(frozen=True)
class Seen:
    """What one observed state of a pod means: still pending, running, or ended."""

    kind: Literal["pending", "running", "exited", "unschedulable"]
    ip: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    ran: bool = False
    #: The cluster restarted the container (its restartPolicy is not Never): delete the pod.
    restarted: bool = False


def _container(status: dict[str, Any]) -> dict[str, Any]:
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return dict(cs)
    found = status.get("containerStatuses") or [{}]
    return dict(found[0])


def _join(*parts: str | None) -> str:
    return ": ".join(p for p in parts if p)


def _restarted(pod: dict[str, Any], container: dict[str, Any], ip: str | None) -> Seen:
    """Our pods run once (restartPolicy Never); an admission webhook may have made it Always
    or OnFailure, and then a crash shows as Running, then CrashLoopBackOff. The program's first
    end is what counts: its exit code is in lastState (or in state, before the restart)."""
    name = (pod.get("metadata") or {}).get("name", "?")
    state = container.get("state") or {}
    ended = (container.get("lastState") or {}).get("terminated") or state.get("terminated") or {}
    code = int(ended.get("exitCode", KILLED))
    why = _join(ended.get("reason"), ended.get("message"))
    now = (state.get("waiting") or {}).get("reason")
    restarts = int(container.get("restartCount") or 0)
    policy = (pod.get("spec") or {}).get("restartPolicy")
    reason = (
        f"pod {name} exited with {code}"
        + (f" ({why})" if why else "")
        + f" and the cluster restarted it ({restarts} restart(s)"
        + (f", now {now}" if now else "")
        + "): its restartPolicy is "
        + (f"{policy}, not Never" if policy else "not Never")
        + " (an admission webhook may have changed it)"
    )
    return Seen("exited", ip, code, reason, ran=True, restarted=True)


def without_restarts(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as if its container had never been restarted (no restartCount, no lastState):
    for a pod whose restarts are expected (Chaos Mesh swaps its image during a pause), so its
    current state alone says whether it runs or has ended."""
    status = dict(pod.get("status") or {})
    status["containerStatuses"] = [
        {k: v for k, v in cs.items() if k not in ("restartCount", "lastState")}
        for cs in status.get("containerStatuses") or []
    ]
    return {**pod, "status": status}


def interpret(pod: dict[str, Any]) -> Seen:
    """Turn one pod object (as the API serves it) into a lifecycle observation."""
    meta = pod.get("metadata") or {}
    name = meta.get("name", "?")
    status = pod.get("status") or {}
    phase = status.get("phase")
    container = _container(status)
    state = container.get("state") or {}
    ip = status.get("podIP") or None
    pod_reason = _join(status.get("reason"), status.get("message")) or None
    if container.get("restartCount") or (container.get("lastState") or {}).get("terminated"):
        return _restarted(pod, container, ip)
    terminated = state.get("terminated")
    if terminated:
        code = int(terminated.get("exitCode", KILLED))
        reason = None
        if code != 0 or pod_reason:
            why = _join(terminated.get("reason"), terminated.get("message"))
            reason = f"pod {name} exited with {code}" + (f" ({why})" if why else "")
            if pod_reason:
                reason += f"; pod {pod_reason}"
        return Seen("exited", ip, code, reason, ran=bool(terminated.get("startedAt")))
    if phase in ("Succeeded", "Failed"):
        code = 0 if phase == "Succeeded" else KILLED
        reason = (
            None if code == 0 else f"pod {name} failed" + (f": {pod_reason}" if pod_reason else "")
        )
        return Seen("exited", ip, code, reason, ran=ip is not None)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in FATAL_WAITING:
        image = next(
            (c.get("image") for c in (pod.get("spec") or {}).get("containers") or []), None
        )
        what = f" (image {image})" if image and "Image" in waiting["reason"] else ""
        return Seen(
            "exited",
            ip,
            NEVER_RAN,
            f"pod {name} cannot start{what}: " + _join(waiting["reason"], waiting.get("message")),
        )
    if phase == "Running" or state.get("running"):
        return Seen("running", ip) if ip else Seen("pending")
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return Seen("unschedulable", reason=cond.get("message") or "Unschedulable")
    return Seen("pending")
