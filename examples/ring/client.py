"""A ring client: sends REQUESTS requests through "its" server (pod id modulo the servers) all
the way round the ring, records each round trip as metric `request_ms` (one line:
`tricks.record`), and exits 0. `tricks-nats report runs/<id>` then shows their percentiles."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

from tricks_nats.driver import Driver

PORT = int(os.environ.get("RING_PORT", "7000"))
REQUESTS = int(os.environ.get("REQUESTS", "5"))


async def main() -> None:
    async with Driver() as tricks:
        me = tricks.config
        servers = await tricks.discover("server")
        mine = servers[me.pod_id % len(servers)]
        reader, writer = await asyncio.open_connection(mine.ip, PORT)
        rtts = []
        for seq in range(REQUESTS):
            started = time.perf_counter()
            writer.write(json.dumps({"type": "request", "seq": seq}).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await reader.readline())
            rtts.append((time.perf_counter() - started) * 1000)
            assert reply["seq"] == seq and reply["hops"] == len(servers), reply
            tricks.record("request_ms", rtts[-1])
            if seq < 3:
                print(
                    f"client {me.pod_id} via server {mine.pod_id}: request {seq} went "
                    f"{reply['hops']} hops in {rtts[-1]:.2f} ms",
                    flush=True,
                )
        print(f"client {me.pod_id}: median round trip {statistics.median(rtts):.2f} ms", flush=True)
        writer.close()
        await writer.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
