"""A ring client that rides out faults: sends REQUESTS requests, one every INTERVAL_MS, through
its server (pod id modulo the servers) all the way round the ring. A request without a reply
within TIMEOUT_MS (its server or one on the way was killed, paused, restarting) is sent again;
each request's time, retries included, is recorded as `request_ms`, and each retry registers
event `retry`: the faults show in the latency figures and on the timeline."""

from __future__ import annotations

import asyncio
import json
import os

from tricks_nats.driver import Driver

PORT = int(os.environ.get("RING_PORT", "7100"))
REQUESTS = int(os.environ.get("REQUESTS", "300"))
INTERVAL_S = int(os.environ.get("INTERVAL_MS", "10")) / 1000
TIMEOUT_S = int(os.environ.get("TIMEOUT_MS", "300")) / 1000


async def main() -> None:
    loop = asyncio.get_running_loop()
    async with Driver() as tricks:
        me = tricks.config
        servers = await tricks.discover("server")
        mine = servers[me.pod_id % len(servers)]
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        retries = 0
        for seq in range(REQUESTS):
            started = loop.time()
            while True:
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(mine.ip, PORT)
                    reader, writer = conn
                    writer.write(json.dumps({"type": "request", "seq": seq}).encode() + b"\n")
                    await writer.drain()
                    reply = await asyncio.wait_for(_reply_to(reader, seq), TIMEOUT_S)
                    break
                except (OSError, TimeoutError):
                    conn = None  # connect again: the server may have been started again
                    retries += 1
                    await tricks.register_event("retry")
                    await asyncio.sleep(INTERVAL_S)
            tricks.record("request_ms", (loop.time() - started) * 1000)
            if seq == 0:
                print(f"client {me.pod_id}: {reply['hops']} hops", flush=True)
            await asyncio.sleep(INTERVAL_S)
        print(f"client {me.pod_id}: {REQUESTS} requests, {retries} retries", flush=True)


async def _reply_to(reader: asyncio.StreamReader, seq: int) -> dict[str, object]:
    """The reply to request `seq` (a late reply to an earlier attempt is skipped)."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("the server closed the connection")
        reply: dict[str, object] = json.loads(line)
        if reply.get("seq") == seq:
            return reply


if __name__ == "__main__":
    asyncio.run(main())
