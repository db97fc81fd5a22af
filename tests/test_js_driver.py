"""The JavaScript driver's own tests (`node --test drivers/js/test/`) and its type check, run
from pytest so that the one test command covers them, and a check that it speaks the protocol
of `tricks_nats.protocol` (version, subjects). Needs `npm ci` in drivers/js (the README's test
command and .ci/run do it).

The node tests run against a real nats-server with the pod permissions of PROTOCOL.md version 2
and tests/conformance/fixture.py as the coordinator's side: registration requests, rosters,
notifications; among them a forged notification that must not release a waiter, close()
during a pending wait, the password kept out of printed configs, and a permissions violation
reported at once as its own error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tricks_nats import protocol as p

from .conftest import ROOT, cli_env

JS = ROOT / "drivers" / "js"

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env["TRICKS_PYTHON"] = sys.executable
    return subprocess.run(list(args), cwd=JS, env=env, capture_output=True, text=True, timeout=240)


def test_dependencies_are_installed() -> None:
    assert (JS / "node_modules" / "@nats-io" / "transport-node").is_dir(), (
        "run `npm ci` in drivers/js first (see the README's test command)"
    )


def test_node_test_suite_passes() -> None:
    result = run("node", "--test", "test/")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
    assert "# cancelled 0" in result.stdout
    assert "# pass 0" not in result.stdout


def test_types_check() -> None:
    result = run("node", "node_modules/typescript/bin/tsc", "-p", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_names_match_the_protocol_module() -> None:
    """Same version, same subjects as tricks_nats.protocol (PROTOCOL.md's other twin)."""
    exp, tag, event = "ring-20261122-031444-35d1", "server", "server-connected"
    script = f"""
        import {{ names, PROTOCOL_VERSION }} from "./src/index.js";
        const [exp, tag, event] = {json.dumps([exp, tag, event])};
        console.log(JSON.stringify({{
          version: PROTOCOL_VERSION,
          counts: names.countsStream(exp),
          pods: names.podsStream(exp),
          count: names.countSubject(exp, event),
          event: names.eventSubject(exp, event),
          roster: names.rosterSubject(exp, tag),
          reached: names.reachedSubject(exp, event, 6),
          inbox: names.inboxPrefix(exp),
          msgId: names.msgId(exp, "server-3", event, "9f2c41d07ab3e865"),
          topic: names.topicSubject(exp, "config"),
          stored: names.storedSubject(exp, "config"),
          topics: names.topicsStream(exp),
          topicMsgId: names.topicMsgId(exp, "server-3", "config", "9f2c41d07ab3e865"),
        }}));
    """
    result = run("node", "--input-type=module", "-e", script)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "version": p.VERSION,
        "counts": p.stream_of(p.counts_bucket(exp)),
        "pods": p.stream_of(p.pods_bucket(exp)),
        "count": p.count_subject(exp, event),
        "event": p.event_subject(exp, event),
        "roster": p.roster_subject(exp, tag),
        "reached": p.reached_subject(exp, event, 6),
        "inbox": p.inbox_prefix(exp),
        "msgId": p.event_msg_id(exp, "server-3", event, "9f2c41d07ab3e865"),
        "topic": p.topic_subject(exp, "config"),
        "stored": p.stored_subject(exp, "config"),
        "topics": p.topics_stream(exp),
        "topicMsgId": p.topic_msg_id(exp, "server-3", "config", "9f2c41d07ab3e865"),
    }
