"""Campaigns end to end: real CLI, real nats-server, real processes. Runs, records, results.csv,
interruption and resume, a changed spec, exit codes."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import kmock
import pytest

from tricks_nats.natsserver import EmbeddedServer
from tricks_nats.runtimes import kube_objects as ko

from .conftest import ROOT, cli_env, start_cli
from .kube_cluster import Cluster, PodContext

pytestmark = pytest.mark.slow
TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]


def cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRICKS, *args], capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd
    )


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def campaign_dir(runs: Path) -> Path:
    (only,) = list(runs.iterdir())
    return only


def campaign(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "campaign.json").read_text())
    return data


def results(directory: Path) -> list[dict[str, str]]:
    with (directory / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def tree_digest(directory: Path) -> dict[str, str]:
    """Every file of a directory and its content's hash (to prove a run was left untouched)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# Two variables crossed (Tricks' config list), pods that echo a latency the spec reads back.
FOUR_RUNS = """\
    name: grid
    config:
      - {$clients: 1, $ms: 10}
      - {$clients: 1, $ms: 20}
      - {$clients: 2, $ms: 10}
      - {$clients: 2, $ms: 20}
    experiment:
      - tag: server
        command: "echo up"
      - tag: client
        replicas: $clients
        command: [sh, -c, "for i in 1 2 3; do echo \\"took $(( $ms * i )) ms\\"; done"]
        workflow:
          start: {name: server_start, value: 1}
        metrics:
          - name: lat_ms
            pattern: 'took (?P<value>\\d+) ms'
    """


def test_four_run_campaign_end_to_end(tmp_path: Path) -> None:
    spec = write(tmp_path, FOUR_RUNS)
    runs = tmp_path / "runs"
    done = cli("up", str(spec), "--runs-dir", str(runs))
    assert done.returncode == 0, done.stderr
    assert "Unknown child process" not in done.stderr  # asyncio, on nats-server reaped twice
    assert "Traceback" not in done.stderr
    d = campaign_dir(runs)
    c = campaign(d)
    assert c["name"] == "grid" and c["variables"] == ["clients", "ms"] and c["state"] == "finished"
    assert c["spec"] == spec.read_text() and c["spec_path"] == str(spec)
    assert [(r["index"], r["state"], r["variables"]) for r in c["runs"]] == [
        (1, "succeeded", {"clients": 1, "ms": 10}),
        (2, "succeeded", {"clients": 1, "ms": 20}),
        (3, "succeeded", {"clients": 2, "ms": 10}),
        (4, "succeeded", {"clients": 2, "ms": 20}),
    ]
    # the progress lines: run k of n, with its variables, and the end
    assert "run 3/4 (#3, repetition 1): $clients=2, $ms=10 [2 succeeded, 0 failed" in done.stdout
    assert "campaign " + d.name + ": 4 of 4 runs succeeded" in done.stdout
    # results.csv: one row per run, variables, verdict, and each metric's figures
    rows = results(d)
    assert list(rows[0]) == [
        "run", "config", "repetition", "clients", "ms", "verdict", "duration_s", "experiment",
        "lat_ms_count", "lat_ms_mean", "lat_ms_p50", "lat_ms_p90", "lat_ms_p99",
    ]  # fmt: skip
    assert [(r["clients"], r["ms"], r["lat_ms_count"], r["lat_ms_mean"]) for r in rows] == [
        ("1", "10", "3", "20.0"),
        ("1", "20", "3", "40.0"),
        ("2", "10", "6", "20.0"),
        ("2", "20", "6", "40.0"),
    ]
    assert all(r["verdict"] == "succeeded" and float(r["duration_s"]) > 0 for r in rows)
    # each run: its own experiment and records, its variables and provenance in summary.json
    for r, entry in zip(rows, c["runs"], strict=True):
        run_dir = d / entry["run_dir"]
        assert entry["experiment"] == r["experiment"] == run_dir.name
        s = json.loads((run_dir / "summary.json").read_text())
        assert s["experiment"] == entry["experiment"] and s["variables"] == entry["variables"]
        assert s["provenance"]["nats_server"] and s["provenance"]["spec_path"] == str(spec)
        body = (run_dir / "spec.yaml").read_text().split("\n", 2)[2]  # after the comments
        assert "$ms" not in body and "$clients" not in body and "$((" in body
    assert len({e["experiment"] for e in c["runs"]}) == 4


def test_a_run_spec_runs_that_configuration_again(tmp_path: Path) -> None:
    spec = write(tmp_path, FOUR_RUNS)
    runs = tmp_path / "runs"
    assert cli("up", str(spec), "--runs-dir", str(runs), "-q").returncode == 0
    third = campaign_dir(runs) / campaign(campaign_dir(runs))["runs"][2]["run_dir"]
    again = tmp_path / "again"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = cli("up", str(third / "spec.yaml"), "--runs-dir", str(again), "-q", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    (rerun,) = list(again.iterdir())
    s = json.loads((rerun / "summary.json").read_text())
    assert [p["tag"] for p in s["pods"]] == ["server", "client", "client"]  # $clients = 2
    assert {m["name"]: m["mean"] for m in s["metrics"]} == {"lat_ms": 20.0}  # $ms = 10


def test_dry_run_and_validate_count_the_runs(tmp_path: Path) -> None:
    spec = write(tmp_path, FOUR_RUNS)
    v = cli("validate", str(spec))
    assert v.returncode == 0
    assert "2 to 3 pods" in v.stdout and "4 runs (4 configurations x 1 repetition)" in v.stdout
    dry = cli("up", str(spec), "--dry-run", "--repeat", "2", "--runs-dir", str(tmp_path / "r"))
    assert dry.returncode == 0 and not (tmp_path / "r").exists()
    lines = dry.stdout.splitlines()
    assert lines[0].endswith("8 runs (4 configurations x 2 repetitions)")
    assert lines[1] == "  run 1: configuration 1, repetition 1: $clients=1, $ms=10 (2 pods)"
    assert lines[8] == "  run 8: configuration 4, repetition 2: $clients=2, $ms=20 (3 pods)"


def test_bad_configuration_exits_2_before_any_run(tmp_path: Path) -> None:
    spec = write(tmp_path, FOUR_RUNS.replace("{$clients: 2, $ms: 20}", "{$clients: 0, $ms: 20}"))
    runs = tmp_path / "runs"
    done = cli("up", str(spec), "--runs-dir", str(runs))
    assert done.returncode == 2 and not runs.exists()
    assert "in configuration 4 ($clients=0, $ms=20, line 6)" in done.stderr
    assert "Traceback" not in done.stderr


FAILING = """\
    name: mixed
    matrix:
      $code: [0, 3, 0]
    experiment:
      - tag: a
        command: "exit $code"
    """


def test_a_failed_run_does_not_stop_the_campaign_but_fails_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = cli("up", str(write(tmp_path, FAILING)), "--runs-dir", str(runs))
    assert done.returncode == 1
    c = campaign(campaign_dir(runs))
    assert [r["state"] for r in c["runs"]] == ["succeeded", "failed", "succeeded"]
    verdicts = [r["verdict"] for r in results(campaign_dir(runs))]
    assert verdicts == ["succeeded", "failed", "succeeded"]
    assert "2 of 3 runs succeeded" in done.stderr


def test_fail_fast_stops_at_the_first_failure_and_resume_retries(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    spec = write(tmp_path, FAILING)
    done = cli("up", str(spec), "--runs-dir", str(runs), "--fail-fast", "-q")
    assert done.returncode == 1
    d = campaign_dir(runs)
    assert [r["state"] for r in campaign(d)["runs"]] == ["succeeded", "failed", "pending"]
    # resume runs only what has no verdict: the failed run stays failed
    again = cli("resume", str(d), "-q")
    assert again.returncode == 1
    c = campaign(d)
    assert [r["state"] for r in c["runs"]] == ["succeeded", "failed", "succeeded"]
    failed_dir = c["runs"][1]["run_dir"]
    nothing = cli("resume", str(d))  # every run has a verdict: says so, runs nothing
    assert nothing.returncode == 1 and campaign(d)["runs"] == c["runs"]
    assert nothing.stdout.startswith(
        f"campaign {d.name}: every run has a verdict: nothing to run (--retry-failed runs "
        "the 1 failed again); records in"
    )
    # --retry-failed runs it again, in a new directory, keeping the old one listed
    retry = cli("up", str(spec), "--resume", str(d), "--retry-failed", "-q")
    assert retry.returncode == 1  # `exit 3` fails again
    c = campaign(d)
    assert c["runs"][1]["previous"] == [failed_dir] and c["runs"][1]["run_dir"].endswith("-002-2")
    assert (d / failed_dir).is_dir() and (d / c["runs"][1]["run_dir"] / "summary.json").is_file()


HELD = """\
    name: held
    matrix:
      $hold: [no, yes, no]
    experiment:
      - tag: a
        command: "if [ $hold = yes ] && [ ! -e release ]; then sleep 120; fi"
    """


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupt_then_resume_leaves_finished_runs_untouched(
    tmp_path: Path, sig: signal.Signals
) -> None:
    import psutil

    spec = write(tmp_path, HELD)
    runs = tmp_path / "runs"
    proc = start_cli(
        "up", str(spec), "--runs-dir", str(runs), "--json", "--grace", "1", cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until run 2's pod is running
            entry = json.loads(line)
            if (
                entry.get("kind") == "event"
                and entry.get("name") == "a_start"
                and entry["experiment"].endswith("-002")
            ):
                break
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    d = campaign_dir(runs)
    c = campaign(d)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert c["state"] == "interrupted"
        assert [r["state"] for r in c["runs"]] == ["succeeded", "interrupted", "pending"]
        assert f"tricks-nats resume {d}" in err
    else:  # killed in the middle of run 2: only that run is lost
        _, alive = psutil.wait_procs(family, timeout=15)  # the watchdog stops its pods
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert c["state"] == "running"
        assert [r["state"] for r in c["runs"]] == ["succeeded", "running", "pending"]
    assert [r["run"] for r in results(d)] == ["1"]  # only finished runs have a row
    first = d / c["runs"][0]["run_dir"]
    before = tree_digest(first)
    interrupted_dir = c["runs"][1]["run_dir"]

    # the spec changed: refused, nothing run
    spec.write_text(spec.read_text().replace("sleep 120", "sleep 121"))
    refused = cli("up", str(spec), "--resume", str(d), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(
        f"changed since campaign {d.name} began: "
        "--force runs what is left with the spec as it is now"
    )
    assert campaign(d) == c
    spec.write_text(textwrap.dedent(HELD))

    (tmp_path / "release").touch()
    if sig == signal.SIGINT:
        resumed = cli("up", str(spec), "--resume", str(d), cwd=tmp_path)
    else:
        resumed = cli("resume", str(d), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"campaign {d.name}: 2 of 3 runs" in resumed.stdout
    c = campaign(d)
    assert c["state"] == "finished"
    assert [r["state"] for r in c["runs"]] == ["succeeded"] * 3
    assert c["runs"][1]["previous"] == [interrupted_dir]
    assert tree_digest(first) == before  # the finished run was not touched
    assert [r["run"] for r in results(d)] == ["1", "2", "3"]


def test_force_resumes_with_a_changed_spec(tmp_path: Path) -> None:
    spec = write(tmp_path, FAILING)
    runs = tmp_path / "runs"
    assert cli("up", str(spec), "--runs-dir", str(runs), "--fail-fast", "-q").returncode == 1
    d = campaign_dir(runs)
    spec.write_text(spec.read_text().replace('"exit $code"', '"exit 0 # $code"'))
    assert cli("up", str(spec), "--resume", str(d), "-q").returncode == 2
    forced = cli("up", str(spec), "--resume", str(d), "--force", "--retry-failed", "-q")
    assert forced.returncode == 0, forced.stderr
    assert [r["state"] for r in campaign(d)["runs"]] == ["succeeded"] * 3


def test_resume_of_something_else_is_one_line(tmp_path: Path) -> None:
    done = cli("resume", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == f"tricks-nats: error: {tmp_path}: not a campaign (no campaign.json)\n"


def test_provenance_records_the_git_commit_and_a_dirty_tree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    spec = write(repo, "experiment: [{tag: a, command: 'exit 0'}]\n", "spec.yaml")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "spec.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "spec"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    runs = repo / "runs"  # untracked run records do not make the tree dirty
    assert cli("up", str(spec), "--runs-dir", str(runs), "-q").returncode == 0
    spec.write_text(spec.read_text() + "# edited\n")
    assert cli("up", str(spec), "--runs-dir", str(runs), "-q").returncode == 0
    found = sorted(
        (json.loads((r / "summary.json").read_text()) for r in runs.iterdir()),
        key=lambda s: s["started_at"],
    )
    clean, dirty = (s["provenance"] for s in found)
    assert clean["git_commit"] == dirty["git_commit"] == head.strip()
    assert clean["git_dirty"] is False and dirty["git_dirty"] is True
    assert clean["python"] == sys.version.split()[0] and clean["tricks_nats"]


def test_a_campaign_is_run_by_one_up_at_a_time(tmp_path: Path) -> None:
    import fcntl

    runs = tmp_path / "runs"
    spec = write(tmp_path, FAILING)
    assert cli("up", str(spec), "--runs-dir", str(runs), "--fail-fast", "-q").returncode == 1
    d = campaign_dir(runs)
    before = campaign(d)
    with (d / ".lock").open("a+") as held:  # as an `up` still running it would
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = cli("resume", str(d))
    assert busy.returncode == 2
    assert busy.stderr == (
        f"tricks-nats: error: campaign {d} is being run by another tricks-nats up right now\n"
    )
    assert campaign(d) == before


async def test_on_kubernetes_a_runs_pods_are_gone_before_the_next_run(
    cluster: Cluster, kubecfg: Path, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    from tricks_nats import campaign as cmod
    from tricks_nats import study

    from .test_kubernetes import _options

    async def quick(ctx: PodContext) -> int:
        ctx.print(f"pod {ctx.name} of {ctx.env['EXP_ID']}")
        return 0

    cluster.programs.update(a=quick)
    found = study.parse(
        "name: kstudy\nmatrix: {$n: [2, 3]}\nrepeat: 2\n"
        "experiment: [{tag: a, image: example/a, replicas: $n}]\n",
        "kstudy.yaml",
        runtime="kubernetes",
    )
    opts = _options(tmp_path, kubecfg, nats_server)
    existing: list[dict[str, Any]] = []
    c, d = cmod.new(found, tmp_path / "runs")
    options = cmod.CampaignOptions(on_run_start=lambda *_: existing.append(cluster.pods()))
    ended = await cmod.run(c, d, dict(enumerate(found.experiments)), opts, options)
    assert ended.exit_code == 0
    assert [r.state for r in ended.campaign.runs] == ["succeeded"] * 4
    assert existing == [{}] * 4 and cluster.pods() == {}
    # every run made its own pods: 2 + 3 + 2 + 3
    created = [r for r in cluster if r.action == kmock.action.CREATE]
    assert len(created) == 10
    assert len({r.data["metadata"]["labels"][ko.EXPERIMENT] for r in created}) == 4


def test_a_missing_program_in_one_configuration_exits_2_before_any_run(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        """\
        matrix:
          $prog: [sh, sh, no-such-program-here]
        experiment:
          - tag: a
            command: [$prog, -c, "exit 0"]
        """,
    )
    runs = tmp_path / "runs"
    done = cli("up", str(spec), "--runs-dir", str(runs))
    assert done.returncode == 2 and not runs.exists()
    assert done.stderr == (
        f"tricks-nats: error: {spec} ($prog=no-such-program-here): tag 'a': command "
        "'no-such-program-here' not found on PATH\n"
    )


def test_json_output_is_one_object_per_line_with_each_runs_end(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = cli("up", str(write(tmp_path, FAILING)), "--runs-dir", str(runs), "--json")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    ends = [e for e in lines if e["kind"] == "campaign_run"]
    assert [(e["run"], e["of"], e["variables"], e["verdict"]) for e in ends] == [
        (1, 3, {"code": 0}, "succeeded"),
        (2, 3, {"code": 3}, "failed"),
        (3, 3, {"code": 0}, "succeeded"),
    ]
    verdicts = [e["verdict"] for e in lines if e["kind"] == "verdict"]
    assert verdicts == ["succeeded", "failed", "succeeded"]  # each run's own journal too
    assert "2 of 3 runs succeeded" in done.stderr


def test_the_ring_study_example_runs_and_compares(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    study = "examples/ring-study/ring-study.yaml"
    dry = cli("up", study, "--dry-run")
    assert dry.stdout.splitlines()[0].endswith("9 runs (3 configurations x 3 repetitions)")
    done = cli("up", study, "--repeat", "1", "--runs-dir", str(runs), "-q")
    assert done.returncode == 0, done.stderr
    d = campaign_dir(runs)
    rows = results(d)
    assert [(r["servers"], r["verdict"], r["request_ms_count"]) for r in rows] == [
        ("3", "succeeded", "1200"),
        ("6", "succeeded", "1200"),
        ("12", "succeeded", "1200"),
    ]
    assert [r["token_ms_count"] for r in rows] == ["3", "6", "12"]
    report = cli("report", str(d))
    assert report.returncode == 0 and "request_ms (ms)" in report.stdout
    figure = tmp_path / "study.svg"
    drawn = cli("plot", str(d), "request_ms", "--x", "servers", "-o", str(figure))
    assert drawn.returncode == 0, drawn.stderr
    assert "p99 of request_ms (ms)" in figure.read_text()


def test_a_command_for_one_run_given_a_campaign_says_so(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert cli("up", str(write(tmp_path, FAILING)), "--runs-dir", str(runs), "-q").returncode
    d = campaign_dir(runs)
    first = campaign(d)["runs"][0]["run_dir"]
    done = cli("logs", str(d))
    assert done.returncode == 2
    assert done.stderr == (
        f"tricks-nats: error: {d} is a campaign: give one of its runs (e.g. {d / first}), "
        "or use `tricks-nats report` or `plot`, which compare its runs\n"
    )
    assert cli("logs", str(d / first)).returncode == 0


def test_a_disk_that_fills_mid_campaign_keeps_every_verdict(tmp_path: Path) -> None:
    """Run 1's pod fills the disk the records are on: later runs cannot write records (each
    is an error, said in one line), and campaign.json still holds every verdict (its room was
    reserved when the campaign began)."""
    from .test_trust_records import tiny_disk

    with tiny_disk(tmp_path / "disk", size="512k") as disk:
        spec = write(
            tmp_path,
            f"""\
            matrix:
              $fill: [yes, no, no]
            experiment:
              - tag: a
                command: "[ $fill = no ] || cat /dev/zero > {disk}/filler; exit 0"
            """,
        )
        done = cli("up", str(spec), "--runs-dir", str(disk / "runs"))
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        d = campaign_dir(disk / "runs")
        c = campaign(d)
        assert c["state"] == "finished"
        assert [r["state"] for r in c["runs"]] == ["succeeded", "error", "error"]
        for r in c["runs"][1:]:
            assert "cannot write run records" in r["reason"]
        first = json.loads((d / c["runs"][0]["run_dir"] / "summary.json").read_text())
        assert first["verdict"] == "succeeded"
