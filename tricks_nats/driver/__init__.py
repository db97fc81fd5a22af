"""The Python driver: what a pod uses to discover peers, register events and wait for counts.

Configured from the pod's environment alone (drivers/PROTOCOL.md). `Driver` is asyncio;
`SyncDriver` is the same API for plain blocking programs (it runs a private event loop in a
background thread, so the NATS connection stays alive between calls)::

    from tricks_nats.driver import SyncDriver
    with SyncDriver() as tricks:
        servers = tricks.discover("server", 6)
        tricks.register_event("server-connected")
        tricks.wait_event("server-connected", 6, timeout=60)

Timeouts are seconds (`None`: wait forever). Given arguments of the annotated types, a call
raises only `TricksError` and its subclasses: `ConfigError` (the environment),
`NatsUnavailable` (NATS away for 20 s, or the credentials refused), `PermissionDenied` (a
subject these credentials do not reach: a wrong EXP_ID), `UnknownTag` (`discover` of a tag not
in TRICKS_TAGS), `WaitTimeout` (a timeout ran out; also a `TimeoutError`). The reference, for
all three drivers: docs/api.md.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import secrets
import signal
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tricks_nats import podconfig
from tricks_nats.errors import (
    ConfigError,
    NatsUnavailable,
    PermissionDenied,
    TricksError,
    UnknownTag,
    WaitTimeout,
)
from tricks_nats.protocol import (
    PodRecord,
    check_name,
    check_tag_known,
    event_msg_id,
    pod_name,
    topic_msg_id,
)

__all__ = [
    "Config",
    "ConfigError",
    "Driver",
    "NatsUnavailable",
    "Peer",
    "PermissionDenied",
    "SyncDriver",
    "SyncSubscription",
    "TricksError",
    "UnknownTag",
    "WaitTimeout",
]

if TYPE_CHECKING:
    from tricks_nats.bus import Bus
    from tricks_nats.recorder import Recorder
    from tricks_nats.topics import Subscription, TopicMessage

Peer = PodRecord
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """A pod's identity and where its NATS is, read from the environment."""

    tag: str
    replicas: int
    pod_id: int
    experiment: str
    pod_ip: str
    nats_url: str
    nats_user: str | None = None
    #: A secret: never in a repr, a log line or an error message.
    nats_password: str | None = field(default=None, repr=False)
    #: The experiment's tags (TRICKS_TAGS); None when not given: discover then checks nothing.
    tags: tuple[str, ...] | None = None

    @property
    def pod(self) -> str:
        """The pod's name, `<tag>-<pod_id>` (e.g. `server-3`)."""
        return pod_name(self.tag, self.pod_id)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read from the environment (`os.environ` by default): PROTOCOL.md section 1."""
        return cls(**podconfig.read(environ))


class Driver:
    """The asyncio driver: `async with Driver() as tricks:` or `await Driver.connect()`.

    `Driver(config=None, *, record_buffer=None)` does not connect: `open()` does (`async
    with` and `connect()` call it). `config`: who the pod is, by default `Config.from_env()`
    (raises `ConfigError`). `record_buffer`: samples that may wait to be sent (default
    100,000); a sample recorded while that many wait is dropped and counted in `dropped`.
    """

    def __init__(self, config: Config | None = None, *, record_buffer: int | None = None) -> None:
        self.config = config or Config.from_env()
        self._bus: Bus | None = None
        self._recorder: Recorder | None = None
        self._record_buffer = record_buffer
        self._closed = False

    @classmethod
    async def connect(cls, config: Config | None = None) -> Driver:
        """A connected driver (`Driver(config)`, then `open()`); raises as `open()` does."""
        driver = cls(config)
        await driver.open()
        return driver

    async def open(self) -> None:
        """Connect to the experiment's NATS, riding out a server restart for 20 s.

        Raises `NatsUnavailable` (unreachable for 20 s, or the credentials refused).
        """
        from tricks_nats.bus import RECOVERY_S, Bus, Endpoint

        c = self.config
        # A pod may start while the server restarts: connecting rides that out too.
        bus = self._bus = await Bus.open(
            Endpoint(c.nats_url, c.nats_user, c.nats_password),
            c.experiment,
            name=f"tricks-{c.experiment}-{c.pod}",
            budget=RECOVERY_S,
        )
        from tricks_nats.recorder import CAPACITY, Recorder

        def send(body: bytes, msg_id: str) -> Coroutine[Any, Any, str | None]:
            return bus.store_batch(c.pod, body, msg_id)

        self._recorder = Recorder(
            send,
            c.experiment,
            c.pod,
            asyncio.get_running_loop(),
            capacity=self._record_buffer or CAPACITY,
            on_first=_stop_on_sigterm,
        )
        # the hot path, one call deep (a pod may record hundreds of thousands a second)
        self.record = self._recorder.record_kw  # type: ignore[method-assign,assignment]

    async def close(self) -> None:
        """Send the samples recorded so far (10 s at most; the rest are dropped and counted),
        then disconnect. A call still waiting (`wait_event`, a blocking `discover`) fails at
        once with `TricksError`. Never raises; closing twice is harmless."""
        if self._recorder is not None:
            await self._recorder.close()
            _restore_sigterm()
        if self._bus is not None:
            await self._bus.close()
            self._bus = None
        self._closed = True

    async def __aenter__(self) -> Driver:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def bus(self) -> Bus:
        """The NATS layer (`tricks_nats.bus.Bus`), for what the driver does not cover;
        `TricksError` before `open()` and after `close()`."""
        if self._bus is None:
            if self._closed:
                raise TricksError("the driver is closed")
            raise TricksError("the driver is not connected (use `await Driver.connect()`)")
        return self._bus

    async def discover(
        self, tag: str, count: int | None = None, timeout: float | None = None
    ) -> list[Peer]:
        """The running pods of `tag`, as `Peer`s (`tag`, `pod_id`, `ip`, `name`) sorted by
        `pod_id`: those running now (possibly none); with `count`, first block until at least
        `count` run (`timeout`: seconds for the whole call, `None` = forever).

        Raises `UnknownTag` (a tag not in TRICKS_TAGS, at once), `WaitTimeout` (`timeout` ran
        out), `TricksError` (a bad tag name, `count` < 0), `NatsUnavailable`, `PermissionDenied`.
        """
        check_name(tag, "tag")
        check_tag_known(tag, self.config.tags, self.config.experiment)
        if count is not None and count < 0:
            raise TricksError(f"count must be >= 0, got {count}")
        return await self.bus.discover(tag, count, timeout)

    async def register_event(self, name: str) -> int:
        """Add one to event `name` (exactly once, even if the request is retried).

        Returns the count right after this registration (concurrent registrations get
        distinct counts). Raises `TricksError` (a bad name, or the coordinator refused it:
        `<tag>_start`/`<tag>_stop` are its own), `NatsUnavailable`, `PermissionDenied`.
        """
        return await self.register_with_id(name, secrets.token_hex(8))

    async def register_with_id(self, name: str, key: str) -> int:
        """`register_event` with a caller-chosen id: calls with the same `key` (within 5
        minutes) count once, so a script can retry one safely (the shell's `event --id`).
        Returns the count right after the (first) registration; raises as `register_event`."""
        check_name(name, "event name")
        c = self.config
        msg_id = event_msg_id(c.experiment, c.pod, name, key)
        return await self.bus.register(name, msg_id=msg_id, pod=c.pod)

    async def wait_event(self, name: str, value: int, timeout: float | None = None) -> int:
        """Block until event `name` has been registered at least `value` times; return the
        count reached (>= `value`). `timeout`: seconds, `None` = forever.

        Raises `WaitTimeout` (`timeout` ran out: the message says the count),
        `TricksError` (a bad name, the driver closed meanwhile), `NatsUnavailable`,
        `PermissionDenied`.
        """
        check_name(name, "event name")
        return await self.bus.wait_count(name, value, timeout)

    async def barrier(self, name: str, value: int, timeout: float | None = None) -> int:
        """`register_event(name)`, then `wait_event(name, value)`, in one request and one
        notification (the cheapest barrier: Testground's signal-and-wait). Returns the count
        reached (>= `value`). `timeout` bounds the whole call: when it runs out during the
        registration, that registration may have been counted (as with any call cut short).

        Raises as `register_event` and `wait_event`.
        """
        check_name(name, "event name")
        c = self.config
        msg_id = event_msg_id(c.experiment, c.pod, name, secrets.token_hex(8))
        return await self.bus.barrier(name, value, msg_id=msg_id, pod=c.pod, timeout=timeout)

    async def count(self, name: str) -> int:
        """The current count of event `name` (0 if never registered), without waiting."""
        check_name(name, "event name")
        return await self.bus.count(name)

    async def publish(self, topic: str, data: bytes | str | object) -> int:
        """Add one message to `topic`, kept for the whole run (stored exactly once, even if
        the request is retried); every subscriber gets it, also those that subscribe later.
        `data`: bytes as they are, a `str` as UTF-8 text, any other value as JSON (marked,
        see `TopicMessage.is_json`); at most 1,000,000 bytes. Returns the message's `seq`.

        Raises `TricksError` (a bad topic name, data too large or not JSON-able, the stream
        refused it: full), `NatsUnavailable`, `PermissionDenied`.
        """
        from tricks_nats.topics import encode, publish

        check_name(topic, "topic")
        body, is_json = encode(data)
        c = self.config
        msg_id = topic_msg_id(c.experiment, c.pod, topic, secrets.token_hex(8))
        return await publish(self.bus, topic, body, msg_id=msg_id, pod=c.pod, is_json=is_json)

    def subscribe(self, topic: str) -> Subscription:
        """Every message of `topic` from the start of the run, in order, each exactly once
        (across reconnects and server restarts), as `TopicMessage`s (`seq`, `pod`, `data`,
        `is_json`, `text`, `json()`): an async iterator that waits for the next one::

            async with tricks.subscribe("config") as sub:
                first = await sub.next(timeout=30)      # WaitTimeout if none comes
                rest = await sub.take(3, timeout=30)    # the next 3
                async for msg in sub: ...               # forever (until closed)

        Listening starts at the first `next`/`take`/iteration. Raises `TricksError` at once
        for a bad topic name; its calls raise as `wait_event` does.
        """
        from tricks_nats.topics import Subscription

        check_name(topic, "topic")
        return Subscription(self.bus, topic)

    def record(self, name: str, value: float, **labels: str | float) -> None:
        """Record one sample of metric `name` (e.g. a latency in ms: name it `..._ms`) now.

        Never blocks: the sample is buffered and sent in a batch; a full buffer drops it
        (counted in `dropped`, reported in the run's summary). `value`: a finite number.
        Labels: at most 8, keys like identifiers (not ts, tag, pod_id, name, value), values
        strings of at most 200 characters (numbers become strings). Raises `TricksError` at
        once for a bad name, value or label, or before `open()`.
        """
        self.recorder.record_kw(name, value, **labels)

    def expect_interval(self, name: str, ms: float) -> None:
        """Declare that `name` is recorded every `ms` milliseconds (a closed-loop client's
        pace): the report then corrects its percentiles for coordination omission.
        Raises `TricksError` for a bad name or an `ms` that is not a positive number."""
        self.recorder.expect_interval(name, ms)

    async def flush(self) -> None:
        """Return once every sample recorded so far has been stored (or dropped, and
        counted in `dropped`): it does not raise for a sample it could not store."""
        await self.recorder.flush()

    @property
    def dropped(self) -> int:
        """Samples dropped so far (a full buffer, a refused batch): cumulative, 0 before
        `open()`."""
        return self._recorder.dropped if self._recorder is not None else 0

    @property
    def recorder(self) -> Recorder:
        """The sample buffer and its sender (`tricks_nats.recorder.Recorder`); `TricksError`
        before `open()`."""
        if self._recorder is None:
            raise TricksError("the driver is not connected (use `await Driver.connect()`)")
        return self._recorder


class SyncDriver:
    """The blocking facade over `Driver`, for programs that are not asyncio.

    `SyncDriver(config=None, *, record_buffer=None)` connects at once (raises `ConfigError`,
    `NatsUnavailable`), runs the driver's event loop in a daemon thread, is a context
    manager, and closes at interpreter exit if the program did not. Its methods are
    `Driver`'s, blocking, with the same returns and errors (`register_with_id`, `open`,
    `bus` and `recorder` are `Driver`'s only); timeouts are seconds, `None` = forever.
    """

    def __init__(self, config: Config | None = None, *, record_buffer: int | None = None) -> None:
        self.config = config or Config.from_env()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tricks-driver", daemon=True
        )
        self._thread.start()
        self._driver = Driver(self.config, record_buffer=record_buffer)
        try:
            self._call(self._driver.open())
        except BaseException:
            self._shutdown()
            raise
        self.record = self._driver.recorder.record_kw  # type: ignore[method-assign,assignment]
        # A program that never closes its driver still sends its samples at exit.
        atexit.register(self.close)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise TricksError("the driver is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def discover(
        self, tag: str, count: int | None = None, timeout: float | None = None
    ) -> list[Peer]:
        """As `Driver.discover`: the running pods of `tag` (`list[Peer]`, sorted by
        `pod_id`); with `count`, blocks until at least `count` run."""
        return self._call(self._driver.discover(tag, count, timeout))

    def register_event(self, name: str) -> int:
        """As `Driver.register_event`: +1, exactly once; the count right after."""
        return self._call(self._driver.register_event(name))

    def wait_event(self, name: str, value: int, timeout: float | None = None) -> int:
        """As `Driver.wait_event`: blocks until `name` reaches `value`; the count reached."""
        return self._call(self._driver.wait_event(name, value, timeout))

    def barrier(self, name: str, value: int, timeout: float | None = None) -> int:
        """As `Driver.barrier`: registers `name`, blocks until it reaches `value`."""
        return self._call(self._driver.barrier(name, value, timeout))

    def count(self, name: str) -> int:
        """As `Driver.count`: the current count of `name` (0 if never registered)."""
        return self._call(self._driver.count(name))

    def publish(self, topic: str, data: bytes | str | object) -> int:
        """As `Driver.publish`: one message on `topic`, stored once; its `seq`."""
        return self._call(self._driver.publish(topic, data))

    def subscribe(self, topic: str) -> SyncSubscription:
        """As `Driver.subscribe`, blocking: an iterator of every message of `topic` from the
        start of the run, with `next(timeout)`, `take(count, timeout)` and `close()`."""
        return SyncSubscription(self, self._driver.subscribe(topic))

    def record(self, name: str, value: float, **labels: str | float) -> None:
        """As `Driver.record`: never blocks (callable from any thread)."""
        self._driver.recorder.record_kw(name, value, **labels)

    def expect_interval(self, name: str, ms: float) -> None:
        """As `Driver.expect_interval`: `name` is recorded every `ms` milliseconds."""
        self._driver.recorder.expect_interval(name, ms)

    def flush(self) -> None:
        """As `Driver.flush`: returns once every sample so far is stored (or dropped)."""
        self._call(self._driver.flush())

    @property
    def dropped(self) -> int:
        """As `Driver.dropped`: samples dropped so far, cumulative."""
        return self._driver.dropped

    def close(self) -> None:
        """As `Driver.close` (sends the buffered samples, 10 s at most), then stops the
        driver's thread: a later call that waits (`discover`, `register_event`, `wait_event`,
        `count`, `flush`) raises `TricksError`. Closing twice is harmless."""
        atexit.unregister(self.close)
        if self._thread.is_alive():
            try:
                self._call(self._driver.close())
            finally:
                self._shutdown()
                _restore_sigterm()

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSubscription:
    """`Subscription` for `SyncDriver`: the same calls, blocking; a context manager and an
    iterator (that ends when the driver closes)."""

    def __init__(self, driver: SyncDriver, sub: Subscription) -> None:
        self._driver, self._sub = driver, sub
        self.topic = sub.topic

    def next(self, timeout: float | None = None) -> TopicMessage:
        """As `Subscription.next`: the next message (`WaitTimeout` when `timeout` runs out)."""
        return self._driver._call(self._sub.next(timeout))

    def take(self, count: int, timeout: float | None = None) -> list[TopicMessage]:
        """As `Subscription.take`: the next `count` messages."""
        return self._driver._call(self._sub.take(count, timeout))

    def close(self) -> None:
        """Stop listening (harmless once the driver is closed)."""
        with contextlib.suppress(TricksError):
            self._driver._call(self._sub.close())

    def __iter__(self) -> SyncSubscription:
        return self

    def __next__(self) -> TopicMessage:
        try:
            return self._driver._call(self._sub.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_on_sigterm() -> None:
    """When a pod records, SIGTERM (the coordinator stopping it, with a grace period) exits
    like Ctrl-C does: `with`/`async with` blocks unwind and `atexit` runs, so the driver
    sends the samples it holds. Only where the program set no handler of its own, and only
    from the main thread (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        return


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    raise SystemExit(128 + signum)


def _restore_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
