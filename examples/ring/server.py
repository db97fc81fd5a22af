"""A ring server: listens on POD_IP:RING_PORT, connects to its right neighbour, proves the ring
by sending a token all the way round, registers `server-connected`, then forwards client
requests around the ring until it is told to stop (SIGTERM)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time

from tricks_nats.driver import Driver

PORT = int(os.environ.get("RING_PORT", "7000"))


async def connect(host: str, port: int, attempts: int = 100) -> asyncio.StreamWriter:
    """The neighbour is running but may not listen yet: retry for a while."""
    for attempt in range(attempts):
        try:
            _, writer = await asyncio.open_connection(host, port)
            return writer
        except OSError:
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
    raise SystemExit(f"cannot connect to {host}:{port}")


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Driver() as tricks:
        me = tricks.config
        ring_closed = asyncio.Event()
        clients: dict[str, asyncio.StreamWriter] = {}
        ids = itertools.count()
        right: asyncio.StreamWriter | None = None
        right_ready = asyncio.Event()

        async def forward(msg: dict[str, object]) -> None:
            await right_ready.wait()  # a token may arrive before we reach our neighbour
            assert right is not None
            right.write(json.dumps(msg).encode() + b"\n")
            await right.drain()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async for line in reader:
                msg = json.loads(line)
                if msg["type"] == "token":
                    if msg["origin"] == me.pod_id:
                        ring_closed.set()
                    else:
                        await forward(msg)
                elif msg["type"] == "request":  # from a client: send it round the ring
                    rid = f"{me.pod_id}:{next(ids)}"
                    clients[rid] = writer
                    await forward(
                        {
                            "type": "ring",
                            "origin": me.pod_id,
                            "id": rid,
                            "hops": 1,
                            "seq": msg["seq"],
                        }
                    )
                elif msg["type"] == "ring":
                    if msg["origin"] == me.pod_id:
                        back = clients.pop(msg["id"])
                        reply = {"type": "reply", "seq": msg["seq"], "hops": msg["hops"]}
                        back.write(json.dumps(reply).encode() + b"\n")
                        await back.drain()
                    else:
                        msg["hops"] += 1
                        await forward(msg)

        server = await asyncio.start_server(handle, me.pod_ip, PORT)
        print(f"server {me.pod_id} listening on {me.pod_ip}:{PORT}", flush=True)
        peers = await tricks.discover("server", me.replicas, timeout=60)
        neighbour = next(p for p in peers if p.pod_id == (me.pod_id + 1) % me.replicas)
        right = await connect(neighbour.ip, PORT)
        right_ready.set()
        print(
            f"server {me.pod_id} connected to server {neighbour.pod_id} at {neighbour.ip}",
            flush=True,
        )
        sent = time.perf_counter()
        await forward({"type": "token", "origin": me.pod_id})
        await asyncio.wait_for(ring_closed.wait(), 60)
        took = (time.perf_counter() - sent) * 1000
        print(
            f"server {me.pod_id}: token went round the ring of {me.replicas} in {took:.3f} ms",
            flush=True,
        )
        await tricks.register_event("server-connected")
        await stop.wait()
        print(f"server {me.pod_id}: stopping", flush=True)
        server.close()
        right.close()


if __name__ == "__main__":
    asyncio.run(main())
