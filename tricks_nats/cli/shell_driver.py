"""`tricks-nats event/wait/discover/record/publish/subscribe`: the driver API for shell scripts
and any language that can run a command (drivers/PROTOCOL.md, section 10). The plain calls take
the fast path (`fastpath`, over `syncwire`); these typer commands run the rest (`--help`,
`record -`, TLS).

Configured from the pod's environment alone. Exit codes: 0 ok, 1 timeout (or the experiment is
not on this NATS), 2 usage or configuration error, 3 NATS unreachable; errors are one line on
stderr. A pod may call these in a loop, so nats-py is imported only inside a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from tricks_nats.cli.fastpath import ID_RE
from tricks_nats.cli.output import fail
from tricks_nats.errors import TricksError, UsageError
from tricks_nats.protocol import MAX_TOPIC_BYTES, check_name

if TYPE_CHECKING:
    from tricks_nats.driver import Driver

T = TypeVar("T")


TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", min=0, help="Seconds to wait at most (default: forever); exit 1."),
]


def _run(call: Callable[[Driver], Awaitable[T]], timeout: float | None = None) -> T:
    """Connect from the environment, make one call, close; our errors become an exit code.
    `timeout` bounds all of it, connecting included."""
    from tricks_nats.driver import Config, Driver
    from tricks_nats.errors import WaitTimeout

    async def main() -> T:
        config = Config.from_env()
        if not config.nats_url.startswith(("ws://", "wss://")):
            _skip_websocket_support()
        try:
            # The call's own timeout reports what it waited for; this one bounds the rest
            # (connecting while NATS is away included).
            outer = None if timeout is None else timeout + 0.5
            async with asyncio.timeout(outer) as deadline, Driver(config) as driver:
                return await call(driver)
        except TimeoutError as exc:
            if isinstance(exc, WaitTimeout) or not deadline.expired():
                raise
            raise WaitTimeout(f"timed out after {timeout:g}s") from exc

    try:
        return asyncio.run(main())
    except TricksError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:  # the reader went away (`subscribe | head -1`): main() ends quietly
        raise
    except Exception as exc:  # a bug of ours: still one line for the script, details with -v
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (run with -v for details)", 1)


def _skip_websocket_support() -> None:
    """nats-py imports aiohttp (about 0.16 s here) only for ws:// URLs: not for a nats:// one."""
    if "aiohttp" not in sys.modules and "nats" not in sys.modules:
        sys.modules["aiohttp"] = None  # type: ignore[assignment]


def event(
    name: Annotated[str, typer.Argument(help="The event to register (+1).")],
    key: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Registrations with the same id (within 5 minutes) count once: "
            "pass one to retry safely.",
        ),
    ] = None,
) -> None:
    """Register event NAME once; print the count right after this registration."""
    try:
        check_name(name, "event name")
        if key is not None and not ID_RE.match(key):
            raise UsageError(f"bad --id {key!r}: 1 to 100 letters, digits, '-', '_' or ':'")
    except UsageError as exc:
        fail(exc)

    async def call(driver: Driver) -> int:
        if key is None:
            return await driver.register_event(name)
        return await driver.register_with_id(name, key)

    typer.echo(_run(call))


def wait(
    name: Annotated[str, typer.Argument(help="The event to wait for.")],
    value: Annotated[int, typer.Argument(min=0, help="The count to reach.")],
    timeout: TimeoutOpt = None,
) -> None:
    """Block until event NAME has been registered VALUE times; print the count reached."""
    try:
        check_name(name, "event name")
    except UsageError as exc:
        fail(exc)
    typer.echo(_run(lambda driver: driver.wait_event(name, value, timeout), timeout))


def barrier(
    name: Annotated[str, typer.Argument(help="The event to register (+1) and wait for.")],
    value: Annotated[int, typer.Argument(min=0, help="The count to reach.")],
    timeout: TimeoutOpt = None,
) -> None:
    """Register event NAME once, then block until it has been registered VALUE times (`event`
    then `wait`, in one call); print the count reached."""
    try:
        check_name(name, "event name")
    except UsageError as exc:
        fail(exc)
    typer.echo(_run(lambda driver: driver.barrier(name, value, timeout), timeout))


def discover(
    tag: Annotated[str, typer.Argument(help="The tag whose running pods to list.")],
    count: Annotated[
        int | None,
        typer.Option("--count", min=0, help="First wait until at least this many pods run."),
    ] = None,
    timeout: TimeoutOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='A JSON list of {"tag","pod_id","ip","name"}.')
    ] = False,
) -> None:
    """List the running pods of TAG, one `pod_id ip` line each (sorted by pod id)."""
    try:
        check_name(tag, "tag")
    except UsageError as exc:
        fail(exc)
    peers = _run(lambda driver: driver.discover(tag, count, timeout), timeout)
    if as_json:
        rows = [{"tag": p.tag, "pod_id": p.pod_id, "ip": p.ip, "name": p.name} for p in peers]
        typer.echo(json.dumps(rows))
    else:
        for p in peers:
            typer.echo(f"{p.pod_id} {p.ip}")


def publish(
    topic: Annotated[str, typer.Argument(help="The topic to publish on.")],
    data: Annotated[
        str, typer.Argument(help="The message (default `-`: all of stdin, bytes as they are).")
    ] = "-",
    as_json: Annotated[
        bool, typer.Option("--json", help="The data is JSON: checked, and marked as JSON.")
    ] = False,
    key: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Publishes with the same id (within 5 minutes) store one message: "
            "pass one to retry safely.",
        ),
    ] = None,
) -> None:
    """Publish one message on TOPIC, kept for the whole run: every subscriber gets it, also
    those that subscribe later. Prints the message's seq."""
    import os
    import secrets

    try:
        check_name(topic, "topic")
        if key is not None and not ID_RE.match(key):
            raise UsageError(f"bad --id {key!r}: 1 to 100 letters, digits, '-', '_' or ':'")
        body = sys.stdin.buffer.read() if data == "-" else os.fsencode(data)
        if as_json:
            try:
                json.loads(body)
            except ValueError as exc:
                raise UsageError(f"--json: the data is not JSON ({exc})") from None
    except UsageError as exc:
        fail(exc)

    async def call(driver: Driver) -> int:
        from tricks_nats.protocol import topic_msg_id
        from tricks_nats.topics import publish as store

        if len(body) > MAX_TOPIC_BYTES:
            raise TricksError(
                f"a topic message holds at most {MAX_TOPIC_BYTES:,} bytes, got {len(body):,}"
            )
        c = driver.config
        msg_id = topic_msg_id(c.experiment, c.pod, topic, key or secrets.token_hex(8))
        return await store(driver.bus, topic, body, msg_id=msg_id, pod=c.pod, is_json=as_json)

    typer.echo(_run(call))


def subscribe(
    topic: Annotated[str, typer.Argument(help="The topic to read.")],
    count: Annotated[
        int | None,
        typer.Option("--count", min=0, help="Exit after this many messages (default: never)."),
    ] = None,
    timeout: TimeoutOpt = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='One JSON object per message: {"seq","pod","data"} (`data_base64` for bytes '
            "that are not UTF-8).",
        ),
    ] = False,
) -> None:
    """Print every message of TOPIC from the start of the run, in order, one line each (the
    data as text; use --json for data with newlines or bytes), waiting for more."""
    from tricks_nats.synctopics import line

    try:
        check_name(topic, "topic")
    except UsageError as exc:
        fail(exc)

    async def call(driver: Driver) -> int:
        n = 0
        async with asyncio.timeout(timeout), driver.subscribe(topic) as sub:
            while count is None or n < count:
                msg = await sub.next()
                typer.echo(line(msg.seq, msg.pod, msg.data, msg.is_json, as_json))
                sys.stdout.flush()
                n += 1
        return n

    async def bounded(driver: Driver) -> int:
        from tricks_nats.errors import WaitTimeout

        try:
            return await call(driver)
        except TimeoutError as exc:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for messages") from exc

    _run(bounded, timeout)


def record(
    name: Annotated[
        str, typer.Argument(help="The metric (e.g. request_ms), or - to read samples from stdin.")
    ],
    value: Annotated[float | None, typer.Argument(help="The sample's value (a number).")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="A label KEY=VALUE (repeatable).")
    ] = None,
    expected_interval_ms: Annotated[
        float | None,
        typer.Option(
            "--expected-interval-ms",
            min=0,
            help="Declare that NAME is recorded every this many ms (coordination omission).",
        ),
    ] = None,
) -> None:
    """Record one sample of metric NAME; with NAME `-`, one sample per stdin line:
    `NAME VALUE [KEY=VALUE ...]` or a JSON object {"name", "value", "labels", "ts"}.
    Samples are sent in batches; the command returns once all are stored."""
    from tricks_nats.samples_text import parse_label, parse_line

    try:
        labels = dict(parse_label(text) for text in label or [])
        if name != "-":
            check_name(name, "metric name")
            if value is None:
                raise UsageError("missing VALUE (or use `-` to read samples from stdin)")
            if not math.isfinite(value):
                raise UsageError(f"value {value!r} is not a finite number")
        elif value is not None:
            raise UsageError("with `-`, samples come from stdin: no VALUE")
    except UsageError as exc:
        fail(exc)
    bad: list[str] = []

    async def call(driver: Driver) -> int:
        if expected_interval_ms is not None and name != "-":
            driver.expect_interval(name, expected_interval_ms)
        if name != "-":
            assert value is not None
            driver.record(name, value, **labels)
            return 1
        return await _pump(driver, labels, bad, parse_line)

    _run(call)
    if bad:
        fail(UsageError(f"{len(bad)} bad line(s) skipped; the first: {bad[0]}"))


async def _pump(
    driver: Driver,
    labels: dict[str, str],
    bad: list[str],
    parse: Callable[[str], tuple[str, float, dict[str, str], float | None]],
) -> int:
    """Read stdin in a daemon thread (SIGTERM must not wait for a blocked read), recording
    each line as it comes: the recorder is thread-safe and never blocks."""
    import threading

    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    recorder = driver.recorder

    def finish(n: int) -> None:
        if not done.done():
            done.set_result(n)

    def pump() -> None:
        n = 0
        try:
            for number, line in enumerate(sys.stdin, 1):
                if not line.strip():
                    continue
                try:
                    name, value, own, ts = parse(line)
                    recorder.record(name, value, {**labels, **own} or None, ts)
                    n += 1
                except (TricksError, ValueError) as exc:
                    bad.append(f"line {number}: {exc}")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone (interrupted)
                loop.call_soon_threadsafe(finish, n)

    threading.Thread(target=pump, name="tricks-record-stdin", daemon=True).start()
    return await done


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("record")(record)
    app.command("event")(event)
    app.command("wait")(wait)
    app.command("barrier")(barrier)
    app.command("discover")(discover)
    app.command("publish")(publish)
    app.command("subscribe")(subscribe)
