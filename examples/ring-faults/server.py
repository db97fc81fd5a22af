"""A ring server that survives its neighbours' faults: as examples/ring/server.py, but a
message it cannot pass on (its right neighbour was killed, is paused or restarting) makes it
reconnect and try again, and a server started again (a `restart` fault: same POD_ID, same
POD_IP) simply joins the ring again. Requests lost on the way are the clients' to retry."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal

from tricks_nats.driver import Driver

PORT = int(os.environ.get("RING_PORT", "7100"))


class Right:
    """The connection to the right neighbour, made again whenever it breaks."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, msg: dict[str, object]) -> None:
        for _ in range(200):  # 20 s at most: then the message is dropped
            try:
                if self.writer is None:
                    _, self.writer = await asyncio.open_connection(self.host, PORT)
                self.writer.write(json.dumps(msg).encode() + b"\n")
                await self.writer.drain()
                return
            except OSError:
                self.writer = None
                await asyncio.sleep(0.1)


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Driver() as tricks:
        me = tricks.config
        ring_closed = asyncio.Event()
        clients: dict[str, asyncio.StreamWriter] = {}
        ids = itertools.count()
        peers = await tricks.discover("server", me.replicas, timeout=60)
        right = Right(next(p.ip for p in peers if p.pod_id == (me.pod_id + 1) % me.replicas))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async for line in reader:
                    await on_message(json.loads(line), writer)
            except OSError:
                pass  # a neighbour or a client went away: it will connect again

        async def on_message(msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
            if msg["type"] == "token":
                if msg["origin"] == me.pod_id:
                    ring_closed.set()
                else:
                    await right.send(msg)
            elif msg["type"] == "request":
                rid = f"{me.pod_id}:{next(ids)}"
                clients[rid] = writer
                ring = {"type": "ring", "origin": me.pod_id, "id": rid, "seq": msg["seq"]}
                await right.send({**ring, "hops": 1})
            elif msg["type"] == "ring" and msg["origin"] == me.pod_id:
                back = clients.pop(str(msg["id"]), None)
                if back is not None and not back.is_closing():
                    back.write(json.dumps({"type": "reply", **msg}).encode() + b"\n")
            elif msg["type"] == "ring":
                await right.send({**msg, "hops": int(msg["hops"]) + 1})  # type: ignore[call-overload]

        server = await asyncio.start_server(handle, me.pod_ip, PORT)
        print(f"server {me.pod_id} listening on {me.pod_ip}:{PORT}", flush=True)
        await right.send({"type": "token", "origin": me.pod_id})
        await asyncio.wait_for(ring_closed.wait(), 60)
        print(f"server {me.pod_id}: the ring is closed", flush=True)
        await tricks.register_event("server-connected")
        await stop.wait()
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
