"""Topics on the blocking client (`syncwire`), for `tricks-nats publish/subscribe`: PROTOCOL.md
6.7 and 6.8 with the standard library only, as `topics` does it on nats-py. Also the one place
that says how a shell command prints a message.
"""

from __future__ import annotations

import base64
import json
import time

from tricks_nats import wirenames as w
from tricks_nats.errors import TricksError, WaitTimeout
from tricks_nats.syncwire import REQUEST_TIMEOUT_S, Dropped, parse_headers

TYPE_CHECKING = False  # typing itself costs an import: only for the type checker
if TYPE_CHECKING:
    from collections.abc import Callable

    from tricks_nats.syncwire import Connection, Msg


def publish(conn: Connection, topic: str, body: bytes, *, is_json: bool, msg_id: str) -> int:
    """PROTOCOL.md 6.7: store one message on `topic` (once, whatever the retries); its seq."""
    headers = {w.MSG_ID_HEADER: msg_id, w.POD_HEADER: conn.pod}
    if is_json:
        headers[w.TYPE_HEADER] = w.JSON_TYPE
    subject = w.topic_subject(conn.experiment, topic)
    pause, give_up = 0.02, time.monotonic() + 20.0
    while True:
        reply = conn.request(subject, f"publish on topic {topic!r}", headers, body)
        answer = _json(reply.data)
        error = answer.get("error")
        if (
            isinstance(error, dict)
            and error.get("err_code") == 10158
            and time.monotonic() < give_up
        ):
            time.sleep(pause)  # an earlier attempt is still being applied: ask again
            pause = min(pause * 2, 1.0)
            continue
        if error:
            description = error.get("description") if isinstance(error, dict) else error
            raise TricksError(f"publishing on topic {topic!r} refused: {description}")
        seq = answer.get("seq")
        if not isinstance(seq, int):
            raise TricksError(f"publishing on topic {topic!r}: no seq in {reply.data[:100]!r}")
        return seq


class Message:
    __slots__ = ("data", "is_json", "pod", "seq")

    def __init__(self, seq: int, pod: str, data: bytes, is_json: bool) -> None:
        self.seq, self.pod, self.data, self.is_json = seq, pod, data, is_json


def subscribe(
    conn: Connection,
    topic: str,
    count: int | None,
    until: float | None,
    emit: Callable[[Message], None],
) -> int:
    """PROTOCOL.md 6.8: `emit` every message of `topic` from the start of the run, in order,
    once each, until `count` came (None: forever). A WaitTimeout at `until` (monotonic)."""
    stored = w.stored_subject(conn.experiment, topic)
    conn.next_id += 1
    sid = f"s{conn.next_id}"
    conn.subs[sid] = (stored, False)  # restored by every reconnect
    conn.send(f"SUB {stored} {sid}\r\n".encode())
    last, behind, seen, n = 0, True, conn.connects, 0
    while count is None or n < count:
        if conn.connects != seen:  # reconnected: what was republished meanwhile is lost
            seen, behind = conn.connects, True
        if behind:
            found = _read_after(conn, topic, last)
            if found is None:
                behind = conn.connects != seen
                continue
            last = found.seq
            emit(found)
            n += 1
            continue
        cut = REQUEST_TIMEOUT_S * 5 if until is None else until - time.monotonic()
        if cut <= 0:
            raise WaitTimeout(f"waiting for messages on {topic!r} ({n} came)")
        try:
            note = conn.take(time.monotonic() + cut, lambda m: m.sid == sid)
            if note is None:
                if until is None:
                    conn.flush()  # a long wait: look once in a while that we still hear
                continue
        except Dropped:
            conn.close()
            conn.connect()  # resubscribes; the count of connections tells the loop
            continue
        try:
            s, prev = int(note.headers["Nats-Sequence"]), int(note.headers["Nats-Last-Sequence"])
        except (KeyError, ValueError):
            continue  # not a stored message: ignored
        if s <= last:
            continue
        if prev != last:
            behind = True
            continue
        last = s
        emit(_message(s, note.headers, note.data))
        n += 1
    return n


def _read_after(conn: Connection, topic: str, last: int) -> Message | None:
    exp = conn.experiment
    body = json.dumps({"seq": last + 1, "next_by_subj": w.topic_subject(exp, topic)}).encode()
    reply: Msg = conn.request(
        f"$JS.API.STREAM.MSG.GET.{w.topics_stream(exp)}", f"read topic {topic!r}", None, body
    )
    answer = _json(reply.data)
    error = answer.get("error")
    if isinstance(error, dict) and error.get("err_code") == w.JS_NO_MESSAGE:
        return None  # nothing after `last`: up to date (a missing stream is another 404)
    got = answer.get("message")
    if error or not isinstance(got, dict) or not isinstance(got.get("seq"), int):
        raise TricksError(f"reading topic {topic!r}: {error or reply.data[:100]!r}")
    try:
        data = base64.b64decode(got.get("data") or "")
        block = base64.b64decode(got.get("hdrs") or "")
    except ValueError as exc:
        raise TricksError(f"reading topic {topic!r}: bad base64 ({exc})") from exc
    return _message(got["seq"], parse_headers(block)[1], data)


def _message(seq: int, headers: dict[str, str], data: bytes) -> Message:
    return Message(
        seq, headers.get(w.POD_HEADER, ""), data, headers.get(w.TYPE_HEADER) == w.JSON_TYPE
    )


def line(seq: int, pod: str, data: bytes, is_json: bool, as_json: bool) -> str:
    """How `tricks-nats subscribe` prints a message: its data as text; with `--json`, one JSON
    object `{"seq", "pod", "data"}` (`data`: the JSON value when the message is JSON, else the
    text; `data_base64` instead for bytes that are not UTF-8)."""
    if not as_json:
        return data.decode(errors="replace")
    return json.dumps(row(seq, pod, data, is_json), ensure_ascii=False)


def row(seq: int, pod: str, data: bytes, is_json: bool) -> dict[str, object]:
    """A message as JSON: `{"seq", "pod", "data"}`, `data` the JSON value of a JSON message,
    else the text, or `data_base64` for bytes that are not UTF-8."""
    out: dict[str, object] = {"seq": seq, "pod": pod}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        out["data_base64"] = base64.b64encode(data).decode()
        return out
    try:
        out["data"] = json.loads(text) if is_json else text
    except ValueError:
        out["data"] = text
    return out


def _json(data: bytes) -> dict[str, object]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
