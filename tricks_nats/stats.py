"""Statistics of metric samples, in pure Python: percentiles as HdrHistogram defines them,
coordination-omission correction and detection, units read from metric names, and the
confidence intervals the bar plots draw.

Percentiles are nearest-rank (HdrHistogram's `getValueAtPercentile`, without its bucketing):
the value of rank `max(1, int(q * n / 100 + 0.5))` in sorted order, so a percentile is always
one of the samples.

Coordination omission: a closed-loop client (send, wait for the answer, send again) that is
stalled for a second records one slow sample where an open-loop client would have recorded a
hundred. `corrected` adds the samples it missed, exactly as HdrHistogram's
`recordValueWithExpectedInterval` does; `detect_omission` spots the pattern in one pod's
samples when no interval was declared.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Suffix of a metric name -> its unit (longest suffixes are tried first).
UNITS: dict[str, str] = {
    "_seconds": "s",
    "_percent": "%",
    "_bytes": "bytes",
    "_pct": "%",
    "_ms": "ms",
    "_us": "µs",
    "_ns": "ns",
    "_s": "s",
}
#: Seconds in one of each time unit.
SECONDS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}

#: `corrected` refuses to build more values than this (a huge value with a tiny interval would
#: exhaust memory); `corrected_percentile` needs no such list.
MAX_CORRECTED = 10_000_000

#: `detect_omission` needs at least this many samples of a pod to judge its gaps.
MIN_SAMPLES = 20
#: A gap is a stall when it exceeds STALL_FACTOR times the median gap and the median gap plus
#: STALL_MIN_EXTRA_S (the second keeps a jittery fast loop's ordinary hiccups out).
STALL_FACTOR = 10.0
STALL_MIN_EXTRA_S = 0.05


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of values sorted in ascending order, nearest rank as
    HdrHistogram computes it. Raises ValueError for no values or `q` out of range."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is not in 0..100")
    return float(sorted_values[_rank(len(sorted_values), q) - 1])


def _rank(n: int, q: float) -> int:
    """1-based rank of the `q`-th percentile among `n` values (HdrHistogram's
    `getTargetCountAtPercentile`: same operations, same rounding)."""
    return min(n, max(1, int(q * n / 100 + 0.5)))


@dataclass(frozen=True)
class Stats:
    count: int
    mean: float
    min: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float


def describe(values: Iterable[float]) -> Stats:
    """Count, mean and percentiles of the values (any order; the input is not changed).
    Raises ValueError for no values."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("no values to describe")
    return Stats(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        min=ordered[0],
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        p999=percentile(ordered, 99.9),
        max=ordered[-1],
    )


# -- coordination-omission correction ----------------------------------------------------------


def _missing_count(value: float, interval: float) -> int:
    """How many values `value - k * interval` (k = 1, 2, ...) are >= `interval`: the samples a
    stall of `value` hid. Exact for floats: the same test as the loop it replaces."""
    if interval <= 0 or not value > interval:
        return 0
    k = max(0, int((value - interval) // interval))
    while value - (k + 1) * interval >= interval:
        k += 1
    while k > 0 and value - k * interval < interval:
        k -= 1
    return k


def corrected_count(values: Iterable[float], expected_interval: float) -> int:
    """How many values `corrected` returns, without building them."""
    return sum(1 + _missing_count(v, expected_interval) for v in values)


def corrected(
    values: Sequence[float], expected_interval: float, *, limit: int = MAX_CORRECTED
) -> list[float]:
    """The values plus the ones a closed loop missed, as HdrHistogram's
    `recordValueWithExpectedInterval`: each value `v` is kept and, when `expected_interval > 0`
    and `v > expected_interval`, so are `v - i, v - 2i, ...` while they are `>= i` (`i` the
    interval, in the values' unit). Not sorted: the values first, in order, then the added ones.
    Raises ValueError when the result would exceed `limit` values."""
    total = corrected_count(values, expected_interval)
    if total > limit:
        raise ValueError(
            f"correcting {len(values)} values with an interval of {expected_interval:g} "
            f"would make {total} values (more than {limit})"
        )
    out = [float(v) for v in values]
    for v in values:
        out.extend(
            v - k * expected_interval for k in range(1, _missing_count(v, expected_interval) + 1)
        )
    return out


class _Corrected:
    """The corrected values of `corrected(values, interval)`, never listed: values needing no
    correction sorted, each stalled value `v` as its sequence `v - k i`, k = 0..K."""

    def __init__(self, values: Sequence[float], interval: float) -> None:
        if not values:
            raise ValueError("no values")
        self.i = interval
        singles: list[float] = []
        self.runs: list[tuple[float, int]] = []
        for v in values:
            k = _missing_count(v, interval)
            if k:
                self.runs.append((float(v), k))
            else:
                singles.append(float(v))
        singles.sort()
        self.singles = singles
        self.total = len(singles) + sum(k + 1 for _, k in self.runs)
        self.lowest = min([*singles[:1], *(v - k * interval for v, k in self.runs)])
        self.highest = max([*singles[-1:], *(v for v, _ in self.runs)])

    def count(self, x: float) -> int:
        """How many corrected values are <= x: O(log n + stalled values)."""
        i = self.i
        n = bisect.bisect_right(self.singles, x)
        for v, last in self.runs:
            if x >= v:
                n += last + 1
            elif x >= v - last * i:
                k = max(0, math.ceil((v - x) / i))  # the first k with v - k i <= x, roughly:
                while k > 0 and v - (k - 1) * i <= x:
                    k -= 1
                while v - k * i > x:
                    k += 1
                n += last - k + 1
        return n

    def percentile(self, q: float) -> float:
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile {q} is not in 0..100")
        rank = _rank(self.total, q)
        # Invariant: count(lo) < rank <= count(hi), over floats in order (as integers: adjacent
        # floats differ by 1), so it ends on the one float that is the rank-th value.
        lo, hi = _ordinal(self.lowest) - 1, _ordinal(self.highest)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.count(_from_ordinal(mid)) >= rank:
                hi = mid
            else:
                lo = mid
        return _from_ordinal(hi)

    def sum(self) -> float:
        """Sum of the corrected values: each sequence's in closed form."""
        i = self.i
        return math.fsum(
            [*self.singles, *((k + 1) * v - i * k * (k + 1) / 2 for v, k in self.runs)]
        )


def corrected_percentile(values: Sequence[float], expected_interval: float, q: float) -> float:
    """`percentile(sorted(corrected(values, expected_interval)), q)` without building that
    list: bisection over the floats, counting the corrected values <= x in O(log n + number of
    stalled values) per step (at most 64 steps). Raises ValueError for no values."""
    if not values:
        raise ValueError("percentile of no values")
    return _Corrected(values, expected_interval).percentile(q)


def describe_corrected(values: Sequence[float], expected_interval: float) -> Stats:
    """`describe(corrected(values, expected_interval))` in memory O(len(values)), whatever the
    number of values the correction adds (no MAX_CORRECTED limit). Raises ValueError for no
    values."""
    if not values:
        raise ValueError("no values to describe")
    c = _Corrected(values, expected_interval)
    return Stats(
        count=c.total,
        mean=c.sum() / c.total,
        min=c.lowest,
        p50=c.percentile(50),
        p90=c.percentile(90),
        p99=c.percentile(99),
        p999=c.percentile(99.9),
        max=c.highest,
    )


def _ordinal(x: float) -> int:
    """Floats as integers in the same order, consecutive floats consecutive integers."""
    bits: int = struct.unpack("<q", struct.pack("<d", x))[0]
    return bits if bits >= 0 else -(bits & 0x7FFF_FFFF_FFFF_FFFF)


def _from_ordinal(n: int) -> float:
    bits = n if n >= 0 else (-n) | (1 << 63)
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


# -- units -----------------------------------------------------------------------------------


def unit_of(name: str) -> str | None:
    """The unit a metric name declares by its suffix (`request_ms` -> "ms"), or None."""
    for suffix in sorted(UNITS, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return UNITS[suffix]
    return None


def seconds_per_unit(name: str) -> float | None:
    """Seconds in one unit of the metric (0.001 for `request_ms`); None unless a time unit."""
    unit = unit_of(name)
    return SECONDS.get(unit) if unit is not None else None


def axis_label(name: str) -> str:
    """`request_ms (ms)`; the bare name when it declares no unit."""
    unit = unit_of(name)
    return f"{name} ({unit})" if unit else name


def interval_in_unit(expected_interval_ms: float, name: str) -> float:
    """A declared interval (milliseconds) in the metric's own unit; a metric without a time
    unit is taken to be in milliseconds."""
    per_unit = seconds_per_unit(name)
    if per_unit is None:
        return expected_interval_ms
    return expected_interval_ms * 1e-3 / per_unit


def format_value(value: float, unit: str | None) -> str:
    """Three significant digits and the unit: `10.2 ms`, `960 ms`, `1500 bytes`."""
    if value == 0 or not math.isfinite(value):
        text = f"{value:g}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    else:
        text = f"{value:#.3g}"
    if unit is None:
        return text
    return f"{text}{unit}" if unit == "%" else f"{text} {unit}"


# -- coordination-omission detection ---------------------------------------------------------


@dataclass(frozen=True)
class Omission:
    """Stalls in one pod's samples of one metric that look like coordination omission."""

    #: Gaps judged stalls, their total and the longest (seconds).
    stalls: int
    stalled_s: float
    longest_s: float
    #: p99 of the samples as recorded, and corrected with `expected_interval` (None when the
    #: metric has no time unit: its values cannot be compared with gaps).
    raw_p99: float
    corrected_p99: float | None
    #: The median gap between samples, in the metric's unit (None without a time unit).
    expected_interval: float | None


def detect_omission(ts: Sequence[float], values: Sequence[float], name: str) -> Omission | None:
    """Stalls in ONE pod's samples of `name` (`ts` seconds since the epoch, when each sample
    was recorded: usually when a request completed).

    A stall is a gap between consecutive samples longer than both STALL_FACTOR times the
    median gap and the median gap plus STALL_MIN_EXTRA_S, ended by a sample above the series'
    p90 which, for a time unit, lasted at least half the gap (the request was under way during
    the gap: the loop waited for it, and recorded nothing meanwhile). None with fewer than
    MIN_SAMPLES samples or no stall."""
    if len(ts) != len(values):
        raise ValueError(f"{len(ts)} times for {len(values)} values")
    if len(ts) < MIN_SAMPLES:
        return None
    pairs = sorted(zip(ts, values, strict=True))
    times = [t for t, _ in pairs]
    vals = [v for _, v in pairs]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    median_gap = statistics.median(gaps)
    threshold = max(STALL_FACTOR * median_gap, median_gap + STALL_MIN_EXTRA_S)
    ordered = sorted(vals)
    p90 = percentile(ordered, 90)
    per_unit = seconds_per_unit(name)
    stalls = []
    for gap, value in zip(gaps, vals[1:], strict=True):
        if gap <= threshold or value <= p90:
            continue
        if per_unit is not None and value * per_unit < gap / 2:
            continue
        stalls.append(gap)
    if not stalls:
        return None
    raw_p99 = percentile(ordered, 99)
    interval = median_gap / per_unit if per_unit is not None else None
    corrected_p99 = (
        corrected_percentile(vals, interval, 99) if interval is not None and interval > 0 else None
    )
    return Omission(
        stalls=len(stalls),
        stalled_s=math.fsum(stalls),
        longest_s=max(stalls),
        raw_p99=raw_p99,
        corrected_p99=corrected_p99,
        expected_interval=interval,
    )


def warning(pod: str, name: str, o: Omission) -> str:
    """One line for a person: what was seen, what it does to p99, what to do."""
    unit = unit_of(name)
    stalls = f"{o.stalls} stall{'' if o.stalls == 1 else 's'}"
    text = (
        f"{pod} {name}: {stalls} ({o.stalled_s:.2f} s, longest {o.longest_s:.2f} s) looks like "
        f"coordination omission: p99 {format_value(o.raw_p99, unit)} raw"
    )
    if o.corrected_p99 is not None and o.expected_interval is not None:
        text += (
            f", {format_value(o.corrected_p99, unit)} corrected"
            f" (expected interval {format_value(o.expected_interval, unit)})"
        )
    return text + "; declare expected_interval_ms to correct it"


# -- confidence intervals --------------------------------------------------------------------


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def quantile_ci(
    sorted_values: Sequence[float], q: float, confidence: float = 0.95
) -> tuple[float, float]:
    """A distribution-free confidence interval for the `q`-th percentile (0..100) of values
    sorted in ascending order: the order statistics at ranks n p -/+ z sqrt(n p (1 - p)),
    clamped to the data (so with few values it is wide, up to min..max)."""
    if not sorted_values:
        raise ValueError("confidence interval of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is not in 0..100")
    n = len(sorted_values)
    p = q / 100
    half = _z(confidence) * math.sqrt(n * p * (1 - p))
    low = min(n, max(1, math.floor(n * p - half)))
    high = min(n, max(1, math.ceil(n * p + half)))
    return float(sorted_values[low - 1]), float(sorted_values[high - 1])


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Normal-approximation confidence interval of the mean: mean -/+ z s / sqrt(n) (one value:
    the value itself)."""
    if not values:
        raise ValueError("confidence interval of no values")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, mean
    half = _z(confidence) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half
