"""Data exchange between pods: `publish(topic, data)` and `subscribe(topic)` (PROTOCOL.md 6.7,
6.8).

A topic keeps its messages in the run's topics stream for the whole run. A publish is a
JetStream publish under a message id kept across its retries (stored once). The stream
republishes each message it stores on `tricks.<exp>.stored.<topic>` with its sequence and the
previous sequence of the same topic, so a subscriber delivers a republished message at once
when it follows the last one it delivered, and otherwise reads what it missed from the stream's
leader (STREAM.MSG.GET, `next_by_subj`): in order, exactly once, from the start of the run,
and again after a reconnect (a restarted server loses the republished messages in flight).

Pods need no consumer for this (they may create none: PROTOCOL.md 9), and only the server
can publish on the republish subjects, so a subscriber's messages are what the stream holds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js.api import DiscardPolicy, RePublish, StorageType, StreamConfig

from tricks_nats import protocol as p
from tricks_nats.errors import TricksError, WaitTimeout
from tricks_nats.syncwire import parse_headers

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from tricks_nats.bus import Bus

log = logging.getLogger(__name__)

#: Republished messages a subscription buffers at most (bytes) before it drops them and reads
#: what it missed from the stream instead (bounded memory, nothing lost).
BUFFER_BYTES = 64 << 20


def topics_config(exp: str, replicas: int) -> StreamConfig:
    """The run's topics stream: every topic's messages, kept for the whole run and
    republished (with their sequences) to the subjects subscribers listen on."""
    return StreamConfig(
        name=p.topics_stream(exp),
        subjects=[p.topic_subject(exp, "*")],
        storage=StorageType.FILE,
        duplicate_window=p.DUPLICATE_WINDOW_S,
        max_msg_size=p.MAX_TOPIC_BYTES + 8192,  # the data and its headers
        max_bytes=p.TOPICS_STREAM_BYTES,
        discard=DiscardPolicy.NEW,
        num_replicas=replicas,
        republish=RePublish(
            src=p.topic_subject(exp, "*"), dest=p.stored_subject(exp, "{{wildcard(1)}}")
        ),
    )


@dataclass(frozen=True)
class TopicMessage:
    """One message of a topic, as `subscribe` delivers it."""

    topic: str
    #: Its place in the run's topics stream: increasing within a topic, not consecutive.
    seq: int
    #: The publisher, as it says (`<tag>-<pod_id>`; pods share credentials: not proven).
    pod: str
    data: bytes
    #: Whether the publisher marked the data as JSON (`Tricks-Type: json`).
    is_json: bool = False

    @property
    def text(self) -> str:
        """The data as text (UTF-8; bytes that are not become U+FFFD)."""
        return self.data.decode(errors="replace")

    def json(self) -> Any:
        """The data decoded as JSON; `TricksError` when it is not JSON."""
        try:
            return msgspec.json.decode(self.data)
        except msgspec.DecodeError as exc:
            raise TricksError(f"message {self.seq} of {self.topic!r} is not JSON: {exc}") from exc


def encode(data: object) -> tuple[bytes, bool]:
    """A publish's body and whether it is JSON: bytes as they are, text as UTF-8, any other
    value as JSON. `TricksError` for a value JSON cannot hold or data over 1 MB."""
    if isinstance(data, bytes | bytearray | memoryview):
        body, is_json = bytes(data), False
    elif isinstance(data, str):
        body, is_json = data.encode(), False
    else:
        try:
            body, is_json = msgspec.json.encode(data), True
        except (TypeError, ValueError, OverflowError) as exc:
            raise TricksError(f"cannot publish {type(data).__name__}: {exc}") from exc
    if len(body) > p.MAX_TOPIC_BYTES:
        raise TricksError(
            f"a topic message holds at most {p.MAX_TOPIC_BYTES:,} bytes, got {len(body):,}"
        )
    return body, is_json


async def publish(
    bus: Bus, topic: str, body: bytes, *, msg_id: str, pod: str, is_json: bool = False
) -> int:
    """Store one message on `topic` (once, however often the request is retried); its seq."""
    p.check_name(topic, "topic")
    headers = {p.MSG_ID_HEADER: msg_id, p.POD_HEADER: pod}
    if is_json:
        headers[p.TYPE_HEADER] = p.JSON_TYPE
    subject = p.topic_subject(bus.exp_id, topic)
    ack = await bus.stored_publish(subject, body, headers, f"publish on topic {topic!r}")
    if ack.error:
        raise TricksError(
            f"publishing on topic {topic!r} refused: "
            f"{ack.error.description or f'error {ack.error.code}'}"
        )
    return ack.seq


class _Got(msgspec.Struct, forbid_unknown_fields=False):
    subject: str = ""
    seq: int = 0
    hdrs: str | None = None
    data: str | None = None


class _MsgGetReply(msgspec.Struct, forbid_unknown_fields=False):
    message: _Got | None = None
    error: p.ApiError | None = None


class Subscription:
    """Every message of one topic from the start of the run, in order, each once: an async
    iterator (`async for msg in sub`), with `next(timeout)` and `take(count, timeout)`.
    Opens on first use; `close()` (or `async with`) ends it."""

    def __init__(self, bus: Bus, topic: str) -> None:
        p.check_name(topic, "topic")
        self.topic = topic
        self._bus = bus
        self._last = 0
        self._behind = True
        #: Republished messages, or None for "read from the stream" (a reconnect, an overflow).
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._queued = 0
        self._overflow = False
        self._sub: Any = None
        self._stack = contextlib.ExitStack()
        self._closed = False
        self._lock = asyncio.Lock()
        #: Messages a `take` got before its timeout ran out: the next calls return them first.
        self._held: list[TopicMessage] = []

    async def _open(self) -> None:
        bus = self._bus
        self._sub = await bus.nc.subscribe(
            p.stored_subject(bus.exp_id, self.topic),
            cb=self._on_republished,
            pending_msgs_limit=0,  # bounded by BUFFER_BYTES below instead
            pending_bytes_limit=0,
        )
        self._stack.enter_context(bus.on_reconnect(self._reconnected))
        self._stack.enter_context(bus.on_close(self._wake))

    async def _on_republished(self, msg: Msg) -> None:
        size = len(msg.data)
        if self._overflow or self._queued + size > BUFFER_BYTES:
            if not self._overflow:
                self._overflow = True
                self._queue.put_nowait(None)
            return
        self._queued += size
        self._queue.put_nowait(msg)

    async def _reconnected(self) -> None:
        self._queue.put_nowait(None)

    def _wake(self) -> None:
        self._closed = True
        self._queue.put_nowait(None)

    async def next(self, timeout: float | None = None) -> TopicMessage:
        """The next message (waiting for it to be published). `WaitTimeout` when `timeout`
        (seconds) runs out; `TricksError` once closed; `NatsUnavailable`, `PermissionDenied`."""
        async with self._lock:  # one reader at a time: the order is the subscription's
            if self._held:
                return self._held.pop(0)
            try:
                if timeout is not None and timeout <= 0:  # look once: no waiting for more
                    found = await self._next(wait=False)
                    if found is None:
                        raise TimeoutError
                    return found
                async with asyncio.timeout(timeout):
                    found = await self._next()
                    assert found is not None
                    return found
            except TimeoutError as exc:
                raise WaitTimeout(
                    f"timed out after {timeout:g}s waiting for a message on {self.topic!r} "
                    f"(after seq {self._last})"
                ) from exc

    async def take(self, count: int, timeout: float | None = None) -> list[TopicMessage]:
        """The next `count` messages; `timeout` bounds the whole call (`WaitTimeout`: the
        message says how many came; those are kept, the next call returns them first)."""
        if count < 0:
            raise TricksError(f"count must be >= 0, got {count}")
        got: list[TopicMessage] = []
        try:
            if timeout is not None and timeout <= 0:  # what is there, waiting for nothing
                while len(got) < count:
                    got.append(await self.next(0))
            else:
                async with asyncio.timeout(timeout):
                    while len(got) < count:
                        got.append(await self.next())
        except (TimeoutError, WaitTimeout) as exc:
            self._held[:0] = got
            raise WaitTimeout(
                f"timed out after {timeout:g}s waiting for {count} messages on "
                f"{self.topic!r} ({len(got)} came)"
            ) from exc
        return got

    async def _next(self, *, wait: bool = True) -> TopicMessage | None:
        if self._sub is None:
            if self._closed:
                raise TricksError("the subscription is closed")
            await self._open()
        while True:
            if self._closed:
                raise TricksError(f"the subscription to {self.topic!r} is closed")
            if self._behind:
                found = await self._read_after(self._last)
                if found is None:
                    self._behind = False
                    continue
                self._last = found.seq
                return found
            if not wait and self._queue.empty():
                return None
            msg = await self._queue.get()
            if msg is None:
                self._overflow = False
                self._behind = True
                continue
            self._queued -= len(msg.data)
            headers = msg.headers or {}
            try:
                seq, prev = int(headers["Nats-Sequence"]), int(headers["Nats-Last-Sequence"])
            except (KeyError, ValueError):
                log.warning("ignoring a republished message without sequences on %s", msg.subject)
                continue
            if seq <= self._last:
                continue
            if prev != self._last:
                self._behind = True  # one was missed: the reads deliver it, then this one
                continue
            self._last = seq
            return self._message(seq, headers, msg.data)

    def _message(self, seq: int, headers: dict[str, str], data: bytes) -> TopicMessage:
        return TopicMessage(
            topic=self.topic,
            seq=seq,
            pod=headers.get(p.POD_HEADER, ""),
            data=data,
            is_json=headers.get(p.TYPE_HEADER) == p.JSON_TYPE,
        )

    async def _read_after(self, last: int) -> TopicMessage | None:
        """The topic's first message after `last`, from the stream's leader; None: none yet."""
        bus = self._bus
        body = msgspec.json.encode(
            {"seq": last + 1, "next_by_subj": p.topic_subject(bus.exp_id, self.topic)}
        )
        reply = await bus.request(
            f"$JS.API.STREAM.MSG.GET.{p.topics_stream(bus.exp_id)}",
            body,
            f"read topic {self.topic!r}",
        )
        try:
            answer = msgspec.json.decode(reply.data, type=_MsgGetReply)
            got = answer.message
            data = base64.b64decode(got.data or "") if got is not None else b""
            block = base64.b64decode(got.hdrs) if got is not None and got.hdrs else b""
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise TricksError(
                f"reading topic {self.topic!r}: not a stream message: {reply.data[:100]!r}"
            ) from exc
        if answer.error is not None:
            if answer.error.err_code == p.JS_NO_MESSAGE:
                return None  # nothing after `last`: up to date
            raise TricksError(f"reading topic {self.topic!r}: {answer.error.description}")
        if got is None or got.seq <= last:
            raise TricksError(f"reading topic {self.topic!r}: no message in {reply.data[:100]!r}")
        return self._message(got.seq, parse_headers(block)[1], data)

    async def close(self) -> None:
        """Stop listening; a call waiting for a message fails with `TricksError`."""
        if not self._closed:
            self._wake()
        self._stack.close()
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> TopicMessage:
        try:
            return await self.next()
        except TricksError:
            if self._closed:
                raise StopAsyncIteration from None
            raise

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def save(bus: Bus, path: Path, timeout: float = 60.0) -> int:
    """Every message of the run's topics, in the order stored, one JSON object per line in
    `path` (`{"seq", "topic", "pod", "time", "data"}`, see `synctopics.row`); how many. Nothing
    is written for a run without messages. One ordered consumer, `timeout` seconds at most."""
    from nats.js.api import DeliverPolicy

    from tricks_nats.synctopics import row

    stream, prefix = p.topics_stream(bus.exp_id), p.topic_subject(bus.exp_id, "")
    info = await bus.js.stream_info(stream)
    if not info.state.messages:
        return 0
    n = 0
    async with asyncio.timeout(timeout):
        sub = await bus.js.subscribe(
            p.topic_subject(bus.exp_id, "*"),
            stream=stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            with path.open("w") as f:
                while True:
                    msg = await sub.next_msg(timeout=None)
                    headers = msg.headers or {}
                    out = {
                        "topic": msg.subject.removeprefix(prefix),
                        "time": msg.metadata.timestamp.isoformat(),
                        **row(
                            msg.metadata.sequence.stream,
                            headers.get(p.POD_HEADER, ""),
                            msg.data,
                            headers.get(p.TYPE_HEADER) == p.JSON_TYPE,
                        ),
                    }
                    f.write(msgspec.json.encode(out).decode() + "\n")
                    n += 1
                    if not msg.metadata.num_pending:
                        return n
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
