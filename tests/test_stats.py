"""tricks_nats.stats: percentiles as HdrHistogram defines them (checked against the reference
implementation), coordination-omission correction and detection, units, confidence
intervals."""

from __future__ import annotations

import math
import random
import re

import pytest
from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st

from tricks_nats import stats
from tricks_nats.stats import (
    Omission,
    Stats,
    axis_label,
    corrected,
    corrected_count,
    corrected_percentile,
    describe,
    describe_corrected,
    detect_omission,
    format_value,
    interval_in_unit,
    mean_ci,
    percentile,
    quantile_ci,
    seconds_per_unit,
    unit_of,
    warning,
)

# -- percentile, describe --------------------------------------------------------------------


def test_percentile_is_hdr_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert percentile(values, 0) == 1  # rank max(1, 0)
    assert percentile(values, 10) == 1  # rank int(1.5) = 1
    assert percentile(values, 15) == 2  # rank int(2.0) = 2
    assert percentile(values, 50) == 5
    assert percentile(values, 55) == 6  # int(5.5 + 0.5)
    assert percentile(values, 94) == 9  # int(9.4 + 0.5)
    assert percentile(values, 95) == 10
    assert percentile(values, 100) == 10
    assert percentile([7.0], 0) == percentile([7.0], 99.9) == 7.0
    assert percentile([3.0] * 5, 50) == 3.0


def test_percentile_rejects_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    for q in (-0.1, 100.1, math.nan):
        with pytest.raises(ValueError, match=r"not in 0\.\.100"):
            percentile([1.0], q)


@given(
    st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=60),
    st.floats(0, 100),
    st.floats(0, 100),
)
def test_percentile_is_monotone_in_q_and_one_of_the_values(
    values: list[float], q1: float, q2: float
) -> None:
    ordered = sorted(values)
    lo, hi = sorted((q1, q2))
    assert percentile(ordered, lo) <= percentile(ordered, hi)
    assert percentile(ordered, lo) in values
    assert ordered[0] <= percentile(ordered, hi) <= ordered[-1]


def test_describe() -> None:
    s = describe([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == Stats(count=5, mean=3.0, min=1.0, p50=3.0, p90=5.0, p99=5.0, p999=5.0, max=5.0)
    one = describe(iter([2.5]))
    assert one == Stats(1, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5)
    same = describe([4.0] * 10)
    assert (same.min, same.p50, same.p999, same.max, same.mean) == (4.0, 4.0, 4.0, 4.0, 4.0)
    values = [3.0, 1.0, 2.0]
    describe(values)
    assert values == [3.0, 1.0, 2.0]  # sorts a copy
    with pytest.raises(ValueError):
        describe([])


# -- correction ------------------------------------------------------------------------------


def test_corrected_adds_what_a_stalled_loop_missed() -> None:
    # recordValueWithExpectedInterval: v, then v - i, v - 2i, ... while >= i.
    assert corrected([30.0], 10) == [30.0, 20.0, 10.0]
    assert corrected([25.0], 10) == [25.0, 15.0]  # 5 < 10: not added
    assert corrected([10.0, 5.0], 10) == [10.0, 5.0]  # not above the interval
    assert corrected([19.9], 10) == [19.9]  # 9.9 < 10
    assert corrected([50.0, 3.0], 0) == [50.0, 3.0]  # no interval: unchanged
    assert corrected([50.0], -1) == [50.0]
    assert corrected([], 10) == []
    assert corrected_count([30.0, 25.0, 5.0], 10) == 3 + 2 + 1
    # Floats: the loop's own test (0.3 - 2 * 0.1 is just below 0.1 in floats: not added).
    assert corrected([0.3], 0.1) == [0.3, 0.3 - 0.1]
    assert corrected([0.5], 0.125) == [0.5, 0.375, 0.25, 0.125]  # exact in binary


def test_corrected_refuses_to_exhaust_memory() -> None:
    with pytest.raises(ValueError, match="would make 1000000 values"):
        corrected([1e6], 1.0, limit=999_999)
    assert len(corrected([1e6], 1.0, limit=1_000_000)) == 1_000_000
    # The percentile needs no such list.
    assert corrected_percentile([1e9], 1.0, 50) == pytest.approx(5e8, rel=1e-6)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(-100, 500, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.5, 50),
    st.floats(0, 100),
)
def test_corrected_percentile_equals_the_list_it_avoids(
    values: list[float], interval: float, q: float
) -> None:
    full = corrected(values, interval)
    assert full[: len(values)] == values  # every value kept, in order
    assert all(interval <= x < max(values) for x in full[len(values) :])  # added: in range
    assert corrected_percentile(values, interval, q) == percentile(sorted(full), q)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-100, 500, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.5, 50),
)
def test_describe_corrected_equals_describe_of_the_list(
    values: list[float], interval: float
) -> None:
    ours = describe_corrected(values, interval)
    theirs = describe(corrected(values, interval))
    assert ours == Stats(**{**theirs.__dict__, "mean": ours.mean})
    assert ours.mean == pytest.approx(theirs.mean, rel=1e-9, abs=1e-9)


def test_describe_corrected_of_a_huge_correction() -> None:
    # 1e9 with an interval of 1: a billion values, described without listing them.
    s = describe_corrected([1e9, 0.5], 1.0)
    assert s.count == 1_000_000_000 + 1  # 1e9 down to 1, and 0.5
    assert s.max == 1e9 and s.min == 0.5
    assert s.p50 == pytest.approx(5e8, rel=1e-6) and s.mean == pytest.approx(5e8, rel=1e-6)
    with pytest.raises(ValueError):
        describe_corrected([], 1.0)


def test_corrected_percentile_rejects_nothing() -> None:
    with pytest.raises(ValueError):
        corrected_percentile([], 10, 50)
    with pytest.raises(ValueError):
        corrected_percentile([1.0], 10, 101)


#: HdrHistogram's own test data (HdrHistogram_py test_hdrhistogram.py, from the C and Java
#: versions): 10,000 values of 1,000 and one of 100,000,000 (microseconds), interval 10,000.
HDR_VALUES = [1000.0] * 10_000 + [100_000_000.0]
HDR_INTERVAL = 10_000
HDR_PERCENTILES = (0, 30, 50, 75, 90, 99, 99.9, 99.99, 99.999, 100)


def _hdr(values: list[float], interval: int | None) -> HdrHistogram:
    h = HdrHistogram(1, 3600 * 1000 * 1000, 3)
    for v in values:
        if interval is None:
            h.record_value(int(v))
        else:
            h.record_corrected_value(int(v), interval)
    return h


def _agrees_with_hdr(ours: float, theirs: float) -> bool:
    """HDR keeps 3 significant digits: its value is within 0.1% of the exact one."""
    return abs(ours - theirs) <= 0.001 * max(abs(ours), 1.0)


def test_percentiles_match_hdrhistogram_on_its_own_test_values() -> None:
    raw, fixed = _hdr(HDR_VALUES, None), _hdr(HDR_VALUES, HDR_INTERVAL)
    assert fixed.get_total_count() == corrected_count(HDR_VALUES, HDR_INTERVAL) == 20_000
    ordered = sorted(HDR_VALUES)
    for q in HDR_PERCENTILES:
        assert _agrees_with_hdr(percentile(ordered, q), raw.get_value_at_percentile(q)), q
        ours = corrected_percentile(HDR_VALUES, HDR_INTERVAL, q)
        assert _agrees_with_hdr(ours, fixed.get_value_at_percentile(q)), q
    # The published expectations of that test, exactly.
    assert corrected_percentile(HDR_VALUES, HDR_INTERVAL, 75) == 50_000_000
    assert corrected_percentile(HDR_VALUES, HDR_INTERVAL, 90) == 80_000_000
    assert corrected_percentile(HDR_VALUES, HDR_INTERVAL, 99) == 98_000_000


def test_percentiles_match_hdrhistogram_on_a_mixed_workload() -> None:
    # Ordinary latencies under the interval and stalls of whole intervals. (Stalls that are not
    # a multiple differ by design: HdrHistogram_py also records the last remainder below the
    # interval; we follow the Java reference and the C version, which stop at the interval.)
    rnd = random.Random(42)
    interval = 1000
    values = [float(rnd.randint(100, 999)) for _ in range(5000)]
    values += [float(interval * rnd.randint(2, 400)) for _ in range(40)]
    rnd.shuffle(values)
    raw, fixed = _hdr(values, None), _hdr(values, interval)
    assert fixed.get_total_count() == corrected_count(values, interval)
    ordered = sorted(values)
    for q in (*HDR_PERCENTILES, 12.5, 63.2, 95, 97.5):
        assert _agrees_with_hdr(percentile(ordered, q), raw.get_value_at_percentile(q)), q
        ours = corrected_percentile(values, interval, q)
        assert _agrees_with_hdr(ours, fixed.get_value_at_percentile(q)), q
        assert ours == percentile(sorted(corrected(values, interval)), q)


# -- units -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "unit", "per_second", "label"),
    [
        ("request_ms", "ms", 1e-3, "request_ms (ms)"),
        ("gc_pause_s", "s", 1.0, "gc_pause_s (s)"),
        ("rtt_seconds", "s", 1.0, "rtt_seconds (s)"),
        ("lock_us", "µs", 1e-6, "lock_us (µs)"),
        ("syscall_ns", "ns", 1e-9, "syscall_ns (ns)"),
        ("payload_bytes", "bytes", None, "payload_bytes (bytes)"),
        ("cpu_pct", "%", None, "cpu_pct (%)"),
        ("cpu_percent", "%", None, "cpu_percent (%)"),
        ("queue_depth", None, None, "queue_depth"),
        ("requests", None, None, "requests"),  # ends in "s", not "_s"
        ("items", None, None, "items"),
        ("_ms", None, None, "_ms"),  # a suffix alone names no quantity
        ("ms", None, None, "ms"),
    ],
)
def test_units_from_the_name(
    name: str, unit: str | None, per_second: float | None, label: str
) -> None:
    assert unit_of(name) == unit
    assert seconds_per_unit(name) == per_second
    assert axis_label(name) == label


def test_interval_in_the_metric_unit() -> None:
    assert interval_in_unit(10, "request_ms") == pytest.approx(10)
    assert interval_in_unit(10, "request_s") == pytest.approx(0.01)
    assert interval_in_unit(10, "request_us") == pytest.approx(10_000)
    assert interval_in_unit(10, "request_ns") == pytest.approx(10_000_000)
    assert interval_in_unit(10, "queue_depth") == 10  # no time unit: taken as ms
    assert interval_in_unit(10, "payload_bytes") == 10


def test_format_value() -> None:
    assert format_value(10.24, "ms") == "10.2 ms"
    assert format_value(11.0, "ms") == "11.0 ms"
    assert format_value(958.3, "ms") == "958 ms"
    assert format_value(1500, "bytes") == "1500 bytes"
    assert format_value(42.5, "%") == "42.5%"
    assert format_value(0, None) == "0"
    assert format_value(0.00123, "s") == "0.00123 s"


# -- coordination omission -------------------------------------------------------------------


def closed_loop(
    n: int = 300, stall_at: int | None = 150, stall_ms: float = 1000.0, seed: int = 7
) -> tuple[list[float], list[float]]:
    """A client in a 10 ms loop: each request takes ~10 ms and is recorded when it completes;
    one request (`stall_at`) takes `stall_ms`, so the loop records nothing meanwhile."""
    rnd = random.Random(seed)
    t = 1_700_000_000.0
    ts, values = [], []
    for i in range(n):
        value = stall_ms if i == stall_at else 10.0 + rnd.uniform(-0.5, 0.5)
        t += value / 1000
        ts.append(t)
        values.append(value)
    return ts, values


def test_acceptance_a_one_second_stall_of_a_10ms_loop() -> None:
    ts, values = closed_loop()
    ordered = sorted(values)
    raw_p99 = percentile(ordered, 99)
    assert 9.5 <= raw_p99 <= 10.5  # the stall is one sample in 300: p99 does not see it
    fixed = sorted(corrected(values, 10.0))
    assert len(fixed) == 300 + 99  # 990, 980, ..., 10: the 99 requests it did not send
    assert 100 <= percentile(fixed, 99) < 1000  # hundreds of ms
    o = detect_omission(ts, values, "request_ms")
    assert o is not None
    assert o.stalls == 1
    assert o.stalled_s == pytest.approx(1.0, abs=0.01)
    assert o.longest_s == o.stalled_s
    assert o.raw_p99 == raw_p99
    assert o.expected_interval == pytest.approx(10.0, abs=0.5)
    assert o.corrected_p99 is not None and 100 <= o.corrected_p99 < 1000
    text = warning("client-2", "request_ms", o)
    assert re.fullmatch(
        r"client-2 request_ms: 1 stall \(1\.00 s, longest 1\.00 s\) looks like coordination "
        r"omission: p99 \d+\.\d ms raw, \d{3} ms corrected \(expected interval \d+\.\d+ ms\); "
        r"declare expected_interval_ms to correct it",
        text,
    ), text


def test_detect_omission_in_other_time_units_and_unsorted_input() -> None:
    ts, values = closed_loop()
    pairs = list(zip(ts, [v / 1000 for v in values], strict=True))
    random.Random(1).shuffle(pairs)  # the function sorts by time
    o = detect_omission([t for t, _ in pairs], [v for _, v in pairs], "request_s")
    assert o is not None and o.stalls == 1
    assert o.expected_interval == pytest.approx(0.010, abs=0.0005)
    assert o.corrected_p99 is not None and 0.1 <= o.corrected_p99 < 1.0
    assert "p99 0.0" in warning("c-0", "request_s", o) and " s corrected" in warning(
        "c-0", "request_s", o
    )


def test_no_omission_without_enough_samples_or_without_a_stall() -> None:
    ts, values = closed_loop(n=19, stall_at=10)
    assert detect_omission(ts, values, "request_ms") is None  # too few to judge
    ts, values = closed_loop(stall_at=None)
    assert detect_omission(ts, values, "request_ms") is None  # steady
    assert detect_omission([], [], "request_ms") is None
    ts, values = closed_loop(n=30, stall_at=None)
    constant = [5.0] * 30
    assert detect_omission(ts, constant, "request_ms") is None


def test_a_pause_with_fast_requests_is_not_omission() -> None:
    # The loop slept for a second by itself (think time): the request after it was fast.
    ts, values = closed_loop(stall_at=None)
    ts = [t + (1.0 if i >= 150 else 0.0) for i, t in enumerate(ts)]
    assert detect_omission(ts, values, "request_ms") is None
    # A slow sample after a long gap, but much shorter than the gap: not what hid the gap.
    values = list(values)
    values[150] = 100.0  # 0.1 s of a 1 s gap
    assert detect_omission(ts, values, "request_ms") is None


def test_omission_of_a_metric_without_a_time_unit() -> None:
    ts, values = closed_loop()
    o = detect_omission(ts, values, "queue_depth")
    assert o == Omission(
        stalls=1,
        stalled_s=o.stalled_s if o else 0.0,
        longest_s=o.longest_s if o else 0.0,
        raw_p99=percentile(sorted(values), 99),
        corrected_p99=None,
        expected_interval=None,
    )
    assert o is not None
    text = warning("w-0", "queue_depth", o)
    assert "corrected" not in text and text.endswith("declare expected_interval_ms to correct it")
    assert "2 stalls" in warning("w-0", "queue_depth", Omission(2, 2.0, 1.0, 1.0, None, None))


def test_detect_omission_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 times for 2 values"):
        detect_omission([1.0, 2.0, 3.0], [1.0, 2.0], "x_ms")


def test_stall_thresholds_are_documented_constants() -> None:
    assert stats.MIN_SAMPLES == 20
    assert stats.STALL_FACTOR == 10 and stats.STALL_MIN_EXTRA_S == 0.05


# -- confidence intervals --------------------------------------------------------------------


def test_quantile_ci_from_order_statistics() -> None:
    values = [float(v) for v in range(1, 1001)]
    lo, hi = quantile_ci(values, 50)
    # ranks 500 -/+ 1.96 * sqrt(250) = 500 -/+ 31
    assert (lo, hi) == (469.0, 531.0)
    lo, hi = quantile_ci(values, 99)
    assert lo <= percentile(values, 99) <= hi and hi <= 1000.0
    assert quantile_ci(values, 50, confidence=0.99)[0] < 469.0  # wider
    assert quantile_ci([3.0], 50) == (3.0, 3.0)
    assert quantile_ci([1.0, 2.0], 99) == (1.0, 2.0)  # ranks 1.98 -/+ 0.28
    assert quantile_ci([1.0, 2.0, 3.0], 50) == (1.0, 3.0)  # clamped to the data
    assert quantile_ci([2.0] * 10, 90) == (2.0, 2.0)
    assert quantile_ci(values, 0) == (1.0, 1.0) and quantile_ci(values, 100) == (1000.0, 1000.0)
    with pytest.raises(ValueError):
        quantile_ci([], 50)
    with pytest.raises(ValueError):
        quantile_ci(values, 50, confidence=1.0)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=80), st.floats(0, 100))
def test_quantile_ci_contains_the_percentile(values: list[float], q: float) -> None:
    ordered = sorted(values)
    lo, hi = quantile_ci(ordered, q)
    assert lo <= percentile(ordered, q) <= hi


def test_mean_ci_normal_approximation() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    lo, hi = mean_ci(values)
    half = 1.959964 * math.sqrt(2.5) / math.sqrt(5)
    assert lo == pytest.approx(3 - half, rel=1e-5) and hi == pytest.approx(3 + half, rel=1e-5)
    assert mean_ci([4.0]) == (4.0, 4.0)
    assert mean_ci([2.0] * 7) == (2.0, 2.0)
    with pytest.raises(ValueError):
        mean_ci([])
