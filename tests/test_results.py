"""`report` and `plot` on real runs: the metrics table, coordination omission corrected where
declared and detected where not, figures from the CLI, clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tricks_nats import results

from .conftest import ROOT, cli_env
from .test_up import only_run, up

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]

#: A closed-loop client: a request every ~10 ms (the sleep is its work), one of which stalls
#: for a second. It records each request's duration twice: as `request_ms` (nothing declared)
#: and as `declared_ms` (the spec declares the 10 ms interval).
STALLING_CLIENT = """
import time
from tricks_nats.driver import SyncDriver
with SyncDriver() as t:
    for i in range(300):
        started = time.perf_counter()
        time.sleep(1.0 if i == 150 else 0.01)
        took = (time.perf_counter() - started) * 1000
        t.record("request_ms", took)
        t.record("declared_ms", took)
"""

STEADY = """
from tricks_nats.driver import SyncDriver
with SyncDriver() as t:
    for i in range(100):
        t.record("tick", i)
"""

SPEC = """
name: stall
experiment:
- tag: client
  command: [python, client.py]
  metrics:
  - {name: declared_ms, expected_interval_ms: 10}
- tag: steady
  command: [python, steady.py]
"""


@pytest.fixture(scope="module")
def stalled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("stall")
    (work / "client.py").write_text(STALLING_CLIENT)
    (work / "steady.py").write_text(STEADY)
    (work / "spec.yaml").write_text(textwrap.dedent(SPEC))
    result = up(str(work / "spec.yaml"), "--runs-dir", str(work / "runs"))
    assert result.returncode == 0, result.stderr[-2000:]
    return only_run(work / "runs")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRICKS, *args], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120
    )


def test_a_stall_is_corrected_where_declared_and_detected_where_not(stalled_run: Path) -> None:
    found = results.load(stalled_run)
    assert found is not None
    rows = {m.name: m for m in results.table(found)}
    raw, declared = rows["request_ms"], rows["declared_ms"]
    assert raw.count == declared.count == 300
    assert raw.p99 < 100  # the stall is one sample in 300: raw p99 hides it
    assert raw.max >= 1000
    assert raw.corrected is None and declared.expected_interval_ms == 10
    assert declared.corrected is not None
    assert declared.corrected.count > 300 + 50  # the requests the stall held back
    assert 300 <= declared.corrected.p99 <= 1100
    (warning,) = results.omission_warnings(found)  # the declared one is corrected, not warned
    assert warning.startswith("client-0 request_ms: 1 stall (")
    corrected_ms = float(warning.split(" raw, ")[1].split(" ms corrected")[0])
    assert 300 <= corrected_ms <= 1100
    # the summary written by `up` has the same figures
    summary = (stalled_run / "summary.json").read_text()
    assert '"corrected"' in summary


def test_report_prints_the_table_and_the_warning(stalled_run: Path) -> None:
    out = cli("report", stalled_run.name, "--runs-dir", str(stalled_run.parent))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(line for line in lines if line.split()[:2] == ["metric", "tag"])
    assert head.split()[2:] == ["count", "mean", "min", "p50", "p90", "p99", "p99.9", "max"]
    assert any(line.split()[:3] == ["request_ms", "client", "300"] for line in lines)
    assert any(line.split()[:2] == ["tick", "steady"] for line in lines)
    assert any(line.strip().startswith("corrected (10.0 ms)") for line in lines)
    assert any("warning: client-0 request_ms: 1 stall" in line for line in lines)
    assert not any("steady" in line and "warning" in line for line in lines)


def test_report_and_plot_draw_figures(stalled_run: Path, tmp_path: Path) -> None:
    out = cli("report", str(stalled_run), "-o", f"{tmp_path}/figs/", "--format", "svg")
    assert out.returncode == 0, out.stderr
    drawn = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert drawn == ["declared_ms-cdf.svg", "request_ms-cdf.svg", "tick-line.svg", "timeline.svg"]
    for name in drawn:
        assert (tmp_path / "figs" / name).read_text().lstrip().startswith(("<?xml", "<svg"))
    target = tmp_path / "rate.pdf"
    out = cli("plot", str(stalled_run), "request_ms", "--kind", "rate", "-o", str(target))
    assert out.returncode == 0, out.stderr
    assert target.read_bytes().startswith(b"%PDF-")
    assert "1 series: client" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plot", "RUN", "nope"], "no metric 'nope'"),
        (["plot", "RUN", "tick", "--kind", "pie"], "unknown plot kind 'pie'"),
        (["plot", "RUN", "tick", "-o", "x.gif"], ".gif"),
        (["plot", "nowhere-20260101-000000-abcd", "tick"], "no run 'nowhere-20260101-000000-abcd'"),
        (["report", "RUN", "-o", "DIR/", "--format", "bmp"], "--format 'bmp'"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    stalled_run: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [a.replace("RUN", str(stalled_run)).replace("DIR", str(tmp_path / "d")) for a in args]
    out = cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
