"""The parent's side of the worker processes: start them, send commands, gather answers.

Pipes are read through the event loop (`add_reader`), never by blocking it: the parent also
hosts the experiment's count watcher (the coordinator's part) while workers run a measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from bench import worker


class WorkerError(RuntimeError):
    pass


def split(n: int, parts: int) -> list[list[int]]:
    """0..n-1 in `parts` nearly equal, non-empty consecutive runs (fewer parts when n is small)."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


class Pool:
    """`size` worker processes; use `async with Pool(size) as pool`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []

    async def __aenter__(self) -> Pool:
        ctx = multiprocessing.get_context("spawn")
        for i in range(self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker.main, args=(child,), name=f"bench-worker-{i}")
            proc.daemon = True
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("exit", {}))
        loop = asyncio.get_running_loop()
        for proc in self.procs:
            await loop.run_in_executor(None, proc.join, 15)
            if proc.is_alive():
                proc.kill()
                await loop.run_in_executor(None, proc.join, 5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    async def _recv(self, conn: Connection) -> Any:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(conn.fileno(), ready.set)
        try:
            while not conn.poll():
                await ready.wait()
                ready.clear()
        finally:
            loop.remove_reader(conn.fileno())
        try:
            status, value = conn.recv()
        except EOFError as exc:
            raise WorkerError("a benchmark worker died") from exc
        if status != "ok":
            raise WorkerError(value)
        return value

    async def call(self, op: str, per_worker: list[dict[str, Any]]) -> list[Any]:
        """Send `op` to the first len(per_worker) workers (one kwargs each); gather answers."""
        conns = self.conns[: len(per_worker)]
        for conn, kwargs in zip(conns, per_worker, strict=True):
            conn.send((op, kwargs))
        results = await asyncio.gather(*(self._recv(c) for c in conns), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def call_one(self, index: int, op: str, **kwargs: Any) -> Any:
        self.conns[index].send((op, kwargs))
        return await self._recv(self.conns[index])

    async def call_all(self, op: str, **kwargs: Any) -> list[Any]:
        return await self.call(op, [kwargs] * self.size)
