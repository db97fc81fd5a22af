"""`runs/<id>/metrics.csv`: every sample of a run, one row each, as pandas reads it as is.

Header `ts,tag,pod_id,name,value` then one column per label key, in order of first use; `ts` is
seconds since the epoch (a float). The file is written as samples arrive and complete when the
run ends. A label key first seen mid-run adds a column: the file is rewritten once with the
wider header (label keys are few: at most MAX_LABEL_COLUMNS in a run, more are dropped and
counted).
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tricks_nats.protocol import pod_name

BASE_COLUMNS = ("ts", "tag", "pod_id", "name", "value")
#: Label columns one run may have; labels with other keys are dropped (and counted).
MAX_LABEL_COLUMNS = 32

#: (ts, tag, pod_id, name, value, labels or None)
Row = tuple[float, str, int, str, float, Mapping[str, str] | None]


class MetricsWriter:
    """Appends rows to metrics.csv; each `write` is flushed (a crash keeps what was written)."""

    def __init__(self, path: Path, label_keys: Iterable[str] = ()) -> None:
        self.path = path
        self.keys: list[str] = []
        #: Labels dropped because the run had MAX_LABEL_COLUMNS keys already.
        self.labels_dropped = 0
        self.rows = 0
        for key in label_keys:
            if key not in self.keys and len(self.keys) < MAX_LABEL_COLUMNS:
                self.keys.append(key)
        #: Why the file could not even be begun (a full disk): every write then fails.
        self.broken: OSError | None = None
        try:
            self._file = path.open("w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._file, lineterminator="\n")
            self._csv.writerow([*BASE_COLUMNS, *self.keys])
            self._file.flush()
        except OSError as exc:  # rows without their header would be worse than none
            self.broken = exc
            with contextlib.suppress(OSError, AttributeError):
                self._file.close()

    def write(self, rows: Iterable[Row]) -> None:
        """Raises OSError when the disk refuses them (the caller counts them lost)."""
        if self.broken is not None:
            raise self.broken
        rows = list(rows)
        known = set(self.keys)
        new = [k for *_, labels in rows if labels for k in labels if k not in known]
        if new:
            self._widen(list(dict.fromkeys(new)))
        keys = self.keys
        columns = set(keys)
        blanks = [""] * len(keys)
        out: list[list[object]] = []
        # csv writes a float as its repr (exact, round-trips), an int as digits
        for ts, tag, pod_id, name, value, labels in rows:
            if labels:
                out.append([ts, tag, pod_id, name, value, *[labels.get(k, "") for k in keys]])
                if len(labels) > len(columns) or not columns.issuperset(labels):
                    self.labels_dropped += sum(1 for k in labels if k not in columns)
            else:
                out.append([ts, tag, pod_id, name, value, *blanks])
        self._csv.writerows(out)
        self._file.flush()
        self.rows += len(out)

    def _widen(self, new: list[str]) -> None:
        room = MAX_LABEL_COLUMNS - len(self.keys)
        if room <= 0:
            return
        self._file.flush()
        old_width = len(BASE_COLUMNS) + len(self.keys)
        self.keys.extend(new[:room])
        pad = [""] * (len(BASE_COLUMNS) + len(self.keys) - old_width)
        tmp = self.path.with_suffix(".csv.tmp")
        with (
            self.path.open(newline="", encoding="utf-8") as src,
            tmp.open("w", newline="", encoding="utf-8") as dst,
        ):
            reader = csv.reader(src)
            writer = csv.writer(dst, lineterminator="\n")
            next(reader, None)
            writer.writerow([*BASE_COLUMNS, *self.keys])
            for row in reader:
                writer.writerow(row + pad)
        self._file.close()
        os.replace(tmp, self.path)
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file, lineterminator="\n")

    def close(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # never opened: a full disk
            self._file.close()


@dataclass
class Samples:
    """A metrics.csv, by column (what plots and reports read)."""

    ts: list[float] = field(default_factory=list)
    tag: list[str] = field(default_factory=list)
    pod_id: list[int] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ts)

    def names(self) -> list[str]:
        """Metric names in order of first appearance."""
        return list(dict.fromkeys(self.name))

    def series(
        self, name: str, by: str = "tag", tags: Iterable[str] | None = None
    ) -> dict[str, tuple[list[float], list[float]]]:
        """`name`'s samples split by tag (`by="tag"`) or by pod (`"pod"`: `<tag>-<id>`), each
        series (times, values) in time order; `tags` keeps only those tags."""
        keep = set(tags) if tags else None
        out: dict[str, list[tuple[float, float]]] = {}
        for ts, tag, pod_id, n, value in zip(
            self.ts, self.tag, self.pod_id, self.name, self.value, strict=True
        ):
            if n != name or (keep is not None and tag not in keep):
                continue
            key = tag if by == "tag" else pod_name(tag, pod_id)
            out.setdefault(key, []).append((ts, value))
        result = {}
        for key, pairs in out.items():
            pairs.sort(key=lambda pv: pv[0])
            result[key] = ([t for t, _ in pairs], [v for _, v in pairs])
        return result


def read(path: Path) -> Samples:
    """All samples of a metrics.csv; rows that do not parse (a torn last line of a run still
    going) are skipped."""
    samples = Samples()
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header[: len(BASE_COLUMNS)]) != BASE_COLUMNS:
            raise ValueError(f"{path}: not a metrics.csv (header {header!r})")
        keys = header[len(BASE_COLUMNS) :]
        columns: list[list[str]] = [[] for _ in keys]
        for row in reader:
            if len(row) != len(header):
                continue
            try:
                ts, pod_id, value = float(row[0]), int(row[2]), float(row[4])
            except ValueError:
                continue
            samples.ts.append(ts)
            samples.tag.append(row[1])
            samples.pod_id.append(pod_id)
            samples.name.append(row[3])
            samples.value.append(value)
            for column, cell in zip(columns, row[len(BASE_COLUMNS) :], strict=True):
                column.append(cell)
        samples.labels = dict(zip(keys, columns, strict=True))
    return samples
