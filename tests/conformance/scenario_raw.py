"""The conformance scenario written from drivers/PROTOCOL.md (version 2) alone: core NATS only
(connect, publish, subscribe, request, headers from nats-py), no JetStream API and nothing of
tricks_nats. It is the proof that the document is enough to write a driver, and a small
example of one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import secrets
from typing import Any, NamedTuple

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

E = os.environ
EXP, TAG, POD_ID, REPLICAS = E["EXP_ID"], E["TAG"], int(E["POD_ID"]), int(E["REPLICAS"])
POD = f"{TAG}-{POD_ID}"
COUNTS, PODS, TOPICS = f"tricks-{EXP}-counts", f"tricks-{EXP}-pods", f"tricks-{EXP}-topics"
RECOVERY_S = 20.0
#: The queues of the open topic subscriptions: each hears of every reconnect (PROTOCOL 6.8, 4).
SUBSCRIBED: list[asyncio.Queue[Msg | None]] = []


class Timeout(Exception):
    pass


async def request(
    nc: Client, subject: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> Msg:
    """PROTOCOL 6: the same request again on a timeout or "no responders", for 20 s."""
    loop = asyncio.get_running_loop()
    deadline, pause = loop.time() + RECOVERY_S, 0.05
    while True:
        try:
            return await nc.request(subject, body, timeout=2, headers=headers)
        except nats.errors.NoRespondersError:
            with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                info = await nc.request(f"$JS.API.STREAM.INFO.KV_{COUNTS}", b"", timeout=2)
                if json.loads(info.data).get("error", {}).get("code") == 404:
                    raise RuntimeError(f"experiment {EXP} is not running") from None
        except nats.errors.TimeoutError:
            pass
        if loop.time() + pause >= deadline:
            raise RuntimeError(f"NATS did not answer on {subject}")
        await asyncio.sleep(pause)  # a backoff between attempts
        pause = min(pause * 2, 1.0)


def status(reply: Msg) -> str | None:
    """The status line's code (`NATS/1.0 404 ...`), which nats-py surfaces as "Status"."""
    return (reply.headers or {}).get("Status")


async def register(nc: Client, event: str, msg_id: str) -> int:  # PROTOCOL 6.1
    headers = {"Nats-Msg-Id": msg_id, "Tricks-Pod": POD}
    reply = await request(nc, f"tricks.{EXP}.event.{event}", headers)
    answer = json.loads(reply.data)
    if "error" in answer:
        raise RuntimeError(answer["error"]["description"])
    return int(answer["val"])


async def count(nc: Client, event: str) -> int:  # PROTOCOL 6.2
    reply = await request(nc, f"$JS.API.DIRECT.GET.KV_{COUNTS}.$KV.{COUNTS}.{event}")
    if status(reply) == "404":
        return 0
    return int(json.loads(reply.data)["val"])


async def wait(nc: Client, event: str, value: int, timeout: float) -> int:  # PROTOCOL 6.3
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        sub = await nc.subscribe(f"tricks.{EXP}.reached.{event}.{value}")
        try:
            await sub.unsubscribe(limit=1)  # one-shot: the server drops it after one message
            await nc.flush()  # the server has the subscription before we read
            current = await count(nc, event)
            if current >= value:
                return current
            try:
                await sub.next_msg(timeout=max(0.001, deadline - loop.time()))
            except nats.errors.TimeoutError:
                now = await count(nc, event)
                if now >= value:
                    return now
                raise Timeout(f"{event} is {now}, not {value}") from None
            current = await count(nc, event)  # a notification is a hint: the count decides
            if current >= value:
                return current
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        # short: subscribe again first, then read again (the loop)


async def roster(nc: Client, tag: str) -> list[dict[str, Any]]:  # PROTOCOL 6.4, read_roster
    reply = await request(nc, f"$JS.API.DIRECT.GET.KV_{PODS}.$KV.{PODS}.{tag}")
    deleted = (reply.headers or {}).get("KV-Operation") in ("DEL", "PURGE")
    if status(reply) == "404" or deleted or not reply.data:
        return []
    records = []
    for pod in sorted(json.loads(reply.data)["pods"], key=lambda pod: pod["pod_id"]):
        n = pod["pod_id"]  # unknown fields are ignored
        records.append({"tag": tag, "pod_id": n, "ip": pod.get("ip", ""), "name": f"{tag}-{n}"})
    return records


async def discover(nc: Client, tag: str, want: int, timeout: float) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()  # PROTOCOL 6.4
    deadline = loop.time() + timeout  # one deadline for the whole call
    while True:
        started = await count(nc, f"{tag}_start")  # FIRST the count,
        pods = await roster(nc, tag)  # THEN the roster: every start counted is in it
        if len(pods) >= want:
            return pods
        try:
            await wait(nc, f"{tag}_start", started + want - len(pods), deadline - loop.time())
        except Timeout:
            raise Timeout(f"{len(pods)} pods of {tag}, not {want}") from None


async def record(nc: Client, samples: list[list[Any]]) -> bool:  # PROTOCOL 6.6
    """One batch, sent twice under one message id (a retry): stored once. True when the
    second send was acknowledged as the duplicate it is."""
    body = json.dumps({"samples": samples, "dropped": 0}).encode()
    headers = {"Nats-Msg-Id": f"{EXP}.{POD}.metrics.{secrets.token_hex(8)}"}
    acks = []
    for _ in range(2):
        reply = await request(nc, f"tricks.{EXP}.metrics.{POD}", headers, body)
        ack = json.loads(reply.data)
        if "error" in ack:
            raise RuntimeError(f"batch refused: {ack['error']}")
        acks.append(ack)
    return bool(acks[1].get("duplicate")) and acks[0]["seq"] == acks[1]["seq"]


async def publish(nc: Client, topic: str, body: bytes, is_json: bool) -> int:  # PROTOCOL 6.7
    headers = {
        "Nats-Msg-Id": f"{EXP}.{POD}.topic.{topic}.{secrets.token_hex(8)}",
        "Tricks-Pod": POD,
    }
    if is_json:
        headers["Tricks-Type"] = "json"
    loop = asyncio.get_running_loop()
    deadline, pause = loop.time() + RECOVERY_S, 0.05
    while True:  # the same request (same id) on every retry: stored once
        ack = json.loads((await request(nc, f"tricks.{EXP}.topic.{topic}", headers, body)).data)
        error = ack.get("error")
        if not error:
            return int(ack["seq"])
        if error.get("err_code") != 10158 or loop.time() + pause >= deadline:
            raise RuntimeError(f"publish on {topic} refused: {error.get('description')}")
        await asyncio.sleep(pause)  # "duplicate message id is in process": ask again
        pause = min(pause * 2, 1.0)


class TopicMessage(NamedTuple):
    seq: int
    pod: str
    data: bytes
    is_json: bool


def header_block(block: bytes) -> dict[str, str]:
    """`NATS/1.0\r\nKey: Value\r\n...` (a stored message's `hdrs`) as a dict."""
    lines = block.decode(errors="replace").split("\r\n")[1:]
    return {k.strip(): v.strip() for k, sep, v in (ln.partition(":") for ln in lines) if sep}


class Topic:  # PROTOCOL 6.8
    """Every message of a topic from the start of the run, in order, each once."""

    def __init__(self, nc: Client, topic: str) -> None:
        self.nc, self.topic, self.last, self.behind = nc, topic, 0, True
        self.queue: asyncio.Queue[Msg | None] = asyncio.Queue()  # None: reconnected

    async def open(self) -> None:
        SUBSCRIBED.append(self.queue)
        # 1. subscribe FIRST: stored later reaches it, stored before is found by the reads
        self.sub = await self.nc.subscribe(f"tricks.{EXP}.stored.{self.topic}", cb=self.queue.put)

    async def close(self) -> None:
        SUBSCRIBED.remove(self.queue)
        with contextlib.suppress(nats.errors.Error):
            await self.sub.unsubscribe()

    async def read(self) -> TopicMessage | None:
        """2. The topic's first message after `last`, from the stream's leader (None: none)."""
        body = json.dumps(
            {"seq": self.last + 1, "next_by_subj": f"tricks.{EXP}.topic.{self.topic}"}
        )
        reply = await request(self.nc, f"$JS.API.STREAM.MSG.GET.{TOPICS}", None, body.encode())
        answer = json.loads(reply.data)
        if "error" in answer:
            if answer["error"].get("err_code") == 10037:
                return None  # "no message found": up to date
            raise RuntimeError(f"reading {self.topic}: {answer['error'].get('description')}")
        got = answer["message"]
        h = header_block(base64.b64decode(got.get("hdrs") or ""))
        data = base64.b64decode(got.get("data") or "")
        return TopicMessage(
            got["seq"], h.get("Tricks-Pod", ""), data, h.get("Tricks-Type") == "json"
        )

    async def next(self, timeout: float) -> TopicMessage:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.behind:
                found = await self.read()
                if found is None:
                    self.behind = False
                    continue
                self.last = found.seq
                return found
            try:
                msg = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise Timeout(f"no message on {self.topic} after seq {self.last}") from None
            if msg is None:
                self.behind = True  # 4. reconnected: republished messages may have been lost
                continue
            h = msg.headers or {}
            try:  # 3. a republished message
                seq, prev = int(h["Nats-Sequence"]), int(h["Nats-Last-Sequence"])
            except (KeyError, ValueError):
                print(f"ignoring a republished message without sequences: {h}", flush=True)
                continue
            if seq <= self.last:
                continue  # delivered already (by a read)
            if prev != self.last:
                self.behind = True  # one was missed: the reads deliver it, then this one
                continue
            self.last = seq
            return TopicMessage(
                seq, h.get("Tricks-Pod", ""), msg.data, h.get("Tricks-Type") == "json"
            )


async def reconnected() -> None:
    for queue in SUBSCRIBED:
        queue.put_nowait(None)


#: Asynchronous errors from the server: a permissions violation arrives only this way (6).
ERRORS: list[str] = []
ERROR_CAME = asyncio.Event()


async def on_error(exc: Exception) -> None:
    ERRORS.append(str(exc).lower())
    ERROR_CAME.set()


async def refused(subject: str) -> bool:
    """Whether the server said "Permissions Violation for Publish to <subject>" (it says it
    in its own time: maybe after the replies to later commands)."""
    said = f'publish to "{subject.lower()}"'
    async with asyncio.timeout(RECOVERY_S):
        while not any(said in e for e in ERRORS):
            ERROR_CAME.clear()
            await ERROR_CAME.wait()
    return True


async def forge(nc: Client) -> int:
    """PROTOCOL 9: a pod may not write a count, a notification or a stored topic message.
    Each try gets a permissions violation; how many did."""
    tries = [
        (f"$KV.{COUNTS}.hello", {"Nats-Incr": "100"}),
        (f"tricks.{EXP}.reached.hello.1000", {}),
        (f"tricks.{EXP}.stored.greeting", {"Nats-Sequence": "1", "Nats-Last-Sequence": "0"}),
    ]
    for subject, headers in tries:
        await nc.publish(subject, b'{"event":"hello","value":1000}', headers=headers or None)
    return sum([await refused(subject) for subject, _ in tries])


async def main() -> None:
    if E.get("TRICKS_PROTOCOL", "2") not in ("", "2"):
        raise SystemExit(f"TRICKS_PROTOCOL={E['TRICKS_PROTOCOL']}: this pod speaks protocol 2")
    nc = await nats.connect(
        E["TRICKS_NATS_URL"],
        user=E.get("TRICKS_NATS_USER") or None,
        password=E.get("TRICKS_NATS_PASSWORD") or None,
        inbox_prefix=f"_INBOX_{EXP}",  # nats-py adds a random token per connection
        name=f"tricks-{EXP}-{POD}",
        reconnected_cb=reconnected,
        error_cb=on_error,
    )
    try:
        print(f"config {TAG} {POD_ID}/{REPLICAS} {EXP} {E['POD_IP']}", flush=True)
        peers = await discover(nc, TAG, REPLICAS, 60)
        assert [p["pod_id"] for p in peers][:REPLICAS] == list(range(REPLICAS)), peers
        assert any(p["pod_id"] == POD_ID and p["ip"] == E["POD_IP"] for p in peers), peers
        print(f"discovered {len(peers)}", flush=True)

        msg_id = f"{EXP}.{POD}.hello.{secrets.token_hex(8)}"
        first, again = await register(nc, "hello", msg_id), await register(nc, "hello", msg_id)
        assert first == again, (first, again)
        plain = await register(nc, "hello", f"{EXP}.{POD}.hello.{secrets.token_hex(8)}")
        assert plain > first
        print(f"registered {first} {again} {plain}", flush=True)
        print(f"forgeries refused {await forge(nc)}", flush=True)

        total = int(E.get("HELLO_TOTAL", 2 * REPLICAS))
        reached = await wait(nc, "hello", total, 60)
        assert reached >= total
        print(f"waited {reached}", flush=True)

        import time

        now = time.time()
        samples = [[now, "conformance_ms", POD_ID * 10 + k, {"lang": "protocol"}] for k in (1, 2)]
        stored_once = await record(nc, [*samples, [now, "conformance_ms", POD_ID * 10 + 3]])
        assert stored_once
        print("recorded 3", flush=True)

        hello = {"tag": TAG, "pod_id": POD_ID}
        mine = await publish(nc, "greeting", json.dumps(hello).encode(), is_json=True)
        greetings = Topic(nc, "greeting")
        await greetings.open()
        loop, got = asyncio.get_running_loop(), []
        deadline = loop.time() + 60  # one deadline for all of them
        try:
            for _ in range(int(E.get("GREET_TOTAL", REPLICAS))):
                got.append(await greetings.next(deadline - loop.time()))
        finally:
            await greetings.close()
        assert all(a.seq < b.seq for a, b in itertools.pairwise(got)), got
        assert any(
            m.seq == mine and m.pod == POD and m.is_json and json.loads(m.data) == hello
            for m in got
        ), got
        print(f"exchanged {len(got)}", flush=True)

        try:
            await wait(nc, "never", 1, 0.5)
        except Timeout as exc:
            print(f"timed out as expected: {exc}", flush=True)
        else:
            raise SystemExit("wait for 'never' did not time out")
        print("scenario ok", flush=True)
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
