"""The coordinator's one view of every count: a single ordered consumer on the counts stream.

Each increment reaches the coordinator once (O(N) for N increments), and the coordinator tells
waiters with one message per threshold reached (`tricks.<exp>.reached.<event>.<value>`), so a
barrier of N pods costs O(N) deliveries instead of every waiter seeing every increment (N^2).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg

from tricks_nats import protocol as p
from tricks_nats.bus import Bus

log = logging.getLogger(__name__)

#: A jump bigger than this (a hostile `Nats-Incr`) notifies only the new value.
MAX_NOTIFY_SPAN = 100_000

OnChange = Callable[[str, int, str | None], None]


class CountWatcher:
    """Follows every count of one experiment; tells `on_change` and notifies waiters."""

    def __init__(self, bus: Bus, on_change: OnChange) -> None:
        self.bus = bus
        self.on_change = on_change
        self.counts: dict[str, int] = {}
        self._sub: object | None = None
        self._prefix = f"$KV.{p.counts_bucket(bus.exp)}."
        self._last_seq = 0

    async def start(self) -> None:
        await self._subscribe(None)
        self.bus.reconnect_hooks.append(self._resubscribe)

    async def _subscribe(self, from_seq: int | None) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = None
        if from_seq is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq
            )
        self._sub = await self.bus.js.subscribe(
            f"{self._prefix}>",
            ordered_consumer=True,
            cb=self._on_msg,
            config=config,
            idle_heartbeat=2.0,
        )

    async def _resubscribe(self) -> None:
        """After a reconnect (the server may have restarted and lost our consumer), follow
        the stream again from the first message we have not seen."""
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()  # type: ignore[attr-defined]
        await self.bus.ride_out(
            "follow the counts again", lambda: self._subscribe(self._last_seq + 1)
        )

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):  # close() may have cleared the hooks
            self.bus.reconnect_hooks.remove(self._resubscribe)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()  # type: ignore[attr-defined]
            except Exception as exc:  # closing anyway; nothing to recover
                log.debug("count watcher unsubscribe: %s", exc)

    async def _on_msg(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            self._last_seq = max(self._last_seq, msg.metadata.sequence.stream)
        event = msg.subject[len(self._prefix) :]
        value = p.parse_count(msg.data)
        if value is None or not p.NAME_RE.match(event):
            log.warning("ignoring a malformed count message on %r: %r", msg.subject, msg.data[:100])
            return
        pod = msg.headers.get(p.POD_HEADER) if msg.headers else None
        await self.advance(event, value, pod)

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
        body = msgspec.json.encode({"event": event, "value": value})
        for reached in range(first, value + 1):
            await self.bus.publish(p.reached_subject(self.bus.exp, event, reached), body)
        self.on_change(event, value, pod)
