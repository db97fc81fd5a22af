"""Faults on Kubernetes as Chaos Mesh objects (https://chaos-mesh.org/docs/), as plain dicts.

`pause` is a PodChaos `pod-failure` (Chaos Mesh swaps the container's image for a pause image
until the object is deleted or its `duration` ends: the program stops, and starts again from
the beginning once healed); `delay`, `loss` and `partition` are NetworkChaos objects between
the pods (`selector`) and their peers (`target`), both named pod by pod. Every object carries
the experiment's labels, so the teardown (and `tricks-nats down`) finds it by label. Pure:
no I/O, no kubernetes_asyncio.
"""

from __future__ import annotations

import hashlib
import re
import signal
from typing import TYPE_CHECKING, Any

from tricks_nats.runtimes import kube_objects as ko

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from tricks_nats.faults import Fault, FaultAction

GROUP = "chaos-mesh.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
#: Plural (the API's resource name) by kind.
PLURALS = {"PodChaos": "podchaos", "NetworkChaos": "networkchaos"}
#: Fault kinds that need Chaos Mesh, and the object each becomes.
KIND_OF = {
    "pause": "PodChaos",
    "delay": "NetworkChaos",
    "loss": "NetworkChaos",
    "partition": "NetworkChaos",
}
#: Signals a pod deletion sends: SIGKILL (grace 0) and SIGTERM (the pod's grace period).
SIGNALS = (int(signal.SIGKILL), int(signal.SIGTERM))
#: The label naming the fault firing an object belongs to.
FAULT = "tricks-nats/fault"
DOCS = "https://chaos-mesh.org/docs/"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def needs_chaos_mesh(faults: Iterable[Fault]) -> list[str]:
    """The names of the faults that Chaos Mesh carries out, in order."""
    return [f.name for f in faults if f.kind in KIND_OF]


def problems(faults: Iterable[Fault]) -> list[str]:
    """What the kubernetes runtime cannot do at all (checked before the run)."""
    return [
        signal_problem(f.name, f.signal)
        for f in faults
        if f.kind == "kill" and f.signal not in SIGNALS
    ]


def signal_problem(fault: str, number: int) -> str:
    return (
        f"fault {fault!r}: the kubernetes runtime cannot send {_signal_name(number)} (a pod "
        "deletion sends SIGKILL, or SIGTERM then SIGKILL after the pod's grace period): use "
        "signal SIGKILL or SIGTERM"
    )


def missing(names: list[str]) -> str:
    """The one-line error for a cluster without Chaos Mesh."""
    which = ", ".join(repr(n) for n in names)
    return (
        f"fault(s) {which} need Chaos Mesh, whose {GROUP}/{VERSION} resources (podchaos, "
        f"networkchaos) this cluster does not serve: install it ({DOCS}) or drop these faults"
    )


def object_name(exp_id: str, action_id: str) -> str:
    """`<experiment>-<action>` as a DNS-1123 label; a short hash of the exact pair keeps
    names distinct once cleaned (`a#1` and `a-1`)."""
    plain = f"{exp_id}-{action_id}"
    if len(plain) <= 63 and _DNS_LABEL.match(plain):
        return plain
    suffix = "-" + hashlib.sha256(f"{exp_id}/{action_id}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9]+", "-", plain.lower()).strip("-")
    return (stem[: 63 - len(suffix)].rstrip("-") or "fault") + suffix


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration Chaos Mesh parses (`100ms`, `1500us`, `30s`)."""
    us = round(seconds * 1_000_000)
    if us % 1_000_000 == 0:
        return f"{us // 1_000_000}s"
    if us % 1000 == 0:
        return f"{us // 1000}ms"
    return f"{us}us"


def percent(value: float) -> str:
    """A percentage as Chaos Mesh's float string (`25`, `12.5`)."""
    return f"{value:.6g}"


def manifest(
    action: FaultAction, *, exp_id: str, namespace: str, pod_name: Callable[[str, int], str]
) -> dict[str, Any]:
    """The Chaos Mesh object for one firing of a pause or network fault; `pod_name(tag, id)`
    names a pod on the cluster."""
    kind = KIND_OF[action.kind]
    spec: dict[str, Any] = {"mode": "all", "selector": _pods(namespace, action.pods, pod_name)}
    if kind == "PodChaos":
        spec["action"] = "pod-failure"
    else:
        spec["action"] = action.kind
        # `one`: from `pods` to `peers` only, which Chaos Mesh calls `to` (the target).
        spec["direction"] = "both" if action.direction == "both" else "to"
        spec["target"] = {"mode": "all", "selector": _pods(namespace, action.peers, pod_name)}
        if action.kind == "delay":
            spec["delay"] = {"latency": go_duration(action.delay_ms / 1000)}
            if action.jitter_ms:
                spec["delay"]["jitter"] = go_duration(action.jitter_ms / 1000)
        elif action.kind == "loss":
            spec["loss"] = {"loss": percent(action.loss_percent)}
    if action.duration is not None:
        spec["duration"] = go_duration(action.duration)
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {
            "name": object_name(exp_id, action.id),
            "namespace": namespace,
            "labels": {
                ko.MANAGED_BY: ko.MANAGER,
                ko.EXPERIMENT: ko.label_value(exp_id),
                FAULT: ko.label_value(action.id),
            },
            "annotations": {FAULT: action.id},
        },
        "spec": spec,
    }


def _pods(
    namespace: str, pods: Iterable[tuple[str, int]], pod_name: Callable[[str, int], str]
) -> dict[str, Any]:
    return {"pods": {namespace: sorted({pod_name(tag, i) for tag, i in pods})}}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
