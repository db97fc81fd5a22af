"""`tricks-nats event/wait/barrier/discover/record/publish/subscribe` without typer, asyncio or
nats-py: what a pod runs, often in a loop and by the hundred, costs a Python start and a few
round trips (`syncwire`).

Only the plain forms are taken here; anything else (`--help`, `-v`, a usage error, `record -`,
a TLS or websocket URL) returns None and the full command (`shell_driver`, typer) runs instead,
with the same output, exit codes and messages. `TRICKS_SHELL_FAST=0` turns this path off.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from tricks_nats import wirenames as w
from tricks_nats.errors import TricksError, UsageError, WaitTimeout

TYPE_CHECKING = False  # typing itself costs an import: only for the type checker
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: What `event --id` accepts: it becomes the last token of the Nats-Msg-Id.
ID_RE = re.compile(r"^[A-Za-z0-9_:-]{1,100}$")


class _Fallback(Exception):
    """Not a plain form: let the full command handle it (and say what is wrong)."""


#: Per command: its positional arguments, and its options as flag -> (name, type).
COMMANDS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, str]]]] = {
    "event": (("name",), {"--id": ("key", "str")}),
    "wait": (("name", "value"), {"--timeout": ("timeout", "seconds")}),
    "barrier": (("name", "value"), {"--timeout": ("timeout", "seconds")}),
    "discover": (
        ("tag",),
        {
            "--count": ("count", "count"),
            "--timeout": ("timeout", "seconds"),
            "--json": ("as_json", "flag"),
        },
    ),
    "publish": (
        ("topic", "data"),
        {"--json": ("as_json", "flag"), "--id": ("key", "str")},
    ),
    "subscribe": (
        ("topic",),
        {
            "--count": ("count", "count"),
            "--timeout": ("timeout", "seconds"),
            "--json": ("as_json", "flag"),
        },
    ),
    "record": (
        ("name", "value"),
        {
            "--label": ("label", "list"),
            "-l": ("label", "list"),
            "--expected-interval-ms": ("expected_interval_ms", "seconds"),
        },
    ),
}


def run(argv: list[str]) -> int | None:
    """Run `argv` (without the program name) if it is a plain shell-driver call: its exit
    code; None when the full command should run it."""
    if not argv or argv[0] not in COMMANDS or os.environ.get("TRICKS_SHELL_FAST") == "0":
        return None
    started = time.monotonic()
    try:
        args = _parse(argv[0], argv[1:])
    except _Fallback:
        return None
    from tricks_nats.syncwire import Unsupported

    timeout = args.get("timeout")
    try:
        return _COMMAND[argv[0]](args, None if timeout is None else started + timeout)
    except Unsupported:
        return None
    except WaitTimeout as exc:
        return _fail(f"timed out after {timeout:g}s" + (f" {exc}" if str(exc) else ""), 1)
    except TricksError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 1


def _parse(command: str, words: list[str]) -> dict[str, Any]:
    names, options = COMMANDS[command]
    out: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--" or not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        flag, eq, value = word.partition("=")
        if flag not in options:
            raise _Fallback  # --help, an unknown option: the full command says what it is
        name, kind = options[flag]
        if kind == "flag":
            if eq:
                raise _Fallback
            out[name] = True
            continue
        if not eq:
            if i >= len(words):
                raise _Fallback
            value = words[i]
            i += 1
        out[name] = [*out.get(name, []), value] if kind == "list" else _convert(value, kind)
    if command == "publish" and len(positional) == 1:
        positional.append("-")  # the data from stdin
    if len(positional) != len(names) or "--" in positional:
        raise _Fallback
    for name, value in zip(names, positional, strict=True):
        out[name] = value
    if command in ("wait", "barrier"):
        out["value"] = _convert(out["value"], "count")
    if command == "record":
        if out["name"] == "-":
            raise _Fallback  # a stream of samples: the full driver's batching
        out["value"] = _convert(out["value"], "number")
    return out


def _convert(text: str, kind: str) -> Any:
    try:
        if kind == "count":
            value: Any = int(text)
            ok = value >= 0
        elif kind in ("seconds", "number"):
            value = float(text)
            ok = kind == "number" or value >= 0
        else:
            return text
    except ValueError:
        raise _Fallback from None
    if not ok:
        raise _Fallback
    return value


#: Past a call's own timeout, the moment the command takes to say what it waited for (the
#: count, the pods running): the command's deadline, as the full command's.
GRACE_S = 0.5


def _connection(until: float | None, config: dict[str, Any] | None = None) -> Any:
    from tricks_nats import podconfig
    from tricks_nats.syncwire import Connection

    conn = Connection(config or podconfig.read(), None if until is None else until + GRACE_S)
    conn.connect()
    return conn


def _event(args: dict[str, Any], until: float | None) -> int:
    name, key = w.check_name(args["name"], "event name"), args.get("key")
    if key is not None and not ID_RE.match(key):
        raise UsageError(f"bad --id {key!r}: 1 to 100 letters, digits, '-', '_' or ':'")
    conn = _connection(until)
    try:
        msg_id = w.event_msg_id(conn.experiment, conn.pod, name, key or os.urandom(8).hex())
        _say(str(conn.register(name, msg_id)))
    finally:
        conn.close()
    return 0


def _wait(args: dict[str, Any], until: float | None) -> int:
    name = w.check_name(args["name"], "event name")
    conn = _connection(until)
    try:
        _say(str(conn.wait(name, args["value"], until)))
    finally:
        conn.close()
    return 0


def _barrier(args: dict[str, Any], until: float | None) -> int:
    name = w.check_name(args["name"], "event name")
    conn = _connection(until)
    try:
        msg_id = w.event_msg_id(conn.experiment, conn.pod, name, os.urandom(8).hex())
        _say(str(conn.wait(name, args["value"], until, lambda: conn.register(name, msg_id))))
    finally:
        conn.close()
    return 0


def _discover(args: dict[str, Any], until: float | None) -> int:
    from tricks_nats import podconfig

    tag = w.check_name(args["tag"], "tag")
    config = podconfig.read()
    w.check_tag_known(tag, config["tags"], config["experiment"])
    conn = _connection(until, config)
    try:
        pods = conn.discover(tag, args.get("count"), until)
    finally:
        conn.close()
    if args.get("as_json"):
        _say(json.dumps(pods))
    else:
        _say("\n".join(f"{p['pod_id']} {p['ip']}" for p in pods), empty_ok=True)
    return 0


def _record(args: dict[str, Any], until: float | None) -> int:
    from tricks_nats.samples_text import parse_label

    name, value = w.check_name(args["name"], "metric name"), args["value"]
    if not math.isfinite(value):
        raise UsageError(f"value {value!r} is not a finite number")
    labels = dict(parse_label(text) for text in args.get("label", []))
    if len(labels) > w.MAX_LABELS:
        raise TricksError(f"at most {w.MAX_LABELS} labels per sample, got {len(labels)}")
    labels = {key: w.check_label(key, text) for key, text in labels.items()}
    sample: list[Any] = [time.time(), name, value, *([labels] if labels else [])]
    batch: dict[str, Any] = {"samples": [sample]}
    interval = args.get("expected_interval_ms")
    if interval is not None:
        if not 0 < interval < math.inf:
            raise TricksError(
                f"expected interval of {name!r}: {interval!r} is not a positive number"
            )
        batch["intervals"] = {name: interval}
    conn = _connection(until)
    try:
        refused = conn.store_batch(json.dumps(batch).encode())
    finally:
        conn.close()
    if refused is not None:
        raise TricksError(f"the metrics stream refused the sample: {refused}")
    return 0


def _publish(args: dict[str, Any], until: float | None) -> int:
    from tricks_nats.synctopics import publish

    topic, key = w.check_name(args["topic"], "topic"), args.get("key")
    if key is not None and not ID_RE.match(key):
        raise UsageError(f"bad --id {key!r}: 1 to 100 letters, digits, '-', '_' or ':'")
    text = args["data"]
    body = sys.stdin.buffer.read() if text == "-" else os.fsencode(text)
    is_json = bool(args.get("as_json"))
    if is_json:
        try:
            json.loads(body)
        except ValueError as exc:
            raise UsageError(f"--json: the data is not JSON ({exc})") from None
    if len(body) > w.MAX_TOPIC_BYTES:
        raise TricksError(
            f"a topic message holds at most {w.MAX_TOPIC_BYTES:,} bytes, got {len(body):,}"
        )
    conn = _connection(until)
    try:
        msg_id = w.topic_msg_id(conn.experiment, conn.pod, topic, key or os.urandom(8).hex())
        _say(str(publish(conn, topic, body, is_json=is_json, msg_id=msg_id)))
    finally:
        conn.close()
    return 0


def _subscribe(args: dict[str, Any], until: float | None) -> int:
    from tricks_nats.synctopics import Message, line, subscribe

    topic, as_json = w.check_name(args["topic"], "topic"), bool(args.get("as_json"))

    def emit(msg: Message) -> None:
        _say(line(msg.seq, msg.pod, msg.data, msg.is_json, as_json))

    conn = _connection(until)
    try:
        subscribe(conn, topic, args.get("count"), until, emit)
    finally:
        conn.close()
    return 0


_COMMAND: dict[str, Callable[[dict[str, Any], float | None], int]] = {
    "event": _event,
    "wait": _wait,
    "barrier": _barrier,
    "discover": _discover,
    "record": _record,
    "publish": _publish,
    "subscribe": _subscribe,
}


def _say(text: str, *, empty_ok: bool = False) -> None:
    if text or not empty_ok:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int) -> int:
    try:
        sys.stderr.write(f"tricks-nats: error: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass
    return code


def _quiet_stdout() -> None:
    """Nothing more reaches stdout (Python's flush at exit would fail again, loudly)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
