"""Figures: every plot kind in every format (valid files that name their series), the errors,
the numbers behind each kind, and the run timeline (events, stopped pods, the failure's
cause). Samples and runs are built here, small, once per module."""

from __future__ import annotations

import json
import os
import random
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tricks_nats import figures, plots, report, stats, timeline
from tricks_nats.errors import UsageError
from tricks_nats.metrics_csv import MetricsWriter, Samples
from tricks_nats.plots import build, draw_metric, nice_step, rate_bin

TAGS = ("client", "proxy", "server")
T0 = 1_700_000_000.0


def make_samples(per_pod: int = 60, seed: int = 3) -> Samples:
    """3 tags x 2 pods of `request_ms` (~10-20 ms, recorded as the loop completes them) and
    one `queue_depth` (no unit) per pod."""
    rnd = random.Random(seed)
    s = Samples()
    for ti, tag in enumerate(TAGS):
        for pod in range(2):
            t = T0 + 0.05 * pod
            for _ in range(per_pod):
                v = rnd.lognormvariate(2.2 + 0.3 * ti, 0.3)
                t += v / 1000 + 0.005
                for name, value in (("request_ms", v), ("queue_depth", float(rnd.randint(0, 9)))):
                    s.ts.append(t)
                    s.tag.append(tag)
                    s.pod_id.append(pod)
                    s.name.append(name)
                    s.value.append(value)
    return s


@pytest.fixture(scope="module")
def samples() -> Samples:
    return make_samples()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plots")


# -- readers of what was written --------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    found, i = {}, len(PNG_SIGNATURE)
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            found[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        i += 12 + length
    return found


def svg_text(path: Path) -> str:
    """Every piece of text drawn in an SVG (text elements only, not its metadata)."""
    root = ET.parse(path).getroot()
    return "\n".join(
        "".join(el.itertext()) for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "text"
    )


def pdf_info(path: Path) -> bytes:
    """The PDF's Info dictionary, as bytes (matplotlib leaves it uncompressed)."""
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    start = data.rindex(b"/Producer") if b"/Keywords" not in data else data.rindex(b"/Keywords")
    return data[max(0, start - 400) : start + 400]


def check_file(path: Path, series: list[str], labels: list[str]) -> None:
    """A valid file of its format that names each series (and, where text can be read back,
    the axis labels)."""
    suffix = path.suffix
    assert path.stat().st_size > 0
    if suffix == ".png":
        from matplotlib.image import imread

        image = imread(path)
        assert image.ndim == 3 and image[..., :3].std() > 0.05  # not a blank canvas
        text = png_text(path)
        for name in series:
            assert name in text["Keywords"] and name in text["Description"]
        assert text["Title"]
    elif suffix == ".svg":
        drawn = svg_text(path)
        for name in [*series, *labels]:
            assert name in drawn, (name, drawn)
    elif suffix == ".pdf":
        info = pdf_info(path)
        for name in series:
            assert f"{name}".encode() in info, (name, info)
        assert b"/Title (" in info
    else:
        assert path.stat().st_size < 1_000_000
        page = path.read_text(encoding="utf-8").replace("\\u002f", "/")  # JSON escapes /
        assert '<script src="plotly.min.js"' in page
        assert "https://cdn.plot.ly/plotly-" in page  # the fallback when the copy is missing
        assert (path.parent / "plotly.min.js").stat().st_size > 1_000_000
        for name in series:
            assert f'"{name}"' in page, name  # a trace's name, or a bar's category
        for label in labels:
            assert json.dumps(label)[1:-1] in page, label


# -- every kind in every format ---------------------------------------------------------------

LABELS = {
    "cdf": ["request_ms (ms)", "fraction of samples ≤ x"],
    "line": ["request_ms (ms)", "time since start (s)"],
    "rate": ["request_ms samples/s", "time since start (s)"],
    "bar": ["request_ms (ms)", "p50", "mean", "p99"],
    "hist": ["request_ms (ms)", "samples"],
}


@pytest.mark.parametrize("fmt", [".png", ".svg", ".pdf", ".html"])
@pytest.mark.parametrize("kind", plots.KINDS)
def test_every_kind_in_every_format(samples: Samples, out: Path, kind: str, fmt: str) -> None:
    path = out / f"request_ms-{kind}{fmt}"
    drawn = draw_metric(samples, "request_ms", kind, path)
    assert drawn == list(TAGS)
    check_file(path, drawn, LABELS[kind])


def test_series_by_pod_in_natural_order_and_filtered_by_tag(tmp_path: Path) -> None:
    s = Samples()
    for pod in (10, 2, 1):
        for i in range(5):
            s.ts.append(T0 + i)
            s.tag.append("client")
            s.pod_id.append(pod)
            s.name.append("x_ms")
            s.value.append(float(i))
        s.ts.append(T0)
        s.tag.append("server")
        s.pod_id.append(pod)
        s.name.append("x_ms")
        s.value.append(1.0)
    path = tmp_path / "pods.svg"
    names = draw_metric(s, "x_ms", "cdf", path, by="pod", tags=["client"])
    assert names == ["client-1", "client-2", "client-10"]
    assert "server-1" not in svg_text(path)
    assert draw_metric(s, "x_ms", "bar", tmp_path / "b.svg", tags=["server"]) == ["server"]


def test_no_title_unless_given(samples: Samples, out: Path) -> None:
    plain, titled = out / "plain.svg", out / "titled.svg"
    draw_metric(samples, "request_ms", "cdf", plain)
    draw_metric(samples, "request_ms", "cdf", titled, title="Latency of the ring")
    assert "Latency of the ring" not in svg_text(plain)
    assert "Latency of the ring" in svg_text(titled)
    assert "<dc:title>request_ms cdf</dc:title>" in plain.read_text()  # metadata names it


def test_print_style_fonts_text_and_size(samples: Samples, out: Path) -> None:
    path = out / "style.svg"
    draw_metric(samples, "queue_depth", "hist", path)
    svg = path.read_text()
    assert 'width="252pt" height="187.2pt"' in svg  # 3.5 x 2.6 in
    assert "queue_depth" in svg_text(path)  # no unit: the bare name labels the axis
    sizes = [float(v) for v in re.findall(r"font-size: ?([\d.]+)px", svg)]
    assert sizes and min(sizes) >= 9  # 9 pt at 72 px/in: SVG user units are points here
    style = figures.rc()
    assert style["svg.fonttype"] == "none" and style["pdf.fonttype"] == 42
    assert min(v for k, v in style.items() if k.endswith("size")) >= 9


def test_many_series_vary_line_style() -> None:
    styles = [figures.series_style(i, 12) for i in range(12)]
    assert len({(s.color, s.linestyle, s.marker) for s in styles}) == 12
    assert {s.linestyle for s in styles[:8]} == {"-"} and styles[8].linestyle == "--"
    assert all(s.marker is None for s in (figures.series_style(i, 8) for i in range(8)))
    assert len({s.color for s in styles[:8]}) == 8
    assert set(figures.OKABE_ITO) == {s.color for s in styles}


def test_long_lines_are_rasterized_in_vector_files(tmp_path: Path) -> None:
    s = Samples()
    for i in range(plots.RASTERIZE_ABOVE + 500):
        s.ts.append(T0 + i * 0.001)
        s.tag.append("client")
        s.pod_id.append(0)
        s.name.append("x_ms")
        s.value.append(float(i % 97))
    big = tmp_path / "big.svg"
    draw_metric(s, "x_ms", "line", big)
    assert "<image" in big.read_text()
    small = tmp_path / "small.svg"
    draw_metric(make_samples(per_pod=20), "request_ms", "line", small)
    assert "<image" not in small.read_text()
    page = tmp_path / "big.html"
    draw_metric(s, "x_ms", "line", page)  # thinned: the page stays small
    assert page.stat().st_size < 300_000


def test_plotly_js_is_written_once_beside_the_pages(samples: Samples, tmp_path: Path) -> None:
    first = tmp_path / "a.html"
    draw_metric(samples, "request_ms", "cdf", first)
    js = tmp_path / "plotly.min.js"
    before = js.stat()
    assert before.st_mode & 0o644 == 0o644  # readable by a web server
    draw_metric(samples, "request_ms", "bar", tmp_path / "b.html")
    after = js.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    js.write_text("/** plotly.js v0.0.1 */")  # another version's copy is replaced
    draw_metric(samples, "request_ms", "bar", tmp_path / "c.html")
    assert js.stat().st_size > 1_000_000
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".plotly-")]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "output", "options", "message"),
    [
        ("request_ms", "pie", "x.png", {}, "unknown plot kind 'pie': use one of cdf, line"),
        ("request_ms", "cdf", "x.jpg", {}, "use a .png, .svg, .pdf or .html file name"),
        ("request_ms", "cdf", "x", {}, "use a .png, .svg, .pdf or .html file name"),
        ("latency", "cdf", "x.png", {}, "no metric 'latency'; the metrics are: request_ms, "),
        (
            "request_ms",
            "cdf",
            "x.png",
            {"tags": ["nope"]},
            "no samples of request_ms from tag nope; its tags are: client, proxy, server",
        ),
        ("request_ms", "cdf", "x.png", {"by": "host"}, "cannot split series by 'host'"),
        ("request_ms", "line", "x.png", {"log_x": True}, "a log x axis suits the cdf and hist"),
    ],
)
def test_errors_are_one_clear_line(
    samples: Samples,
    tmp_path: Path,
    name: str,
    kind: str,
    output: str,
    options: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(UsageError) as err:
        draw_metric(samples, name, kind, tmp_path / output, **options)  # type: ignore[arg-type]
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_errors_without_samples_or_positive_values(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="there are no samples at all"):
        draw_metric(Samples(), "request_ms", "cdf", tmp_path / "x.png")
    s = Samples(ts=[T0, T0 + 1], tag=["a", "a"], pod_id=[0, 0], name=["d_ms"] * 2, value=[0, -1])
    for kind in ("cdf", "hist"):
        with pytest.raises(UsageError, match="log x axis needs positive values"):
            draw_metric(s, "d_ms", kind, tmp_path / "x.png", log_x=True)
    with pytest.raises(UsageError, match="cannot write"):
        draw_metric(s, "d_ms", "cdf", tmp_path / "missing" / "x.png")


# -- the numbers behind each kind -------------------------------------------------------------


def series_of(values: list[float], tag: str = "a") -> dict[str, tuple[list[float], list[float]]]:
    return {tag: ([T0 + 0.01 * i for i in range(len(values))], values)}


def test_cdf_points() -> None:
    trace = build(series_of([3.0, 1.0, 2.0, 2.0]), "x_ms", "cdf").traces[0]
    assert list(zip(trace.x, trace.y, strict=True)) == [
        (1.0, 0.0),
        (1.0, 0.25),
        (2.0, 0.75),  # equal values: one step to the top
        (3.0, 1.0),
    ]
    big = [float(i % 1000) + 0.5 * (i // 1000) for i in range(50_000)] + [1e6]
    thin = build(series_of(big), "x_ms", "cdf").traces[0]
    assert len(thin.x) <= 2 * plots.CDF_STEPS + 3
    assert thin.x[-1] == 1e6 and thin.y[-1] == 1.0  # the tail survives
    assert all(a <= b for a, b in zip(thin.y, thin.y[1:], strict=False))
    constant = build(series_of([5.0] * 10), "x_ms", "cdf").traces[0]
    assert (constant.x, constant.y) == ([5.0, 5.0], [0.0, 1.0])


def test_rate_bins_and_values() -> None:
    assert nice_step(0.73) == 1.0 and nice_step(1.5) == 2.0 and nice_step(3) == 5.0
    assert nice_step(0.1) == pytest.approx(0.1) and nice_step(0) == 1.0
    assert rate_bin(10) == pytest.approx(0.1)
    assert rate_bin(0.5) == plots.RATE_MIN_BIN_S  # at least 10 ms
    assert rate_bin(150) == 2.0 and rate_bin(0) == plots.RATE_MIN_BIN_S
    # 200 samples evenly over 2 s, none on a bin edge: 100 samples/s in every 20 ms bin.
    ts = [T0 + 0.005 + i * 0.01 for i in range(200)]
    plot = build({"a": (ts, [1.0] * 200)}, "x_ms", "rate", t0=T0)
    (trace,) = plot.traces
    assert trace.x[0] == 0 and trace.x[1] == pytest.approx(0.02)
    assert len(trace.x) == len(trace.y) + 1
    assert sum(y * 0.02 for y in trace.y) == pytest.approx(200)
    assert all(y == pytest.approx(100) for y in trace.y[:-1])
    assert plot.ylabel == "x_ms samples/s" and plot.xlabel == "time since start (s)"
    later = build({"a": (ts, [1.0] * 200)}, "x_ms", "line", t0=T0 - 5)
    assert later.traces[0].x[0] == pytest.approx(5.005)  # time zero as given


def test_bar_numbers_and_intervals() -> None:
    values = [float(v) for v in range(1, 101)]
    plot = build(series_of(values), "x_ms", "bar")
    p50, mean, p99 = plot.traces
    assert (p50.label, mean.label, p99.label) == ("p50", "mean", "p99")
    assert p50.y == [50.0] and mean.y == [50.5] and p99.y == [99.0]
    lo, hi = stats.quantile_ci(values, 50)
    assert p50.low == [50.0 - lo] and p50.high == [hi - 50.0]
    m_lo, m_hi = stats.mean_ci(values)
    assert mean.low == [pytest.approx(50.5 - m_lo)] and mean.high == [pytest.approx(m_hi - 50.5)]
    assert plot.categories == ["a"]


def test_hist_shares_bins() -> None:
    series = {**series_of([1.0, 2.0, 3.0], "a"), **series_of([10.0, 20.0], "b")}
    a, b = build(series, "x_ms", "hist").traces
    assert a.x == b.x and a.x[0] == 1.0 and a.x[-1] == 20.0
    assert sum(a.y) == 3 and sum(b.y) == 2
    log = build(series, "x_ms", "hist", log_x=True).traces[0]
    assert log.x[1] / log.x[0] == pytest.approx(log.x[-1] / log.x[-2])  # geometric bins


def test_html_thinning_keeps_spikes() -> None:
    x = [float(i) for i in range(10_000)]
    y = [1.0] * 10_000
    y[4321] = 500.0
    tx, ty = plots.thin(x, y, 200)
    assert len(tx) <= 200 and 500.0 in ty and tx == sorted(tx)


# -- the timeline --------------------------------------------------------------------------


def make_run(root: Path, pods_per_tag: int = 3) -> Path:
    """A failed run: servers stopped by their workflow, two clients failing (client-3 listed
    first but failing second), a proxy stopped as the run ended, a tag that never started, and
    the events a run journals (the coordinator's own and a user event)."""
    run = root / "demo-2"
    (run / "logs").mkdir(parents=True)

    def pod(tag: str, i: int, start: float | None, stop: float | None, **kw: object) -> dict:
        return {
            "tag": tag,
            "pod_id": i,
            "started_at": None if start is None else T0 + start,
            "stopped_at": None if stop is None else T0 + stop,
            **kw,
        }

    pods = [
        pod("server", i, 0.1, 3.0, exit_code=143, stopped_by_workflow=True, state="stopped")
        for i in range(pods_per_tag)
    ]
    pods += [
        pod("client", 3, 1.0, 1.6, exit_code=1, state="failed"),
        pod("client", 0, 1.0, 2.0, exit_code=0, state="exited"),
        pod("client", 2, 1.0, 1.5, exit_code=2, state="failed"),
        pod("proxy", 0, 0.5, 3.1, exit_code=143, state="stopped"),
        pod("late", 0, None, None, state="stopped"),
    ]
    summary = {
        "experiment": "demo-2",
        "name": "demo",
        "verdict": "failed",
        "reason": "client-2 exited with 2",
        "started_at": T0,
        "ended_at": T0 + 3.2,
        "pods": pods,
        "events": {"server-connected": pods_per_tag, "server_start": pods_per_tag},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    lines: list[dict[str, object]] = []
    for i in range(pods_per_tag):
        lines.append({"ts": T0 + 0.12, "kind": "event", "name": "server_start", "count": i + 1})
        lines.append(
            {
                "ts": T0 + 0.3 + 0.1 * i,
                "kind": "event",
                "name": "server-connected",
                "count": i + 1,
                "pod": f"server-{i}",
            }
        )
    lines.append(
        {
            "ts": T0 + 0.9,
            "kind": "workflow",
            "tag": "client",
            "action": "start",
            "condition": {"name": "server-connected", "value": pods_per_tag},
        }
    )
    (run / "journal.jsonl").write_text(
        "".join(json.dumps({"experiment": "demo-2", **line}) + "\n" for line in lines)
    )
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


def test_timeline_model(run_dir: Path) -> None:
    run = report.load_run(run_dir)
    outcomes = {b.pod: b.outcome for b in run.bars}
    assert outcomes["server-0"] == "stopped by workflow"
    # the tool stopped it as the failed run ended: not failed (a summary without `outcome`)
    assert outcomes["proxy-0"] == "stopped after a failure"
    assert outcomes["late-0"] == "never started"
    assert outcomes["client-3"] == outcomes["client-2"] == "failed"
    assert run.cause == "client-2"  # the first to fail, by stop time
    assert [(round(e.at, 2), e.name, e.pod) for e in run.events] == [
        (0.3, "server-connected", "server-0"),
        (0.4, "server-connected", "server-1"),
        (0.5, "server-connected", "server-2"),
    ]  # the coordinator's server_start is not a user event
    text = report.text_summary(run)
    assert "  proxy: 1 pod (1 stopped after a failure), 0.50s -> 3.10s" in text
    assert "  client: 3 pods (1 succeeded, 2 failed), 1.00s -> 2.00s" in text
    assert "  caused the failure: client-2 (exit 2) at 1.50s" in text
    assert "  at 0.90s: server-connected 3 -> start client" in text


@pytest.mark.parametrize("fmt", [".svg", ".pdf", ".png", ".html"])
def test_timeline_formats(run_dir: Path, out: Path, fmt: str) -> None:
    run = report.load_run(run_dir)
    path = out / f"timeline{fmt}"
    timeline.draw(run, path)
    pods = [b.pod for b in run.bars]
    if fmt == ".svg":
        drawn = svg_text(path)
        for text in [*pods, "server-connected (3)", "time since start (s)", "caused the failure"]:
            assert text in drawn, text
        assert "server-connected 3 → start client" in drawn
        assert "stopped after a failure" in drawn and "never started" in drawn
        assert "demo-2: failed" not in drawn  # no title in vector output unless given
        assert "server_start" not in drawn
    elif fmt == ".pdf":
        info = pdf_info(path)
        assert all(p.encode() in info for p in pods) and b"server-connected" in info
    elif fmt == ".png":
        from matplotlib.image import imread

        width, height = timeline.figure_size(run)
        assert imread(path).shape[:2] == (round(height * timeline.DPI), round(width * timeline.DPI))
        assert "client-2" in png_text(path)["Keywords"]
    else:
        check_file(path, [], [])
        page = path.read_text()
        cause = page.index('"name":"caused the failure"')
        assert '"y":["client-2"]' in page[cause - 300 : cause + 600]
        assert '"name":"server-connected"' in page
        for p in pods:
            assert f'"{p}"' in page


def test_timeline_title_when_given(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.svg"
    timeline.draw(report.load_run(run_dir), path, title="Ring, 3 servers")
    assert "Ring, 3 servers" in svg_text(path)


def test_timeline_of_many_pods_labels_tags(tmp_path: Path) -> None:
    run = report.load_run(make_run(tmp_path, pods_per_tag=60))
    path = tmp_path / "many.svg"
    timeline.draw(run, path)
    drawn = svg_text(path)
    assert "server (60)" in drawn and "server-17" not in drawn
    assert timeline.figure_size(run)[1] <= timeline.MAX_BARS_IN + 3


def test_timeline_rejects_other_formats(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"use a \.png, \.svg, \.pdf or \.html file name"):
        timeline.draw(report.load_run(run_dir), tmp_path / "t.jpg")


def stalled_samples() -> Iterator[tuple[float, str, int, str, float, None]]:
    """client-0's 10 ms loop with a 1 s stall; client-1's without."""
    for pod in (0, 1):
        t = T0
        for i in range(100):
            v = 1000.0 if (pod == 0 and i == 50) else 10.0
            t += v / 1000
            yield (t, "client", pod, "request_ms", v, None)
            yield (t, "client", pod, "queue_depth", float(i % 7), None)


def test_draw_all_writes_the_timeline_and_one_figure_per_metric(
    run_dir: Path, tmp_path: Path
) -> None:
    writer = MetricsWriter(run_dir / "metrics.csv")
    try:
        writer.write(stalled_samples())
    finally:
        writer.close()
    try:
        written = report.draw_all(run_dir, tmp_path / "fig", suffix=".svg")
    finally:
        (run_dir / "metrics.csv").unlink()
    assert [p.name for p in written] == [
        "timeline.svg",
        "request_ms-cdf.svg",
        "queue_depth-line.svg",
    ]
    assert all(p.exists() for p in written)
    assert report.draw_all(run_dir, tmp_path / "only", suffix=".pdf")[0].name == "timeline.pdf"
