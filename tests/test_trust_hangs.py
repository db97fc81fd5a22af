"""Nothing a pod does can hang `up` past its timeout, and nothing it starts outlives the run.

Real processes throughout. A test never judges by time: `up` (or the runtime) must END with
the right verdict; the generous hang guards only turn a hang into a failure. Waiting for a
process to disappear is a bounded poll on a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tricks_nats.errors import RuntimeFailure
from tricks_nats.runtimes import PodEvent, PodPlan
from tricks_nats.runtimes.local import MAX_PODS, LocalRuntime
from tricks_nats.watchdog import Watchdog

from .conftest import ROOT, cli_env, start_cli

TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]
HANG_GUARD_S = 120  # far beyond any honest run here: only a hang reaches it
TRACKING = ["cgroup", "environ"]


# -- helpers ---------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Bounded poll for a condition (a process gone, a file written)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what}")
        time.sleep(0.02)


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def named(proc: psutil.Process, name: str) -> bool:
    try:
        return bool(proc.name() == name)
    except psutil.Error:
        return False


@pytest.fixture
def daemons() -> Iterator[list[psutil.Process]]:
    """Processes a test expects to be killed; whatever survives is killed here, so a failing
    test (or the code before the fix) leaves nothing behind."""
    found: list[psutil.Process] = []
    yield found
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def gate(path: Path) -> str:
    """Shell: wait until the test creates `path` (so that `up` is surely watching the pod when
    its main process exits, not racing with its start)."""
    return f"while [ ! -e {path} ]; do sleep 0.01; done"


def read_pid(path: Path, daemons: list[psutil.Process]) -> psutil.Process:
    wait_until(lambda: path.exists() and path.read_text().endswith("\n"), f"{path} written")
    proc = psutil.Process(int(path.read_text()))
    daemons.append(proc)
    return proc


def plan(tmp_path: Path, script: str, tag: str = "p", log: Path | None = None) -> PodPlan:
    return PodPlan(
        tag=tag,
        pod_id=0,
        replicas=1,
        command=("/bin/sh", "-c", script),
        image=None,
        env={},
        log_path=log or tmp_path / "logs" / f"{tag}-0.log",
        cwd=tmp_path,
    )


@pytest.fixture
async def runtime() -> AsyncIterator[LocalRuntime]:
    rt = LocalRuntime()
    try:
        yield rt
    finally:
        await rt.aclose(0.0)


async def exited(rt: LocalRuntime) -> PodEvent:
    async with asyncio.timeout(HANG_GUARD_S):
        while True:
            ev = await rt.events.get()
            if ev.kind == "exited":
                return ev


def tracking_env(mode: str) -> dict[str, str]:
    env = cli_env()
    if mode == "environ":
        env["TRICKS_NATS_CGROUP"] = "off"
    return env


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def up_when(
    written: Path, go: Path, spec: Path, runs: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run `up`; once its pod has written `written`, create `go` (see `gate`)."""
    proc = start_cli("up", str(spec), "--runs-dir", str(runs), "--grace", "1", env=env)
    try:
        wait_until(lambda: written.exists() or proc.poll() is not None, f"{written}")
        go.touch()
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert written.exists(), f"up ended before its pod ran: {err}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def summary(runs: Path) -> dict[str, Any]:
    (run,) = list(runs.iterdir())
    data: dict[str, Any] = json.loads((run / "summary.json").read_text())
    return data


# -- 1. a pod ends when its main process exits, not when its output pipe closes --------------------


async def test_pod_ends_at_main_exit_though_a_background_job_holds_stdout(
    tmp_path: Path, runtime: LocalRuntime, daemons: list[psutil.Process]
) -> None:
    pidfile, go = tmp_path / "job.pid", tmp_path / "go"
    await runtime.launch(
        plan(tmp_path, f"sleep 1000 & echo $! > {pidfile}; {gate(go)}; echo hello; exit 7")
    )
    job = await asyncio.to_thread(read_pid, pidfile, daemons)
    go.touch()
    ev = await exited(runtime)
    assert ev.exit_code == 7
    wait_until(lambda: gone(job), "the background job, killed with its group")
    assert (tmp_path / "logs" / "p-0.log").read_text() == "hello\n"


@pytest.mark.parametrize("mode", TRACKING)
async def test_setsid_daemon_holding_stdout_neither_holds_the_pod_nor_outlives_the_run(
    tmp_path: Path, mode: str, daemons: list[psutil.Process]
) -> None:
    rt = LocalRuntime(cgroups=mode == "cgroup")
    pidfile, go = tmp_path / "daemon.pid", tmp_path / "go"
    try:
        await rt.launch(
            plan(tmp_path, f"setsid sleep 1000 & echo $! > {pidfile}; {gate(go)}; echo bye")
        )
        daemon = await asyncio.to_thread(read_pid, pidfile, daemons)
        go.touch()
        ev = await exited(rt)
        assert ev.exit_code == 0
        if mode == "cgroup" and rt.tracking == "cgroup":  # killed with its pod already
            wait_until(lambda: gone(daemon), "the daemon, killed with its pod's cgroup")
    finally:
        await rt.aclose(0.0)
    wait_until(lambda: gone(daemon), "the daemon, killed at the end of the run")
    assert (tmp_path / "logs" / "p-0.log").read_text() == "bye\n"


def test_up_ends_when_a_pod_leaves_a_background_job_holding_stdout(
    tmp_path: Path, daemons: list[psutil.Process]
) -> None:
    pidfile, go = tmp_path / "job.pid", tmp_path / "go"
    spec = write_spec(
        tmp_path,
        f"""\
        timeout: 600
        experiment:
        - tag: a
          command: "sleep 1000 & echo $! > {pidfile}; {gate(go)}; echo started"
        """,
    )
    result = up_when(pidfile, go, spec, tmp_path / "runs", cli_env())
    job = read_pid(pidfile, daemons)
    assert result.returncode == 0, result.stderr
    assert summary(tmp_path / "runs")["verdict"] == "succeeded"
    wait_until(lambda: gone(job), "the background job")


@pytest.mark.parametrize("mode", TRACKING)
def test_up_ends_and_kills_a_setsid_daemon_holding_stdout(
    tmp_path: Path, mode: str, daemons: list[psutil.Process]
) -> None:
    pidfile, go = tmp_path / "daemon.pid", tmp_path / "go"
    spec = write_spec(
        tmp_path,
        f"""\
        timeout: 600
        experiment:
        - tag: a
          command: "setsid sleep 1000 & echo $! > {pidfile}; {gate(go)}; echo started"
        """,
    )
    result = up_when(pidfile, go, spec, tmp_path / "runs", tracking_env(mode))
    daemon = read_pid(pidfile, daemons)
    assert result.returncode == 0, result.stderr
    s = summary(tmp_path / "runs")
    assert s["verdict"] == "succeeded"
    assert s["pods"][0]["exit_code"] == 0
    wait_until(lambda: gone(daemon), "the daemon, after the end of the run")


# -- 2. a daemon that left its process group dies with the run, even when `up` is killed -----------


@pytest.mark.parametrize("mode", TRACKING)
def test_sigkill_of_up_kills_a_daemon_that_left_its_group(
    tmp_path: Path, mode: str, daemons: list[psutil.Process]
) -> None:
    pidfile = tmp_path / "daemon.pid"
    spec = write_spec(
        tmp_path,
        f"""\
        experiment:
        - tag: a
          command: >-
            setsid sleep 1000 > /dev/null 2>&1 &
            echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; exec sleep 1000
        """,
    )
    proc = subprocess.Popen(
        [*TRICKS, "up", str(spec), "--runs-dir", str(tmp_path / "runs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=tracking_env(mode),
        cwd=ROOT,
    )
    try:
        daemon = read_pid(pidfile, daemons)
        wait_until(lambda: daemon.name() == "sleep", "the daemon to run sleep")
        assert os.getsid(daemon.pid) == daemon.pid  # it left the pod's group and session
        pod = [p for p in psutil.Process(proc.pid).children(recursive=True) if named(p, "sleep")]
        assert pod
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: gone(daemon), "the daemon, after up was killed")
    for p in pod:
        wait_until(lambda p=p: gone(p), "the pod's main process")


# -- 3. a log that cannot be written never blocks a pod --------------------------------------------

MIB = 1 << 20
WRITE_MIB = f"{sys.executable} -c \"import sys; sys.stdout.buffer.write(b'x' * {MIB})\""


async def test_a_full_disk_drops_and_counts_log_bytes_but_never_blocks_the_pod(
    tmp_path: Path, runtime: LocalRuntime
) -> None:
    """/dev/full fails every write with ENOSPC; 1 MiB is far more than a pipe holds, so a
    copier that stopped reading would block the pod for good."""
    await runtime.launch(plan(tmp_path, WRITE_MIB, log=Path("/dev/full")))
    ev = await exited(runtime)
    assert ev.exit_code == 0
    assert ev.log_bytes_lost == MIB
    assert ev.log_incomplete == f"{MIB} bytes of output lost: No space left on device"


async def test_a_log_directory_that_cannot_be_made_loses_the_log_not_the_pod(
    tmp_path: Path, runtime: LocalRuntime
) -> None:
    (tmp_path / "file").write_text("")
    await runtime.launch(plan(tmp_path, WRITE_MIB, log=tmp_path / "file" / "logs" / "p-0.log"))
    ev = await exited(runtime)
    assert ev.exit_code == 0
    assert ev.log_bytes_lost == MIB


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that fills while a pod writes."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if os.geteuid() != 0 or "permission" in result.stderr.lower():
            pytest.skip(f"cannot mount a tmpfs here ({errno.errorcode[errno.EPERM]})")
        raise AssertionError(result.stderr)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_a_disk_that_fills_mid_run_keeps_what_fits_and_counts_the_rest(
    tiny_disk: Path, tmp_path: Path, runtime: LocalRuntime
) -> None:
    log = tiny_disk / "logs" / "p-0.log"
    await runtime.launch(plan(tmp_path, WRITE_MIB, log=log))
    ev = await exited(runtime)
    assert ev.exit_code == 0
    assert 0 < ev.log_bytes_lost < MIB
    assert log.read_bytes().count(b"x") + ev.log_bytes_lost == MIB


# -- 4. the watchdog removes files when its parent dies without a goodbye --------------------------

WATCHDOG_PARENT = """\
import sys
from tricks_nats.watchdog import Watchdog
w = Watchdog()
for path in sys.argv[1:]:
    w.remove_on_death(path)
w.forget_file(sys.argv[-1])
print(w.pid, flush=True)
if sys.stdin.readline() == "close\\n":
    w.close()
    print("closed", flush=True)
sys.stdin.readline()
"""


def start_watchdog_parent(*paths: Path) -> tuple[subprocess.Popen[str], psutil.Process]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG_PARENT, *map(str, paths)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    return proc, psutil.Process(int(proc.stdout.readline()))


def test_watchdog_removes_registered_files_when_its_parent_is_killed(tmp_path: Path) -> None:
    conf, state, store, kept = (tmp_path / n for n in ("server.conf", "run.json", "js", "keep"))
    for f in (conf, state, kept):
        f.write_text("x")
    (store / "stream").mkdir(parents=True)
    (store / "stream" / "data").write_text("x")
    proc, watchdog = start_watchdog_parent(conf, state, store, kept)
    proc.kill()
    proc.communicate()
    wait_until(lambda: gone(watchdog), "the watchdog to finish")
    assert not conf.exists() and not state.exists() and not store.exists()
    assert kept.exists()  # forgotten: not touched


def test_watchdog_goodbye_removes_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "server.conf"
    conf.write_text("x")
    proc, watchdog = start_watchdog_parent(conf, tmp_path / "other")
    out, _ = proc.communicate("close\n\n")
    assert out == "closed\n" and proc.returncode == 0
    assert gone(watchdog)
    assert conf.exists()


def test_watchdog_refuses_a_path_it_cannot_put_on_one_line(tmp_path: Path) -> None:
    w = Watchdog()
    try:
        with pytest.raises(ValueError):
            w.remove_on_death(tmp_path / "a\nb")
    finally:
        w.close()


# -- 5. the local runtime's address space ----------------------------------------------------------


def test_check_refuses_more_pods_than_the_runtime_can_address(tmp_path: Path) -> None:
    def tag(name: str, replicas: int) -> PodPlan:
        return PodPlan(name, 0, replicas, ("true",), None, {}, Path(os.devnull), tmp_path)

    rt = LocalRuntime()
    assert rt.check([tag("a", MAX_PODS - 1), tag("b", 1)]) == []
    (problem,) = rt.check([tag("a", MAX_PODS - 1), tag("b", 2)])
    assert str(MAX_PODS + 1) in problem and str(MAX_PODS) in problem
    assert "\n" not in problem


def test_addresses_are_valid_distinct_loopback_until_they_run_out() -> None:
    rt = LocalRuntime()
    seen = set()
    for i in range(MAX_PODS):
        ip = ipaddress.IPv4Address(rt._address(("t", i)))
        assert ip.is_loopback and ip.packed[-1] not in (0, 255)
        seen.add(ip)
    assert len(seen) == MAX_PODS
    assert rt._address(("t", 7)) == rt._address(("t", 7))  # a pod started again keeps its own
    with pytest.raises(RuntimeFailure, match=str(MAX_PODS)):
        rt._address(("t", MAX_PODS))


# -- other ways to hang: late launches, stubborn pods ----------------------------------------------


async def test_a_launch_after_aclose_starts_nothing(tmp_path: Path) -> None:
    rt = LocalRuntime()
    await rt.aclose(0.0)
    await rt.launch(plan(tmp_path, "exec sleep 1000"))
    ev = rt.events.get_nowait()
    assert ev.kind == "exited" and ev.reason and "not started" in ev.reason
    assert rt.events.empty()


async def test_terminate_ends_a_pod_that_ignores_sigterm_after_its_leader_forked_away(
    tmp_path: Path, runtime: LocalRuntime, daemons: list[psutil.Process]
) -> None:
    """The main process ignores SIGTERM and waits on a child that moved to its own session
    (so the group signal misses it) and ignores SIGTERM too: terminate still ends the pod."""
    pidfile = tmp_path / "child.pid"
    script = (
        "trap '' TERM; setsid sh -c 'trap \"\" TERM; sleep 1000 & wait' & "
        f"echo $! > {pidfile}; wait"
    )
    await runtime.launch(plan(tmp_path, script))
    child = read_pid(pidfile, daemons)
    assert (await runtime.events.get()).kind == "running"
    async with asyncio.timeout(HANG_GUARD_S):
        await runtime.terminate("p", 0, 0.5)
    ev = await exited(runtime)
    assert ev.exit_code == 137
    await runtime.aclose(0.0)
    wait_until(lambda: gone(child), "the child that left the group")


@pytest.fixture
def freezer() -> Iterator[Path]:
    """A cgroup v1 freezer: a frozen process cannot die, not even of SIGKILL, until thawed (as a
    process stuck in uninterruptible sleep)."""
    path = Path("/sys/fs/cgroup/freezer") / f"tricks-nats-test-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"no cgroup v1 freezer to use here: {exc}")
    try:
        yield path
    finally:
        (path / "freezer.state").write_text("THAWED")
        wait_until(lambda: not (path / "cgroup.procs").read_text().strip(), "thawed processes")
        path.rmdir()


async def test_terminate_gives_up_on_a_main_process_that_cannot_die(
    tmp_path: Path, freezer: Path, daemons: list[psutil.Process]
) -> None:
    rt = LocalRuntime()
    pidfile = tmp_path / "main.pid"
    main: psutil.Process | None = None
    try:
        await rt.launch(
            plan(tmp_path, f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 1000")
        )
        main = read_pid(pidfile, daemons)
        (freezer / "cgroup.procs").write_text(str(main.pid))
        (freezer / "freezer.state").write_text("FROZEN")
        wait_until(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN", "frozen")
        async with asyncio.timeout(HANG_GUARD_S):
            await rt.terminate("p", 0, 0.1)
        ev = await exited(rt)
        assert ev.exit_code is None and ev.reason and "after SIGKILL" in ev.reason
        assert not gone(main)
    finally:
        (freezer / "freezer.state").write_text("THAWED")
        if main is not None:
            wait_until(lambda: gone(main), "the thawed process to die of its SIGKILL")
        await rt.aclose(0.0)


async def test_a_program_that_cannot_start_is_reported_and_leaves_nothing(
    tmp_path: Path, runtime: LocalRuntime
) -> None:
    await runtime.launch(plan(tmp_path, "true"))  # makes the run's cgroup, if any
    assert (await exited(runtime)).exit_code == 0
    missing = PodPlan("m", 0, 1, ("./no-such-program",), None, {}, tmp_path / "m.log", tmp_path)
    await runtime.launch(missing)
    ev = await exited(runtime)
    assert ev.exit_code == 127 and ev.reason and "no-such-program" in ev.reason
    assert "no-such-program" in (tmp_path / "m.log").read_text()
    run = runtime._made_cgroup
    if run is not None:  # the pods' cgroups went with them (or are only waiting to)
        assert not any(p.name.endswith("m-0") for p in run.iterdir() if p.is_dir())


async def test_programs_are_found_as_exec_would_and_pods_start_inside_their_cgroup(
    tmp_path: Path, runtime: LocalRuntime
) -> None:
    """The launch checks the program before the cgroup shell runs it: a file that is not
    executable is 126 "Permission denied" (not the shell's own error), one relative to the
    pod's directory and one on the pod's PATH start; the pod's process is in its cgroup."""
    (tmp_path / "data.txt").write_text("not a program\n")
    bad = PodPlan("b", 0, 1, ("./data.txt",), None, {}, tmp_path / "b.log", tmp_path)
    await runtime.launch(bad)
    ev = await exited(runtime)
    assert ev.exit_code == 126 and ev.reason and "Permission denied" in ev.reason
    tool = tmp_path / "bin" / "where-am-i"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\ncat /proc/self/cgroup\n")
    tool.chmod(0o755)
    for command, env in (
        (("./bin/where-am-i",), {}),
        (("where-am-i",), {"PATH": f"{tool.parent}:/usr/bin:/bin"}),
    ):
        log = tmp_path / f"{len(env)}.log"
        await runtime.launch(PodPlan("w", len(env), 1, command, None, env, log, tmp_path))
        assert (await exited(runtime)).exit_code == 0
        if runtime.tracking == "cgroup":  # the unified hierarchy's line names the pod's
            (unified,) = [line for line in log.read_text().splitlines() if line.startswith("0::")]
            assert unified.endswith(f"-w-{len(env)}"), unified
