"""NATS I/O for one experiment: connect, buckets, exactly-once increments, counts, rosters.

With topics.py (its topic operations), the only module that talks nats-py; every nats-py error
is translated here into ours.
Both the coordinator and the Python driver use it, so both speak drivers/PROTOCOL.md alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from tricks_nats import protocol as p
from tricks_nats import replication
from tricks_nats.endpoint import Endpoint as Endpoint  # re-exported: the bus's address
from tricks_nats.endpoint import Secret
from tricks_nats.errors import NatsUnavailable, PermissionDenied, TricksError, WaitTimeout
from tricks_nats.tasks import Tasks
from tricks_nats.topics import topics_config

log = logging.getLogger(__name__)
T = TypeVar("T")

PUBLISH_TIMEOUT_S = 2.0
#: How long a request keeps retrying while NATS restarts before the caller gets an error.
RECOVERY_S = 20.0
#: How long a request waits in all while NATS answers but the coordinator has not yet (a
#: registration while hundreds of pods start on a small machine).
PATIENCE_S = 300.0


async def connect(
    endpoint: Endpoint,
    *,
    name: str,
    exp: str | None = None,
    connect_timeout: float = 2.0,
    errors: list[BaseException] | None = None,
    budget: float = 1.5,
    keep_reconnecting: bool = True,
    on_error: Callable[[BaseException], None] | None = None,
    on_closed: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """Connect, trying again for `budget` seconds of wall time (a pod started while the server
    restarts must not fail); refused credentials are final at once. Raises NatsUnavailable
    with a clear reason (unreachable, refused login)."""
    last: list[BaseException] = errors if errors is not None else []

    async def error_cb(exc: Exception) -> None:
        last.append(exc)
        del last[:-50]  # keep the newest: a long run must not grow this without bound
        log.debug("nats %s: %s", name, exc)
        if on_error is not None:
            on_error(exc)

    async def on_disconnect() -> None:
        log.debug("nats %s: disconnected", name)

    options: dict[str, Any] = {
        "servers": [endpoint.url],
        "name": name,
        "connect_timeout": connect_timeout,
        "max_reconnect_attempts": 1,  # per try of ours (0 would make nats-py loop forever)
        "reconnect_time_wait": 0.2,
        "error_cb": error_cb,
        "disconnected_cb": on_disconnect,
        "allow_reconnect": True,
    }
    if on_closed is not None:
        options["closed_cb"] = on_closed
    if on_reconnect is not None:
        options["reconnected_cb"] = on_reconnect
    if endpoint.user:
        options["user"] = endpoint.user
        options["password"] = Secret(endpoint.password or "")  # kept in nc.options
    if exp:
        options["inbox_prefix"] = p.inbox_prefix(exp)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    pause = 0.1
    while True:
        try:
            nc = await nats.connect(**options)
            break
        except (nats.errors.NoServersError, OSError, TimeoutError, nats.errors.Error) as exc:
            refused = [e for e in last if "authorization" in str(e).lower()]
            if refused or loop.time() + pause >= deadline:
                reason = _reason(refused[0] if refused else last[-1] if last else exc)
                raise NatsUnavailable(f"cannot reach NATS at {endpoint.url}: {reason}") from exc
        await asyncio.sleep(pause)  # a backoff between attempts, not a wait for an event
        pause = min(pause * 2, 1.0)
    if keep_reconnecting:  # once up, a restarted server comes back on the same address
        nc.options["max_reconnect_attempts"] = -1
    return nc


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "authorization" in text.lower():
        return "credentials refused (authorization violation)"
    return text


class Bus:
    """One experiment's state in NATS: its counts, its rosters, its notifications."""

    def __init__(self, nc: Client, exp_id: str, errors: list[BaseException] | None = None) -> None:
        self.nc = nc
        self.exp_id = exp_id
        self.js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self._pods: KeyValue | None = None
        #: Asynchronous errors the server sent this connection (e.g. permission violations).
        self.errors = errors if errors is not None else []
        #: Called (as tasks) after a reconnect: what a server restart may have lost is redone.
        self._reconnect_hooks: list[Callable[[], Awaitable[None]]] = []
        #: Reconnect hooks running, and requests being answered (`serve`).
        self._tasks = Tasks()
        #: Set when NATS is known to be gone for good: every call then fails at once.
        self.gone: str | None = None
        #: Requests in flight by subject (lowercased, as the server's errors name it), so a
        #: permissions violation fails its request at once instead of after the retries.
        self._in_flight: dict[str, set[asyncio.Task[Any]]] = {}
        self._denied: dict[asyncio.Task[Any], str] = {}
        #: Notifications waited for: a close ends those waits with an error.
        self._arrivals: set[asyncio.Future[Msg | None]] = set()
        #: Requests waiting for an answer, by the last token of their reply subject.
        self._replies: dict[str, asyncio.Future[Msg]] = {}
        self._reply_sub: tuple[str, Any] | None = None
        self._close_hooks: list[Callable[[], None]] = []

    @classmethod
    async def open(
        cls,
        endpoint: Endpoint,
        exp: str,
        *,
        name: str,
        budget: float = 1.5,
        keep_reconnecting: bool = True,
        on_closed: Callable[[], Awaitable[None]] | None = None,
    ) -> Bus:
        """Connect for one experiment (`budget`: seconds to keep trying; an observer that
        must not wait for a server that went away passes 0 and keep_reconnecting=False)."""
        errors: list[BaseException] = []
        holder: list[Bus] = []

        async def reconnected() -> None:
            if holder:
                holder[0].after_reconnect()

        def on_error(exc: BaseException) -> None:
            if holder:
                holder[0]._on_async_error(exc)

        nc = await connect(
            endpoint,
            name=name,
            exp=exp,
            errors=errors,
            budget=budget,
            keep_reconnecting=keep_reconnecting,
            on_error=on_error,
            on_closed=on_closed,
            on_reconnect=reconnected,
        )
        bus = cls(nc, exp, errors)
        holder.append(bus)
        return bus

    def server_version(self) -> str | None:
        """The version the NATS server announced (for a run's provenance)."""
        version = self.nc._server_info.get("version")
        return str(version) if version else None

    def after_reconnect(self) -> None:
        log.info("reconnected to NATS; catching up")
        for hook in list(self._reconnect_hooks):
            self._tasks.spawn(self._run_hook(hook))

    @contextlib.contextmanager
    def on_reconnect(self, hook: Callable[[], Awaitable[None]]) -> Iterator[None]:
        """Run `hook` after every reconnect while the block lasts."""
        self._reconnect_hooks.append(hook)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):  # close() may have cleared the list
                self._reconnect_hooks.remove(hook)

    @contextlib.contextmanager
    def on_close(self, hook: Callable[[], None]) -> Iterator[None]:
        """Call `hook` when the connection closes (a subscription waiting ends), while the
        block lasts."""
        self._close_hooks.append(hook)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                self._close_hooks.remove(hook)

    @staticmethod
    async def _run_hook(hook: Callable[[], Awaitable[None]]) -> None:
        try:
            await hook()
        except Exception as exc:
            log.warning("catching up after a reconnect failed: %s", exc)

    def mark_gone(self, reason: str) -> None:
        """NATS will not come back (the embedded server was given up on): fail fast."""
        if self.gone is None:
            log.warning("NATS is gone for good: %s", reason)
            self.gone = reason

    async def close(self) -> None:
        """Close the connection; errors on the way out (a dead server) are logged, not raised."""
        self._reconnect_hooks.clear()
        for hook in list(self._close_hooks):
            hook()
        for arrival in self._arrivals:
            if not arrival.done():
                arrival.set_exception(TricksError("the driver was closed while waiting"))
        await self._tasks.cancel()
        try:
            if self.gone is None and self.nc.is_connected:
                await asyncio.wait_for(self.nc.drain(), PUBLISH_TIMEOUT_S)
        except Exception as exc:
            log.debug("draining the NATS connection: %s", exc)
        try:
            if not self.nc.is_closed:
                await self.nc.close()
        except Exception as exc:  # e.g. ConnectionResetError flushing to a dead server
            log.debug("closing the NATS connection: %s", exc)
            await _abandon(self.nc)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """A task that ends with this connection at the latest (`close` cancels it)."""
        return self._tasks.spawn(coro, name=name)

    # -- plain messages -------------------------------------------------------------------

    async def publish(self, subject: str, body: bytes) -> None:
        """Fire and forget (core NATS); buffered by the client while it reconnects."""
        await self.nc.publish(subject, body)

    async def flush(self, timeout: float = PUBLISH_TIMEOUT_S) -> None:
        await self.nc.flush(timeout=max(1, round(timeout)))

    async def serve(
        self,
        subject: str,
        handler: Callable[[str, dict[str, str]], Awaitable[bytes]],
        *,
        concurrency: int = 256,
    ) -> None:
        """Answer requests on `subject`: `handler(subject, headers) -> reply body`, many at
        once (each in its own task, at most `concurrency`), so a slow one never holds back
        the rest. A handler that raises is logged and the request gets no reply (the
        requester retries)."""
        slots = asyncio.Semaphore(concurrency)

        async def answer(msg: Msg) -> None:
            async with slots:
                try:
                    body = await handler(msg.subject, dict(msg.headers or {}))
                    if msg.reply:
                        await self.nc.publish(msg.reply, body)
                except Exception as exc:
                    log.warning("request on %r not answered: %s", msg.subject, exc)

        async def on_msg(msg: Msg) -> None:
            self._tasks.spawn(answer(msg))

        await self.nc.subscribe(subject, cb=on_msg)

    async def take(self, subject: str, handler: Callable[[Request], Awaitable[None]]) -> None:
        """Requests on `subject`, handed to `handler` one at a time as they arrive, on the
        connection's own task: the handler must not wait for anything (it queues what takes
        time and answers later with `publish(request.reply, body)`)."""

        async def on_msg(msg: Msg) -> None:
            await handler(Request(msg.subject, msg.headers or {}, msg.reply))

        await self.nc.subscribe(subject, cb=on_msg)

    # -- streams ----------------------------------------------------------------------------

    async def follow(
        self,
        subject: str,
        handler: Callable[[StreamMsg], Awaitable[None]],
        *,
        new_only: bool = False,
        resume: bool = True,
    ) -> Follower:
        """Every message of the stream that holds `subject`, in order, once each (an ordered
        consumer), from the first (or, with `new_only`, from now on). With `resume`, a
        reconnect follows the stream again from the first message not yet handled (the
        server may have restarted and lost the consumer)."""
        follower = Follower(self, subject, handler, resume=resume)
        await follower.start(new_only)
        return follower

    # -- buckets (coordinator) ------------------------------------------------------------

    async def create_buckets(self) -> None:
        """Create this experiment's streams and buckets on file storage, each kept by as many
        servers as `replication.choose` says (3 on a cluster, else 1); idempotent."""
        counts = p.counts_bucket(self.exp_id)
        plan = replication.choose(self.nc._server_info)
        replicas = plan.tries[0]
        try:
            while True:  # the first stream settles how many copies JetStream can keep
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
                            num_replicas=replicas,
                        )
                    )
                    break
                except nats.js.errors.APIError as exc:
                    lower = plan.lower(replicas, exc.err_code)
                    if lower is None:
                        raise
                    log.warning("JetStream cannot keep %d replicas: %s", replicas, exc.description)
                    replicas = lower
            log.info("the experiment's streams have %d replica(s): %s", replicas, plan.reason)
            self._pods = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=p.pods_bucket(self.exp_id),
                    history=1,
                    storage=StorageType.FILE,
                    direct=True,
                    replicas=replicas,
                )
            )
            await self.js.add_stream(
                StreamConfig(
                    name=p.journal_stream(self.exp_id),
                    subjects=[p.journal_subject(self.exp_id)],
                    storage=StorageType.FILE,
                    max_msg_size=64 * 1024,
                    num_replicas=replicas,
                )
            )
            await self.js.add_stream(
                StreamConfig(
                    name=p.metrics_stream(self.exp_id),
                    subjects=[p.metrics_subject(self.exp_id)],
                    storage=StorageType.FILE,
                    duplicate_window=p.DUPLICATE_WINDOW_S,
                    max_msg_size=p.MAX_BATCH_BYTES,
                    max_bytes=p.METRICS_STREAM_BYTES,
                    discard=DiscardPolicy.NEW,
                    num_replicas=replicas,
                )
            )
            await self.js.add_stream(topics_config(self.exp_id, replicas))
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            where = f" ({replicas} replicas: {plan.reason})" if replicas > 1 else ""
            raise TricksError(f"cannot create the experiment's buckets{where}: {exc}") from exc

    async def delete_buckets(self) -> None:
        streams = [
            p.stream_of(p.counts_bucket(self.exp_id)),
            p.stream_of(p.pods_bucket(self.exp_id)),
            p.journal_stream(self.exp_id),
            p.metrics_stream(self.exp_id),
            p.topics_stream(self.exp_id),
        ]
        for stream in streams:
            try:
                await self.js.delete_stream(stream)
            except (nats.js.errors.Error, nats.errors.Error) as exc:
                log.debug("deleting stream %s: %s", stream, exc)

    # -- counts ---------------------------------------------------------------------------

    async def register(self, event: str, *, msg_id: str, pod: str | None = None) -> int:
        """A pod's registration: ask the coordinator to add one to `event` (exactly once
        however often this request is retried: it keeps `msg_id`). Returns the count right
        after it."""
        p.check_name(event)
        subject = p.event_subject(self.exp_id, event)
        headers = _headers(msg_id, pod)
        reply = await self.request(subject, b"", f"register event {event!r}", headers)
        try:
            answer = msgspec.json.decode(reply.data, type=p.EventReply)
            value = int(answer.val) if answer.val is not None else None
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            answer, value = p.EventReply(), None
        if answer.error:
            raise TricksError(f"registering {event!r} refused: {answer.error.description}")
        if value is None:
            raise TricksError(f"registering {event!r}: no count in the reply {reply.data[:100]!r}")
        return value

    async def store_batch(self, pod: str, body: bytes, msg_id: str) -> str | None:
        """A pod's batch of samples into the metrics stream (retried like every request, under
        one message id: stored once). None when stored, else why the stream refused it."""
        subject = p.metrics_subject(self.exp_id, pod)
        headers = {p.MSG_ID_HEADER: msg_id}
        reply = await self.request(subject, body, "send metrics", headers)
        try:
            ack = msgspec.json.decode(reply.data, type=p.PubAckOrError)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return f"not an acknowledgement: {reply.data[:100]!r}"
        if ack.error:
            return ack.error.description or f"error {ack.error.code}"
        return None

    async def increment(
        self, event: str, *, msg_id: str | None = None, pod: str | None = None, by: int = 1
    ) -> int:
        """The coordinator's write: add exactly `by` to `event` in the counts stream (a retried
        publish with the same `msg_id` counts once). Returns the count right after it (from
        the ack, or for a duplicate, read back from the original message)."""
        p.check_name(event)
        headers = {p.INCR_HEADER: str(by), **_headers(msg_id or f"c.{secrets.token_hex(12)}", pod)}
        subject = p.count_subject(self.exp_id, event)
        ack = await self.stored_publish(subject, b"", headers, f"increment of {event!r}")
        if ack.error:
            raise TricksError(f"increment of {event!r} refused: {ack.error.description}")
        if ack.val is not None:
            return int(ack.val)
        return await self._value_at(ack.seq, event)

    async def stored_publish(
        self, subject: str, body: bytes, headers: dict[str, str], what: str
    ) -> p.PubAckOrError:
        """A JetStream publish as a request (section 6's retries, one message id): the
        stream's acknowledgement, or its error. While JetStream says an earlier attempt with
        this id is still being applied (a stream whose leader just changed), it asks again:
        the answer then is that attempt's outcome, as a duplicate."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECOVERY_S
        pause = 0.02
        while True:
            reply = await self.request(subject, body, what, headers)
            try:
                ack = msgspec.json.decode(reply.data, type=p.PubAckOrError)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise TricksError(
                    f"{what}: the reply is not a JetStream acknowledgement: {reply.data[:100]!r}"
                ) from exc
            if not ack.error or ack.error.err_code != p.JS_ID_IN_PROCESS:
                return ack
            if loop.time() + pause >= deadline:
                raise NatsUnavailable(f"{what}: {ack.error.description}")
            await asyncio.sleep(pause)  # a backoff between attempts, not a wait for an event
            pause = min(pause * 2, 1.0)

    async def request(
        self, subject: str, payload: bytes, what: str, headers: dict[str, str] | None = None
    ) -> Msg:
        """A request that rides out a restarting server (see `ride_out`); the same payload,
        headers and reply subject every attempt, so a retried registration keeps its message
        id and counts once, and an answer to an earlier attempt still ends the call (a busy
        coordinator may answer after one attempt's timeout: with a reply subject per attempt,
        no answer would ever be taken). A permissions violation for `subject` fails it at once.
        """
        key = subject.lower()  # nats-py reports the subject of a violation lowercased
        replies = await self._reply_prefix()
        token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        self._replies[token] = loop.create_future()

        async def attempt() -> Msg:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.setdefault(key, set()).add(task)
            try:
                await self.nc.publish(subject, payload, reply=f"{replies}.{token}", headers=headers)
                answer = self._replies[token]
                try:
                    msg = await asyncio.wait_for(asyncio.shield(answer), PUBLISH_TIMEOUT_S)
                except TimeoutError:
                    raise nats.errors.TimeoutError from None
                if msg.headers and msg.headers.get("Status") == "503":
                    self._replies[token] = loop.create_future()  # for the next attempt
                    raise nats.errors.NoRespondersError
                return msg
            except asyncio.CancelledError:
                if self._denied.pop(task, None) is not None:
                    task.uncancel()
                    raise self._denial(subject) from None
                raise
            except nats.errors.TimeoutError:
                self._raise_if_denied(subject)
                raise
            finally:
                waiting = self._in_flight.get(key)
                if waiting is not None:
                    waiting.discard(task)
                    if not waiting:
                        del self._in_flight[key]

        try:
            return await self.ride_out(what, attempt)
        finally:
            self._replies.pop(token).cancel()

    async def _reply_prefix(self) -> str:
        """One subscription for the replies of every request of this connection."""
        if self._reply_sub is None:
            prefix = self.nc.new_inbox()

            async def on_reply(msg: Msg) -> None:
                answer = self._replies.get(msg.subject.rsplit(".", 1)[-1])
                if answer is not None and not answer.done():
                    answer.set_result(msg)

            self._reply_sub = (prefix, await self.nc.subscribe(f"{prefix}.*", cb=on_reply))
        return self._reply_sub[0]

    def _on_async_error(self, exc: BaseException) -> None:
        """A permissions violation names its subject: fail the requests waiting on it now."""
        text = str(exc).lower()
        if "permissions violation" not in text:
            return
        for key, tasks in list(self._in_flight.items()):
            if f'"{key}"' in text or f"'{key}'" in text or text.endswith(key):
                for task in tasks:
                    if task not in self._denied:
                        self._denied[task] = key
                        task.cancel()

    def _denial(self, subject: str) -> PermissionDenied:
        return PermissionDenied(
            f"NATS refused {subject!r}: these credentials do not reach "
            f"experiment {self.exp_id!r} (permissions violation)"
        )

    async def ride_out(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it succeeds, retrying while the connection is re-established,
        while a restarted server is still loading its streams (it answers "no responders" for
        a moment), and while the coordinator is busy (its experiment is there, it has not
        answered yet: 200 pods starting on 2 cores).

        Final: JetStream says the experiment does not exist, a closed connection, NATS known
        to be gone for good, RECOVERY_S (wall time) in which NATS itself did not answer, or
        PATIENCE_S in all."""
        loop = asyncio.get_running_loop()
        first = loop.time()
        deadline = first + RECOVERY_S
        pause = 0.05
        while True:
            if self.gone is not None:
                raise NatsUnavailable(f"cannot {what}: NATS is gone ({self.gone})")
            unanswered = True  # NATS is up but nobody answered (else: the connection broke)
            try:
                return await attempt()
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError) as exc:
                last: BaseException = exc
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                last = exc
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
                raise _unavailable(what, exc) from exc
            except OSError as exc:  # a write on a socket the server just reset
                last, unanswered = exc, False
            if unanswered and self.nc.is_connected:
                there = await self._experiment_there()
                if there is False:
                    raise TricksError(
                        f"experiment {self.exp_id!r} is not running on this NATS (no counts bucket)"
                    ) from last
                if there:  # NATS answers: only the coordinator is slow; keep waiting for it
                    deadline = min(first + PATIENCE_S, max(deadline, loop.time() + RECOVERY_S))
            if self.nc.is_closed or loop.time() + pause >= deadline:
                raise _unavailable(what, last)
            log.debug("%s: %s; retrying", what, last)
            await asyncio.sleep(pause)  # a backoff between attempts, not a wait for an event
            pause = min(pause * 2, 1.0)

    async def _experiment_there(self) -> bool | None:
        """Whether JetStream has this experiment's counts: True, False (it answered 404), or
        None when it does not answer (a restart in progress)."""
        stream = p.stream_of(p.counts_bucket(self.exp_id))
        try:
            reply = await self.nc.request(
                f"$JS.API.STREAM.INFO.{stream}", b"", timeout=PUBLISH_TIMEOUT_S
            )
        except nats.errors.Error:
            return None
        try:
            info = msgspec.json.decode(reply.data, type=p.ApiReply)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if info.error is None:
            return True
        return False if info.error.code == 404 else None

    def _raise_if_denied(self, subject: str) -> None:
        """A violation that arrived before the request was registered as in flight."""
        for exc in self.errors:
            text = str(exc).lower()
            if "permissions violation" in text and subject.lower() in text:
                raise self._denial(subject)

    async def _value_at(self, seq: int, event: str) -> int:
        """The total right after the message at `seq` (the original of a duplicate publish)."""
        stream = p.stream_of(p.counts_bucket(self.exp_id))
        reply = await self.request(
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
        stream = p.stream_of(p.counts_bucket(self.exp_id))
        subject = f"$JS.API.DIRECT.GET.{stream}.{p.count_subject(self.exp_id, event)}"
        reply = await self.request(subject, b"", f"read event {event!r}")
        if _not_found(reply):
            return 0
        value = p.parse_count(reply.data)
        if value is None:
            log.warning("ignoring a malformed count for %r: %r", event, reply.data[:100])
            return 0
        return value

    async def wait_count(
        self,
        event: str,
        value: int,
        timeout: float | None = None,
        read: Callable[[], Awaitable[int]] | None = None,
        notices: list[bytes] | None = None,
    ) -> int:
        """Return once `event` has reached `value`; resolves by subscription, never polling.

        Subscribe to the coordinator's one-shot notification first, then read the count: an
        increment between the two is caught by the subscription, one before by the read. The
        notification ends the wait with the count its body states, when that is `>= value`:
        only the coordinator may publish it (the pods' permissions), and whoever could forge
        it could as well forge the count itself, so reading the count again would prove
        nothing (it would cost every waiter of a barrier a JetStream read at release). A body
        that does not state such a count (garbage) is answered by reading the count: below
        `value`, the wait goes on.

        The release path is kept short, since a barrier releases all its waiters at once:
        the notification resolves a future straight from the connection's reader (no task
        per subscription, no callback), and the server drops the interest by itself after
        that one message (UNSUB with a limit of 1, sent with the SUB).

        `read` is the first read of the count (a barrier registers there: its reply is the
        count right after); later reads are direct gets. `notices`, when given, gets the body
        of the notification that ended the wait (a discover takes a roster from it).

        A `timeout` of 0 (or less) looks once and subscribes to nothing: a wait cancelled
        inside nats-py's flush would leave the connection broken (nats.py issue 624).
        """
        first = read or (lambda: self.count(event))
        if timeout is not None and timeout <= 0:
            now = await first()
            if now >= value:
                return now
            raise WaitTimeout(
                f"timed out after {timeout:g}s waiting for {event!r} to reach {value} (it is {now})"
            )
        try:
            async with asyncio.timeout(timeout):
                while True:
                    seen = await self._wait_notified(event, value, first, notices)
                    if seen >= value:
                        return seen
                    log.warning("a notification for %r = %d, but it is %d", event, value, seen)
                    first = lambda: self.count(event)  # noqa: E731
        except TimeoutError as exc:
            now = await self.count(event)
            if now >= value:
                return now
            raise WaitTimeout(
                f"timed out after {timeout:g}s waiting for {event!r} to reach {value} (it is {now})"
            ) from exc

    async def barrier(
        self, event: str, value: int, *, msg_id: str, pod: str | None, timeout: float | None
    ) -> int:
        """Register `event`, then wait until it reaches `value` (Testground's signal and wait)
        with one request and one notification: the subscription goes out before the
        registration, so the registration's reply is the first read of the count."""
        registered = False

        async def register_then_count() -> int:
            nonlocal registered
            if registered:
                return await self.count(event)
            total = await self.register(event, msg_id=msg_id, pod=pod)
            registered = True
            return total

        return await self.wait_count(event, value, timeout, read=register_then_count)

    async def _wait_notified(
        self,
        event: str,
        value: int,
        read: Callable[[], Awaitable[int]],
        notices: list[bytes] | None = None,
    ) -> int:
        """One subscription: the count once it is >= value, or as read after a notification.

        No flush between subscribing and reading: a server handles one connection's commands
        in order, so the SUB is in place before the read's request is served (and after a
        reconnect, nats-py sends its SUBs before anything buffered)."""
        arrived: asyncio.Future[Msg | None] = asyncio.get_running_loop().create_future()
        sub = await self.nc.subscribe(p.reached_subject(self.exp_id, event, value), future=arrived)
        self._arrivals.add(arrived)

        async def recheck() -> None:  # a notification sent while we were away is lost
            if not arrived.done() and await self.count(event) >= value and not arrived.done():
                await _unsubscribe(sub)  # first, so no message can reach the future after
                if not arrived.done():
                    arrived.set_result(None)

        try:
            with self.on_reconnect(recheck):
                await sub.unsubscribe(limit=1)
                current = await read()
                if current >= value:
                    return current
                notice = await arrived
                told = None if notice is None else p.reached_value(notice.data, event)
                if told is not None and told >= value:
                    if notices is not None and notice is not None:
                        notices.append(notice.data)
                    return told  # only the coordinator may publish it (see the docstring)
                return await self.count(event)
        finally:
            self._arrivals.discard(arrived)
            delivered = (
                arrived.done()
                and not arrived.cancelled()
                and arrived.exception() is None
                and arrived.result() is not None
            )
            if not delivered:  # the server still holds our interest: drop it
                arrived.cancel()  # no-op when done; a message arriving now is dropped by nats-py
                await _unsubscribe(sub)

    # -- rosters --------------------------------------------------------------------------

    async def pods(self) -> KeyValue:
        if self._pods is None:
            bucket = p.pods_bucket(self.exp_id)
            try:
                self._pods = await self.ride_out(
                    "open the pods bucket", lambda: self.js.key_value(bucket)
                )
            except nats.js.errors.NotFoundError as exc:
                raise TricksError(
                    f"experiment {self.exp_id!r} is not running on this NATS (no pods bucket)"
                ) from exc
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                raise _unavailable("open the pods bucket", exc) from exc
        return self._pods

    async def put_roster(self, roster: p.Roster) -> None:
        """The coordinator's write of a tag's running pods."""
        kv = await self.pods()
        value = msgspec.json.encode(roster)
        await self.ride_out(f"record the pods of {roster.tag!r}", lambda: kv.put(roster.tag, value))

    async def roster(self, tag: str) -> list[p.PodRecord]:
        """The running pods of `tag` now: one direct get, no consumer."""
        stream = p.stream_of(p.pods_bucket(self.exp_id))
        subject = f"$JS.API.DIRECT.GET.{stream}.{p.roster_subject(self.exp_id, tag)}"
        reply = await self.request(subject, b"", f"discover {tag!r}")
        if _not_found(reply) or not reply.data:
            return []
        try:
            return msgspec.json.decode(reply.data, type=p.Roster).records()
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring a malformed roster of %r: %r", tag, reply.data[:100])
            return []

    async def discover(
        self, tag: str, count: int | None = None, timeout: float | None = None
    ) -> list[p.PodRecord]:
        """The running pods of `tag`; with `count`, first wait until at least that many run.

        The coordinator writes a tag's roster before it counts `<tag>_start`, so: read the
        start count, then the roster (any start counted is in it); short of `count`, wait for
        as many more starts as are missing, and look again. O(1) messages per look. The
        notification that ends the wait may carry the roster (once all the tag's pods run):
        then it is the answer, with no read (PROTOCOL.md 6.4).
        """
        if count is None:
            return await self.roster(tag)
        live: list[p.PodRecord] = []
        if timeout is not None and timeout <= 0:  # look once (see wait_count)
            live = await self.roster(tag)
            if len(live) >= count:
                return live
            raise WaitTimeout(
                f"timed out after {timeout:g}s discovering {count} pods of "
                f"{tag!r} ({len(live)} running)"
            )
        try:
            async with asyncio.timeout(timeout):
                while True:
                    started = await self.count(p.start_event(tag))
                    live = await self.roster(tag)
                    if len(live) >= count:
                        return live
                    notices: list[bytes] = []
                    target = started + count - len(live)
                    await self.wait_count(p.start_event(tag), target, notices=notices)
                    carried = p.reached_roster(notices[-1], tag) if notices else None
                    if carried is not None and len(carried) >= count:
                        return carried
        except TimeoutError as exc:
            live = await self.roster(tag)  # the message says how many run now
            if len(live) >= count:
                return live
            raise WaitTimeout(
                f"timed out after {timeout:g}s discovering {count} pods of "
                f"{tag!r} ({len(live)} running)"
            ) from exc


@dataclass(frozen=True)
class Request:
    """A request as `Bus.take` hands it over: `reply` is empty when nobody waits for one."""

    subject: str
    headers: dict[str, str]
    reply: str


@dataclass(frozen=True)
class StreamMsg:
    """One stored message, as `Bus.follow` hands it over."""

    subject: str
    data: bytes
    headers: dict[str, str]
    #: Its sequence number in the stream (0 if the server did not say).
    seq: int


class Follower:
    """An ordered consumer of one stream that can pick up where it was (see Bus.follow)."""

    def __init__(
        self,
        bus: Bus,
        subject: str,
        handler: Callable[[StreamMsg], Awaitable[None]],
        *,
        resume: bool,
    ) -> None:
        self.bus = bus
        self.subject = subject
        self.handler = handler
        self.resume = resume
        #: The stream sequence of the last message handed over.
        self.last_seq = 0
        self._sub: Any = None

    async def start(self, new_only: bool) -> None:
        await self._subscribe(DeliverPolicy.NEW if new_only else DeliverPolicy.ALL, None)
        if self.resume:
            self.bus._reconnect_hooks.append(self._resubscribe)

    async def _subscribe(self, policy: DeliverPolicy, from_seq: int | None) -> None:
        config = ConsumerConfig(deliver_policy=policy)
        if from_seq is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq
            )
        self._sub = await self.bus.js.subscribe(
            self.subject, ordered_consumer=True, cb=self._on_msg, config=config, idle_heartbeat=2.0
        )

    async def _on_msg(self, msg: Msg) -> None:
        seq = 0
        with contextlib.suppress(Exception):  # a message without JetStream metadata
            seq = msg.metadata.sequence.stream
        self.last_seq = max(self.last_seq, seq)
        await self.handler(StreamMsg(msg.subject, msg.data, dict(msg.headers or {}), seq))

    async def _resubscribe(self) -> None:
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        await self.bus.ride_out(
            f"follow {self.subject!r} again",
            lambda: self._subscribe(DeliverPolicy.ALL, self.last_seq + 1),
        )

    async def stop(self) -> None:
        """Stop following; errors on the way (a dead server) are logged, not raised."""
        with contextlib.suppress(ValueError):  # close() may have cleared the hooks
            self.bus._reconnect_hooks.remove(self._resubscribe)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # closing anyway; nothing to recover
                log.debug("unsubscribing from %r: %s", self.subject, exc)


@dataclass(frozen=True)
class ExperimentState:
    """What a server holds of one experiment (`tricks-nats status`)."""

    experiment: str
    #: When its streams were created (Unix seconds), if the server said.
    created: float | None
    counts: dict[str, int]
    #: Its last `verdict` journal entry, as stored, if it has one.
    verdict_entry: bytes | None


async def survey(endpoint: Endpoint, only: str | None = None) -> list[ExperimentState]:
    """Every experiment the server at `endpoint` holds (or only `only`): one connection, one
    stream listing, then each experiment's counts and last verdict entry."""
    nc = await connect(endpoint, name="tricks-status", exp=only, budget=0)
    try:
        js = nc.jetstream()
        found = []
        for info in await js.streams_info():
            exp = p.experiment_of_stream(info.config.name or "")
            if exp is None or (only and exp != only):
                continue
            found.append(await _state_of(Bus(nc, exp), info.created))
        return found
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def _state_of(bus: Bus, created: Any) -> ExperimentState:
    counts: dict[str, int] = {}
    prefix = f"$KV.{p.counts_bucket(bus.exp_id)}."
    with contextlib.suppress(nats.js.errors.Error):
        stream = p.stream_of(p.counts_bucket(bus.exp_id))
        detail = await bus.js.stream_info(stream, subjects_filter=">")
        for subject in detail.state.subjects or {}:
            if subject.startswith(prefix):
                counts[subject[len(prefix) :]] = await bus.count(subject[len(prefix) :])
    verdict = None
    with contextlib.suppress(Exception):
        journal = p.journal_stream(bus.exp_id)
        last = await bus.js.get_last_msg(journal, p.journal_subject(bus.exp_id, "verdict"))
        verdict = last.data
    when = None
    if created:
        with contextlib.suppress(ValueError, TypeError):
            when = datetime.fromisoformat(str(created)).timestamp()
    return ExperimentState(bus.exp_id, when, counts, verdict)


def _headers(msg_id: str, pod: str | None) -> dict[str, str]:
    return {p.MSG_ID_HEADER: msg_id, **({p.POD_HEADER: pod} if pod else {})}


def _not_found(reply: Msg) -> bool:
    """A direct get's "no such message" (status 404 in the reply's header line)."""
    return bool(reply.headers) and reply.headers.get("Status") == "404"  # type: ignore[union-attr]


async def _abandon(nc: Client) -> None:
    """What nats-py's close() skips when it fails half-way: stop every subscription's task
    and drop the transport, so nothing of the connection outlives it."""
    tasks: list[asyncio.Task[None]] = []
    for sub in list(nc._subs.values()):
        task = sub._wait_for_msgs_task
        if task is not None and not task.done():
            task.cancel()
            tasks.append(task)
        for fut in (sub._pending_next_msgs_calls or {}).values():
            fut.cancel()
    nc._subs.clear()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        if nc._transport is not None:
            nc._transport.close()  # type: ignore[no-untyped-call]


async def _unsubscribe(sub: Any) -> None:
    """Unsubscribe unless that already happened (or the connection is gone)."""
    with contextlib.suppress(nats.errors.Error):
        await sub.unsubscribe()


def _unavailable(what: str, exc: BaseException | None) -> NatsUnavailable:
    return NatsUnavailable(f"cannot {what}: NATS did not answer ({exc or 'no reply'})")
