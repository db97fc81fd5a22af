"""The coordinator's side of metrics: samples from pods' batches and from their log lines, into
`metrics.csv` as they come and into `summary.json` at the end.

Batches come from the metrics stream (drivers/PROTOCOL.md 6.6), followed in order and resumed
after a server restart. Each is written once: by stream sequence (a redelivery) and by message
id (a batch stored twice). What a pod sends is untrusted input: a malformed batch or sample is
counted as rejected and logged once per pod, never a failure of the run. Written batches are
purged from the stream, so it holds only what is not yet on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from tricks_nats import protocol as p
from tricks_nats.logtap import LogTap, Pattern
from tricks_nats.metrics_csv import MetricsWriter, Row
from tricks_nats.records import MetricStats

if TYPE_CHECKING:
    from tricks_nats.bus import Bus, Follower, StreamMsg
    from tricks_nats.spec import Experiment

log = logging.getLogger(__name__)

_POD = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*)-([0-9]{1,9})$")
#: Purge the stream after this many written batches.
PURGE_EVERY = 64
#: Message ids remembered (two generations of this many each).
IDS_KEPT = 100_000
_decode = msgspec.json.Decoder(p.MetricsBatch).decode
_INF = math.inf


class Collector:
    def __init__(self, root: Path, exp: Experiment, bus: Bus | None = None) -> None:
        self.exp = exp
        self.bus = bus
        self.patterns: dict[str, tuple[Pattern, ...]] = {}
        #: Expected ms between samples, by (tag, name): the spec's, then the pods' own.
        self.intervals: dict[tuple[str, str], float] = {}
        keys: list[str] = []
        for t in exp.tags:
            found = []
            for m in t.metrics:
                if m.expected_interval_ms is not None:
                    self.intervals[(t.tag, m.name)] = m.expected_interval_ms
                if m.pattern is not None:
                    regex = re.compile(m.pattern)
                    found.append(Pattern(m.name, regex))
                    keys += [g for g in regex.groupindex if g not in ("value", "ts")]
            self.patterns[t.tag] = tuple(found)
        self.writer = MetricsWriter(root / "metrics.csv", keys)
        self.values: dict[tuple[str, str], array[float]] = {}
        #: Samples each pod dropped (its own count, cumulative).
        self.dropped: dict[str, int] = {}
        #: Samples and batches refused here (malformed, unknown pod).
        self.rejected = 0
        self._complained: set[str] = set()
        self._ids: set[str] = set()
        self._old_ids: set[str] = set()
        self._tags = {t.tag for t in exp.tags}
        self._names: set[str] = set()
        self._keys: set[str] = set()
        self._follower: Follower | None = None
        self._last_seq = 0
        self._since_purge = 0
        self._progress = asyncio.Event()
        self._taps: list[LogTap] = []
        self.write_failed: str | None = None
        #: Samples metrics.csv could not take (a full disk); the summary's figures have them.
        self.lost = 0

    # -- log lines ---------------------------------------------------------------------------

    def tap(self, tag: str, pod_id: int, log_path: Path) -> LogTap:
        """The tap for one pod's output (a runtime calls it with every chunk)."""
        tap = LogTap(
            log_path,
            tag,
            pod_id,
            self.patterns.get(tag, ()),
            self.add,
            lambda why: self._reject(p.pod_name(tag, pod_id), why),
        )
        self._taps.append(tap)
        return tap

    # -- batches -----------------------------------------------------------------------------

    async def start(self) -> None:
        assert self.bus is not None
        self._follower = await self.bus.follow(p.metrics_subject(self.bus.exp_id), self._on_batch)

    async def _on_batch(self, msg: StreamMsg) -> None:
        if msg.seq and msg.seq <= self._last_seq:
            return
        self._last_seq = max(self._last_seq, msg.seq)
        try:
            self._take(msg)
        finally:
            self._progress.set()
        self._since_purge += 1
        if self._since_purge >= PURGE_EVERY:
            await self._purge()

    def _take(self, msg: StreamMsg) -> None:
        pod = msg.subject.rsplit(".", 1)[-1]
        m = _POD.match(pod)
        if m is None or m.group(1) not in self._tags:
            self._reject(pod, "a batch from a pod not in this experiment")
            return
        tag, pod_id = m.group(1), int(m.group(2))
        msg_id = msg.headers.get(p.MSG_ID_HEADER)
        if msg_id is not None:
            if msg_id in self._ids or msg_id in self._old_ids:
                return
            if len(self._ids) >= IDS_KEPT:
                self._old_ids, self._ids = self._ids, set()
            self._ids.add(msg_id)
        try:
            batch = _decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._reject(pod, f"a malformed batch ({exc})")
            return
        if type(batch.dropped) is int and batch.dropped > self.dropped.get(pod, 0):
            self.dropped[pod] = batch.dropped
        for metric, ms in batch.intervals.items():
            if p.NAME_RE.match(metric) and 0 < ms < math.inf:
                self.intervals.setdefault((tag, metric), ms)
        rows: list[Row] = []
        append, names, good_labels = rows.append, self._names, self._good_labels
        ts: Any
        name: Any
        value: Any
        labels: Any
        for s in batch.samples:
            n = len(s)
            if n == 3:
                ts, name, value = s
                labels = None
            elif n == 4:
                ts, name, value, labels = s
            else:
                ts = name = value = labels = None
            kt, kv = type(ts), type(value)
            if (
                (kt is float or kt is int)
                and (kv is float or kv is int)
                and 0 <= ts < _INF
                and -_INF < value < _INF
                and name in names
                and (labels is None or good_labels(labels))
            ):
                append((float(ts), tag, pod_id, name, value, labels or None))
            elif (row := self._row(s, tag, pod_id, pod)) is not None:  # says what is wrong
                append(row)
        if rows:
            self.add(rows)

    def _row(self, s: list[Any], tag: str, pod_id: int, pod: str) -> Row | None:
        if len(s) not in (3, 4):
            self._reject(pod, "a sample that is not [ts, name, value] or [ts, name, value, labels]")
            return None
        ts, name, value = s[0], s[1], s[2]
        if type(ts) not in (float, int) or not 0 <= ts < math.inf:
            self._reject(pod, f"a sample with a bad time {ts!r}")
            return None
        if type(value) not in (float, int) or not -math.inf < value < math.inf:
            self._reject(pod, f"a sample with a bad value {value!r}")
            return None
        if name not in self._names:
            if type(name) is not str or not p.NAME_RE.match(name):
                self._reject(pod, f"a sample with a bad name {str(name)[:50]!r}")
                return None
            self._names.add(name)
        labels = s[3] if len(s) == 4 else None
        if labels is not None and not self._good_labels(labels):
            self._reject(pod, f"a sample with bad labels {str(labels)[:80]}")
            return None
        return (float(ts), tag, pod_id, name, value, labels or None)

    def _good_labels(self, labels: Any) -> bool:
        if type(labels) is not dict or len(labels) > p.MAX_LABELS:
            return False
        for key, value in labels.items():
            if key not in self._keys:
                if not p.LABEL_RE.match(key) or key in p.RESERVED_LABELS:
                    return False
                self._keys.add(key)
            if type(value) is not str or len(value) > p.MAX_LABEL_VALUE:
                return False
        return True

    def _reject(self, pod: str, why: str) -> None:
        self.rejected += 1
        if pod not in self._complained:
            self._complained.add(pod)
            log.warning("metrics from %s: ignoring %s (and any more from it)", pod[:80], why)

    def add(self, rows: list[Row]) -> None:
        """Samples into metrics.csv and the summary's figures."""
        values = self.values
        for _ts, tag, _pod_id, name, value, _labels in rows:
            key = (name, tag)
            series = values.get(key)
            if series is None:
                series = values[key] = array("d")
            series.append(value)
        try:
            self.writer.write(rows)
        except (OSError, ValueError) as exc:
            self.lost += len(rows)
            if self.write_failed is None:
                self.write_failed = str(exc)
                log.warning("cannot write metrics.csv (%s): samples are lost from now on", exc)

    async def _purge(self) -> None:
        """Remove what is written from the stream (it holds only what is not on disk yet)."""
        assert self.bus is not None
        self._since_purge = 0
        try:
            await self.bus.js.purge_stream(
                p.metrics_stream(self.bus.exp_id), seq=self._last_seq + 1
            )
        except Exception as exc:  # the next purge will do
            log.debug("purging the metrics stream: %s", exc)

    async def drain(self, timeout: float) -> None:
        """Wait (up to `timeout`) until every batch the stream holds now is written: the pods
        have ended, their last batches were acknowledged before they did."""
        if self.bus is None or self._follower is None or self.bus.gone is not None:
            return
        try:
            async with asyncio.timeout(timeout):
                info = await self.bus.js.stream_info(p.metrics_stream(self.bus.exp_id))
                target = info.state.last_seq if info.state.messages else 0
                while self._last_seq < target:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            log.warning("metrics: batches not all written after %gs", timeout)
        except Exception as exc:
            log.warning("metrics: cannot tell whether every batch is written: %s", exc)

    async def stop(self) -> None:
        for tap in self._taps:
            tap.close()
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None

    def close(self) -> None:
        for tap in self._taps:
            tap.close()
        with contextlib.suppress(OSError):
            self.writer.close()

    # -- the summary -------------------------------------------------------------------------

    def stats(self) -> list[MetricStats]:
        """Per metric and tag: count, mean, percentiles; raw and, for a metric with an
        expected interval, corrected for coordination omission."""
        from tricks_nats.results import metric_stats

        return [
            metric_stats(name, tag, values, self.intervals.get((tag, name)))
            for (name, tag), values in self.values.items()
        ]

    def dropped_by_pod(self) -> Mapping[str, int]:
        return dict(sorted(self.dropped.items()))
