"""The conformance scenario written from drivers/PROTOCOL.md alone: core NATS only (connect,
publish, subscribe, request, headers from nats-py), no JetStream API and nothing of tricks_nats.
It is the proof that the document is enough to write a driver, and a small example of one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

E = os.environ
EXP, TAG, POD_ID, REPLICAS = E["EXP_ID"], E["TAG"], int(E["POD_ID"]), int(E["REPLICAS"])
POD = f"{TAG}-{POD_ID}"
COUNTS, PODS = f"tricks-{EXP}-counts", f"tricks-{EXP}-pods"


class Timeout(Exception):
    pass


async def increment(nc: Client, event: str, msg_id: str) -> int:  # PROTOCOL 6.1
    headers = {"Nats-Incr": "1", "Nats-Msg-Id": msg_id, "Tricks-Pod": POD}
    for _ in range(5):
        try:
            reply = await nc.request(f"$KV.{COUNTS}.{event}", b"", timeout=2, headers=headers)
        except nats.errors.TimeoutError:
            continue  # retry with the same id: counted once
        ack = json.loads(reply.data)
        if "error" in ack:
            raise RuntimeError(ack["error"]["description"])
        if "val" in ack:
            return int(ack["val"])
        body = json.dumps({"seq": ack["seq"]}).encode()
        original = await nc.request(f"$JS.API.DIRECT.GET.KV_{COUNTS}", body, timeout=2)
        return int(json.loads(original.data)["val"])
    raise RuntimeError("NATS did not answer")


async def count(nc: Client, event: str) -> int:  # PROTOCOL 6.2
    reply = await nc.request(f"$JS.API.DIRECT.GET.KV_{COUNTS}.$KV.{COUNTS}.{event}", b"", timeout=2)
    if reply.headers and reply.headers.get("Status") == "404":
        return 0
    return int(json.loads(reply.data)["val"])


async def wait(nc: Client, event: str, value: int, timeout: float) -> int:  # PROTOCOL 6.3
    sub = await nc.subscribe(f"tricks.{EXP}.reached.{event}.{value}", max_msgs=1)
    try:
        await nc.flush()
        current = await count(nc, event)
        if current >= value:
            return current
        try:
            await sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            now = await count(nc, event)
            if now >= value:
                return now
            raise Timeout(f"{event} is {now}, not {value}") from None
        return max(value, current)
    finally:
        await sub.unsubscribe()


async def discover(nc: Client, tag: str, want: int, timeout: float) -> list[dict]:  # 6.4
    stream, prefix = f"KV_{PODS}", f"$KV.{PODS}."
    name, deliver = f"d{secrets.token_hex(6)}", f"_INBOX_{EXP}.discover.{secrets.token_hex(6)}"
    subject = f"{prefix}{tag}.*"
    live: dict[str, dict] = {}
    caught_up = asyncio.Event()
    enough = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        headers = msg.headers or {}
        if headers.get("Status") == "100":  # flow control (with a reply) or heartbeat
            if msg.reply:
                await nc.publish(msg.reply, b"")
            return
        key = msg.subject[len(prefix) :]
        if headers.get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            live.pop(key, None)
        else:
            live[key] = json.loads(msg.data)
        tokens = (msg.reply or "").split(".")
        pending = int(tokens[8] if len(tokens) == 9 else tokens[10])
        if pending == 0:
            caught_up.set()
        if caught_up.is_set() and len(live) >= want:
            enough.set()

    sub = await nc.subscribe(deliver, cb=on_msg)  # before the consumer exists: nothing lost
    config = {
        "name": name,
        "deliver_subject": deliver,
        "filter_subject": subject,
        "deliver_policy": "last_per_subject",
        "ack_policy": "none",
        "max_deliver": 1,
        "flow_control": True,
        "idle_heartbeat": 5_000_000_000,
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": 300_000_000_000,
    }
    body = json.dumps({"stream_name": stream, "config": config}).encode()
    try:
        reply = await nc.request(
            f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{subject}", body, timeout=2
        )
        info = json.loads(reply.data)
        if "error" in info:
            raise RuntimeError(info["error"]["description"])
        if info["num_pending"] == 0:
            caught_up.set()
        if caught_up.is_set() and len(live) >= want:
            enough.set()
        try:
            await asyncio.wait_for(enough.wait(), timeout)
        except TimeoutError:
            raise Timeout(f"{len(live)} pods of {tag}, not {want}") from None
        return sorted(live.values(), key=lambda pod: pod["pod_id"])
    finally:
        await sub.unsubscribe()
        await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=2)


async def main() -> None:
    nc = await nats.connect(
        E["TRICKS_NATS_URL"],
        user=E.get("TRICKS_NATS_USER") or None,
        password=E.get("TRICKS_NATS_PASSWORD") or None,
        inbox_prefix=f"_INBOX_{EXP}",
        name=f"tricks-{EXP}-{POD}",
    )
    try:
        print(f"config {TAG} {POD_ID}/{REPLICAS} {EXP} {E['POD_IP']}", flush=True)
        peers = await discover(nc, TAG, REPLICAS, 60)
        assert [p["pod_id"] for p in peers][:REPLICAS] == list(range(REPLICAS)), peers
        assert any(p["pod_id"] == POD_ID and p["ip"] == E["POD_IP"] for p in peers), peers
        print(f"discovered {len(peers)}", flush=True)

        msg_id = f"{EXP}.{POD}.hello.{secrets.token_hex(8)}"
        first, again = await increment(nc, "hello", msg_id), await increment(nc, "hello", msg_id)
        assert first == again, (first, again)
        plain = await increment(nc, "hello", f"{EXP}.{POD}.hello.{secrets.token_hex(8)}")
        assert plain > first
        print(f"registered {first} {again} {plain}", flush=True)

        total = int(E.get("HELLO_TOTAL", 2 * REPLICAS))
        reached = await wait(nc, "hello", total, 60)
        assert reached >= total
        print(f"waited {reached}", flush=True)

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
