"""`tricks-nats up`: spec -> NATS (embedded or given) -> runtime -> coordinator -> records.

Owns every resource of a run and releases each one on every path out, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tricks_nats import protocol as p
from tricks_nats.errors import TricksError, UsageError
from tricks_nats.variables import label

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # heavy modules are imported when a run starts
    from tricks_nats.bus import Bus, Endpoint
    from tricks_nats.coordinator import Coordinator, Outcome
    from tricks_nats.entries import Entry
    from tricks_nats.natsserver import EmbeddedServer
    from tricks_nats.provenance import Provenance
    from tricks_nats.records import RunRecords
    from tricks_nats.runtimes import NatsRoute, PodPlan, Runtime
    from tricks_nats.spec import Experiment
    from tricks_nats.watchdog import Watchdog


@dataclass
class UpOptions:
    runs_dir: Path = Path("runs")
    nats_url: str | None = None
    runtime: str | None = None
    grace: float = 5.0
    timeout: float | None = None
    on_journal: Callable[[Entry], None] | None = None
    on_start: Callable[[str, Path], None] | None = None
    #: One line the user should read before the run (e.g. pods are not isolated).
    on_notice: Callable[[str], None] | None = None
    #: Keep the experiment's streams on a shared server after the run (--keep).
    keep: bool = False
    #: Each runtime's own options, by runtime name (e.g. "kubernetes": KubeOptions(...)).
    runtime_options: Mapping[str, Any] = field(default_factory=dict)
    #: The run's experiment id (a campaign names its runs); default: a new one from the name.
    experiment_id: str | None = None
    #: Recorded in summary.json; default: collected for the spec's file.
    provenance: Provenance | None = None


@dataclass
class _Nats:
    """NATS for one run: the coordinator's way in, the pods', the observers' (state file)."""

    endpoint: Endpoint
    pods: Endpoint
    observer: Endpoint
    server: EmbeddedServer | None = None
    shared: bool = False


@contextlib.asynccontextmanager
async def _nats_for(
    exp_id: str, route: NatsRoute, records: RunRecords, guard: Watchdog
) -> AsyncIterator[_Nats]:
    from tricks_nats.bus import Endpoint
    from tricks_nats.natsserver import EmbeddedServer, User

    if route.coordinator_url:
        ep = Endpoint.from_url(route.coordinator_url)
        pods = ep
        if route.pods_url:
            pods = Endpoint.from_url(route.pods_url, option="--pod-nats-url").with_login_of(ep)
        yield _Nats(ep, pods, ep, shared=True)
        return
    coordinator = User.random("coordinator")
    pod = User.random("pod", p.pod_permissions(exp_id))
    observer = User.random("observer", p.observer_permissions(exp_id))
    server = EmbeddedServer(
        users=[coordinator, pod, observer],
        log_path=records.root / "nats-server.log",
        watchdog=guard,  # one watchdog for the server and the state file
    )
    async with server:
        yield _Nats(
            Endpoint(server.url, coordinator.name, coordinator.password),
            Endpoint(server.url, pod.name, pod.password),
            Endpoint(server.url, observer.name, observer.password),
            server,
        )


async def up(exp: Experiment, opts: UpOptions) -> Outcome:
    """Run `exp` to its end and return the outcome; records are written on every path."""
    from tricks_nats.watchdog import Watchdog

    exp_id = opts.experiment_id or p.new_experiment_id(exp.name)
    runtime, route = _checked(exp, exp_id, opts)
    await runtime.prepare()  # e.g. reach the cluster (and fail) before anything starts
    records = _create_records(opts.runs_dir, exp_id, exp)
    if opts.provenance is None:
        from tricks_nats import provenance

        opts = dataclasses.replace(opts, provenance=provenance.collect(exp.source))
    if opts.on_journal:
        records.listeners.append(opts.on_journal)
    guard = Watchdog()  # removes the state file (it holds credentials) if we are killed
    started_at = time.time()
    try:
        return await _run(exp, exp_id, opts, runtime, route, records, guard)
    except BaseException as exc:
        # Before the coordinator had a verdict (it writes its own on every path): say why.
        if not (records.root / "summary.json").is_file() or _is_placeholder(records.root):
            interrupted = isinstance(exc, KeyboardInterrupt | asyncio.CancelledError)
            reason = "interrupted" if interrupted else str(exc) or type(exc).__name__
            _write_early_verdict(
                exp, exp_id, records, runtime, started_at, reason, interrupted, opts.provenance
            )
        if isinstance(exc, Exception) and not isinstance(exc, TricksError):
            log.debug("up failed", exc_info=True)
            raise TricksError(f"internal error: {type(exc).__name__}: {exc}") from exc
        raise
    finally:
        records.close()
        guard.close()


def preflight(exp: Experiment, opts: UpOptions) -> None:
    """Raise UsageError if `exp`'s pods cannot start with these options (a program that is not
    there, no image, no way to NATS), starting and writing nothing: a campaign checks every
    configuration so before its first run."""
    _checked(exp, "preflight", opts)


def _checked(exp: Experiment, exp_id: str, opts: UpOptions) -> tuple[Runtime, NatsRoute]:
    from tricks_nats import runtimes

    runtime_name = opts.runtime or exp.runtime or "local"
    runtime = runtimes.create(runtime_name, exp, exp_id, opts.runtime_options)
    problems = runtime.check(_drafts(exp))
    if exp.faults:
        problems += runtime.fault_problems(exp.faults)
    if problems:
        where = f"{exp.source} ({label(exp.variables)})" if exp.variables else exp.source
        raise UsageError(f"{where}: " + "; ".join(problems))
    return runtime, runtime.nats_route(opts.nats_url)


def _is_placeholder(root: Path) -> bool:
    """summary.json still holds the space reserved at the start (no verdict yet)."""
    try:
        with (root / "summary.json").open("rb") as f:
            return not f.read(64).strip()
    except OSError:
        return True


def _write_early_verdict(
    exp: Experiment,
    exp_id: str,
    records: RunRecords,
    runtime: Runtime,
    started_at: float,
    reason: str,
    interrupted: bool,
    provenance: Provenance | None,
) -> None:
    from tricks_nats.entries import VerdictEntry
    from tricks_nats.outcomes import NEVER_STARTED
    from tricks_nats.records import PodSummary, Summary

    verdict = "interrupted" if interrupted else "error"
    records.write(VerdictEntry(verdict=verdict, reason=reason))
    records.write_summary(
        Summary(
            experiment=exp_id,
            name=exp.name,
            verdict=verdict,
            reason=reason,
            started_at=started_at,
            ended_at=time.time(),
            pods=[
                PodSummary(tag=t.tag, pod_id=i, reason="never started", outcome=NEVER_STARTED)
                for t in exp.tags
                for i in range(t.replicas)
            ],
            events={},
            runtime=runtime.name,
            journal_lost=records.journal_lost,
            variables=dict(exp.variables),
            provenance=provenance,
        )
    )


async def _run(
    exp: Experiment,
    exp_id: str,
    opts: UpOptions,
    runtime: Runtime,
    route: NatsRoute,
    records: RunRecords,
    guard: Watchdog,
) -> Outcome:
    from tricks_nats import statefile
    from tricks_nats.bus import Bus
    from tricks_nats.coordinator import Coordinator
    from tricks_nats.journal import JournalPublisher

    async with _nats_for(exp_id, route, records, guard) as nats:
        bus = await Bus.open(nats.endpoint, exp_id, name=f"tricks-coordinator-{exp_id}")
        if opts.provenance is not None:
            opts.provenance.nats_server = bus.server_version()
        if nats.shared and opts.on_notice:
            opts.on_notice(
                "pods use the credentials given with --nats-url: on a shared server they "
                "are not isolated from other experiments (PROTOCOL.md, section 9)"
            )
        publisher = JournalPublisher(bus)
        state = statefile.RunState(
            experiment=exp_id,
            run_dir=str(records.root.resolve()),
            pid=os.getpid(),
            started_at=time.time(),
            nats_url=nats.observer.url,
            user=nats.observer.user,
            password=nats.observer.password,
            cwd=statefile.here(),
        )
        try:
            await bus.create_buckets()
            records.listeners.append(publisher)
            publisher.start()
            guard.remove_on_death(statefile.path_of(exp_id))
            _quietly("write the run's state file", lambda: statefile.write(state))
            coord = Coordinator(
                exp,
                exp_id,
                bus,
                runtime,
                records,
                nats.pods,
                grace=opts.grace,
                timeout=opts.timeout,
                provenance=opts.provenance,
            )
            if nats.server is not None:
                nats.server.on_gone = coord.abort
            if opts.on_start:
                opts.on_start(exp_id, records.root)
            with _signals(coord):
                return await coord.run()
        finally:
            await _save_topics(bus, records.root)
            await publisher.aclose()
            _quietly("forget the run's credentials", lambda: statefile.finish(state))
            if nats.shared and not opts.keep:
                await bus.delete_buckets()
            await bus.close()


async def _save_topics(bus: Bus, root: Path) -> None:
    """The run's topic messages into `topics.jsonl`, when NATS is still there: best effort
    (the verdict and summary are written already)."""
    from tricks_nats import topics

    if bus.gone is not None or not bus.nc.is_connected:
        return
    try:
        n = await topics.save(bus, root / "topics.jsonl")
    except Exception as exc:
        log.warning("could not save the topics' messages in topics.jsonl: %s", exc)
    else:
        if n:
            log.info("%d topic message(s) saved in %s", n, root / "topics.jsonl")


def _create_records(runs_dir: Path, exp_id: str, exp: Experiment) -> RunRecords:
    """The run's directory, or one line saying why it cannot be (exit 2)."""
    from tricks_nats.records import RunRecords

    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        return RunRecords.create(runs_dir, exp_id, exp.text, exp.pod_count)
    except OSError as exc:
        where = exc.filename or runs_dir
        raise UsageError(
            f"cannot write run records under {runs_dir}: {where}: {exc.strerror or exc}"
        ) from exc


def _quietly(what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:
        log.warning("could not %s: %s", what, exc)


def _drafts(exp: Experiment) -> list[PodPlan]:
    """One plan per tag, enough for a runtime to check that the tag's pods can start."""
    from tricks_nats.runtimes import PodPlan

    return [
        PodPlan(
            tag=t.tag,
            pod_id=0,
            replicas=t.replicas,
            command=t.command,
            image=t.image,
            env=dict(t.env),
            log_path=Path(os.devnull),
            cwd=exp.base_dir,
        )
        for t in exp.tags
    ]


@contextlib.contextmanager
def _signals(coord: Coordinator) -> Iterator[None]:
    """SIGINT/SIGTERM stop the run (grace period); a second one kills the pods at once."""
    loop = asyncio.get_running_loop()
    seen = 0

    def on_signal() -> None:
        nonlocal seen
        seen += 1
        coord.interrupt(force=seen > 1)

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
