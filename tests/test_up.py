"""`tricks-nats up` end to end: real CLI, real nats-server, real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, cli_env, exp_processes, start_cli
from .test_trust_hangs import wait_until

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]


def up(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRICKS, "up", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        cwd=ROOT,
    )


def only_run(runs: Path) -> Path:
    (run,) = list(runs.iterdir())
    return run


def summary(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / "summary.json").read_text())
    return data


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_ring_example_end_to_end(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    result = up("examples/ring/ring.yaml", "--runs-dir", str(runs))
    assert result.returncode == 0, result.stdout + result.stderr
    run = only_run(runs)
    s = summary(run)
    assert s["verdict"] == "succeeded"
    servers = [x for x in s["pods"] if x["tag"] == "server"]
    clients = [x for x in s["pods"] if x["tag"] == "client"]
    assert len(servers) == 6 and len(clients) == 6
    assert all(x["exit_code"] == 0 for x in clients)
    assert all(x["exit_code"] == 0 or x["stopped_by_workflow"] for x in servers)
    assert s["events"]["server-connected"] >= 6
    assert s["events"]["client_start"] == 6 and s["events"]["client_stop"] == 6
    assert min(c["started_at"] for c in clients) > max(x["started_at"] for x in servers)
    logs = sorted(p.name for p in (run / "logs").iterdir())
    pods = [f"server-{i}" for i in range(6)] + [f"client-{i}" for i in range(6)]
    assert logs == sorted(f"{pod}.{kind}" for pod in pods for kind in ("log", "ts"))
    assert "went 6 hops" in (run / "logs" / "client-0.log").read_text()
    # results for free: each request's round trip (driver), each token's tour (log pattern)
    metrics = {(m["name"], m["tag"]): m for m in s["metrics"]}
    assert sorted(metrics) == [("request_ms", "client"), ("token_ms", "server")]
    assert metrics[("request_ms", "client")]["count"] == 6 * 200
    assert metrics[("token_ms", "server")]["count"] == 6
    assert 0 < metrics[("request_ms", "client")]["p50"] <= metrics[("request_ms", "client")]["p99"]
    assert (run / "spec.yaml").read_text() == (ROOT / "examples/ring/ring.yaml").read_text()
    journal = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]
    assert journal[-1] == {**journal[-1], "kind": "verdict", "verdict": "succeeded"}
    assert sum(1 for e in journal if e["kind"] == "pod" and e["state"] == "running") == 12
    assert not exp_processes(s["experiment"])
    # How each pod ended, in one vocabulary; the end of `up` says what to look at next.
    assert {x["outcome"] for x in servers} == {"stopped by workflow"}
    assert {x["outcome"] for x in clients} == {"succeeded"} and s["cause"] is None
    lines = result.stdout.splitlines()
    tail = lines[lines.index(next(x for x in lines if x.startswith("succeeded: "))) :]
    assert tail[1:3] == ["  server: 6 stopped by workflow", "  client: 6 succeeded"]
    assert tail[3].startswith("  events: server-connected=") and "client_stop=6" in tail[3]
    assert tail[4:] == [f"  records: {run}", f"  next: tricks-nats report {run}"]
    # Secrets stay out of the records.
    password = "TRICKS_NATS_PASSWORD"
    assert password not in (run / "journal.jsonl").read_text()
    assert password not in (run / "summary.json").read_text()


def test_crashing_pods_fail_the_run(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        """\
        experiment:
        - tag: crash
          command: exit 3
          replicas: 2
        - tag: watcher
          command: exec sleep 60
          workflow:
            stop: {name: crash_stop, value: 2}
        """,
    )
    runs = tmp_path / "runs"
    result = up(str(spec), "--runs-dir", str(runs), "--grace", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    s = summary(only_run(runs))
    assert s["verdict"] == "failed"
    crashes = [x for x in s["pods"] if x["tag"] == "crash"]
    assert [x["exit_code"] for x in crashes] == [3, 3]
    assert s["events"]["crash_stop"] == 2
    (watcher,) = [x for x in s["pods"] if x["tag"] == "watcher"]
    assert watcher["state"] == "stopped" and watcher["stopped_by_workflow"]
    assert [x["outcome"] for x in crashes] == ["failed"] * 2
    assert watcher["outcome"] == "stopped by workflow"
    assert "crash-0 exited with 3" in result.stderr
    cause = s["cause"]
    assert cause in ("crash-0", "crash-1")  # the first of the two to fail
    assert f"  {cause} caused the failure (exit 3); its log is empty (" in result.stderr
    assert "  crash: 2 failed\n  watcher: 1 stopped by workflow\n" in result.stderr
    assert not exp_processes(s["experiment"])


def test_sigint_stops_pods_that_ignore_sigterm(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        """\
        experiment:
        - tag: stubborn
          command: "trap '' TERM; sleep 120 & wait; sleep 120"
          replicas: 3
        """,
    )
    runs = tmp_path / "runs"
    proc = start_cli("up", str(spec), "--runs-dir", str(runs), "--json", "--grace", "1")
    try:
        assert proc.stdout is not None
        running = 0
        exp = None
        for line in proc.stdout:  # wait for the journal to say all three run
            entry = json.loads(line)
            exp = entry["experiment"]
            if entry["kind"] == "event" and entry["name"] == "stubborn_start":
                running = entry["count"]
            if running == 3:
                break
        assert running == 3
        assert exp is not None and len(exp_processes(exp)) >= 3
        # A pod counts as started when its shell runs, before its `trap`: the background sleep
        # of each pod, started after the trap, says it is in place.
        import psutil

        up_proc = psutil.Process(proc.pid)
        wait_until(
            lambda: [p.name() for p in up_proc.children(recursive=True)].count("sleep") >= 3,
            "the pods' traps (their first sleeps)",
        )
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    s = summary(only_run(runs))
    assert s["verdict"] == "interrupted"
    assert all(x["state"] == "stopped" for x in s["pods"])
    assert {x["outcome"] for x in s["pods"]} == {"interrupted"}
    assert {x["exit_code"] for x in s["pods"]} == {137}
    assert not exp_processes(exp)


def test_timeout_gives_timed_out(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        """\
        timeout: 1
        experiment:
        - tag: slow
          command: [sleep, "60"]
        """,
    )
    runs = tmp_path / "runs"
    result = up(str(spec), "--runs-dir", str(runs))
    assert result.returncode == 1
    s = summary(only_run(runs))
    assert s["verdict"] == "timed_out"
    assert s["pods"][0]["state"] == "stopped"
    assert s["pods"][0]["outcome"] == "stopped at timeout"
    assert "ran out of time (1s)" in result.stderr
    assert "  slow: 1 stopped at timeout\n" in result.stderr


def test_bad_spec_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    spec = write(tmp_path, "experiment:\n- tag: a\n  replicas: six\n  command: x\n")
    runs = tmp_path / "runs"
    result = up(str(spec), "--runs-dir", str(runs))
    assert result.returncode == 2
    assert result.stderr.strip() == f"{spec}:3:13: experiment[0].replicas: expected int, got 'six'"
    assert not runs.exists()


def test_missing_program_exits_2_before_anything_starts(tmp_path: Path) -> None:
    spec = write(tmp_path, "experiment:\n- {tag: a, command: [no-such-program-xyz]}\n")
    runs = tmp_path / "runs"
    result = up(str(spec), "--runs-dir", str(runs))
    assert result.returncode == 2
    assert "command 'no-such-program-xyz' not found on PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not runs.exists()


def test_unreachable_nats_url_is_one_clear_line(tmp_path: Path) -> None:
    spec = write(tmp_path, "experiment:\n- {tag: a, command: 'true'}\n")
    result = up(str(spec), "--runs-dir", str(tmp_path / "runs"), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 3
    assert result.stderr.strip().startswith("tricks-nats: error: cannot reach NATS at")
    assert len(result.stderr.strip().splitlines()) == 1


async def test_existing_nats_server_via_nats_url(tmp_path: Path, nats_server) -> None:
    import asyncio

    spec = write(
        tmp_path,
        """\
        experiment:
        - tag: a
          command: tricks-nats-probe
          replicas: 2
        """,
    )
    spec.write_text(
        spec.read_text().replace(
            "tricks-nats-probe",
            'python -c "from tricks_nats.driver import SyncDriver as D; d = D(); '
            "d.register_event('hello'); d.wait_event('hello', 2, timeout=30); d.close()\"",
        )
    )
    runs = tmp_path / "runs"
    proc = await asyncio.create_subprocess_exec(
        *TRICKS,
        "up",
        str(spec),
        "--runs-dir",
        str(runs),
        "--nats-url",
        nats_server.url,
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, out.decode() + err.decode()
    s = summary(only_run(runs))
    assert s["events"]["hello"] == 2 and s["verdict"] == "succeeded"


def test_sigkill_of_up_leaves_no_pod_and_no_server(tmp_path: Path) -> None:
    import psutil

    spec = write(
        tmp_path,
        """\
        experiment:
        - tag: s
          command: "sleep 300 & sleep 300"
          replicas: 3
        """,
    )
    proc = subprocess.Popen(
        [*TRICKS, "up", str(spec), "--runs-dir", str(tmp_path / "runs"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        exp = None
        for line in proc.stdout:
            entry = json.loads(line)
            exp = entry["experiment"]
            if entry["kind"] == "event" and entry == {**entry, "name": "s_start", "count": 3}:
                break
        up = psutil.Process(proc.pid)

        def family_names() -> list[str]:
            return [p.name() for p in up.children(recursive=True)]

        # A pod counts as started when its shell runs; its two sleeps come a moment later
        # (fork, then exec): nothing announces them, so look until they are there.
        wait_until(lambda: family_names().count("sleep") == 6, "the pods' 6 sleeps")
        family = up.children(recursive=True)
        names = [p.name() for p in family]
        assert "nats-server" in names and names.count("sleep") == 6
        server = next(p for p in family if p.name() == "nats-server").cmdline()
        work = Path(server[server.index("-c") + 1]).parent  # its config, store and all
        assert work.name.startswith("tricks-nats-") and work.is_dir()
    finally:
        proc.kill()
        proc.communicate()
    _, alive = psutil.wait_procs(family, timeout=15)  # the watchdog among them
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
    assert exp is not None and not exp_processes(exp)
    assert not work.exists()  # the embedded server's temporary store went with it


def test_the_end_of_up_shows_a_pods_log_lines_without_their_control_characters() -> None:
    """A pod's log may hold escape sequences: the end of `up` prints them as text, so a pod
    cannot move the cursor, retitle or clear the user's terminal."""
    from tricks_nats.cli.epilogue import printable

    assert printable("plain\ttext é") == "plain\ttext é"
    assert printable("\x1b[2J\x1b]0;pwned\x07boom") == "\\x1b[2J\\x1b]0;pwned\\x07boom"
