"""Publishes journal entries to NATS in order, so `watch` and `status` see a run as it happens.

The records call listeners synchronously; entries go through a queue to one publisher task,
which keeps their order and never blocks the coordinator's loop on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tricks_nats import protocol as p
from tricks_nats.bus import Bus
from tricks_nats.entries import Entry, encode

log = logging.getLogger(__name__)


class JournalPublisher:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def __call__(self, entry: Entry) -> None:
        self._queue.put_nowait(entry)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="journal-publisher")

    async def _run(self) -> None:
        while (entry := await self._queue.get()) is not None:
            subject = p.journal_subject(self.bus.exp_id, entry.kind)
            try:
                await self.bus.publish(subject, encode(entry))
            except Exception as exc:  # the journal file is the record; NATS is a view of it
                log.debug("journal publish failed: %s", exc)

    async def aclose(self) -> None:
        """Publish what is queued, then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._task, 5)
            with contextlib.suppress(Exception):
                await self.bus.flush()
        except TimeoutError:
            log.debug("journal publisher did not drain in time")
        finally:
            self._task = None
