"""A blocking driver on a raw socket, for the shell commands (`tricks-nats event/wait/discover/
record`): the standard library only (no asyncio, no nats-py, no msgspec), so a command costs a
Python start and a few round trips, not the ~0.3 s of importing the asyncio driver.

It implements drivers/PROTOCOL.md (version 2) as the asyncio driver does: connecting and every
request ride out a server restart (sections 3 and 6: the same request again, same reply
subject and message id, 20 s of wall time, moved on while JetStream confirms the experiment,
300 s at most), a permissions violation fails its call at once, a wait subscribes before it
reads and trusts only the count, a discover reads the start count and then the roster.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from tricks_nats import wirenames as w
from tricks_nats.errors import NatsUnavailable, PermissionDenied, TricksError, WaitTimeout

TYPE_CHECKING = False  # typing itself costs an import: only for the type checker
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: As the asyncio driver (bus.PUBLISH_TIMEOUT_S, RECOVERY_S, PATIENCE_S).
REQUEST_TIMEOUT_S = 2.0
RECOVERY_S = 20.0
PATIENCE_S = 300.0
CONNECT_TIMEOUT_S = 2.0
#: What a reply may be at most (a roster of thousands of pods is far below), and a line.
MAX_PAYLOAD = 64 << 20
MAX_LINE = 1 << 20
#: The longest a single blocking read waits (a longer wait is made of several).
MAX_BLOCK_S = 3600.0


class Unsupported(Exception):
    """Something this small client does not speak (TLS, websockets): use the full driver."""


class Dropped(Exception):
    """The connection broke; the caller connects again and resends."""


class Msg:
    __slots__ = ("data", "headers", "sid", "status", "subject")

    def __init__(
        self, subject: str, sid: str, status: int | None, headers: dict[str, str], data: bytes
    ) -> None:
        self.subject, self.sid, self.status, self.headers, self.data = (
            subject,
            sid,
            status,
            headers,
            data,
        )


def _headers_block(headers: dict[str, str]) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


def parse_headers(block: bytes) -> tuple[int | None, dict[str, str]]:
    """A header block (`NATS/1.0 [status [description]]\r\nKey: Value\r\n...`): its
    status code, if any, and its headers."""
    lines = block.decode(errors="replace").split("\r\n")
    first = lines[0].split(None, 2)  # NATS/1.0 [status [description]]
    status = int(first[1]) if len(first) > 1 and first[1].isdigit() else None
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return status, headers


class Connection:
    """One NATS connection of a pod: its inbox, its subscriptions, its requests."""

    def __init__(self, config: dict[str, Any], deadline: float | None) -> None:
        """`config`: the pod's, as `podconfig.read` gives it."""
        self.experiment: str = config["experiment"]
        self.pod = w.pod_name(config["tag"], config["pod_id"])
        self.url: str = config["nats_url"]
        #: The command's own deadline (`--timeout`), monotonic; None: none.
        self.deadline = deadline
        self.host, self.port, user, password = _address(self.url)
        self.user = config["nats_user"] or user
        self.password = config["nats_password"] or password or ""
        self.inbox = f"{w.inbox_prefix(self.experiment)}.{os.urandom(12).hex()}"
        self.sock: socket.socket | None = None
        self.buf = b""
        self.next_id = 0
        #: Subscriptions to restore after a reconnect: sid -> (subject, one-shot).
        self.subs: dict[str, tuple[str, bool]] = {}
        self.pending: list[Msg] = []
        #: Subjects the server refused (a permissions violation), lower-cased.
        self.denied: list[str] = []
        #: Connections made so far: a subscriber that sees it grow knows it was away.
        self.connects = 0

    # -- the socket ---------------------------------------------------------------------

    def _left(self, at_most: float) -> float:
        """Seconds to wait at most now: `at_most`, cut by the command's deadline."""
        if self.deadline is None:
            return at_most
        return max(0.0, min(at_most, self.deadline - time.monotonic()))

    def _read_more(self, until: float) -> None:
        assert self.sock is not None
        while True:
            wait = until - time.monotonic()
            if wait <= 0:
                raise TimeoutError
            # poll() takes at most ~24 days: a longer --timeout waits in slices
            self.sock.settimeout(min(wait, MAX_BLOCK_S))
            try:
                chunk = self.sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError as exc:
                raise Dropped(str(exc)) from exc
        if not chunk:
            raise Dropped("the server closed the connection")
        self.buf += chunk

    def _line(self, until: float) -> str:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise Dropped("a protocol line longer than 1 MiB: not NATS")
            self._read_more(until)
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode(errors="replace")

    def _exactly(self, n: int, until: float) -> bytes:
        if not 0 <= n <= MAX_PAYLOAD:
            raise Dropped(f"a message of {n} bytes: not what a pod's calls get")
        while len(self.buf) < n + 2:
            self._read_more(until)
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def send(self, data: bytes) -> None:
        if self.sock is None:
            raise Dropped("not connected")
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise Dropped(str(exc)) from exc

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    # -- connecting -----------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, trying again for RECOVERY_S while the server is away (PROTOCOL.md 3);
        refused credentials are final at once."""
        first = time.monotonic()
        pause = 0.05
        while True:
            try:
                self._connect_once()
                return
            except (OSError, Dropped) as exc:  # TimeoutError is an OSError
                self.close()
                last = exc
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                raise _timed_out()
            if now + pause >= first + RECOVERY_S:
                raise NatsUnavailable(f"cannot reach NATS at {self.url}: {last or 'no answer'}")
            time.sleep(self._left(pause))  # a backoff between attempts, not a wait for an event
            pause = min(pause * 2, 1.0)

    def _connect_once(self) -> None:
        until = time.monotonic() + self._left(CONNECT_TIMEOUT_S)
        self.sock = socket.create_connection((self.host, self.port), timeout=self._left(2.0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        line = self._line(until)
        try:
            info = json.loads(line[5:]) if line.startswith("INFO ") else None
        except ValueError:
            info = None
        if not isinstance(info, dict):  # another program on the port: no use waiting for it
            raise NatsUnavailable(
                f"cannot reach NATS at {self.url}: not a NATS server (it said {line[:60]!r})"
            )
        if info.get("tls_required"):
            raise Unsupported("tls")
        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "name": f"tricks-{self.experiment}-{self.pod}",
            "lang": "python-sync",
            "version": "2",
            "protocol": 1,
        }
        if self.user:
            connect["user"], connect["pass"] = self.user, self.password
        subs = "".join(
            f"SUB {subject} {sid}\r\n" + (f"UNSUB {sid} 1\r\n" if once else "")
            for sid, (subject, once) in self.subs.items()
        )
        self.send(
            f"CONNECT {json.dumps(connect)}\r\nPING\r\nSUB {self.inbox}.* 0\r\n{subs}".encode()
        )
        while True:
            line = self._line(until)
            if line == "PONG":
                self.connects += 1
                return
            if line.startswith("-ERR"):
                if "authorization" in line.lower():
                    raise NatsUnavailable(
                        f"cannot reach NATS at {self.url}: credentials refused "
                        "(authorization violation)"
                    )
                raise Dropped(line)
            if line == "PING":
                self.send(b"PONG\r\n")

    # -- reading what comes -------------------------------------------------------------

    def _one(self, until: float) -> None:
        """Read one protocol message (a MSG goes to `pending`)."""
        line = self._line(until)
        op, _, rest = line.partition(" ")
        if op in ("MSG", "HMSG"):
            parts = rest.split()
            least = 4 if op == "HMSG" else 3  # subject sid [reply] [header bytes] bytes
            try:
                if not least <= len(parts) <= least + 1:
                    raise ValueError(line)
                sizes = [int(x) for x in parts[-2 if op == "HMSG" else -1 :]]
                if op == "HMSG" and not 0 <= sizes[0] <= sizes[1]:
                    raise ValueError(line)
            except ValueError as exc:
                raise Dropped(f"a garbled message from the server: {line[:80]!r}") from exc
            payload = self._exactly(sizes[-1], until)
            status: int | None = None
            headers: dict[str, str] = {}
            if op == "HMSG":
                status, headers = parse_headers(payload[: sizes[0]])
                payload = payload[sizes[0] :]
            self.pending.append(Msg(parts[0], parts[1], status, headers, payload))
        elif op == "PING":
            self.send(b"PONG\r\n")
        elif op == "PONG":
            self.pending.append(Msg("", "PONG", None, {}, b""))
        elif op == "-ERR":
            text = rest.strip().strip("'")
            if "permissions violation" in text.lower():
                subject = text.rsplit(" to ", 1)[-1].strip('"').lower()
                self.denied.append(subject)
            elif "stale connection" in text.lower() or "slow consumer" in text.lower():
                raise Dropped(text)
        # +OK, INFO (cluster updates): nothing to do

    def take(self, until: float, match: Any, stop: Any = None) -> Msg | None:
        """The first message for which `match(msg)` holds, read until `until` (monotonic);
        None when the time is up, or as soon as `stop()` holds."""
        while True:
            for i, msg in enumerate(self.pending):
                if match(msg):
                    return self.pending.pop(i)
            if stop is not None and stop():
                return None
            try:
                self._one(until)
            except TimeoutError:
                return None

    def flush(self) -> None:
        self.send(b"PING\r\n")
        until = time.monotonic() + self._left(REQUEST_TIMEOUT_S)
        if self.take(until, lambda m: m.sid == "PONG") is None:
            raise Dropped("no PONG")

    # -- requests -----------------------------------------------------------------------

    def _denial(self, subject: str) -> PermissionDenied | None:
        for refused in (subject.lower(), f"{self.inbox}.*".lower()):
            if refused in self.denied:
                return PermissionDenied(
                    f"NATS refused {subject!r}: these credentials do not reach "
                    f"experiment {self.experiment!r} (permissions violation)"
                )
        return None

    def request(
        self, subject: str, what: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Msg:
        """PROTOCOL.md 6: one request, the same again (same reply subject, same headers) on a
        timeout, "no responders" or a dropped connection, for 20 s of wall time, moved on
        while JetStream confirms the experiment is there (300 s at most)."""
        self.next_id += 1
        reply = f"{self.inbox}.{self.next_id}"
        if headers:
            block = _headers_block(headers)
            frame = (
                f"HPUB {subject} {reply} {len(block)} {len(block) + len(body)}\r\n".encode()
                + block
                + body
                + b"\r\n"
            )
        else:
            frame = f"PUB {subject} {reply} {len(body)}\r\n".encode() + body + b"\r\n"
        first = time.monotonic()
        give_up, pause = first + RECOVERY_S, 0.05
        why = "no reply"
        while True:
            try:
                if self.sock is None:  # dropped: connect again (after the backoff below)
                    self.connect()
                self.send(frame)
                until = time.monotonic() + self._left(REQUEST_TIMEOUT_S)
                msg = self.take(
                    until, lambda m: m.subject == reply, lambda: self._denial(subject) is not None
                )
                denied = self._denial(subject)
                if denied is not None:
                    raise denied
                if msg is not None and msg.status != 503:
                    return msg
                why = "no responders" if msg is not None else "no reply"
                there = self._experiment_there()
                if there is False:
                    raise TricksError(
                        f"experiment {self.experiment!r} is not running on this NATS "
                        "(no counts bucket)"
                    )
                if there:  # NATS answers: only the coordinator is slow; keep waiting for it
                    give_up = min(first + PATIENCE_S, max(give_up, time.monotonic() + RECOVERY_S))
            except Dropped as exc:
                why = str(exc)
                self.close()  # and on: the budget and the backoff hold for drops too
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise _timed_out()
            if time.monotonic() + pause >= give_up:
                raise NatsUnavailable(f"cannot {what}: NATS did not answer ({why})")
            time.sleep(self._left(pause))  # a backoff between attempts
            pause = min(pause * 2, 1.0)

    def _experiment_there(self) -> bool | None:
        """Whether JetStream has the experiment's counts: True, False (404), None (no answer)."""
        self.next_id += 1
        reply = f"{self.inbox}.{self.next_id}"
        stream = w.stream_of(w.counts_bucket(self.experiment))
        self.send(f"PUB $JS.API.STREAM.INFO.{stream} {reply} 0\r\n\r\n".encode())
        msg = self.take(
            time.monotonic() + self._left(REQUEST_TIMEOUT_S), lambda m: m.subject == reply
        )
        if msg is None or msg.status == 503:
            return None
        try:
            error = json.loads(msg.data).get("error")
        except (ValueError, AttributeError):
            return None
        if not error:
            return True
        return False if isinstance(error, dict) and error.get("code") == 404 else None

    # -- the calls ----------------------------------------------------------------------

    def register(self, event: str, msg_id: str) -> int:
        """PROTOCOL.md 6.1: the count right after this registration."""
        what = f"register event {event!r}"
        headers = {w.MSG_ID_HEADER: msg_id, w.POD_HEADER: self.pod}
        reply = self.request(w.event_subject(self.experiment, event), what, headers)
        answer = _json_object(reply.data)
        error = answer.get("error")
        if error:
            description = error.get("description") if isinstance(error, dict) else error
            raise TricksError(f"registering {event!r} refused: {description}")
        try:
            return int(answer["val"])
        except (KeyError, TypeError, ValueError):
            raise TricksError(
                f"registering {event!r}: no count in the reply {reply.data[:100]!r}"
            ) from None

    def count(self, event: str) -> int:
        """PROTOCOL.md 6.2: the current count (0 if never registered)."""
        exp = self.experiment
        stream = w.stream_of(w.counts_bucket(exp))
        subject = f"$JS.API.DIRECT.GET.{stream}.{w.count_subject(exp, event)}"
        reply = self.request(subject, f"read the count of {event!r}")
        if reply.status is not None:  # 404: never registered
            return 0
        try:
            return int(_json_object(reply.data).get("val", 0))
        except (TypeError, ValueError):
            return 0

    def roster(self, tag: str) -> list[dict[str, Any]]:
        """PROTOCOL.md 6.4 read_roster: the running pods of `tag`, sorted by pod id."""
        exp = self.experiment
        stream = w.stream_of(w.pods_bucket(exp))
        subject = f"$JS.API.DIRECT.GET.{stream}.{w.roster_subject(exp, tag)}"
        reply = self.request(subject, f"read the pods of {tag!r}")
        if reply.status is not None or not reply.data:
            return []
        if reply.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return []
        return _pods(tag, _json_object(reply.data).get("pods"))

    def wait(
        self,
        event: str,
        value: int,
        until: float | None,
        first: Callable[[], int] | None = None,
        notices: list[bytes] | None = None,
    ) -> int:
        """PROTOCOL.md 6.3: subscribe to the threshold's notification first, then read; the
        count decides. `until`: a monotonic deadline (None: forever); a WaitTimeout then.
        `first`: the first read instead of a count (a barrier registers there)."""
        subject = w.reached_subject(self.experiment, event, value)
        pause = 0.05
        while True:
            self.next_id += 1
            sid = f"w{self.next_id}"
            self.subs[sid] = (subject, True)
            try:
                self.send(f"SUB {subject} {sid}\r\nUNSUB {sid} 1\r\n".encode())
                if first is None:
                    self.flush()
                    seen = self.count(event)
                else:  # the registration goes out after the SUB, on this connection
                    seen, first = first(), None
                if seen >= value:
                    return seen
                while True:
                    cut = REQUEST_TIMEOUT_S * 5 if until is None else until - time.monotonic()
                    if cut <= 0:
                        return self._timed_out_waiting(event, value, until)
                    note = self.take(time.monotonic() + cut, lambda m, s=sid: m.sid == s)
                    if note is not None:
                        told = _reached(note.data, event)
                        if told is not None and told >= value:
                            if notices is not None:
                                notices.append(note.data)
                            return told  # only the coordinator may publish it
                        break  # not a count: read it below
                    if until is None:  # a long wait: look once in a while that we still hear
                        self.flush()
            except Dropped:
                self.close()
                time.sleep(self._left(pause))  # a server that drops at once is not hammered
                pause = min(pause * 2, 1.0)
                self.connect()  # resubscribes; then read again
            finally:
                self.subs.pop(sid, None)
            seen = self.count(event)
            if seen >= value:
                return seen

    def _timed_out_waiting(self, event: str, value: int, until: float | None) -> int:
        now = self.count(event)
        if now >= value:
            return now
        raise WaitTimeout(f"waiting for {event!r} to reach {value} (it is {now})")

    def discover(self, tag: str, count: int | None, until: float | None) -> list[dict[str, Any]]:
        """PROTOCOL.md 6.4: the running pods of `tag`; with `count`, first wait for that many."""
        if count is None:
            return self.roster(tag)
        start = w.start_event(tag)
        while True:
            started = self.count(start)
            live = self.roster(tag)
            if len(live) >= count:
                return live
            notices: list[bytes] = []
            try:
                self.wait(start, started + count - len(live), until, notices=notices)
            except WaitTimeout:
                live = self.roster(tag)
                if len(live) >= count:
                    return live
                raise WaitTimeout(
                    f"discovering {count} pods of {tag!r} ({len(live)} running)"
                ) from None
            carried = _carried_roster(notices[-1], tag) if notices else None
            if carried is not None and len(carried) >= count:
                return carried  # the notification carried the roster (PROTOCOL.md 6.4)

    def store_batch(self, body: bytes) -> str | None:
        """PROTOCOL.md 6.6: one batch of samples into the metrics stream, under one message
        id (stored once whatever the retries). None when stored, else why it was refused."""
        exp, pod = self.experiment, self.pod
        msg_id = w.metrics_msg_id(exp, pod, os.urandom(8).hex())
        reply = self.request(
            w.metrics_subject(exp, pod), "store samples", {w.MSG_ID_HEADER: msg_id}, body
        )
        answer = _json_object(reply.data)
        error = answer.get("error")
        if error:
            return str(error.get("description") if isinstance(error, dict) else error)
        if not isinstance(answer.get("seq"), int):  # {"stream": ..., "seq": n}: stored
            return f"not an acknowledgement: {reply.data[:100]!r}"
        return None


def _address(url: str) -> tuple[str, int, str | None, str | None]:
    """(host, port, user, password) of `nats://[user[:password]@]host[:port]`; Unsupported
    for another scheme (tls://, ws://: the full driver speaks them)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "nats", url
    if scheme != "nats":
        raise Unsupported(scheme)
    rest = rest.split("/", 1)[0]
    creds, at, hostport = rest.rpartition("@")
    user, _, password = creds.partition(":") if at else ("", "", "")
    if hostport.startswith("["):  # [::1]:4222
        host, _, after = hostport[1:].partition("]")
        port = after[1:] if after.startswith(":") else ""
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            host = hostport
    if not port.isdigit():
        port = "4222"
    from urllib.parse import unquote  # credentials in a URL are percent-encoded (rare)

    return (
        host or "127.0.0.1",
        int(port),
        unquote(user) if user else None,
        unquote(password) if password else None,
    )


def _reached(data: bytes, event: str) -> int | None:
    """The count a notification's body states for `event` (PROTOCOL.md 6.3), or None."""
    body = _json_object(data)
    value = body.get("value")
    if body.get("event") != event or not isinstance(value, int) or isinstance(value, bool):
        return None
    return value


def _pods(tag: str, pods: object) -> list[dict[str, Any]]:
    """A roster's `pods` as discover returns them, sorted by pod id; what is not a pod is
    skipped."""
    out = []
    for pod in pods if isinstance(pods, list) else []:
        if isinstance(pod, dict) and isinstance(pod.get("pod_id"), int):
            ip = pod.get("ip")
            out.append(
                {
                    "tag": tag,
                    "pod_id": pod["pod_id"],
                    "ip": ip if isinstance(ip, str) else "",
                    "name": w.pod_name(tag, pod["pod_id"]),
                }
            )
    return sorted(out, key=lambda p: p["pod_id"])


def _carried_roster(data: bytes, tag: str) -> list[dict[str, Any]] | None:
    """The roster a `<tag>_start` notification carries, as `roster` gives it; None if none."""
    body = _json_object(data)
    roster = body.get("roster")
    if body.get("event") != w.start_event(tag) or not isinstance(roster, dict):
        return None
    if roster.get("tag") != tag:
        return None
    return _pods(tag, roster.get("pods"))


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _timed_out() -> WaitTimeout:
    """The command's own deadline passed (the shell prints "timed out after <t>s")."""
    return WaitTimeout("")
