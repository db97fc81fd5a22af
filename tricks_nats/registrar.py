"""The coordinator's two writes that pods depend on: counting their events, listing their peers.

Pods cannot write to JetStream (protocol v2): an event is a request on
`tricks.<exp>.event.<name>` and the `Registrar` adds exactly one to the count, under the pod's
message id (in the `p.` namespace, so a retry counts once and no pod can reach the ids of the
coordinator's own lifecycle counts). `Rosters` keeps each tag's running pods in the pods bucket,
written before `<tag>_start` / `<tag>_stop` is counted, which is what `discover` relies on.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

import msgspec

from tricks_nats import protocol as p
from tricks_nats.bus import Bus
from tricks_nats.counting import CountKeeper

_POD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*-[0-9]+$")


class Registrar:
    """Answers pods' registrations: +1 each, whatever else the request carries."""

    def __init__(self, bus: Bus, keeper: CountKeeper, reserved: Iterable[str] = ()) -> None:
        self.bus = bus
        self.keeper = keeper
        #: Events only the coordinator counts (`<tag>_start`, `<tag>_stop`).
        self.reserved = frozenset(reserved)

    async def start(self) -> None:
        await self.bus.serve(p.event_subject(self.bus.exp_id, "*"), self.handle)
        await self.bus.flush()  # the server knows we answer before the first pod starts

    def refusal(self, event: str, msg_id: str) -> str | None:
        if not p.NAME_RE.match(event):
            return f"bad event name {event!r}"
        if event in self.reserved:
            return f"{event!r} is counted by the coordinator, not by pods"
        if len(msg_id) > p.MAX_MSG_ID:
            return f"message id longer than {p.MAX_MSG_ID} characters"
        return None

    async def handle(self, subject: str, headers: dict[str, str]) -> bytes:
        event = subject.rsplit(".", 1)[-1]
        msg_id = headers.get(p.MSG_ID_HEADER) or secrets.token_hex(12)
        problem = self.refusal(event, msg_id)
        if problem is not None:
            refused = p.EventReply(error=p.ApiError(code=400, description=problem))
            return msgspec.json.encode(refused)
        pod = headers.get(p.POD_HEADER)
        if pod is not None and not _POD_RE.match(pod):
            pod = None  # informational only: never trusted, never echoed malformed
        value = await self.bus.increment(event, msg_id=p.pod_dedup_id(msg_id), pod=pod)
        await self.keeper.advance(event, value, pod)
        return msgspec.json.encode(p.EventReply(val=str(value)))


class Rosters:
    """Each tag's running pods, as `discover` reads them."""

    def __init__(self, bus: Bus, keeper: CountKeeper) -> None:
        self.bus = bus
        self.keeper = keeper
        self.running: dict[str, dict[int, str]] = {}

    async def started(self, tag: str, pod_id: int, ip: str) -> None:
        self.running.setdefault(tag, {})[pod_id] = ip
        await self._publish(tag)
        await self._count(tag, pod_id, "start")

    async def stopped(self, tag: str, pod_id: int, *, listed: bool = True) -> None:
        """`listed`: the pod ran (so it is in the roster); a pod that never ran is only
        counted as stopped."""
        if listed:
            self.running.setdefault(tag, {}).pop(pod_id, None)
            await self._publish(tag)
        await self._count(tag, pod_id, "stop")

    async def _publish(self, tag: str) -> None:
        pods = [p.RosterPod(pod_id=i, ip=ip) for i, ip in sorted(self.running[tag].items())]
        await self.bus.put_roster(p.Roster(tag=tag, pods=pods))

    async def _count(self, tag: str, pod_id: int, what: str) -> None:
        event = p.start_event(tag) if what == "start" else p.stop_event(tag)
        value = await self.bus.increment(event, msg_id=p.lifecycle_msg_id(tag, pod_id, what))
        await self.keeper.advance(event, value)
