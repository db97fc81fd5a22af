"""Network faults on the local runtime, end to end: real pods, real TCP between their loopback
addresses, real nftables rules (tests run as root, as CI does), and nothing left behind after
the run or after SIGKILL of `up`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tricks_nats import spec
from tricks_nats.running import UpOptions, up

from .conftest import ROOT, cli_env, exp_processes

pytestmark = pytest.mark.slow

SERVER = """\
import os, signal, socket, threading
from tricks_nats.driver import SyncDriver

d = SyncDriver()
listener = socket.create_server((os.environ["POD_IP"], 7300))
d.register_event("listening")
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

def echo(conn):
    while data := conn.recv(1024):
        conn.sendall(data)

while True:
    conn, _ = listener.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

PINGER = """\
import socket, sys, time
from tricks_nats.driver import SyncDriver

d = SyncDriver()
(server,) = d.discover("server", 1, timeout=30)
s = socket.create_connection((server.ip, 7300), timeout=30)

def ping():
    started = time.perf_counter()
    s.sendall(b"x")
    s.recv(1)
    return (time.perf_counter() - started) * 1000

for _ in range(20):
    ping()
d.register_event("baseline")
# the fault fires on `baseline`: ping until five round trips in a row show it
slow, deadline = [], time.time() + 60
while len(slow) < 5 and time.time() < deadline:
    rtt = ping()
    slow = slow + [rtt] if rtt >= 200 else []
print("delayed", " ".join(f"{r:.1f}" for r in slow), flush=True)
sys.exit(0 if len(slow) == 5 else 1)
"""

KNOCKER = """\
import socket, sys, time
from tricks_nats.driver import SyncDriver

d = SyncDriver()
(server,) = d.discover("server", 1, timeout=30)

def knock():
    try:
        socket.create_connection((server.ip, 7300), timeout=0.3).close()
        return True
    except OSError as exc:
        return exc

assert knock() is True
d.register_event("connected")
# the partition comes on `connected` and heals a second later
deadline = time.time() + 60
while (answer := knock()) is True and time.time() < deadline:
    time.sleep(0.02)
print("cut off:", answer, flush=True)
while (answer := knock()) is not True and time.time() < deadline:
    time.sleep(0.02)
print("healed:", answer, flush=True)
sys.exit(0 if answer is True else 1)
"""


def spec_text(faults: str) -> str:
    return textwrap.dedent(
        """\
        timeout: 120
        experiment:
        - tag: server
          command: [python, server.py]
          workflow: {stop: {name: client_stop, value: 1}}
        - tag: client
          command: [python, client.py]
          workflow: {start: {name: listening, value: 1}}
        faults:
        """
    ) + textwrap.dedent(faults)


def write_pods(where: Path, client: str, faults: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "server.py").write_text(SERVER)
    (where / "client.py").write_text(client)
    path = where / "spec.yaml"
    path.write_text(spec_text(faults))
    return path


def leftovers() -> list[str]:
    """What network faults of any run left on this machine: tables, mounts."""
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout
    mounts = Path("/proc/self/mountinfo").read_text()
    return [line for line in tables.splitlines() if "tricks_" in line] + [
        line for line in mounts.splitlines() if "tricks-netcls" in line
    ]


async def run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    runs = path.parent / "runs"
    outcome = await up(spec.load(path), UpOptions(runs_dir=runs, grace=2))
    (root,) = runs.iterdir()
    summary = json.loads((root / "summary.json").read_text())
    journal = [json.loads(line) for line in (root / "journal.jsonl").read_text().splitlines()]
    assert summary["verdict"] == outcome.verdict
    assert not exp_processes(summary["experiment"])
    return summary, journal, root


@pytest.fixture(autouse=True)
def clean_machine() -> Any:
    assert leftovers() == []
    yield
    assert leftovers() == []  # after the run: no table, no mount


async def test_a_delay_between_two_tags_slows_their_round_trips(tmp_path: Path) -> None:
    path = await asyncio.to_thread(
        write_pods,
        tmp_path,
        PINGER,
        """\
        - name: slow-link
          when: {name: baseline, value: 1}
          delay: {from: {tag: client}, to: {tag: server}, delay: 100ms}
        """,
    )
    summary, journal, root = await run(path)
    log = (root / "logs" / "client-0.log").read_text()
    assert summary["verdict"] == "succeeded", (summary["reason"], log)
    (line,) = [x for x in log.splitlines() if x.startswith("delayed")]
    # 100 ms each way: every round trip at least 200 ms, five in a row
    assert [float(r) >= 200 for r in line.split()[1:]] == [True] * 5
    fired = [e for e in journal if e["kind"] == "fault"]
    assert [(f["state"], f["pods"], f["peers"]) for f in fired] == [
        ("injected", ["client-0"], ["server-0"]),
        ("healed", ["client-0"], ["server-0"]),
    ]
    assert fired[1]["reason"] == "the run ended"


async def test_a_partition_cuts_the_link_then_heals(tmp_path: Path) -> None:
    path = await asyncio.to_thread(
        write_pods,
        tmp_path,
        KNOCKER,
        """\
        - when: {name: connected, value: 1}
          partition: {from: {tag: client}, to: {tag: server}, duration: 1s}
        """,
    )
    summary, journal, root = await run(path)
    log = (root / "logs" / "client-0.log").read_text()
    assert summary["verdict"] == "succeeded", (summary["reason"], log)
    assert "cut off: timed out" in log and "healed: True" in log
    states = [e["state"] for e in journal if e["kind"] == "fault"]
    assert states == ["injected", "healed"]


def test_sigkill_of_up_leaves_no_rule_no_mount_and_no_paused_pod(tmp_path: Path) -> None:
    path = write_pods(
        tmp_path,
        "import time\nwhile True: time.sleep(1)\n",
        """\
        - when: {name: client_start, value: 1}
          partition: {from: {tag: client}, to: {tag: server}}
        - when: {name: client_start, value: 1}
          delay: {from: {tag: server}, to: {tag: client}, delay: 50ms}
        - when: {name: client_start, value: 1}
          pause: {tag: client, duration: 1h}
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tricks_nats.cli.app", "up", str(path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
        cwd=ROOT,
    )
    experiment = ""
    try:
        assert proc.stdout is not None
        injected = 0
        for line in proc.stdout:
            entry = json.loads(line)
            experiment = entry["experiment"]
            injected += entry["kind"] == "fault" and entry["state"] == "injected"
            if injected == 3:
                break
        assert injected == 3 and leftovers()  # the rules are there while it runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 60  # the watchdog cleans up on its own, in its own time
    while (leftovers() or exp_processes(experiment)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exp_processes(experiment) == []  # the paused pod too; the fixture checks the rest


def test_up_refuses_network_faults_where_nft_is_missing_and_starts_nothing(
    tmp_path: Path,
) -> None:
    path = write_pods(
        tmp_path,
        "print('never')\n",
        """\
        - name: cut
          when: {name: client_start, value: 1}
          partition: {from: {tag: client}, to: {tag: server}}
        """,
    )
    env = {**cli_env(), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # no /usr/sbin
    result = subprocess.run(
        [sys.executable, "-m", "tricks_nats.cli.app", "up", str(path), "--runs-dir", "runs"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "network fault(s) 'cut' cannot run on this machine" in line
    assert "install the nftables package" in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written
