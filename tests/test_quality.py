"""Lint, formatting and types are part of the suite: a red ruff or mypy is a red build."""

from __future__ import annotations

import shutil
import subprocess
import sys

from .conftest import BIN, ROOT


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN))
    assert found, f"{name} is part of the test extra"
    return found


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = subprocess.run(
        [tool("ruff"), "format", "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_does_not_import_heavy_modules() -> None:
    """`tricks-nats --help` and `validate` must not pay for nats-py or kubernetes-asyncio."""
    probe = (
        "import sys, runpy; sys.argv = ['tricks-nats', 'validate', "
        "'examples/ring/ring.yaml']\n"
        "try:\n    runpy.run_module('tricks_nats.cli.app', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('nats', 'kubernetes_asyncio', 'matplotlib', 'plotly') "
        "if m in sys.modules]\nprint(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
