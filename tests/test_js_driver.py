"""The JavaScript driver's own tests (`node --test drivers/js/test/`) and its type check, run
from pytest so that the one test command covers them. Needs `npm ci` in drivers/js (the
README's test command and .ci/run do it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    assert "# pass 0" not in result.stdout


def test_types_check() -> None:
    result = run("node", "node_modules/typescript/bin/tsc", "-p", ".")
    assert result.returncode == 0, result.stdout + result.stderr
