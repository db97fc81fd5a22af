"""A pod's metric samples: recorded without blocking, sent in batches (drivers/PROTOCOL.md 6.6).

`record()` costs about a microsecond: it checks its arguments against caches, takes the time
and appends to a bounded deque (thread-safe: `SyncDriver` records from the program's thread
while the sender runs on the driver's loop). The sender publishes a batch when BATCH samples
wait or every INTERVAL_S, one batch in flight, each under its own message id (kept across
its retries: stored once). A full buffer drops samples and counts them; a refused batch
counts its samples as dropped too; the count travels with every batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tricks_nats import protocol as p
from tricks_nats.errors import NatsUnavailable, TricksError

log = logging.getLogger(__name__)

#: Samples per batch at most, and the sender's period.
BATCH = 4096
INTERVAL_S = 0.2
#: Samples the buffer holds at most (about 100 bytes each).
CAPACITY = 100_000
#: A batch's body is split below this many bytes.
BATCH_BYTES = 256 * 1024
#: How long closing waits for the buffer to be sent.
CLOSE_TIMEOUT_S = 10.0

#: `send(body, msg_id)`: publish one batch; None when stored, else why it was refused.
Send = Callable[[bytes, str], Awaitable[str | None]]

_encode = msgspec.json.Encoder().encode
_FINITE_MAX = math.inf
_LABEL_MAX = p.MAX_LABEL_VALUE


class Recorder:
    def __init__(
        self,
        send: Send,
        experiment: str,
        pod: str,
        loop: asyncio.AbstractEventLoop,
        *,
        capacity: int = CAPACITY,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        #: Called once, in the thread of the first `record` (e.g. to install a SIGTERM hook).
        self._on_first = on_first
        #: The driver's loop: the sender runs there, started by the first sample.
        self._loop = loop
        self._experiment = experiment
        self._pod = pod
        self.capacity = capacity
        #: A batch is sent as soon as this many samples wait.
        self._full = min(BATCH, capacity)
        self._buffer: collections.deque[tuple[Any, ...]] = collections.deque()
        #: Samples dropped so far (a full buffer, a refused or undeliverable batch).
        self.dropped = 0
        #: Samples the stream has acknowledged.
        self.sent = 0
        self._intervals: dict[str, float] = {}
        self._intervals_sent: dict[str, float] = {}
        self._names: set[str] = set()
        self._keys: set[str] = set()
        self._loop_thread = 0
        self._started = False
        self._wake: asyncio.Event | None = None
        self._wake_pending = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        #: Samples taken off the buffer so far (a flush waits for its mark to be sent).
        self._taken = 0
        self._done = 0

    # -- the program's side ------------------------------------------------------------------

    def record(
        self, name: str, value: float, labels: dict[str, Any] | None = None, ts: float | None = None
    ) -> None:
        """One sample, taken now (or at `ts`, seconds since the epoch: a sample read back);
        `labels` is copied."""
        value = self._value(name, value)
        if ts is None:
            ts = time.time()
        elif isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 <= ts < math.inf:
            raise TricksError(f"metric {name!r}: time {ts!r} is not seconds since the epoch")
        self._push((ts, name, value, self._labels(labels)) if labels else (ts, name, value))

    def _push(self, sample: tuple[Any, ...]) -> None:
        if not self._started:
            self._start_soon()
        buffer = self._buffer
        if len(buffer) >= self.capacity:
            self.dropped += 1
            return
        buffer.append(sample)
        if len(buffer) >= self._full and not self._wake_pending:
            self._poke()

    def _value(self, name: str, value: float) -> float:
        """`value` if `name` and `value` make a sample (checked once per name), else why not."""
        if name not in self._names:
            p.check_name(name, "metric name")
            self._names.add(name)
        kind = value.__class__
        if kind is not float and kind is not int:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TricksError(f"metric {name!r}: value {value!r} is not a number")
            value = float(value)
        if not -_FINITE_MAX < value < _FINITE_MAX:
            raise TricksError(f"metric {name!r}: value {value!r} is not finite")
        return value

    def record_kw(self, name: str, value: float, /, **labels: Any) -> None:
        """`record` with labels as keywords (the drivers' API): the hot path, one call deep.
        Keywords arrive in a fresh dict, kept as is when it is valid already."""
        kind = value.__class__
        if (
            name not in self._names
            or (kind is not float and kind is not int)
            or not -_FINITE_MAX < value < _FINITE_MAX
        ):
            value = self._value(name, value)
        if not self._started:
            self._start_soon()
        buffer = self._buffer
        if len(buffer) >= self.capacity:
            self.dropped += 1
            return
        if labels:
            keys = self._keys
            if len(labels) > p.MAX_LABELS:
                labels = self._labels(labels)  # says why
            for key, text in labels.items():
                if key not in keys or text.__class__ is not str or len(text) > _LABEL_MAX:
                    labels = self._labels(labels)
                    break
            buffer.append((time.time(), name, value, labels))
        else:
            buffer.append((time.time(), name, value))
        if len(buffer) >= self._full and not self._wake_pending:
            self._poke()

    def _labels(self, labels: dict[str, Any]) -> dict[str, str]:
        if len(labels) > p.MAX_LABELS:
            raise TricksError(f"at most {p.MAX_LABELS} labels per sample, got {len(labels)}")
        out = {key: p.check_label(key, value) for key, value in labels.items()}
        self._keys.update(out)
        return out

    def expect_interval(self, name: str, ms: float) -> None:
        p.check_name(name, "metric name")
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 < ms < math.inf:
            raise TricksError(f"expected interval of {name!r}: {ms!r} is not a positive number")
        self._intervals[name] = float(ms)
        if not self._started:
            self._start_soon()
        self._poke()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        self._wake_pending = True
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(wake.set)

    # -- the driver's loop ---------------------------------------------------------------------

    def _start_soon(self) -> None:
        """Start the sender on the driver's loop (from any thread; once)."""
        self._started = True
        if self._on_first is not None:
            self._on_first()
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._start()
        elif not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        if self._closing:
            return
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"tricks-record-{self._pod}")
        if self._buffer or self._intervals:
            self._poke()

    async def flush(self) -> None:
        """Return once everything recorded before this call has been sent (or dropped)."""
        if self._task is None or self._task.done():
            return
        mark = self._taken + len(self._buffer)
        if self._done >= mark:
            return
        future = asyncio.get_running_loop().create_future()
        self._flushes.append((mark, future))
        self._poke()
        await asyncio.shield(future)

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is buffered (for `timeout` at most; the rest is dropped and counted), then
        stop the sender."""
        task = self._task
        if task is None:
            return
        self._closing = True
        self._poke()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("metrics: %d samples not sent in %gs; dropped", len(self._buffer), timeout)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._task = None
            lost = len(self._buffer)
            if lost:
                self.dropped += lost
                self._buffer.clear()
            self._release(final=True)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(INTERVAL_S):
                    await wake.wait()
            wake.clear()
            self._wake_pending = False
            while self._buffer or self._intervals != self._intervals_sent:
                await self._send_some()
            self._release()
            if self._closing:
                return

    async def _send_some(self) -> None:
        buffer = self._buffer
        n = min(len(buffer), BATCH)
        samples = [buffer.popleft() for _ in range(n)]
        self._taken += n
        for part in self._split(samples):
            await self._deliver(part)
        self._done += n
        self._release()

    def _split(self, samples: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
        parts = [samples]
        out = []
        while parts:
            part = parts.pop()
            if len(part) > 1 and len(_encode(part)) > BATCH_BYTES:
                half = len(part) // 2
                parts.extend([part[half:], part[:half]])
            else:
                out.append(part)
        return out

    async def _deliver(self, samples: list[tuple[Any, ...]]) -> None:
        intervals = dict(self._intervals)
        batch: dict[str, Any] = {"samples": samples}
        if self.dropped:
            batch["dropped"] = self.dropped
        if intervals != self._intervals_sent:
            batch["intervals"] = intervals
        msg_id = p.metrics_msg_id(self._experiment, self._pod, secrets.token_hex(8))
        try:
            refused = await self._send(_encode(batch), msg_id)
        except (NatsUnavailable, TricksError) as exc:
            refused = str(exc)
        if refused is None:
            self.sent += len(samples)
            self._intervals_sent = intervals
        else:
            self.dropped += len(samples)
            log.warning("metrics: a batch of %d samples was dropped: %s", len(samples), refused)

    def _release(self, *, final: bool = False) -> None:
        """Wake the flushes whose samples have all been sent."""
        keep = []
        for mark, future in self._flushes:
            if future.done():
                continue
            if final or self._done >= mark:
                future.set_result(None)
            else:
                keep.append((mark, future))
        self._flushes = keep
