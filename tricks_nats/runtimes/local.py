"""Pods as local processes: one process group each, its own loopback address, logs line by line.

Every 127.x.y.z address is loopback on Linux, so each pod gets its own `POD_IP` and the same
program can bind a fixed port here and on Kubernetes. Terminating a pod signals its whole group
(SIGTERM, grace, SIGKILL); when a pod's main process exits, whatever it left in its group is
killed, so nothing outlives the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from tricks_nats.errors import RuntimeFailure
from tricks_nats.runtimes import PodEvent, PodPlan, exit_code_of
from tricks_nats.watchdog import Watchdog

log = logging.getLogger(__name__)

#: After the main process exits, how long its output may keep flowing before we cut it.
DRAIN_S = 2.0


class _Pod:
    def __init__(self, plan: PodPlan, proc: asyncio.subprocess.Process, ip: str) -> None:
        self.plan = plan
        self.proc = proc
        self.ip = ip
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class LocalRuntime:
    name = "local"

    def __init__(self) -> None:
        self.events: asyncio.Queue[PodEvent] = asyncio.Queue()
        self._pods: dict[tuple[str, int], _Pod] = {}
        # A random second octet keeps two runs on one machine off each other's addresses.
        self._net = 1 + secrets.randbelow(254)
        self._next = 0
        # Kills every pod's group if this process dies without cleaning up (SIGKILL).
        self.watchdog = Watchdog()

    # -- planning -------------------------------------------------------------------------

    @staticmethod
    def pod_path(base: str | None = None) -> str:
        """PATH for pods: this interpreter's directory first, so `python` and `tricks-nats`
        inside a pod are the ones tricks-nats runs with."""
        here = str(Path(sys.executable).parent)
        rest = base if base is not None else os.environ.get("PATH", "")
        return os.pathsep.join([here, rest]) if rest else here

    def check(self, plans: Iterable[PodPlan]) -> list[str]:
        problems: dict[str, str] = {}
        for plan in plans:
            if not plan.command:
                problems[plan.tag] = f"tag {plan.tag!r} has no command"
                continue
            program = plan.command[0]
            if "/" in program:
                path = plan.cwd / program
                if not path.exists():
                    problems[plan.tag] = f"tag {plan.tag!r}: command {program!r} not found"
                elif not os.access(path, os.X_OK):
                    problems[plan.tag] = f"tag {plan.tag!r}: command {program!r} is not executable"
            elif not shutil.which(program, path=self.pod_path(plan.env.get("PATH"))):
                problems[plan.tag] = f"tag {plan.tag!r}: command {program!r} not found on PATH"
        return list(problems.values())

    def _address(self) -> str:
        self._next += 1
        n = self._next
        return f"127.{self._net}.{n // 250}.{n % 250 + 1}"

    # -- lifecycle ------------------------------------------------------------------------

    async def launch(self, plan: PodPlan) -> None:
        if not plan.command:
            raise RuntimeFailure(f"pod {plan.name} has no command")
        ip = self._address()
        env = {
            **os.environ,
            **plan.env,
            "POD_IP": ip,
            "PATH": self.pod_path(plan.env.get("PATH")),
            "PYTHONUNBUFFERED": "1",
        }
        plan.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                *plan.command,
                cwd=plan.cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                limit=1 << 20,
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            reason = f"cannot start {plan.command[0]!r}: {exc.strerror or exc}"
            plan.log_path.write_text(f"tricks-nats: {reason}\n")
            await self.events.put(
                PodEvent("exited", plan.tag, plan.pod_id, exit_code=code, reason=reason)
            )
            return
        self.watchdog.guard(proc.pid)
        pod = _Pod(plan, proc, ip)
        self._pods[(plan.tag, plan.pod_id)] = pod
        await self.events.put(PodEvent("running", plan.tag, plan.pod_id, ip=ip))
        pod.task = asyncio.create_task(self._supervise(pod), name=f"pod-{plan.name}")

    async def _supervise(self, pod: _Pod) -> None:
        proc = pod.proc
        assert proc.stdout is not None
        copier = asyncio.create_task(self._copy(proc.stdout, pod.plan.log_path))
        returncode = await proc.wait()
        # The group may hold children that outlive the main process: end them now.
        self._signal_group(proc.pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(copier), DRAIN_S)
        except TimeoutError:
            copier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copier
        pod.done.set()
        self.watchdog.release(proc.pid)
        await self.events.put(
            PodEvent(
                "exited",
                pod.plan.tag,
                pod.plan.pod_id,
                ip=pod.ip,
                exit_code=exit_code_of(returncode),
            )
        )

    @staticmethod
    async def _copy(stream: asyncio.StreamReader, path: Path) -> None:
        with path.open("ab") as sink:
            while True:
                try:
                    line = await stream.readline()
                except ValueError:  # a line longer than the limit: take what is there
                    line = await stream.read(1 << 20)
                if not line:
                    return
                sink.write(line)
                sink.flush()

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    async def terminate(self, tag: str, pod_id: int, grace: float) -> None:
        pod = self._pods.get((tag, pod_id))
        if pod is None or pod.done.is_set():
            return
        self._signal_group(pod.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(pod.done.wait(), grace)
        except TimeoutError:
            self._signal_group(pod.proc.pid, signal.SIGKILL)
            await pod.done.wait()

    async def aclose(self, grace: float) -> None:
        await asyncio.gather(
            *(self.terminate(tag, pod_id, grace) for tag, pod_id in list(self._pods))
        )
        tasks = [p.task for p in self._pods.values() if p.task]
        await asyncio.gather(*tasks, return_exceptions=True)
        self.watchdog.close()
