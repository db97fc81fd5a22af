"""One scenario, every driver: Python, JavaScript and shell pods run the same steps
(tests/conformance/scenario.*) in a real experiment (`tricks-nats up`: embedded nats-server
with per-run pod credentials, the coordinator, the local runtime), and the run's records are
checked. One language failing is one test failing.

The scenario: config from the environment, a blocking discover of all REPLICAS peers, one
registration published twice with the same Nats-Msg-Id (counted once) plus a plain one, a wait
that resolves once every pod has registered, three metric samples recorded (two labelled), a
greeting published on a topic and every pod's greeting read back in order (and found in the
run's topics.jsonl), a wait that times out (expected).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, cli_env, exp_processes

pytestmark = pytest.mark.slow

HERE = ROOT / "tests" / "conformance"
COMMANDS = {
    "python": [sys.executable, str(HERE / "scenario.py")],
    "javascript": ["node", str(HERE / "scenario.mjs")],
    "shell": ["bash", str(HERE / "scenario.sh")],
    # A pod written from drivers/PROTOCOL.md alone, on core NATS (nats-py without JetStream).
    "protocol": [sys.executable, str(HERE / "scenario_raw.py")],
}
REPLICAS = 3


def spec(tags: dict[str, str], total: int | None = None) -> str:
    """A spec with one tag per (tag -> language), REPLICAS pods each."""
    lines = ["apiVersion: v1", "name: conformance", "timeout: 120", "experiment:"]
    for tag, language in tags.items():
        lines += [
            f"- tag: {tag}",
            f"  command: {json.dumps(COMMANDS[language])}",
            f"  replicas: {REPLICAS}",
        ]
        if total is not None:
            greet = total // 2  # every pod greets once, registers twice
            lines += ["  env:", f"    HELLO_TOTAL: '{total}'", f"    GREET_TOTAL: '{greet}'"]
    return "\n".join(lines) + "\n"


def run(tmp_path: Path, text: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "tricks_nats.cli.app", "up", str(path), "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=240,
        env=cli_env(),
        cwd=tmp_path,
    )
    (root,) = list(runs.iterdir())
    return result, root


def check_run(
    result: subprocess.CompletedProcess[str], root: Path, languages: dict[str, str]
) -> None:
    tags = list(languages)
    logs = {p.stem: p.read_text() for p in (root / "logs").glob("*.log")}
    assert result.returncode == 0, result.stderr + "\n".join(
        f"--- {name}\n{text}" for name, text in sorted(logs.items())
    )
    summary: dict[str, Any] = json.loads((root / "summary.json").read_text())
    assert summary["verdict"] == "succeeded"
    pods = [(p["tag"], p["pod_id"], p["exit_code"]) for p in summary["pods"]]
    assert sorted(pods) == sorted((t, i, 0) for t in tags for i in range(REPLICAS))
    for name, text in logs.items():
        assert f"discovered {REPLICAS}" in text, name
        assert f"exchanged {REPLICAS * len(tags)}" in text, name
        if languages[name.rsplit("-", 1)[0]] != "shell":  # a shell pod has no way to try
            assert "forgeries refused 3" in text, name
        assert "timed out as expected" in text, name
        assert text.rstrip().endswith("scenario ok"), name
    # Every pod registered twice, one of them published twice: counted exactly once each.
    assert summary["events"]["hello"] == 2 * REPLICAS * len(tags)
    assert "never" not in summary["events"]
    journal = [json.loads(line) for line in (root / "journal.jsonl").read_text().splitlines()]
    hello = [e for e in journal if e["kind"] == "event" and e["name"] == "hello"]
    assert {e.get("pod") for e in hello} <= {f"{t}-{i}" for t in tags for i in range(REPLICAS)}
    # Every pod recorded 3 samples (2 with a label): each in metrics.csv once, as sent.
    with (root / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    got = sorted((r["tag"], int(r["pod_id"]), float(r["value"]), r["lang"] != "") for r in rows)
    assert got == sorted(
        (t, i, float(i * 10 + k), k < 3) for t in tags for i in range(REPLICAS) for k in (1, 2, 3)
    )
    assert {r["name"] for r in rows} == {"conformance_ms"}
    assert summary["metrics_dropped"] == {} and summary["metrics_rejected"] == 0
    # Every pod greeted once on a topic: each greeting in topics.jsonl once, as sent.
    topics = [json.loads(line) for line in (root / "topics.jsonl").read_text().splitlines()]
    assert sorted(
        (r["topic"], r["pod"], r["data"]["tag"], r["data"]["pod_id"]) for r in topics
    ) == [("greeting", f"{t}-{i}", t, i) for t in sorted(tags) for i in range(REPLICAS)]
    assert [r["seq"] for r in topics] == sorted({r["seq"] for r in topics})
    assert not exp_processes(summary["experiment"])


@pytest.mark.parametrize("language", sorted(COMMANDS))
def test_scenario(language: str, tmp_path: Path) -> None:
    result, root = run(tmp_path, spec({"peer": language}))
    check_run(result, root, {"peer": language})


def test_all_languages_in_one_experiment(tmp_path: Path) -> None:
    """Pods in three languages count one event together and wait for each other's total."""
    tags = {f"{language[:2]}": language for language in sorted(COMMANDS)}
    result, root = run(tmp_path, spec(tags, total=2 * REPLICAS * len(tags)))
    check_run(result, root, tags)


def test_polyglot_ring_example(tmp_path: Path) -> None:
    """examples/ring-polyglot: JavaScript servers, shell clients, then Python clients."""
    runs = tmp_path / "runs"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tricks_nats.cli.app",
            "up",
            "examples/ring-polyglot/ring.yaml",
            "--runs-dir",
            str(runs),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=cli_env(),
        cwd=ROOT,
    )
    (root,) = list(runs.iterdir())
    logs = {p.stem: p.read_text() for p in (root / "logs").glob("*.log")}
    assert result.returncode == 0, result.stderr + "\n".join(
        f"--- {name}\n{text}" for name, text in sorted(logs.items())
    )
    summary: dict[str, Any] = json.loads((root / "summary.json").read_text())
    assert summary["verdict"] == "succeeded"
    assert summary["events"]["server-connected"] == 4
    assert summary["events"]["client_stop"] == 4 and summary["events"]["pyclient_stop"] == 2
    for i in range(4):
        assert "token went round the ring of 4" in logs[f"server-{i}"]
        assert f"client {i} (shell) via server" in logs[f"client-{i}"]
        assert "request 4 went 4 hops" in logs[f"client-{i}"]
    for i in range(2):
        assert "request 2 went 4 hops" in logs[f"pyclient-{i}"]
    # every round trip recorded: by the shell clients (`tricks-nats record -`) and by the
    # Python clients (`record`), 5 each
    counts = {(m["name"], m["tag"]): m["count"] for m in summary["metrics"]}
    assert counts[("request_ms", "client")] == 4 * 5
    assert counts[("request_ms", "pyclient")] == 2 * 5
    assert counts[("ring_ms", "server")] == 6 * 5  # JavaScript: each request, once round
    assert counts[("token_ms", "server")] == 4
    assert summary["metrics_dropped"] == {} and summary["metrics_rejected"] == 0
    pods = {(p["tag"], p["pod_id"]): p for p in summary["pods"]}
    assert all(pods[("client", i)]["exit_code"] == 0 for i in range(4))
    assert all(pods[("server", i)]["stopped_by_workflow"] for i in range(4))
    shells = [pods[("client", i)]["started_at"] for i in range(4)]
    pythons = [pods[("pyclient", i)]["started_at"] for i in range(2)]
    assert min(shells) > max(pods[("server", i)]["started_at"] for i in range(4))
    assert min(pythons) > max(pods[("client", i)]["stopped_at"] for i in range(4))
    assert not exp_processes(summary["experiment"])
