"""What the coordinator reads from a pod's output as the runtime writes it to the pod's log.

A runtime hands every chunk of a pod's output to the pod's `LogTap` before writing it. The tap
keeps the log's time index (`logtimes`: when each line was read, so `tricks-nats logs` merges
pods exactly) and, for a tag with `metrics:` patterns, turns matching lines into samples.
Nothing here may stop a pod or a run: a tap that fails stops tapping and says so once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from tricks_nats.logtimes import index_path
from tricks_nats.metrics_csv import Row

log = logging.getLogger(__name__)

#: A line longer than this is not matched against patterns (it is still logged and indexed).
MAX_MATCHED_LINE = 64 * 1024


@dataclass(frozen=True)
class Pattern:
    name: str
    regex: re.Pattern[str]

    @property
    def has_ts(self) -> bool:
        return "ts" in self.regex.groupindex


class LogTap:
    """One pod's output: its time index, and samples from its lines."""

    def __init__(
        self,
        log_path: Path,
        tag: str,
        pod_id: int,
        patterns: tuple[Pattern, ...],
        on_samples: Callable[[list[Row]], None],
        on_rejected: Callable[[str], None],
    ) -> None:
        self.tag = tag
        self.pod_id = pod_id
        self.patterns = patterns
        self._on_samples = on_samples
        self._on_rejected = on_rejected
        self._index_path = index_path(log_path)
        self._index: BinaryIO | None = None
        #: Bytes seen so far: the offset in the log file of the next byte.
        self._offset = 0
        self._at_line_start = True
        self._partial = bytearray()
        self._partial_ts = 0.0
        self._broken = False
        self._index_failed = False

    def __call__(self, chunk: bytes) -> None:
        if self._broken or not chunk:
            return
        try:
            self._take(chunk, time.time())
        except Exception as exc:  # never the pod's problem
            self._broken = True
            log.warning("reading the output of %s-%d: %s", self.tag, self.pod_id, exc)

    def _take(self, chunk: bytes, now: float) -> None:
        first = 0 if self._at_line_start else chunk.find(b"\n") + 1
        if 0 <= first < len(chunk) and (first > 0 or self._at_line_start):
            self._write_index(self._offset + first, now)
        self._offset += len(chunk)
        self._at_line_start = chunk.endswith(b"\n")
        if not self.patterns:
            return
        if not self._partial:
            self._partial_ts = now
        data = bytes(self._partial) + chunk if self._partial else chunk
        lines = data.split(b"\n")
        rest = lines.pop()
        rows: list[Row] = []
        ts = self._partial_ts
        for line in lines:
            self._match(line, ts, rows)
            ts = now
        self._partial = bytearray(rest[: MAX_MATCHED_LINE + 1])
        if lines:
            self._partial_ts = now
        if rows:
            self._on_samples(rows)

    def close(self) -> None:
        """The pod's output has ended: a last line without a newline counts too."""
        if self._partial and not self._broken:
            rows: list[Row] = []
            self._match(bytes(self._partial), self._partial_ts, rows)
            if rows:
                self._on_samples(rows)
        self._partial.clear()
        if self._index is not None:
            with contextlib.suppress(OSError):
                self._index.close()
            self._index = None

    def _write_index(self, offset: int, now: float) -> None:
        """An index that cannot be written (a full disk) is given up: lines keep their order,
        `logs` times them by the file; samples from lines go on."""
        if self._index_failed:
            return
        try:
            if self._index is None:
                self._index_path.parent.mkdir(parents=True, exist_ok=True)
                self._index = self._index_path.open("ab", buffering=0)
            self._index.write(f"{offset} {now:.6f}\n".encode())
        except OSError as exc:
            self._index_failed = True
            log.warning("cannot write %s (%s): its times are lost", self._index_path, exc)

    def _match(self, raw: bytes, arrived: float, rows: list[Row]) -> None:
        if len(raw) > MAX_MATCHED_LINE:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r")
        for pattern in self.patterns:
            m = pattern.regex.search(line)
            if m is None:
                continue
            try:
                value = float(m.group("value"))
            except (TypeError, ValueError):
                self._on_rejected(f"{pattern.name}: value {m.group('value')!r} is not a number")
                continue
            if not math.isfinite(value):
                self._on_rejected(f"{pattern.name}: value {value!r} is not finite")
                continue
            ts = arrived
            if pattern.has_ts and m.group("ts") is not None:
                parsed = parse_ts(m.group("ts"))
                if parsed is None:
                    self._on_rejected(f"{pattern.name}: time {m.group('ts')!r} is not a time")
                    continue
                ts = parsed
            labels = {
                k: v[:200]
                for k, v in m.groupdict().items()
                if k not in ("value", "ts") and v is not None
            }
            rows.append((ts, self.tag, self.pod_id, pattern.name, value, labels or None))


def parse_ts(text: str) -> float | None:
    """Seconds since the epoch, or an ISO 8601 time (without a zone: the machine's)."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) else None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
