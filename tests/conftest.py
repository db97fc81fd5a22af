"""Shared fixtures: a real nats-server per test, and checks that nothing leaks.

- `nats_server`: nats-server from the wheel, port -1, its own temporary store, no auth.
- Every test fails if it leaves asyncio tasks running or child processes alive.
- Warnings are errors (pyproject's filterwarnings).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from tricks_nats.natsserver import EmbeddedServer

from .helpers import make_run  # noqa: F401 (a fixture: the coordinator on a fake runtime)
from .kube_cluster import cluster, kubecfg  # noqa: F401 (fixtures: the Kubernetes API emulator)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Autouse and set up first, so it is torn down last: after every other fixture."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in before]
    for proc in leaked:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    alive = []
    for proc in leaked:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.Error:
            pass
    assert not alive, f"processes outlived the test: {alive}"


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`up` records where it runs for `watch`; tests keep that out of the user's home."""
    state = tmp_path / "state"
    monkeypatch.setenv("TRICKS_NATS_STATE_DIR", str(state))
    return state


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    for _ in range(3):  # let cancelled tasks finish unwinding
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not leaked, f"asyncio tasks outlived the test: {leaked}"


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    async with EmbeddedServer(
        store_dir=tmp_path / "js", log_path=tmp_path / "nats.log", monitor=True
    ) as server:
        yield server


def exp_processes(exp_id: str) -> list[int]:
    """Processes whose environment carries EXP_ID=exp_id (pods of that experiment)."""
    needle = f"EXP_ID={exp_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("EXP_ID", None)
    return env


def start_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`tricks-nats ARGS` in the background, its stdout and stderr piped (text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tricks_nats.cli.app", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or cli_env(),
        cwd=cwd,
    )


# -- opt-in tier: tests marked `k8s` need a real cluster and run only with `pytest --k8s` --------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--k8s", action="store_true", help="also run the tests that need a real Kubernetes"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--k8s"):
        return
    skip = pytest.mark.skip(reason="needs a real Kubernetes cluster: run with --k8s")
    for item in items:
        if "k8s" in item.keywords:
            item.add_marker(skip)
