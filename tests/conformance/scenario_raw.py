"""The conformance scenario written from drivers/PROTOCOL.md (version 2) alone: core NATS only
(connect, publish, subscribe, request, headers from nats-py), no JetStream API and nothing of
tricks_nats. It is the proof that the document is enough to write a driver, and a small
example of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

E = os.environ
EXP, TAG, POD_ID, REPLICAS = E["EXP_ID"], E["TAG"], int(E["POD_ID"]), int(E["REPLICAS"])
POD = f"{TAG}-{POD_ID}"
COUNTS, PODS = f"tricks-{EXP}-counts", f"tricks-{EXP}-pods"
RECOVERY_S = 20.0


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


async def main() -> None:
    if E.get("TRICKS_PROTOCOL", "2") not in ("", "2"):
        raise SystemExit(f"TRICKS_PROTOCOL={E['TRICKS_PROTOCOL']}: this pod speaks protocol 2")
    nc = await nats.connect(
        E["TRICKS_NATS_URL"],
        user=E.get("TRICKS_NATS_USER") or None,
        password=E.get("TRICKS_NATS_PASSWORD") or None,
        inbox_prefix=f"_INBOX_{EXP}",  # nats-py adds a random token per connection
        name=f"tricks-{EXP}-{POD}",
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
