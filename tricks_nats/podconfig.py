"""A pod's identity and where its NATS is, read from the environment (PROTOCOL.md section 1):
shared by the drivers and the shell commands' fast path, so it imports nothing heavy (not even
dataclasses, 20 ms: the driver's `Config` dataclass is built from what `read` returns)."""

from __future__ import annotations

import os

from tricks_nats import env as E
from tricks_nats.errors import ConfigError
from tricks_nats.wirenames import VERSION as PROTOCOL_VERSION
from tricks_nats.wirenames import parse_tags

TYPE_CHECKING = False  # typing costs an import: for the type checker only
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any


def read(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The pod's configuration, as `Config`'s fields; a ConfigError naming what is missing
    or wrong."""
    env = os.environ if environ is None else environ

    def need(name: str) -> str:
        value = env.get(name)
        if not value:
            raise ConfigError(
                f"{name} is not set: run inside a tricks-nats pod, "
                "or set it (see drivers/PROTOCOL.md)"
            )
        return value

    def number(name: str) -> int:
        raw = need(name)
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None

    version = env.get(E.PROTOCOL)
    if version and version != PROTOCOL_VERSION:
        raise ConfigError(
            f"{E.PROTOCOL}={version!r}: this driver speaks protocol "
            f"{PROTOCOL_VERSION} (upgrade tricks-nats in the pod)"
        )
    url = env.get(E.NATS_URL)
    if not url:
        ip, port = env.get(E.TRICKS_IP), env.get(E.TRICKS_PORT)
        if not ip or not port:
            raise ConfigError(
                f"{E.NATS_URL} (or {E.TRICKS_IP} and {E.TRICKS_PORT}) is not "
                "set: run inside a tricks-nats pod"
            )
        url = f"nats://{ip}:{port}"
    return dict(
        tag=need(E.TAG),
        replicas=number(E.REPLICAS),
        pod_id=number(E.POD_ID),
        experiment=need(E.EXP_ID),
        pod_ip=env.get(E.POD_IP, ""),
        nats_url=url,
        nats_user=env.get(E.NATS_USER) or None,
        nats_password=env.get(E.NATS_PASSWORD) or None,
        tags=parse_tags(env.get(E.TAGS)),
    )
