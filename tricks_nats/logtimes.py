"""When each line of a pod's log was read: `logs/<tag>-<id>.ts` beside `logs/<tag>-<id>.log`.

The log file stays plain text. Its index has one line per read that began a new log line:
`<byte offset> <seconds since the epoch>`, meaning the log line that starts at that offset, and
every later one up to the next entry, was first read at that time. A line's time is that of the
last entry at or before its first byte (lines before the first entry: the first entry's time).
Offsets increase; a reader ignores a malformed or torn last line (a run still going).
"""

from __future__ import annotations

import bisect
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_ENTRY = re.compile(rb"^(\d+) (\d+(?:\.\d+)?)\n")


def index_path(log_path: Path) -> Path:
    return log_path.with_suffix(".ts")


def read_index(path: Path) -> tuple[list[int], list[float]]:
    """The index's offsets and times, in order; empty if there is none."""
    offsets: list[int] = []
    times: list[float] = []
    with contextlib.suppress(OSError), path.open("rb") as f:
        for raw in f:
            m = _ENTRY.match(raw)
            if m is None:
                continue
            offset = int(m.group(1))
            if offsets and offset < offsets[-1]:
                continue
            offsets.append(offset)
            times.append(float(m.group(2)))
    return offsets, times


@dataclass(frozen=True)
class LogLine:
    ts: float
    #: Byte offset of the line's start in the log file.
    offset: int
    #: The line without its newline, decoded as UTF-8 (bad bytes replaced).
    text: str


def read_lines(log_path: Path, start: int = 0, *, whole_only: bool = False) -> Iterator[LogLine]:
    """The log's lines from byte `start` (a line start), each with its time. `whole_only`:
    stop before a last line without its newline (a pod still writing it)."""
    offsets, times = read_index(index_path(log_path))
    try:
        f = log_path.open("rb")
    except OSError:
        return
    with f:
        f.seek(start)
        offset = start
        for raw in f:
            if whole_only and not raw.endswith(b"\n"):
                return
            i = bisect.bisect_right(offsets, offset) - 1
            ts = times[i] if i >= 0 else (times[0] if times else 0.0)
            yield LogLine(ts, offset, raw.rstrip(b"\n").decode("utf-8", "replace"))
            offset += len(raw)
