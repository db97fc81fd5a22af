"""An experiment's NATS side for tests of drivers in other languages (the JavaScript tests).

python -m tests.conformance.fixture permissions EXP
    print the pod permissions of experiment EXP as JSON (for a nats-server config)
python -m tests.conformance.fixture serve --url URL --exp EXP [--user U --password P]
    create EXP's buckets, follow its counts like the coordinator (CountKeeper), print
    `ready`, then answer one line per command read on stdin until EOF:
      pod TAG ID IP  -> put a running pod         gone TAG ID -> delete it
      count EVENT    -> the count                 incr EVENT  -> +1 as the coordinator
      samples        -> every metrics batch stored so far, as one JSON list of
                        {"subject", "msg_id", "batch"} objects (the batch as sent)
    Each answer is one line: `ok [value]` or `error <message>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from tricks_nats import protocol as p
from tricks_nats.bus import Bus, Endpoint
from tricks_nats.counting import CountKeeper
from tricks_nats.errors import TricksError
from tricks_nats.registrar import Registrar, Rosters


async def _answer(bus: Bus, rosters: Rosters, words: list[str]) -> str:
    match words:
        case ["pod", tag, pod_id, ip]:
            await rosters.started(tag, int(pod_id), ip)
            return "ok"
        case ["expect", tag, replicas]:  # the tag's size: its complete roster rides along
            rosters.expect(tag, int(replicas))
            return "ok"
        case ["gone", tag, pod_id]:
            await rosters.stopped(tag, int(pod_id))
            return "ok"
        case ["count", event]:
            return f"ok {await bus.count(event)}"
        case ["incr", event]:
            return f"ok {await bus.increment(event)}"
        case ["samples"]:
            return f"ok {json.dumps(await _stored_batches(bus))}"
    return f"error unknown command {' '.join(words)!r}"


async def _stored_batches(bus: Bus) -> list[dict[str, object]]:
    stream = p.metrics_stream(bus.exp_id)
    info = await bus.js.stream_info(stream)
    out: list[dict[str, object]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if not info.state.messages:
            break
        msg = await bus.js.get_msg(stream, seq)
        out.append(
            {
                "subject": msg.subject,
                "msg_id": (msg.headers or {}).get(p.MSG_ID_HEADER),
                "batch": json.loads(msg.data or b"{}"),
            }
        )
    return out


async def serve(url: str, exp: str, user: str | None, password: str | None) -> None:
    bus = await Bus.open(Endpoint(url, user, password), exp, name="conformance-fixture")
    watcher = CountKeeper(bus, lambda _e, _v, _pod: None)
    rosters = Rosters(bus, watcher)
    try:
        await bus.create_buckets()
        await watcher.start()
        await Registrar(bus, watcher).start()
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            if not line.split():
                continue
            try:
                answer = await _answer(bus, rosters, line.split())
            except (TricksError, ValueError) as exc:
                answer = f"error {exc}"
            print(answer, flush=True)
    finally:
        await watcher.stop()
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.fixture")
    sub = parser.add_subparsers(dest="command", required=True)
    perms = sub.add_parser("permissions")
    perms.add_argument("exp")
    srv = sub.add_parser("serve")
    srv.add_argument("--url", required=True)
    srv.add_argument("--exp", required=True)
    srv.add_argument("--user")
    srv.add_argument("--password")
    args = parser.parse_args()
    if args.command == "permissions":
        print(json.dumps(p.pod_permissions(args.exp)))
    else:
        asyncio.run(serve(args.url, args.exp, args.user, args.password))


if __name__ == "__main__":
    main()
