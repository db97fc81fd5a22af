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


#: bus.py, and topics.py: the bus's topic operations (PROTOCOL.md 6.7, 6.8), kept apart for size.
NATS_BOUNDARY = ("tricks_nats/bus.py", "tricks_nats/topics.py", "tricks_nats/driver/")


def test_only_the_bus_and_the_driver_import_nats_py() -> None:
    """One NATS boundary: nats-py types and calls stay in bus.py and its topics part (and the
    driver, which is a client of its own); every other module goes through their operations."""
    import ast

    offenders = []
    for path in sorted((ROOT / "tricks_nats").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(NATS_BOUNDARY):
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{rel}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "nats"]
    assert offenders == []


def _importers_of_nats(module: str) -> set[str]:
    """The modules that import nats-py modules when `module` is imported in a fresh
    interpreter, from `python -X importtime` (children are printed before their parent, one
    indent deeper)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = []  # (depth, module)
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1]
            rows.append(((len(name) - len(name.lstrip())) // 2, name.strip()))
    importers = set()
    for i, (depth, name) in enumerate(rows):
        if name.split(".")[0] == "nats":
            parent = next((n for d, n in rows[i + 1 :] if d < depth), module)
            if parent.split(".")[0] != "nats":
                importers.add(parent)
    return importers


def test_importtime_shows_nats_imported_by_the_bus_only() -> None:
    """Each of our modules, imported alone: nats-py is only ever imported from inside
    tricks_nats.bus, its topics part (or the driver), never by another module of ours."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "tricks_nats").rglob("*.py")
    )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        importers: set[str] = set().union(*pool.map(_importers_of_nats, modules))
    assert "tricks_nats.bus" in importers, "nats-py was never imported: the probe is broken"
    assert importers <= {"tricks_nats.bus", "tricks_nats.topics", "tricks_nats.driver"}, importers
