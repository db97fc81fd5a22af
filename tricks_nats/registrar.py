"""The coordinator's two writes that pods depend on: counting their events, listing their peers.

Pods cannot write to JetStream (protocol v2): an event is a request on
`tricks.<exp>.event.<name>` and the `Registrar` adds exactly one to the count per call. It
commits in groups: while one write of an event is in flight, the registrations that arrive
queue up, and the next write adds all of them at once (`Nats-Incr: K`), so N pods arriving at
a barrier together cost a few JetStream writes, not N. Exactly once is the registrar's own
work: it remembers each pod message id (for the duplicate window) with its answer, and a retry
gets the same answer; each group write has its own id (`b.<random>`), kept across the retries
of that write, so a write whose acknowledgement was lost to a server restart counts once.
`Rosters` keeps each tag's running pods in the pods bucket, written before `<tag>_start` /
`<tag>_stop` is counted, which is what `discover` relies on.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Request
from tricks_nats.counting import CountKeeper
from tricks_nats.errors import NatsUnavailable, TricksError

log = logging.getLogger(__name__)

_POD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*-[0-9]+$")

#: The most registrations one write adds (a bound on the reply burst that follows it).
MAX_GROUP = 10_000


@dataclass
class _Arrival:
    """One registration (one pod message id) waiting for its group's write."""

    pod: str | None
    replies: list[str] = field(default_factory=list)


class Registrar:
    """Answers pods' registrations: +1 each, whatever else the request carries."""

    def __init__(self, bus: Bus, keeper: CountKeeper, reserved: Iterable[str] = ()) -> None:
        self.bus = bus
        self.keeper = keeper
        #: Events only the coordinator counts (`<tag>_start`, `<tag>_stop`).
        self.reserved = frozenset(reserved)
        #: Registrations waiting for the next write of their event, in arrival order.
        self._queued: dict[str, dict[str, _Arrival]] = {}
        #: Registrations in the write under way, by event.
        self._writing: dict[str, dict[str, _Arrival]] = {}
        #: Answers given, by (event, pod message id), kept for the duplicate window.
        self._answered: dict[tuple[str, str], int] = {}
        self._expiry: deque[tuple[float, tuple[str, str]]] = deque()
        #: Group writes done, and registrations they counted (for the bench and the tests).
        self.writes = 0
        self.registrations = 0

    async def start(self) -> None:
        await self.bus.take(p.event_subject(self.bus.exp_id, "*"), self._on_request)
        await self.bus.flush()  # the server knows we answer before the first pod starts

    def refusal(self, event: str, msg_id: str) -> str | None:
        if not p.NAME_RE.match(event):
            return f"bad event name {event!r}"
        if event in self.reserved:
            return f"{event!r} is counted by the coordinator, not by pods"
        if len(msg_id) > p.MAX_MSG_ID:
            return f"message id longer than {p.MAX_MSG_ID} characters"
        return None

    async def _on_request(self, msg: Request) -> None:
        """Never blocks: an answer known is sent, anything else joins its event's queue."""
        try:
            await self._take(msg)
        except Exception as exc:  # garbage on the wire is logged, never the end of the run
            log.warning("registration on %r not answered: %s", msg.subject, exc)

    async def _take(self, msg: Request) -> None:
        event = msg.subject.rsplit(".", 1)[-1]
        headers = msg.headers
        msg_id = headers.get(p.MSG_ID_HEADER) or secrets.token_hex(12)
        problem = self.refusal(event, msg_id)
        if problem is not None:
            refused = p.EventReply(error=p.ApiError(code=400, description=problem))
            await self._reply(msg.reply, msgspec.json.encode(refused))
            return
        key = (event, msg_id)
        known = self._answered.get(key)
        if known is not None:  # a retry of a registration counted already
            await self._reply(msg.reply, _answer(known))
            return
        waiting = self._writing.get(event, {}).get(msg_id)
        waiting = waiting or self._queued.get(event, {}).get(msg_id)
        if waiting is not None:  # a retry while its write is under way: one more reply to send
            if msg.reply:
                waiting.replies.append(msg.reply)
            return
        pod = headers.get(p.POD_HEADER)
        if pod is not None and not _POD_RE.match(pod):
            pod = None  # informational only: never trusted, never echoed malformed
        arrival = _Arrival(pod, [msg.reply] if msg.reply else [])
        self._queued.setdefault(event, {})[msg_id] = arrival
        if event not in self._writing:
            self._writing[event] = {}
            self.bus.spawn(self._write(event), name=f"count {event}")

    async def _write(self, event: str) -> None:
        """Write `event`'s queue in groups until it is empty; one write in flight at a time."""
        try:
            while self._queued.get(event):
                group = self._take_group(event)
                total = await self._commit(event, len(group), _last_pod(group))
                if total is None:  # refused for good: those pods get the error
                    continue
                first = total - len(group) + 1
                self.writes += 1
                self.registrations += len(group)
                self._forget_old()
                expires = time.monotonic() + p.DUPLICATE_WINDOW_S
                for value, (msg_id, arrival) in enumerate(group.items(), start=first):
                    self._answered[(event, msg_id)] = value
                    self._expiry.append((expires, (event, msg_id)))
                    for reply in arrival.replies:
                        await self._reply(reply, _answer(value))
                self._writing[event] = {}
                await self.keeper.advance(event, total, _last_pod(group))
        finally:
            self._writing.pop(event, None)

    def _take_group(self, event: str) -> dict[str, _Arrival]:
        queued = self._queued.pop(event)
        if len(queued) > MAX_GROUP:
            ids = list(queued)
            self._queued[event] = {i: queued[i] for i in ids[MAX_GROUP:]}
            queued = {i: queued[i] for i in ids[:MAX_GROUP]}
        self._writing[event] = queued
        return queued

    async def _commit(self, event: str, count: int, pod: str | None) -> int | None:
        """Add `count` to `event`, exactly once: the same group id on every retry, and retries
        for as long as NATS is away (the pods keep asking meanwhile). None when JetStream
        refused the write (the group's pods are told why)."""
        group_id = p.group_msg_id(secrets.token_hex(12))
        while True:
            try:
                return await self.bus.increment(event, msg_id=group_id, pod=pod, by=count)
            except NatsUnavailable as exc:
                if self.bus.gone is not None or self.bus.nc.is_closed:
                    raise
                log.warning("counting %r: %s; trying again", event, exc)
            except TricksError as exc:
                refused = p.EventReply(error=p.ApiError(code=503, description=str(exc)))
                for arrival in self._writing.get(event, {}).values():
                    for reply in arrival.replies:
                        await self._reply(reply, msgspec.json.encode(refused))
                return None

    def _forget_old(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            self._answered.pop(self._expiry.popleft()[1], None)

    async def _reply(self, subject: str | None, body: bytes) -> None:
        if subject:
            await self.bus.publish(subject, body)


def _answer(value: int) -> bytes:
    return msgspec.json.encode(p.EventReply(val=str(value)))


def _last_pod(group: dict[str, _Arrival]) -> str | None:
    return next(reversed(group.values())).pod if group else None


class Rosters:
    """Each tag's running pods, as `discover` reads them. With `replicas` (pods per tag), the
    notification that a tag's start count reached a value carries the tag's roster when all
    its pods run: the blocking discovers of the whole tag, the usual call, then end with that
    one message instead of N reads of it (once per tag, so O(N) bytes in all)."""

    def __init__(
        self, bus: Bus, keeper: CountKeeper, replicas: Mapping[str, int] | None = None
    ) -> None:
        self.bus = bus
        self.keeper = keeper
        self.running: dict[str, dict[int, str]] = {}
        self.replicas: dict[str, int] = {}
        self._starts: dict[str, str] = {}
        for tag, n in (replicas or {}).items():
            self.expect(tag, n)
        keeper.notice_extra = self._notice_extra

    def expect(self, tag: str, replicas: int) -> None:
        """`tag` has `replicas` pods: once all run, its start notifications carry the roster."""
        self.replicas[tag] = replicas
        self._starts[p.start_event(tag)] = tag

    def _notice_extra(self, event: str) -> dict[str, object] | None:
        tag = self._starts.get(event)
        if tag is None or len(self.running.get(tag, ())) < self.replicas[tag]:
            return None
        roster = self._roster(tag)
        if len(msgspec.json.encode(roster)) > p.MAX_NOTICE_ROSTER:
            return None
        return {"roster": roster}

    def _roster(self, tag: str) -> p.Roster:
        pods = [p.RosterPod(pod_id=i, ip=ip) for i, ip in sorted(self.running[tag].items())]
        return p.Roster(tag=tag, pods=pods)

    async def started(self, tag: str, pod_id: int, ip: str, incarnation: int = 0) -> None:
        """`incarnation`: 0, then 1 after the pod's first restart...: each one counts."""
        self.running.setdefault(tag, {})[pod_id] = ip
        await self._publish(tag)
        await self._count(tag, pod_id, "start", incarnation)

    async def stopped(
        self, tag: str, pod_id: int, *, listed: bool = True, incarnation: int = 0
    ) -> None:
        """`listed`: the pod ran (so it is in the roster); a pod that never ran is only
        counted as stopped."""
        if listed:
            self.running.setdefault(tag, {}).pop(pod_id, None)
            await self._publish(tag)
        await self._count(tag, pod_id, "stop", incarnation)

    async def _publish(self, tag: str) -> None:
        await self.bus.put_roster(self._roster(tag))

    async def _count(self, tag: str, pod_id: int, what: str, incarnation: int) -> None:
        event = p.start_event(tag) if what == "start" else p.stop_event(tag)
        msg_id = p.lifecycle_msg_id(tag, pod_id, what, incarnation)
        value = await self.bus.increment(event, msg_id=msg_id)
        await self.keeper.advance(event, value)
