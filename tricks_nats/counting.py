"""The coordinator's one view of every count: a single ordered consumer on the counts stream.

Each increment reaches the coordinator once (O(N) for N increments), and the coordinator tells
waiters with one message per threshold reached (`tricks.<exp>.reached.<event>.<value>`), so a
barrier of N pods costs O(N) deliveries instead of every waiter seeing every increment (N^2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Follower, StreamMsg

log = logging.getLogger(__name__)

#: A jump bigger than this (a hostile `Nats-Incr`) notifies only the new value.
MAX_NOTIFY_SPAN = 100_000

OnChange = Callable[[str, int, str | None], None]


class CountKeeper:
    """Follows every count of one experiment; tells `on_change` and notifies waiters."""

    def __init__(self, bus: Bus, on_change: OnChange) -> None:
        self.bus = bus
        self.on_change = on_change
        self.counts: dict[str, int] = {}
        self._prefix = f"$KV.{p.counts_bucket(bus.exp_id)}."
        self._follower: Follower | None = None
        #: What a notification of an event carries besides its count (the rosters' hook).
        self.notice_extra: Callable[[str], dict[str, object] | None] = lambda _event: None

    async def start(self) -> None:
        """Follow the counts stream (again from where it was after a reconnect)."""
        self._follower = await self.bus.follow(f"{self._prefix}>", self._on_msg)

    async def stop(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            await follower.stop()

    async def _on_msg(self, msg: StreamMsg) -> None:
        event = msg.subject[len(self._prefix) :]
        value = p.parse_count(msg.data)
        if value is None or not p.NAME_RE.match(event):
            log.warning("ignoring a malformed count message on %r: %r", msg.subject, msg.data[:100])
            return
        await self.advance(event, value, msg.headers.get(p.POD_HEADER))

    async def advance(self, event: str, value: int, pod: str | None = None) -> None:
        """Record that `event` reached `value` (from the stream or from an ack we got)."""
        previous = self.counts.get(event, 0)
        # The registrar's answers and the stream's messages arrive in either order: an older
        # value after a newer one is expected, and ignored (counts only grow: only the
        # coordinator writes them, one at a time).
        if value <= previous:
            return
        self.counts[event] = value
        first = previous + 1 if value - previous <= MAX_NOTIFY_SPAN else value
        body = msgspec.json.encode(
            {"event": event, "value": value, **(self.notice_extra(event) or {})}
        )
        for reached in range(first, value + 1):
            await self.bus.publish(p.reached_subject(self.bus.exp_id, event, reached), body)
        self.on_change(event, value, pod)
