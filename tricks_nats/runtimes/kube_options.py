"""The kubernetes runtime's options (the `up` flags that only it reads), light to import."""

from __future__ import annotations

from dataclasses import dataclass

#: The default of --schedule-timeout.
SCHEDULE_TIMEOUT = 300.0


@dataclass(frozen=True)
class KubeOptions:
    kubeconfig: str | None = None
    context: str | None = None
    #: Namespace of the pods (default: the kubeconfig's, else tricks-nats).
    namespace: str | None = None
    #: NATS as the pods reach it (default: the service of manifests/).
    pod_nats_url: str | None = None
    #: Pod creations in flight at once.
    concurrency: int = 20
    #: Seconds a pod may stay unschedulable before it fails (--schedule-timeout).
    schedule_timeout: float = SCHEDULE_TIMEOUT
