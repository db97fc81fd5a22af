"""NATS I/O for one experiment: connect, buckets, exactly-once increments, counts, pod records.

The only module that talks nats-py; every nats-py error is translated here into ours.
Both the coordinator and the Python driver use it, so both speak drivers/PROTOCOL.md alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from tricks_nats import protocol as p
from tricks_nats.errors import NatsUnavailable, TricksError, WaitTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")

PUBLISH_TIMEOUT_S = 2.0
#: How long a request keeps retrying while NATS restarts before the caller gets an error.
RECOVERY_S = 20.0


@dataclass(frozen=True)
class Endpoint:
    """Where NATS is and how to log in; `url` never carries the password."""

    url: str
    user: str | None = None
    password: str | None = None


async def connect(
    endpoint: Endpoint,
    *,
    name: str,
    exp: str | None = None,
    connect_timeout: float = 2.0,
    errors: list[BaseException] | None = None,
    attempts: int = 3,
    keep_reconnecting: bool = True,
    on_closed: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """Connect, or raise NatsUnavailable with a clear reason (unreachable, refused login)."""
    last: list[BaseException] = errors if errors is not None else []

    async def on_error(exc: Exception) -> None:
        last.append(exc)
        log.debug("nats %s: %s", name, exc)

    async def on_disconnect() -> None:
        log.debug("nats %s: disconnected", name)

    options: dict[str, Any] = {
        "servers": [endpoint.url],
        "name": name,
        "connect_timeout": connect_timeout,
        "max_reconnect_attempts": attempts,
        "reconnect_time_wait": 0.2,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "allow_reconnect": True,
    }
    if on_closed is not None:
        options["closed_cb"] = on_closed
    if on_reconnect is not None:
        options["reconnected_cb"] = on_reconnect
    if endpoint.user:
        options["user"] = endpoint.user
        options["password"] = endpoint.password or ""
    if exp:
        options["inbox_prefix"] = p.inbox_prefix(exp)
    try:
        nc = await nats.connect(**options)
    except (nats.errors.NoServersError, OSError, TimeoutError, nats.errors.Error) as exc:
        refused = [e for e in last if "authorization" in str(e).lower()]
        reason = _reason(refused[0] if refused else last[-1] if last else exc)
        raise NatsUnavailable(f"cannot reach NATS at {endpoint.url}: {reason}") from exc
    if keep_reconnecting:  # once up, a restarted server comes back on the same port
        nc.options["max_reconnect_attempts"] = -1
    return nc


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "authorization" in text.lower():
        return "credentials refused (authorization violation)"
    return text


class Bus:
    """One experiment's state in NATS: the counts bucket and the pods bucket."""

    def __init__(self, nc: Client, exp: str, errors: list[BaseException] | None = None) -> None:
        self.nc = nc
        self.exp = exp
        self.js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self._pods: KeyValue | None = None
        #: Asynchronous errors the server sent this connection (e.g. permission violations).
        self.errors = errors if errors is not None else []
        #: Called (as tasks) after a reconnect: what a server restart may have lost is redone.
        self.reconnect_hooks: list[Callable[[], Awaitable[None]]] = []
        self._hook_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, endpoint: Endpoint, exp: str, *, name: str) -> Bus:
        errors: list[BaseException] = []
        holder: list[Bus] = []

        async def reconnected() -> None:
            if holder:
                holder[0].after_reconnect()

        nc = await connect(endpoint, name=name, exp=exp, errors=errors, on_reconnect=reconnected)
        bus = cls(nc, exp, errors)
        holder.append(bus)
        return bus

    def after_reconnect(self) -> None:
        log.info("reconnected to NATS; catching up")
        for hook in list(self.reconnect_hooks):
            task = asyncio.create_task(self._run_hook(hook))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    @staticmethod
    async def _run_hook(hook: Callable[[], Awaitable[None]]) -> None:
        try:
            await hook()
        except Exception as exc:
            log.warning("catching up after a reconnect failed: %s", exc)

    async def close(self) -> None:
        self.reconnect_hooks.clear()
        for task in list(self._hook_tasks):
            task.cancel()
        await asyncio.gather(*self._hook_tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.nc.drain()
        if not self.nc.is_closed:
            await self.nc.close()

    # -- buckets (coordinator) ------------------------------------------------------------

    async def create_buckets(self) -> None:
        """Create this experiment's buckets on file storage; idempotent."""
        counts = p.counts_bucket(self.exp)
        try:
            await self.js.add_stream(
                StreamConfig(
                    name=p.stream_of(counts),
                    subjects=[f"$KV.{counts}.>"],
                    allow_msg_counter=True,
                    allow_direct=True,
                    storage=StorageType.FILE,
                    duplicate_window=p.DUPLICATE_WINDOW_S,
                    max_msg_size=4096,
                )
            )
            self._pods = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=p.pods_bucket(self.exp),
                    history=1,
                    storage=StorageType.FILE,
                    max_value_size=4096,
                    direct=True,
                )
            )
            await self.js.add_stream(
                StreamConfig(
                    name=p.journal_stream(self.exp),
                    subjects=[p.journal_subject(self.exp)],
                    storage=StorageType.FILE,
                    max_msg_size=64 * 1024,
                )
            )
        except nats.js.errors.Error as exc:
            raise TricksError(f"cannot create the experiment's buckets: {exc}") from exc

    async def delete_buckets(self) -> None:
        streams = [
            p.stream_of(p.counts_bucket(self.exp)),
            p.stream_of(p.pods_bucket(self.exp)),
            p.journal_stream(self.exp),
        ]
        for stream in streams:
            with contextlib.suppress(nats.js.errors.Error, nats.errors.Error):
                await self.js.delete_stream(stream)

    async def pods(self) -> KeyValue:
        if self._pods is None:
            bucket = p.pods_bucket(self.exp)
            try:
                self._pods = await self.ride_out(
                    "open the pods bucket", lambda: self.js.key_value(bucket)
                )
            except nats.js.errors.NotFoundError as exc:
                raise TricksError(
                    f"experiment {self.exp!r} is not running on this NATS (no pods bucket)"
                ) from exc
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                raise _unavailable("open the pods bucket", exc) from exc
        return self._pods

    # -- counts ---------------------------------------------------------------------------

    async def increment(
        self, event: str, *, msg_id: str | None = None, pod: str | None = None
    ) -> int:
        """Add one to `event`, exactly once however often the publish is retried.

        Returns the count right after this increment (known from the ack, or for a retried
        publish that turned out to be a duplicate, read back from the original message).
        """
        if not p.NAME_RE.match(event):
            raise TricksError(f"bad event name {event!r}: letters, digits, '-' or '_' only")
        headers = {
            p.INCR_HEADER: "1",
            p.MSG_ID_HEADER: msg_id
            or p.event_msg_id(self.exp, pod or "anonymous", event, secrets.token_hex(8)),
        }
        if pod:
            headers[p.POD_HEADER] = pod
        subject = p.count_subject(self.exp, event)
        reply = await self._request(subject, b"", f"register event {event!r}", headers)
        try:
            ack = msgspec.json.decode(reply.data, type=p.PubAckOrError)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TricksError(
                f"increment of {event!r}: the reply is not a JetStream "
                f"acknowledgement: {reply.data[:100]!r}"
            ) from exc
        if ack.error:
            raise TricksError(f"increment of {event!r} refused: {ack.error.description}")
        if ack.val is not None:
            return int(ack.val)
        return await self._value_at(ack.seq, event)

    async def _request(
        self, subject: str, payload: bytes, what: str, headers: dict[str, str] | None = None
    ) -> Msg:
        """A request to JetStream that rides out a restarting server (see `ride_out`); the
        same payload and headers every attempt, so a retried increment keeps its message id
        and counts once."""

        async def attempt() -> Msg:
            try:
                return await self.nc.request(
                    subject, payload, timeout=PUBLISH_TIMEOUT_S, headers=headers
                )
            except nats.errors.TimeoutError:
                self._raise_if_denied(subject)
                raise

        return await self.ride_out(what, attempt)

    async def ride_out(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it succeeds, retrying while the connection is re-established
        and while a restarted server is still loading its streams (it answers "no responders"
        for a moment). Only a stream that JetStream says does not exist, a closed connection,
        or RECOVERY_S without an answer is final."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECOVERY_S
        pause = 0.05
        while True:
            try:
                return await attempt()
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError) as exc:
                last: BaseException = exc
                if await self._counts_stream_missing():
                    raise TricksError(
                        f"experiment {self.exp!r} is not running on this NATS (no counts bucket)"
                    ) from exc
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                last = exc
            except nats.errors.ConnectionClosedError as exc:
                raise _unavailable(what, exc) from exc
            if self.nc.is_closed or loop.time() + pause >= deadline:
                raise _unavailable(what, last)
            log.debug("%s: %s; retrying", what, last)
            await asyncio.sleep(pause)  # a backoff between attempts, not a wait for an event
            pause = min(pause * 2, 1.0)

    async def _counts_stream_missing(self) -> bool:
        """True only when JetStream answers that the counts stream does not exist."""
        stream = p.stream_of(p.counts_bucket(self.exp))
        try:
            reply = await self.nc.request(
                f"$JS.API.STREAM.INFO.{stream}", b"", timeout=PUBLISH_TIMEOUT_S
            )
        except nats.errors.Error:
            return False  # JetStream itself is not answering yet: a restart in progress
        try:
            info = msgspec.json.decode(reply.data, type=p.ApiReply)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return info.error is not None and info.error.code == 404

    def _raise_if_denied(self, subject: str) -> None:
        """The server refuses a forbidden publish with an async error, not a reply."""
        for exc in self.errors:
            text = str(exc).lower()  # nats-py reports the subject lowercased
            if "permissions violation" in text and subject.lower() in text:
                raise TricksError(
                    f"NATS refused {subject!r}: these credentials do not reach "
                    f"experiment {self.exp!r} (permissions violation)"
                )

    async def _value_at(self, seq: int, event: str) -> int:
        """The total right after the message at `seq` (the original of a duplicate publish)."""
        stream = p.stream_of(p.counts_bucket(self.exp))
        reply = await self._request(
            f"$JS.API.DIRECT.GET.{stream}",
            msgspec.json.encode({"seq": seq}),
            "read back a duplicate increment",
        )
        value = p.parse_count(reply.data)
        if value is None:
            # The original is gone (a purged stream): the current total is the best answer.
            log.warning("message %d of %s is gone; reporting the current count", seq, stream)
            return await self.count(event)
        return value

    async def count(self, event: str) -> int:
        """The current count of `event` (0 when never registered)."""
        stream = p.stream_of(p.counts_bucket(self.exp))
        subject = f"$JS.API.DIRECT.GET.{stream}.{p.count_subject(self.exp, event)}"
        reply = await self._request(subject, b"", f"read event {event!r}")
        if reply.headers and reply.headers.get("Status") == "404":
            return 0
        value = p.parse_count(reply.data)
        if value is None:
            log.warning("ignoring a malformed count for %r: %r", event, reply.data[:100])
            return 0
        return value

    async def wait_count(self, event: str, value: int, timeout: float | None = None) -> int:
        """Return once `event` has reached `value`; resolves by subscription, never polling.

        Subscribe to the coordinator's one-shot notification first, then read the count: an
        increment between the two is caught by the subscription, one before by the read.

        The release path is kept short, since a barrier releases all its waiters at once:
        the notification resolves a future straight from the connection's reader (no task
        per subscription, no callback), and the server drops the interest by itself after
        that one message (UNSUB with a limit of 1, sent with the SUB), so nothing is sent
        on release.
        """
        arrived: asyncio.Future[Msg | None] = asyncio.get_running_loop().create_future()
        sub = await self.nc.subscribe(p.reached_subject(self.exp, event, value), future=arrived)

        async def recheck() -> None:  # a notification sent while we were away is lost
            if not arrived.done() and await self.count(event) >= value and not arrived.done():
                await _unsubscribe(sub)  # first, so no message can reach the future after
                if not arrived.done():
                    arrived.set_result(None)

        self.reconnect_hooks.append(recheck)
        try:
            await sub.unsubscribe(limit=1)
            # The server has our interest before we read (retried across a reconnect, whose
            # resubscription nats-py sends ahead of anything else).
            await self.ride_out(
                f"wait for {event!r}",
                lambda: self.nc.flush(timeout=max(1, round(PUBLISH_TIMEOUT_S))),
            )
            current = await self.count(event)
            if current >= value:
                return current
            try:
                async with asyncio.timeout(timeout):
                    await arrived
            except TimeoutError as exc:
                now = await self.count(event)
                if now >= value:
                    return now
                raise WaitTimeout(
                    f"timed out after {timeout:g}s waiting for {event!r} to "
                    f"reach {value} (it is {now})"
                ) from exc
            return max(value, current)
        finally:
            self.reconnect_hooks.remove(recheck)
            delivered = arrived.done() and not arrived.cancelled() and arrived.result() is not None
            if not delivered:  # the server still holds our interest: drop it
                arrived.cancel()  # no-op when done; a message arriving now is dropped by nats-py
                await _unsubscribe(sub)

    # -- pods -----------------------------------------------------------------------------

    async def put_pod(self, record: p.PodRecord) -> None:
        kv = await self.pods()
        key, value = p.pod_key(record.tag, record.pod_id), msgspec.json.encode(record)
        await self.ride_out(f"record pod {key}", lambda: kv.put(key, value))

    async def delete_pod(self, tag: str, pod_id: int) -> None:
        kv = await self.pods()
        key = p.pod_key(tag, pod_id)

        async def delete() -> None:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await kv.delete(key)

        await self.ride_out(f"remove pod {key}", delete)

    async def discover(
        self, tag: str, count: int | None = None, timeout: float | None = None
    ) -> list[p.PodRecord]:
        """The running pods of `tag`; with `count`, first wait until at least that many run.

        Follows the pods bucket with a KV watch; after a reconnect the watch starts over, since
        a restarted server may have lost it.
        """
        kv = await self.pods()
        live: dict[str, p.PodRecord] = {}
        restart = asyncio.Event()

        async def on_reconnect() -> None:
            restart.set()

        self.reconnect_hooks.append(on_reconnect)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    restart.clear()
                    live.clear()
                    if await self._watch_pods(kv, tag, count, live, restart):
                        return sorted(live.values(), key=lambda r: r.pod_id)
        except TimeoutError as exc:
            raise WaitTimeout(
                f"timed out after {timeout:g}s discovering {count} pods of "
                f"{tag!r} ({len(live)} running)"
            ) from exc
        finally:
            self.reconnect_hooks.remove(on_reconnect)

    async def _watch_pods(
        self,
        kv: KeyValue,
        tag: str,
        count: int | None,
        live: dict[str, p.PodRecord],
        restart: asyncio.Event,
    ) -> bool:
        """True once caught up with at least `count` pods; False when asked to restart."""
        try:
            watcher = await self.ride_out(f"discover {tag!r}", lambda: kv.watch(f"{tag}.*"))
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise _unavailable(f"discover {tag!r}", exc) from exc
        restarting = asyncio.ensure_future(restart.wait())
        caught_up = False
        try:
            while True:
                update = asyncio.ensure_future(watcher.updates(timeout=None))  # type: ignore[no-untyped-call]
                await asyncio.wait({update, restarting}, return_when=asyncio.FIRST_COMPLETED)
                if not update.done():
                    update.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await update
                    return False
                entry = update.result()
                if entry is None:
                    caught_up = True
                elif entry.operation in ("DEL", "PURGE") or not entry.value:
                    live.pop(entry.key, None)
                else:
                    try:
                        live[entry.key] = msgspec.json.decode(entry.value, type=p.PodRecord)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("ignoring a malformed pod record at %r", entry.key)
                if caught_up and (count is None or len(live) >= count):
                    return True
        finally:
            restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await restarting
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


async def _unsubscribe(sub: Any) -> None:
    """Unsubscribe unless that already happened (or the connection is gone)."""
    with contextlib.suppress(nats.errors.Error):
        await sub.unsubscribe()


def _unavailable(what: str, exc: BaseException | None) -> NatsUnavailable:
    return NatsUnavailable(f"cannot {what}: NATS did not answer ({exc or 'no reply'})")
