"""The conformance scenario in Python (tests/test_conformance.py runs it as every pod of a tag).

Each step prints one line; any failure exits non-zero, so the run's verdict tells it all:
config from env, blocking discover of REPLICAS peers, an event whose publish is sent twice
with the same Nats-Msg-Id (counted once) plus a plain one, a wait that resolves (for HELLO_TOTAL,
default 2 x REPLICAS), a greeting published on a topic and GREET_TOTAL (default REPLICAS)
greetings read back in order, a wait that times out.
"""

from __future__ import annotations

import asyncio
import os
import secrets

from tricks_nats.driver import Driver, PermissionDenied, WaitTimeout


async def main() -> None:
    async with Driver() as tricks:
        me = tricks.config
        assert me.tag == os.environ["TAG"] and me.experiment == os.environ["EXP_ID"]
        assert 0 <= me.pod_id < me.replicas and me.pod_ip == os.environ["POD_IP"]
        print(f"config {me.tag} {me.pod_id}/{me.replicas} {me.experiment} {me.pod_ip}", flush=True)

        peers = await tricks.discover(me.tag, me.replicas, timeout=60)
        assert [p.pod_id for p in peers][: me.replicas] == list(range(me.replicas)), peers
        assert any(p.pod_id == me.pod_id and p.ip == me.pod_ip for p in peers), peers
        print(f"discovered {len(peers)}", flush=True)

        key = secrets.token_hex(8)
        first = await tricks.register_with_id("hello", key)
        again = await tricks.register_with_id("hello", key)
        assert first == again, (first, again)
        plain = await tricks.register_event("hello")
        assert plain > first, (first, plain)
        print(f"registered {first} {again} {plain}", flush=True)

        # PROTOCOL.md 9: a pod may not write a count, a notification or a stored message;
        # the server refuses each with a permissions violation, which fails the request.
        exp, refused, body = me.experiment, 0, b'{"event":"hello","value":1000}'
        for subject, headers in [
            (f"$KV.tricks-{exp}-counts.hello", {"Nats-Incr": "100"}),
            (f"tricks.{exp}.reached.hello.1000", {}),
            (f"tricks.{exp}.stored.greeting", {"Nats-Sequence": "1", "Nats-Last-Sequence": "0"}),
        ]:
            try:
                await tricks.bus.request(subject, body, "forge", headers)
            except PermissionDenied:
                refused += 1
        print(f"forgeries refused {refused}", flush=True)

        total = int(os.environ.get("HELLO_TOTAL", 2 * me.replicas))
        reached = await tricks.wait_event("hello", total, timeout=60)
        assert reached >= total, reached
        print(f"waited {reached}", flush=True)

        for k in (1, 2):
            tricks.record("conformance_ms", me.pod_id * 10 + k, lang="python")
        tricks.record("conformance_ms", me.pod_id * 10 + 3)
        await tricks.flush()
        print("recorded 3", flush=True)

        await tricks.publish("greeting", {"tag": me.tag, "pod_id": me.pod_id})
        greet_total = int(os.environ.get("GREET_TOTAL", me.replicas))
        async with tricks.subscribe("greeting") as sub:
            greetings = await sub.take(greet_total, timeout=60)
        seqs = [m.seq for m in greetings]
        assert seqs == sorted(set(seqs)), seqs
        mine = {"tag": me.tag, "pod_id": me.pod_id}
        assert any(m.is_json and m.json() == mine and m.pod == me.pod for m in greetings)
        print(f"exchanged {greet_total}", flush=True)

        try:
            await tricks.wait_event("never", 1, timeout=0.5)
        except WaitTimeout as exc:
            print(f"timed out as expected: {exc}", flush=True)
        else:
            raise SystemExit("wait for 'never' did not time out")
        print("scenario ok", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
