# ruff: noqa: RUF001 (the report separates a spread's ends with an en dash)
"""Comparing a campaign's configurations: reading campaign.json and results.csv, the numbers
across repetitions, the text report, the figure in every format, and `report`/`plot` on a
campaign directory. Campaigns are written here by hand, in the runner's format, with values
chosen so that every mean, spread and interval can be checked by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tricks_nats import campaign_plot, campaign_results
from tricks_nats.campaign_results import ci95, load, render, t95
from tricks_nats.cli.app import app
from tricks_nats.errors import UsageError

from .test_plots import PNG_SIGNATURE, check_file, png_text, svg_text

SERVERS = (3, 6, 12)
MODES = ("fast", "slow")
STATS = ("count", "mean", "p50", "p90", "p99")


def figures_of(servers: int, mode: str, rep: int) -> dict[str, dict[str, float]]:
    """request_ms: p99 = servers * (1 fast, 2 slow) + rep, mean = p99 / 2, p50 = p99 / 4;
    token_ms only in slow mode; queue_depth (no unit) everywhere."""
    p99 = servers * (1 if mode == "fast" else 2) + rep
    out = {
        "request_ms": {"count": 100, "mean": p99 / 2, "p50": p99 / 4, "p90": p99 / 2, "p99": p99},
        "queue_depth": {"count": 10, "mean": rep, "p50": rep, "p90": rep, "p99": rep},
    }
    if mode == "slow":
        out["token_ms"] = {"count": 5, "mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": 1.0 * rep}
    return out


def write_campaign(
    directory: Path,
    runs: list[dict[str, Any]],
    variables: list[str],
    *,
    state: str = "finished",
    results: bool = True,
) -> Path:
    """campaign.json and (unless `results` is False) results.csv, as the runner writes them.
    Each run: config, repetition, variables, state, and when finished duration_s and figures."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, r in enumerate(runs, 1):
        finished = r["state"] in ("succeeded", "failed", "error")
        entries.append(
            {
                "index": i,
                "config": r["config"],
                "repetition": r["repetition"],
                "variables": r["variables"],
                "state": r["state"],
                "verdict": r["state"] if finished else None,
                "reason": None,
                "experiment": f"study-{i}-20261123-201500-ab12" if finished else None,
                "run_dir": f"study-{i}-20261123-201500-ab12" if finished else None,
                "started_at": 1.0 if finished else None,
                "ended_at": 2.0 if finished else None,
                "duration_s": r.get("duration_s"),
                "previous": [],
            }
        )
    campaign = {
        "format": 1,
        "campaign": "study-20261123-201500-ab12",
        "name": "study",
        "spec_path": "/abs/study.yaml",
        "spec_sha256": "0" * 64,
        "spec": "name: study\n",
        "variables": variables,
        "configurations": len({r["config"] for r in runs}),
        "repeat": max(r["repetition"] for r in runs),
        "started_at": 1.0,
        "updated_at": 2.0,
        "state": state,
        "runs": entries,
    }
    (directory / "campaign.json").write_text(json.dumps(campaign, indent=2))
    if results:
        write_results(directory / "results.csv", entries, runs, variables)
    return directory


def write_results(
    path: Path, entries: list[dict[str, Any]], runs: list[dict[str, Any]], variables: list[str]
) -> None:
    done = [(e, r) for e, r in zip(entries, runs, strict=True) if e["verdict"] is not None]
    names = sorted({n for _, r in done for n in r.get("figures", {})})
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(
            [
                "run",
                "config",
                "repetition",
                *variables,
                "verdict",
                "duration_s",
                "experiment",
                *(f"{n}_{s}" for n in names for s in STATS),
            ]
        )
        for e, r in done:
            values = [_cell(r["variables"][v]) for v in variables]
            row = [e["index"], e["config"], e["repetition"], *values, e["verdict"]]
            row += [r["duration_s"], e["experiment"]]
            for n in names:
                got = r.get("figures", {}).get(n)
                row += [got[s] if got else "" for s in STATS]
            w.writerow(row)


def _cell(value: object) -> object:
    return ("true" if value else "false") if isinstance(value, bool) else value


def grid(*, failed: bool = True) -> list[dict[str, Any]]:
    """SERVERS x MODES x 3 repetitions; run 2 (servers 3, fast, repetition 2) failed with
    figures far off, so that counting it would show."""
    runs = []
    for config, (servers, mode) in enumerate((s, m) for s in SERVERS for m in MODES):
        for rep in (1, 2, 3):
            run: dict[str, Any] = {
                "config": config,
                "repetition": rep,
                "variables": {"servers": servers, "mode": mode},
                "state": "succeeded",
                "duration_s": 10.0 * servers + rep,
                "figures": figures_of(servers, mode, rep),
            }
            if failed and config == 0 and rep == 2:
                run["state"] = "failed"
                run["figures"] = {"request_ms": dict.fromkeys(STATS, 9999.0)}
            runs.append(run)
    return runs


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return write_campaign(
        tmp_path / "runs" / "study-20261123-201500-ab12", grid(), ["servers", "mode"]
    )


def cli(*args: str, code: int = 0) -> tuple[str, str]:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result.stdout, result.stderr


# -- reading and grouping ---------------------------------------------------------------------


def test_runs_are_grouped_by_configuration_and_only_succeeded_runs_count(study: Path) -> None:
    r = load(study)
    assert (r.name, r.state, r.runs, r.variables) == ("study", "finished", 18, ["servers", "mode"])
    assert [c.variables for c in r.configurations[:3]] == [
        {"servers": 3, "mode": "fast"},
        {"servers": 3, "mode": "slow"},
        {"servers": 6, "mode": "fast"},
    ]
    first = r.configurations[0]
    assert [(row.run, row.verdict) for row in first.rows] == [
        (1, "succeeded"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert r.metrics == ["queue_depth", "request_ms", "token_ms"]
    assert campaign_results.metric_names(r) == [*r.metrics, "duration_s"]
    p99 = campaign_results.values(r, "request_ms", "p99")
    assert p99[0] == [4.0, 6.0]  # the failed run's 9999 is not among them
    assert p99[1] == [7.0, 8.0, 9.0] and p99[5] == [25.0, 26.0, 27.0]
    assert campaign_results.values(r, "token_ms", "p99")[0] == []  # fast mode: never recorded
    assert campaign_results.values(r, "duration_s", "p99")[2] == [61.0, 62.0, 63.0]


def test_mean_spread_and_student_t_interval() -> None:
    normal = 1.959964
    assert [t95(df) for df in (1, 2, 30, 31, 1000)] == [12.706, 4.303, 2.042, normal, normal]
    low, high = ci95([7.0, 8.0, 9.0]) or (0.0, 0.0)
    half = 4.303 * 1.0 / math.sqrt(3)  # stdev 1
    assert low == pytest.approx(8 - half) and high == pytest.approx(8 + half)
    low, high = ci95([4.0, 6.0]) or (0.0, 0.0)
    assert (low, high) == pytest.approx((5 - 12.706, 5 + 12.706))  # stdev sqrt 2, n 2
    assert ci95([5.0]) is None and campaign_results.point([]) is None
    p = campaign_results.point([3.0, 1.0, 2.0])
    assert p is not None and (p.n, p.mean, p.min, p.max) == (3, 2.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        t95(0)


def test_variable_values_keep_their_type(tmp_path: Path) -> None:
    runs = [
        {
            "config": i,
            "repetition": 1,
            "variables": {"rate": rate, "tls": tls, "name": name},
            "state": "succeeded",
            "duration_s": 1.0,
            "figures": {},
        }
        for i, (rate, tls, name) in enumerate([(0.5, True, "a"), (2.0, False, "10")])
    ]
    r = load(write_campaign(tmp_path / "c", runs, ["rate", "tls", "name"]))
    assert [c.variables for c in r.configurations] == [
        {"rate": 0.5, "tls": "true", "name": "a"},
        {"rate": 2.0, "tls": "false", "name": 10},
    ]
    cells = ("3", "-1", "0.25", "1e3", "fast", "")
    assert [campaign_results.typed(c) for c in cells] == [3, -1, 0.25, 1000.0, "fast", ""]
    assert r.metrics == [] and campaign_results.metric_names(r) == ["duration_s"]
    assert "  0.5   true   a      1/1  1.00 s" in render(r).splitlines()


# -- the report -------------------------------------------------------------------------------


def table(text: str, title: str) -> list[list[str]]:
    """The rows of the table under `title` in a report, split on runs of two spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        rows.append([c.strip() for c in line.strip().split("  ") if c.strip()])
    return rows


def test_report_gives_each_configuration_its_mean_and_spread(study: Path) -> None:
    text = render(load(study))
    assert text.splitlines()[0] == (
        "campaign study (study-20261123-201500-ab12), finished: "
        "18 of 18 runs finished (17 succeeded, 1 failed)"
    )
    rows = table(text, "request_ms (ms): mean over repetitions [min–max] of each run's mean")
    assert rows[0] == ["servers", "mode", "runs", "mean", "p50", "p99"]
    assert rows[1] == [
        "3",
        "fast",
        "2/3",
        "2.50 ms [2.00–3.00]",
        "1.25 ms [1.00–1.50]",
        "5.00 ms [4.00–6.00]",
    ]
    assert rows[6] == [
        "12",
        "slow",
        "3/3",
        "13.0 ms [12.5–13.5]",
        "6.50 ms [6.25–6.75]",
        "26.0 ms [25.0–27.0]",
    ]
    tokens = table(text, "token_ms (ms)")
    assert tokens[1] == ["3", "fast", "2/3", "-", "-", "-"]
    assert tokens[2] == ["3", "slow", "3/3", "1.00 ms", "1.00 ms", "2.00 ms [1.00–3.00]"]
    assert tokens[-1] == ["not recorded by 8 succeeded runs: 1, 3, 7, 8, 9, 13, 14, 15"]
    durations = table(text, "duration_s (s): mean over repetitions [min–max] of each run's dur")
    assert durations[0] == ["servers", "mode", "runs", "duration"]
    assert durations[1] == ["3", "fast", "2/3", "32.0 s [31.0–33.0]"]
    assert durations[5] == ["12", "fast", "3/3", "122 s [121–123]"]
    assert "queue_depth: mean" in text  # no unit: the bare name
    assert table(text, "queue_depth")[1][3] == "2.00 [1.00–3.00]"


def test_report_fits_100_columns_with_three_variables(tmp_path: Path) -> None:
    runs = [
        {
            "config": c,
            "repetition": rep,
            "state": "succeeded",
            "duration_s": 12.5 + rep,
            "variables": {"servers": s, "payload_bytes": b, "mode": m},
            "figures": {
                "latency_ms": {
                    "count": 1000,
                    "mean": 1234.5 + rep,
                    "p50": 0.0123,
                    "p90": 1,
                    "p99": 98765.4 * rep,
                }
            },
        }
        for c, (s, b, m) in enumerate([(3, 1024, "fast"), (12, 65536, "durable")])
        for rep in (1, 2, 3)
    ]
    text = render(load(write_campaign(tmp_path / "c", runs, ["servers", "payload_bytes", "mode"])))
    assert max(map(len, text.splitlines())) <= 100, text
    assert "1236 ms [1236–1238]" in text and "0.0123 ms" in text


def test_a_campaign_with_no_finished_run_has_no_results_yet(tmp_path: Path) -> None:
    runs = [
        {"config": 0, "repetition": rep, "variables": {"n": 1}, "state": "pending"}
        for rep in (1, 2)
    ]
    runs[0]["state"] = "running"
    d = write_campaign(tmp_path / "c", runs, ["n"], state="running", results=False)
    r = load(d)
    assert r.rows == [] and r.metrics == [] and len(r.configurations) == 1
    assert render(r).splitlines() == [
        "campaign study (study-20261123-201500-ab12), running: "
        "0 of 2 runs finished (0 succeeded, 0 failed)",
        "no run has finished yet",
    ]
    with pytest.raises(UsageError, match=r"no succeeded run of campaign .* has duration_s yet"):
        campaign_plot.draw(r, "duration_s", "n", tmp_path / "x.svg")


def test_errored_runs_are_counted_apart(tmp_path: Path) -> None:
    runs = grid(failed=False)[:3]
    runs[1]["state"] = "error"
    text = render(load(write_campaign(tmp_path / "c", runs, ["servers", "mode"])))
    assert text.splitlines()[0].endswith("3 of 3 runs finished (2 succeeded, 0 failed, 1 error)")


HEADER = "run,config,repetition,servers,mode,verdict,duration_s,experiment,"
GOOD = HEADER + "x_ms_count,x_ms_mean,x_ms_p50,x_ms_p90,x_ms_p99\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "results.csv: empty"),
        (
            "run,config,servers\n",
            "results.csv: not this campaign's results: its columns should "
            "begin run,config,repetition,servers,mode,verdict,duration_s,experiment",
        ),
        (HEADER + "x_ms_p95\n", "results.csv: unexpected column 'x_ms_p95'"),
        (GOOD + "1,0,1,3,fast,succeeded,1.5,e\n", "results.csv:2: 8 cells where the header has 13"),
        (
            GOOD + "1,0,1,3,fast,succeeded,1.5,e,3,lots,1,1,1\n",
            "results.csv:2: x_ms_mean is 'lots', not a number",
        ),
        (GOOD + "1,zero,1,3,fast,succeeded,1.5,e,,,,,\n", "results.csv:2: config is 'zero'"),
        (GOOD + "1,0,1,3,fast,succeeded,soon,e,,,,,\n", "results.csv:2: duration_s is 'soon'"),
        (
            GOOD + "1,7,1,3,fast,succeeded,1.5,e,,,,,\n",
            "results.csv: run 1 has configuration 7, which campaign.json does not have",
        ),
        ("\udcff", "results.csv: not a results file tricks-nats can read"),
    ],
)
def test_a_corrupt_results_csv_is_one_clear_error(study: Path, text: str, message: str) -> None:
    (study / "results.csv").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UsageError) as caught:
        load(study)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(study / "results.csv") in str(caught.value)


def test_a_missing_or_corrupt_campaign_json_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"not a campaign \(no campaign\.json\)"):
        load(tmp_path)
    (tmp_path / "campaign.json").write_text('{"campaign": ')
    with pytest.raises(UsageError, match=r"campaign\.json: not a campaign file"):
        load(tmp_path)


def test_a_metric_missing_from_some_rows_is_empty_cells(study: Path) -> None:
    with (study / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["token_ms_p99"] == "" and rows[3]["token_ms_p99"] == "1.0"  # as written
    r = load(study)
    assert ("token_ms", "p99") not in r.rows[0].figures and r.rows[0].value(
        "token_ms", "p99"
    ) is None


# -- the figure -------------------------------------------------------------------------------


def test_each_point_is_the_mean_over_repetitions_with_its_error_bar(study: Path) -> None:
    r = load(study)
    chart = campaign_plot.build(r, "request_ms", "$servers", series="mode")
    assert (chart.xlabel, chart.ylabel, chart.legend_title) == (
        "servers",
        "p99 of request_ms (ms)",
        "mode",
    )
    fast, slow = chart.lines
    assert (fast.label, fast.x, fast.y, fast.n) == ("fast", [3, 6, 12], [5.0, 8.0, 14.0], [2, 3, 3])
    assert fast.low == [1.0, 1.0, 1.0] and fast.high == [1.0, 1.0, 1.0]  # min-max
    assert slow.y == [8.0, 14.0, 26.0]
    ci = campaign_plot.build(r, "request_ms", "servers", series="mode", error="ci95")
    fast = ci.lines[0]
    assert fast.low[0] == pytest.approx(12.706) and fast.high[0] == pytest.approx(12.706)
    assert fast.low[1] == pytest.approx(4.303 / math.sqrt(3))
    mean = campaign_plot.build(r, "request_ms", "mode", series="servers", stat="mean")
    assert [line.label for line in mean.lines] == ["3", "6", "12"]  # numbers in numeric order
    assert mean.lines[0].y == [2.5, 4.0] and mean.ylabel == "mean of request_ms (ms)"
    assert mean.xs == ["fast", "slow"] and not mean.numeric
    duration = campaign_plot.build(r, "duration_s", "servers", series="mode", stat="p50")
    assert duration.ylabel == "duration_s (s)" and duration.lines[0].y == [32.0, 62.0, 122.0]


def test_categories_in_natural_order_and_a_single_line(tmp_path: Path) -> None:
    runs = [
        {
            "config": c,
            "repetition": 1,
            "variables": {"node": node},
            "state": "succeeded",
            "duration_s": 1.0 + c,
            "figures": {},
        }
        for c, node in enumerate(["n-10", "n-2", "m"])
    ]
    r = load(write_campaign(tmp_path / "c", runs, ["node"]))
    chart = campaign_plot.build(r, "duration_s", "node")
    assert chart.xs == ["m", "n-2", "n-10"] and chart.legend_title is None
    (line,) = chart.lines
    assert (line.label, line.y, line.low) == ("duration_s", [3.0, 2.0, 1.0], [0.0, 0.0, 0.0])
    path = tmp_path / "nodes.svg"
    assert campaign_plot.draw(r, "duration_s", "node", path) == ["duration_s"]
    drawn = svg_text(path)
    assert all(label in drawn for label in ("m", "n-2", "n-10", "node", "duration_s (s)"))
    assert "duration_s by node" not in drawn  # a title only when asked for, as for a run
    assert "<dc:title>duration_s by node</dc:title>" in path.read_text()
    campaign_plot.draw(r, "duration_s", "node", path, title="Runs get slower")
    assert "Runs get slower" in svg_text(path)


def servers_only(tmp_path: Path) -> Path:
    """The fast half of the grid, with $servers its only variable: 3 configurations x 3."""
    runs = [r for r in grid() if r["variables"]["mode"] == "fast"]
    for r in runs:
        r["config"] //= 2
        r["variables"] = {"servers": r["variables"]["servers"]}
    return write_campaign(tmp_path / "servers", runs, ["servers"])


@pytest.mark.parametrize("fmt", [".svg", ".pdf", ".png", ".html"])
@pytest.mark.parametrize("series", [None, "mode"])
def test_every_format_with_and_without_series(
    study: Path, tmp_path: Path, fmt: str, series: str | None
) -> None:
    r = load(study if series else servers_only(tmp_path))
    path = tmp_path / f"request_ms{fmt}"
    drawn = campaign_plot.draw(r, "request_ms", "servers", path, series=series)
    assert drawn == (["fast", "slow"] if series else ["request_ms"])
    check_file(path, drawn, ["p99 of request_ms (ms)", "servers", *(["mode"] if series else [])])
    if fmt == ".png":
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert png_text(path)["Title"] == "request_ms p99 by servers"
    if fmt == ".svg" and series is None:
        assert "fast" not in svg_text(path)  # one line: no legend


def test_without_series_another_varying_variable_is_an_error(study: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        campaign_plot.draw(load(study), "request_ms", "servers", tmp_path / "x.svg")
    assert (
        str(caught.value)
        == "$mode varies too (fast, slow): draw one line per value with --series mode"
    )


@pytest.mark.parametrize(
    ("metric", "x", "options", "message"),
    [
        ("nope_ms", "servers", {"series": "mode"}, "no metric 'nope_ms' in "),
        (
            "nope_ms",
            "servers",
            {"series": "mode"},
            "results.csv; the metrics are: queue_depth, request_ms, token_ms, duration_s",
        ),
        (
            "request_ms",
            "servers",
            {"series": "mode", "stat": "p95"},
            "no statistic 'p95': use one of count, mean, p50, p90, p99",
        ),
        (
            "request_ms",
            "$clients",
            {"series": "mode"},
            "no variable '$clients' in campaign study-20261123-201500-ab12; "
            "its variables are: servers, mode",
        ),
        ("request_ms", "servers", {"series": "$servers"}, "--series $servers is the x variable"),
        (
            "request_ms",
            "servers",
            {"series": "mode", "error": "sd"},
            "--error 'sd': use minmax or ci95",
        ),
        (
            "request_ms",
            "mode",
            {"series": "servers", "log_x": True},
            "a log x axis needs positive numbers; $mode takes fast, slow",
        ),
        ("request_ms", "servers", {"series": "mode", "output": "x.gif"}, "-o "),
    ],
)
def test_plot_mistakes_say_what_exists(
    study: Path, tmp_path: Path, metric: str, x: str, options: dict[str, Any], message: str
) -> None:
    output = tmp_path / options.pop("output", "x.svg")
    with pytest.raises(UsageError) as caught:
        campaign_plot.draw(load(study), metric, x, output, **options)
    assert message in str(caught.value)
    assert not output.exists()


def test_a_third_varying_variable_is_refused_even_with_series(tmp_path: Path) -> None:
    runs = [
        {
            "config": c,
            "repetition": 1,
            "state": "succeeded",
            "duration_s": 1.0,
            "variables": {"a": a, "b": b, "c": cc},
        }
        for c, (a, b, cc) in enumerate([(1, 1, "x"), (1, 2, "y"), (2, 1, "x"), (2, 2, "y")])
    ]
    r = load(write_campaign(tmp_path / "c", runs, ["a", "b", "c"]))
    with pytest.raises(UsageError) as caught:
        campaign_plot.draw(r, "duration_s", "a", tmp_path / "x.svg", series="b")
    assert str(caught.value) == (
        "$c varies too (x, y): a figure shows two variables, $a (--x) and $b (--series)"
    )


def test_log_y_needs_positive_values(tmp_path: Path) -> None:
    runs = [
        {
            "config": c,
            "repetition": 1,
            "state": "succeeded",
            "duration_s": float(c),
            "variables": {"n": c},
        }
        for c in range(3)
    ]
    r = load(write_campaign(tmp_path / "c", runs, ["n"]))
    with pytest.raises(UsageError, match=r"a log y axis needs positive values; duration_s"):
        campaign_plot.draw(r, "duration_s", "n", tmp_path / "x.svg", log_y=True)


# -- the command line -------------------------------------------------------------------------


def test_report_on_a_campaign_directory_or_id(study: Path) -> None:
    out, err = cli("report", str(study))
    assert out == render(load(study)) + "\n" and err == ""
    by_id, _ = cli("report", study.name, "--runs-dir", str(study.parent))
    assert by_id == out


def test_plot_a_campaign_from_the_command_line(study: Path, tmp_path: Path) -> None:
    out, _ = cli("plot", str(study), "request_ms", "--x", "servers", "--series", "$mode")
    assert out == f"wrote {study / 'request_ms-p99-by-servers.svg'} (2 series: fast, slow)\n"
    assert "p99 of request_ms (ms)" in svg_text(study / "request_ms-p99-by-servers.svg")
    out, _ = cli("plot", str(study), "duration_s", "--x", "$servers", "--series", "mode")
    assert out.startswith(f"wrote {study / 'duration_s-by-servers.svg'} ")
    target = tmp_path / "lat.png"
    args = ["--x", "mode", "--series", "servers", "--stat", "mean", "--error", "ci95"]
    out, _ = cli("plot", str(study), "request_ms", *args, "--log-y", "-o", str(target))
    assert out == f"wrote {target} (3 series: 3, 6, 12)\n"
    assert target.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["plot", "CAMPAIGN", "request_ms"],
            "is a campaign: say which variable goes on the x axis with --x "
            "(its variables: servers, mode)",
        ),
        (
            ["plot", "CAMPAIGN", "request_ms", "--x", "servers", "--kind", "bar"],
            "--kind is for a single run",
        ),
        (
            ["plot", "CAMPAIGN", "request_ms", "--x", "servers", "--tag", "client"],
            "--tag is for a single run",
        ),
        (
            ["plot", "CAMPAIGN", "request_ms", "--x", "servers"],
            "$mode varies too (fast, slow): draw one line per value with --series mode",
        ),
        (["plot", "CAMPAIGN", "nope", "--x", "servers"], "no metric 'nope'"),
        (["plot", "RUN", "request_ms", "--x", "servers"], "--x is for a campaign"),
        (["plot", "RUN", "request_ms", "--series", "mode"], "--series is for a campaign"),
        (["report", "CAMPAIGN", "-o", "x.svg"], "-o draws a single run"),
        (["report", "BROKEN"], "results.csv:4: 3 cells where the header has 18"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(
    study: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text("experiment: []\n")  # enough for a run directory
    broken = write_campaign(tmp_path / "broken", grid()[:2], ["servers", "mode"])
    with (broken / "results.csv").open("a") as f:
        f.write("1,2,3\n")
    paths = {"CAMPAIGN": str(study), "RUN": str(run), "BROKEN": str(broken)}
    out, err = cli(*(paths.get(a, a) for a in args), code=2)
    assert message in err and out == ""
    assert len(err.strip().splitlines()) == 1, err
