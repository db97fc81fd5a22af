"""Pods as local processes: one process group each, its own loopback address, logs line by line.

Every 127.x.y.z address is loopback on Linux, so each pod gets its own `POD_IP` and the same
program can bind a fixed port here and on Kubernetes (up to `MAX_PODS` pods per run).

Nothing a pod starts may hang `up` or outlive the run:

- A pod ends when its main process exits, learnt from a pidfd (Linux 5.3+; a thread waits on
  older kernels), never from its output pipe: a child that keeps the pipe open (`cmd &`, a
  daemon) cannot hold the pod. At that moment whatever the pod left is killed, its output is
  read for `DRAIN_S` more at most, then the pipe is closed.
- The pipe is always read. A log that cannot be written (full disk, removed directory) loses
  bytes, counted in the pod's `exited` event (`log_bytes_lost`), never blocks the pod.
- Terminating a pod signals its group (SIGTERM, grace, SIGKILL); a main process that does not
  die `KILL_WAIT_S` after SIGKILL (uninterruptible sleep) is abandoned with a reason.
- Processes that left their group (`setsid`, a double fork) are found in two ways:
  1. a cgroup v2 per run, one child cgroup per pod, made under `up`'s own cgroup (the
     unified hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid mode). A pod's
     processes cannot leave it without privileges, and `cgroup.kill` (Linux 5.14+) kills a
     whole tree atomically, even while it forks: the pod's cgroup at the pod's end, the run's
     at the end of the run, and the watchdog kills the run's if `up` dies. v2 is chosen over the
     v1 `pids`/`freezer` hierarchies because v1 has no atomic kill (freeze, kill, thaw is racy
     and slower) and v1 is legacy: mounts without v2 are rare, and the marker below covers them.
  2. always, and alone where no writable cgroup v2 with `cgroup.kill` exists (or with
     TRICKS_NATS_CGROUP=off): every pod's environment carries `TRICKS_RUN_TOKEN=<random>`; at
     the end of the run (and by the watchdog if `up` dies) every process carrying it is
     killed. A daemon that escaped its group then lives until the end of the run, not the end
     of its pod; a process that clears its environment (`env -i`) escapes this net.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from io import FileIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tricks_nats import env as envnames
from tricks_nats.errors import RuntimeFailure
from tricks_nats.runtimes import NatsRoute, PodEvent, PodPlan, exit_code_of
from tricks_nats.watchdog import Watchdog, kill_cgroup, kill_pids, marked_pids, rmdir_cgroup

if TYPE_CHECKING:
    from tricks_nats.faults import Fault, FaultAction
    from tricks_nats.netfaults import NetFaults
    from tricks_nats.spec import Experiment

log = logging.getLogger(__name__)

#: After the main process exits, how long its output may keep flowing before we cut it.
DRAIN_S = 2.0
#: After SIGKILL, how long to wait for a main process before giving up on it.
KILL_WAIT_S = 5.0
#: At the end of a run, how long to keep killing marked processes and removing cgroups.
SWEEP_S = 10.0
#: Pods one run can address: 127.<run>.<0..255>.<1..250>.
MAX_PODS = 256 * 250
#: The environment entry that marks every process of a run.
MARKER = envnames.RUN_TOKEN
#: Set to `off` to track pods by MARKER alone, without cgroups.
CGROUP_SWITCH = "TRICKS_NATS_CGROUP"

_CHUNK = 1 << 16
_MAX_LINE = 1 << 20  # a line longer than this is written as it comes


class _LogCopier:
    """Reads a pod's output pipe whenever it is readable and appends whole lines to the log.
    A write that fails drops those bytes (counted in `lost`); the pipe is read regardless."""

    def __init__(
        self, fd: int, path: Path, name: str, tap: Callable[[bytes], None] | None = None
    ) -> None:
        self.fd = fd
        self._tap = tap
        self.name = name
        self.lost = 0
        self.eof = asyncio.Event()
        self._pending = bytearray()
        self._error: str | None = None
        self._sink = self._open(path)
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _open(self, path: Path) -> FileIO | None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("ab", buffering=0)
        except OSError as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: OSError) -> None:
        if self._error is None:
            self._error = exc.strerror or str(exc)
            log.warning("log of %s: %s; its output is dropped", self.name, self._error)

    @property
    def incomplete(self) -> str | None:
        """Why the log lacks part of the output, if it does."""
        if not self.lost:
            return None
        return f"{self.lost} bytes of output lost: {self._error or 'unknown error'}"

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._take(data)
        else:
            self.close()

    def _take(self, data: bytes) -> None:
        self._pending += data
        cut = self._pending.rfind(b"\n") + 1
        if len(self._pending) >= _MAX_LINE:
            cut = len(self._pending)
        if cut:
            self._write(bytes(self._pending[:cut]))
            del self._pending[:cut]

    def _write(self, data: bytes) -> None:
        if self._tap is not None:
            self._tap(data)
        view = memoryview(data)
        while view:
            if self._sink is None:
                self.lost += len(view)
                return
            try:
                n = self._sink.write(view)
            except OSError as exc:
                self._failed(exc)
                n = 0
            if not n:
                self.lost += len(view)
                return
            view = view[n:]

    def close(self) -> None:
        """Stop reading: what the pipe holds now is still taken, what comes later is not."""
        if self.fd < 0:
            return
        self._loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            for _ in range(_MAX_LINE // _CHUNK):
                data = os.read(self.fd, _CHUNK)
                if not data:
                    break
                self._take(data)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1
        if self._pending:
            self._write(bytes(self._pending))
            self._pending.clear()
        if self.lost and self._sink is not None:  # say so in the log too, if it takes it now
            with contextlib.suppress(OSError):
                self._sink.write(f"\ntricks-nats: {self.incomplete}\n".encode())
        if self._sink is not None:
            with contextlib.suppress(OSError):
                self._sink.close()
            self._sink = None
        self.eof.set()


class _Pod:
    def __init__(
        self, plan: PodPlan, proc: subprocess.Popen[bytes], ip: str, cgroup: Path | None
    ) -> None:
        self.plan = plan
        self.proc = proc
        self.ip = ip
        self.cgroup = cgroup
        self.copier: _LogCopier | None = None
        #: The main process' return code once it has exited (None: abandoned, never reaped).
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.pidfd = -1
        self.reason: str | None = None
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        #: tricks-nats signalled it (a stop, a fault): its death by a signal is no preemption.
        self.signalled = False
        self.paused = False


class LocalRuntime:
    name = "local"

    def __init__(
        self, *, cgroups: bool | None = None, network_faults: bool = False, pods: int = 0
    ) -> None:
        self.events: asyncio.Queue[PodEvent] = asyncio.Queue()
        self._pods: dict[tuple[str, int], _Pod] = {}
        # A random second octet keeps two runs on one machine off each other's addresses.
        self._net = 1 + secrets.randbelow(254)
        self._next = 0
        self._spawned = 0
        # Kills every pod if this process dies without cleaning up (SIGKILL).
        self.watchdog = Watchdog()
        if cgroups is None:
            cgroups = os.environ.get(CGROUP_SWITCH, "").lower() not in ("off", "0", "no", "false")
        self._want_cgroups = cgroups
        self._marker = f"{MARKER}={secrets.token_hex(16)}"
        self._run_cgroup: Path | None = None  # where new pods go (None: no cgroups)
        self._made_cgroup: Path | None = None  # what to remove at the end
        self._ready = False
        self._closing = False
        #: Network faults (netfaults.py): made ready in `prepare`, for `pods` pod addresses.
        self._want_net = network_faults
        self._net_pods = pods
        self._netfaults: NetFaults | None = None
        #: Each pod's index among the run's addresses (its net_cls cgroup).
        self._index: dict[tuple[str, int], int] = {}

    @classmethod
    def for_experiment(cls, exp: Experiment, exp_id: str, options: Any) -> LocalRuntime:
        network = any(f.network for f in exp.faults)
        return cls(network_faults=network, pods=exp.pod_count if network else 0)

    def nats_route(self, nats_url: str | None) -> NatsRoute:
        """Pods run on this machine: they reach NATS where the coordinator does."""
        return NatsRoute(nats_url)

    async def prepare(self) -> None:
        """With network faults: mark every pod's sockets and set up the run's nftables table
        before anything starts (a UsageError, starting nothing, if this machine cannot)."""
        if not self._want_net or self._netfaults is not None:
            return
        from tricks_nats.netfaults import NetFaults

        faults = NetFaults(self._net, self._marker.partition("=")[2][:12], self.watchdog)
        await faults.start(min(self._net_pods, MAX_PODS))
        self._netfaults = faults

    @property
    def tracking(self) -> Literal["cgroup", "environ"]:
        """How escaped processes are found (known once the first pod has been launched)."""
        return "cgroup" if self._run_cgroup is not None else "environ"

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
        replicas: dict[str, int] = {}
        for plan in plans:
            replicas[plan.tag] = max(replicas.get(plan.tag, 0), plan.replicas)
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
        total = sum(replicas.values())
        found = list(problems.values())
        if total > MAX_PODS:
            found.append(
                f"{total} pods asked, but the local runtime addresses at most {MAX_PODS} per run"
            )
        return found

    def _address(self, key: tuple[str, int]) -> str:
        """The pod's address: a new one, or the one it had (a pod started again keeps it)."""
        n = self._index.get(key)
        if n is None:
            if self._next >= MAX_PODS:
                raise RuntimeFailure(f"the local runtime addresses at most {MAX_PODS} pods per run")
            n = self._index[key] = self._next
            self._next += 1
        return f"127.{self._net}.{n // 250}.{n % 250 + 1}"

    # -- lifecycle ------------------------------------------------------------------------

    async def launch(self, plan: PodPlan) -> None:
        if not plan.command:
            raise RuntimeFailure(f"pod {plan.name} has no command")
        if self._closing:  # the run is ending: start nothing more
            self.events.put_nowait(
                PodEvent("exited", plan.tag, plan.pod_id, reason="not started: the run ended")
            )
            return
        key = (plan.tag, plan.pod_id)
        ip = self._address(key)
        self._setup()
        env = {
            **os.environ,
            **plan.env,
            "POD_IP": ip,
            "PATH": self.pod_path(plan.env.get("PATH")),
            "PYTHONUNBUFFERED": "1",
        }
        name, _, value = self._marker.partition("=")
        env[name] = value
        # Nothing below awaits: a pod is either started and registered, or reported as failed.
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:
            self._not_started(plan, 126, f"cannot start {plan.command[0]!r}: {exc}")
            return
        try:
            cgroups = (self._pod_cgroup(plan), self._net_cgroup(key))
            proc, cgroup = self._spawn(plan, env, write_fd, cgroups)
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(read_fd)
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            strerror = exc.strerror if isinstance(exc, OSError) else None
            self._not_started(plan, code, f"cannot start {plan.command[0]!r}: {strerror or exc}")
            return
        finally:
            os.close(write_fd)
        pod = _Pod(plan, proc, ip, cgroup)
        self._pods[(plan.tag, plan.pod_id)] = pod
        self.watchdog.guard(proc.pid)
        pod.copier = _LogCopier(read_fd, plan.log_path, plan.name, plan.on_output)
        self._watch_exit(pod)
        self.events.put_nowait(PodEvent("running", plan.tag, plan.pod_id, ip=ip))
        pod.task = asyncio.create_task(self._supervise(pod), name=f"pod-{plan.name}")
        pod.task.add_done_callback(lambda task: self._supervisor_ended(pod, task))

    def _not_started(self, plan: PodPlan, code: int, reason: str) -> None:
        with contextlib.suppress(OSError):
            plan.log_path.parent.mkdir(parents=True, exist_ok=True)
            with plan.log_path.open("a") as f:
                f.write(f"tricks-nats: {reason}\n")
        self.events.put_nowait(
            PodEvent("exited", plan.tag, plan.pod_id, exit_code=code, reason=reason)
        )

    def _net_cgroup(self, key: tuple[str, int]) -> str | None:
        """The net_cls cgroup a pod joins when the run has network faults."""
        if self._netfaults is None:
            return None
        return self._netfaults.join_path(self._index[key])

    def _spawn(
        self,
        plan: PodPlan,
        env: dict[str, str],
        out: int,
        cgroups: tuple[Path | None, str | None],
    ) -> tuple[subprocess.Popen[bytes], Path | None]:
        """Start the pod's main process (in its cgroup, and its net_cls cgroup for network
        faults, if given); returns it and its cgroup.

        The child joins its cgroup before it becomes the pod's command, so nothing the pod
        starts escapes it: a shell moves itself there and then execs the command. (A
        `preexec_fn` would do it too, but then every launch forks the whole coordinator and
        runs Python in the child: 3-4 ms a pod against about 0.6, so 3 s more for 1000 pods.)
        A child that cannot join says so in the pod's log and runs tracked by its group and
        the run's marker, as without cgroups."""
        assert plan.command
        command = list(plan.command)
        cgroup, net_cgroup = cgroups
        if cgroup is not None or net_cgroup is not None:
            joined = [str(cgroup or ""), net_cgroup or ""]
            command = ["/bin/sh", "-c", _JOIN, plan.name, *joined, *command]
        try:
            missing = _unstartable(plan.command[0], plan.cwd, env.get("PATH", os.defpath))
            if missing is not None:
                raise missing
            proc = subprocess.Popen(
                command,
                cwd=plan.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError):
            if cgroup is not None:
                rmdir_cgroup(str(cgroup))
            raise
        return proc, cgroup

    # -- process tracking -----------------------------------------------------------------

    def _setup(self) -> None:
        """On the first launch: register the run's marker, make the run's cgroup."""
        if self._ready:
            return
        self._ready = True
        self.watchdog.kill_marked_on_death(self._marker)
        if self._want_cgroups:
            self._run_cgroup = _make_run_cgroup(self._marker.partition("=")[2][:12])
            if self._run_cgroup is not None:
                self._made_cgroup = self._run_cgroup
                self.watchdog.kill_cgroup_on_death(self._run_cgroup)

    def _pod_cgroup(self, plan: PodPlan) -> Path | None:
        if self._run_cgroup is None:
            return None
        self._spawned += 1
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", plan.name)
        path = self._run_cgroup / f"{self._spawned}-{name}"
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            log.warning("cannot make cgroup %s (%s): tracking pods by environment", path, exc)
            self._drop_cgroups()
            return None
        return path

    def _drop_cgroups(self) -> None:
        """Track new pods by environment only; pods already in a cgroup stay tracked by it."""
        self._run_cgroup = None

    def _watch_exit(self, pod: _Pod) -> None:
        loop = asyncio.get_running_loop()
        try:
            pod.pidfd = os.pidfd_open(pod.proc.pid)
        except (OSError, AttributeError):  # before Linux 5.3: a thread waits for the exit
            threading.Thread(
                target=self._wait_in_thread,
                args=(loop, pod),
                name=f"wait-{pod.plan.name}",
                daemon=True,
            ).start()
            return
        loop.add_reader(pod.pidfd, self._main_exited, pod)

    def _wait_in_thread(self, loop: asyncio.AbstractEventLoop, pod: _Pod) -> None:
        with contextlib.suppress(OSError):  # WNOWAIT: the zombie keeps its pid until we reap
            os.waitid(os.P_PID, pod.proc.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._main_exited, pod)

    def _main_exited(self, pod: _Pod) -> None:
        """The main process has exited. It is still a zombie, so its pid and group id cannot
        be reused yet: kill what it left behind, then reap it."""
        if pod.exited.done():
            return
        self._kill(pod)
        code = pod.proc.poll()
        if code is None:
            return
        self._unwatch(pod)
        pod.exited.set_result(code)

    def _unwatch(self, pod: _Pod) -> None:
        if pod.pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(pod.pidfd)
            os.close(pod.pidfd)
            pod.pidfd = -1

    def _abandon(self, pod: _Pod, reason: str) -> None:
        """Give up on a main process that does not die; a thread reaps it if it ever does."""
        if pod.exited.done():
            return
        log.warning("pod %s: %s", pod.plan.name, reason)
        self._unwatch(pod)
        pod.reason = reason
        pod.exited.set_result(None)
        threading.Thread(target=pod.proc.wait, name=f"reap-{pod.plan.name}", daemon=True).start()

    def _kill(self, pod: _Pod) -> None:
        """SIGKILL the pod's group and, when it has one, its cgroup (escaped daemons too)."""
        if not pod.exited.done():
            self._signal_group(pod.proc.pid, signal.SIGKILL)
        if pod.cgroup is not None:
            kill_cgroup(str(pod.cgroup))

    # -- supervision ----------------------------------------------------------------------

    async def _supervise(self, pod: _Pod) -> None:
        code = await asyncio.shield(pod.exited)
        # Output still in flight may follow for a moment; a child that keeps the pipe is cut off.
        assert pod.copier is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pod.copier.eof.wait(), DRAIN_S)
        self._finish(pod, code)

    def _supervisor_ended(self, pod: _Pod, task: asyncio.Task[None]) -> None:
        if pod.done.is_set():
            return
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("supervising pod %s failed", pod.plan.name, exc_info=exc)
        # Nothing may outlive its pod: kill what is left and reap whenever it dies.
        self._kill(pod)
        if not pod.exited.done():
            if pod.proc.poll() is None:
                self._abandon(pod, "its supervision ended unexpectedly")
            else:
                self._unwatch(pod)
                pod.exited.set_result(pod.proc.returncode)
        self._finish(pod, pod.exited.result())

    def _finish(self, pod: _Pod, code: int | None) -> None:
        """The pod has ended: close its log, release it, report it (once)."""
        if pod.done.is_set():
            return
        self._unwatch(pod)
        lost, incomplete = 0, None
        if pod.copier is not None:
            pod.copier.close()
            lost, incomplete = pod.copier.lost, pod.copier.incomplete
        if pod.cgroup is not None:
            kill_cgroup(str(pod.cgroup))
            rmdir_cgroup(str(pod.cgroup))  # busy while its killed processes exit: see aclose
        pod.done.set()
        self.watchdog.release(pod.proc.pid)
        self.events.put_nowait(
            PodEvent(
                "exited",
                pod.plan.tag,
                pod.plan.pod_id,
                ip=pod.ip,
                exit_code=exit_code_of(code) if code is not None else None,
                reason=pod.reason,
                log_bytes_lost=lost,
                log_incomplete=incomplete,
                preempted=code is not None and code < 0 and not pod.signalled,
            )
        )

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    async def terminate(self, tag: str, pod_id: int, grace: float) -> None:
        pod = self._pods.get((tag, pod_id))
        if pod is None or pod.done.is_set():
            return
        pod.signalled = True
        if pod.paused:  # a stopped process hears SIGTERM only once it runs again
            self._resume(pod)
        if not pod.exited.done():
            self._signal_group(pod.proc.pid, signal.SIGTERM)
            await asyncio.wait([pod.exited], timeout=grace)
        if not pod.exited.done():
            self._kill(pod)
            await asyncio.wait([pod.exited], timeout=KILL_WAIT_S)
            self._abandon(pod, f"still alive {KILL_WAIT_S:g}s after SIGKILL")
        # The supervisor drains the log for DRAIN_S at most, then reports the pod.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pod.done.wait(), DRAIN_S + 1)
        self._finish(pod, pod.exited.result())

    async def aclose(self, grace: float) -> None:
        self._closing = True
        pods = list(self._pods.values())
        results = await asyncio.gather(
            *(self.terminate(p.plan.tag, p.plan.pod_id, grace) for p in pods),
            return_exceptions=True,
        )
        for pod, result in zip(pods, results, strict=True):
            if isinstance(result, BaseException):
                log.error("stopping pod %s failed", pod.plan.name, exc_info=result)
                self._supervisor_ended_anyway(pod)
        tasks = [p.task for p in pods if p.task is not None and not p.task.done()]
        for task in tasks:  # every pod is reported by now; what is left only drains
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._sweep()
        if self._netfaults is not None:  # after the pods: their cgroups must be empty
            await self._netfaults.close()
        self.watchdog.close()

    # -- faults -----------------------------------------------------------------------------

    def fault_problems(self, faults: Iterable[Fault]) -> list[str]:
        """Process faults need nothing; network faults need what `NetFaults` needs."""
        network = [f.name for f in faults if f.network]
        if not network:
            return []
        from tricks_nats.netfaults import NetFaults

        found = NetFaults.problems()
        if not found:
            return []
        names = ", ".join(repr(n) for n in network)
        return [f"network fault(s) {names} cannot run on this machine: {' '.join(found)}"]

    async def inject(self, action: FaultAction) -> None:
        pods = [self._pods.get(key) for key in action.pods]
        alive = [pod for pod in pods if pod is not None and not pod.exited.done()]
        if action.kind == "kill":
            for pod in alive:
                pod.signalled = True
                if action.signal == signal.SIGKILL:
                    self._kill(pod)  # its escaped processes too
                else:
                    self._signal_group(pod.proc.pid, signal.Signals(action.signal))
        elif action.kind == "pause":
            for pod in alive:
                self._pause(pod)
        elif self._netfaults is not None and action.kind in ("delay", "loss", "partition"):
            await self._netfaults.apply(
                action, self._ips_of(action.pods), self._ips_of(action.peers)
            )
        else:
            raise RuntimeFailure(f"{action.kind} faults are not available on the local runtime")

    def _ips_of(self, pods: Iterable[tuple[str, int]]) -> list[str]:
        return [self._address(key) for key in pods if key in self._index]

    async def heal(self, action: FaultAction) -> None:
        if self._netfaults is not None and action.kind in ("delay", "loss", "partition"):
            await self._netfaults.remove(action.id)
        if action.kind == "pause":
            for key in action.pods:
                pod = self._pods.get(key)
                if pod is not None and pod.paused:
                    self._resume(pod)

    def _pause(self, pod: _Pod) -> None:
        """Freeze the pod: its cgroup (every process, escaped ones too), else its group."""
        pod.paused = True
        if pod.cgroup is not None and _write(pod.cgroup / "cgroup.freeze", "1"):
            return
        self._signal_group(pod.proc.pid, signal.SIGSTOP)

    def _resume(self, pod: _Pod) -> None:
        pod.paused = False
        if pod.cgroup is not None:
            _write(pod.cgroup / "cgroup.freeze", "0")
        self._signal_group(pod.proc.pid, signal.SIGCONT)

    def _supervisor_ended_anyway(self, pod: _Pod) -> None:
        if not pod.done.is_set():
            self._kill(pod)
            self._abandon(pod, "it could not be stopped")
            self._finish(pod, None)

    async def _sweep(self) -> None:
        """End of the run: kill whatever any pod left anywhere, remove the run's cgroups."""
        if not self._ready:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SWEEP_S
        run = self._made_cgroup
        if run is not None:
            kill_cgroup(str(run))
        while pids := marked_pids(self._marker):
            kill_pids(pids)
            if loop.time() > deadline:
                log.warning("processes %s of this run do not die", pids)
                break
            await asyncio.sleep(0.02)
        if run is None:
            return
        while not rmdir_cgroup(str(run)):
            if loop.time() > deadline:
                log.warning("cannot remove cgroup %s: some of its processes do not die", run)
                return
            await asyncio.sleep(0.02)
        self.watchdog.forget_cgroup(run)


#: The child's first step: move to its cgroup ($1) and its net_cls cgroup ($2), each when
#: given, then become the pod.
_JOIN = (
    'for d in "$1" "$2"; do [ -z "$d" ] || echo 0 > "$d/cgroup.procs" || '
    'echo "tricks-nats: this pod runs outside its cgroup $d" >&2; done; shift 2; exec "$@"'
)


def _write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
    except OSError:
        return False
    return True


def _unstartable(program: str, cwd: Path | str | None, path: str) -> OSError | None:
    """Why `program` cannot be started (as `Popen` would say it), or None; checked before the
    launch, since with the cgroup shell in front of it a missing program would only show as
    the shell's exit 127."""
    if "/" in program:
        where = Path(cwd or ".") / program
        if not where.exists():
            return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if where.is_dir() or not os.access(where, os.X_OK):
            return PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return None
    if shutil.which(program, path=path) is None:
        if any(Path(d or ".", program).exists() for d in path.split(os.pathsep)):
            return PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return None


def _own_cgroup2() -> Path | None:
    """The directory of this process' cgroup in the unified (v2) hierarchy, if mounted."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None or not own.startswith("/"):
        return None
    for line in mounts:
        fields, _, rest = line.partition(" - ")
        if not rest.startswith("cgroup2 "):
            continue
        parts = fields.split()
        root, mount = parts[3], _unescape(parts[4])
        if own == root or own.startswith(root.rstrip("/") + "/"):
            return Path(mount) / own[len(root.rstrip("/")) :].lstrip("/")
    return None


def _unescape(field: str) -> str:
    """mountinfo writes a space as \\040, a tab as \\011, and so on."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _make_run_cgroup(token: str) -> Path | None:
    """`<own cgroup>/tricks-nats-<token>`, if this process may make it and it can be killed
    (`cgroup.kill`); None otherwise."""
    own = _own_cgroup2()
    if own is None:
        return None
    path = own / f"tricks-nats-{token}"
    try:
        path.mkdir()
    except OSError as exc:
        log.debug("no cgroup for this run (%s): tracking pods by environment", exc)
        return None
    if not (path / "cgroup.kill").exists():
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return path
