"""The pods' logs of a run merged in time order, for `tricks-nats logs`: which pods, each line
with its time (from the `.ts` index beside each log, see logtimes), filters, and the output.

Everything streams. A pod's log and its index are read a block at a time, side by side, and a
file is open only while a block is read, so a run of any size needs two file descriptors and
memory for one block per pod; `heapq.merge` orders the pods' lines by (time, pod order, byte
offset): lines with the same time keep each pod's own order, then the order of the pods (the
spec's order of tags, then pod ids).

A line that no index entry times (a run from before the index, a pod whose index has no entry
yet) is timed at its log file's modification time when it is read: such a pod's lines come
after what the other pods wrote before its last write, in their own order, and they count as
written then for `--since`.

Reading is incremental: each `LogSet.lines()` gives the lines written since the previous call
(what `--follow` prints at each check). Lines are merged within one call only; a later call's
lines come after those already given, whatever their times.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import BinaryIO

from tricks_nats.errors import UsageError
from tricks_nats.logtimes import _ENTRY, index_path

#: Bytes of a log (or of an index) read at once, per pod: a block's lines wait in memory
#: while the merge takes them, so a run of many pods reads smaller blocks.
BLOCK = 64 * 1024
MIN_BLOCK = 4 * 1024
BLOCKS_BUDGET = 16 * 1024 * 1024

#: logtimes' index entry, found in a block of the index at once.
_ENTRIES = re.compile(_ENTRY.pattern, re.MULTILINE)

#: One line: (time, pod order, byte offset, text, pod). Sorting these tuples is the merge order
#: (the text is never compared: no two lines share a pod order and an offset).
Line = tuple[float, int, int, str, "PodLog"]

#: The colours of `docker compose logs`, one per pod in the pods' order (ANSI SGR codes).
PALETTE = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")


# -- which pods ------------------------------------------------------------------------------


def pod_of(filename: str) -> tuple[str, int] | None:
    """`server-3.log` -> ("server", 3); None for any other name."""
    if not filename.endswith(".log"):
        return None
    tag, sep, number = filename[: -len(".log")].rpartition("-")
    if not sep or not tag or not (number.isascii() and number.isdigit()):
        return None
    if number != str(int(number)):  # `server-03` is not pod 3's log
        return None
    return tag, int(number)


def parse_pod(value: str) -> int | tuple[str, int]:
    """`--pod`: `N` (pod N of each selected tag) or `TAG-N` (that pod)."""
    text = value.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    found = pod_of(f"{text}.log")
    if found is None:
        raise UsageError(f"--pod {value!r}: expected a pod id (3) or TAG-ID (server-3)")
    return found


@dataclass(frozen=True)
class Selection:
    """`--tag` and `--pod`: each option's values are alternatives, the two options must both
    hold (`--tag client --pod 0` is client-0). Empty: every pod."""

    tags: frozenset[str] = frozenset()
    ids: frozenset[int] = frozenset()
    pods: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def parse(cls, tags: Iterable[str] = (), pods: Iterable[str] = ()) -> Selection:
        parsed = [parse_pod(p) for p in pods]
        return cls(
            tags=frozenset(tags),
            ids=frozenset(p for p in parsed if isinstance(p, int)),
            pods=frozenset(p for p in parsed if isinstance(p, tuple)),
        )

    def wants(self, tag: str, pod_id: int) -> bool:
        if self.tags and tag not in self.tags:
            return False
        if self.ids or self.pods:
            return pod_id in self.ids or (tag, pod_id) in self.pods
        return True

    def check(self, spec_tags: Sequence[tuple[str, int]]) -> None:
        """Against the run's spec ((tag, replicas) in order): a UsageError for a tag or pod
        the run does not have."""
        replicas = dict(spec_tags)
        known = ", ".join(replicas)
        for tag in sorted(self.tags):
            if tag not in replicas:
                raise UsageError(f"--tag {tag!r}: no such tag in this run (its tags: {known})")
        for tag, pod_id in sorted(self.pods):
            if tag not in replicas:
                raise UsageError(
                    f"--pod {tag}-{pod_id}: no tag {tag!r} in this run (its tags: {known})"
                )
            if pod_id >= replicas[tag]:
                raise UsageError(f"--pod {tag}-{pod_id}: {tag} has pods 0 to {replicas[tag] - 1}")
        chosen = [n for t, n in spec_tags if not self.tags or t in self.tags]
        for pod_id in sorted(self.ids):
            if all(pod_id >= n for n in chosen):
                raise UsageError(f"--pod {pod_id}: no selected tag has a pod {pod_id}")


# -- one pod's lines -------------------------------------------------------------------------


class PodLog:
    """One pod's log, read incrementally with its index: where the next line starts, and the
    block of index entries that the lines still to come need."""

    __slots__ = (
        "_cur",
        "_index_pos",
        "_last_offset",
        "_next",
        "_offsets",
        "_times",
        "block",
        "colour",
        "index",
        "name",
        "path",
        "pod_id",
        "pos",
        "rank",
        "tag",
    )

    def __init__(self, tag: str, pod_id: int, path: Path, colour: int = 0) -> None:
        self.tag = tag
        self.pod_id = pod_id
        self.name = f"{tag}-{pod_id}"
        self.path = path
        self.index = index_path(path)
        self.colour = colour
        #: The pod's place in the merge order among the pods read together.
        self.rank = 0
        self.block = BLOCK
        self._reset()

    def _reset(self) -> None:
        #: Byte offset in the log where the next unread line starts.
        self.pos = 0
        self._index_pos = 0  # where the next unread index entry starts
        self._last_offset = -1  # the largest offset of an entry taken (they must not decrease)
        self._cur: float | None = None  # the time of the last entry at or before `pos`
        # The block of entries read last, and the first of them after `pos`.
        self._offsets: list[int] = []
        self._times: list[float] = []
        self._next = 0

    def _read_index(self) -> bool:
        """Take the index's next block of whole entries (replacing the last block, used up);
        False when there was none (a torn last entry waits for its end)."""
        try:
            with self.index.open("rb") as f:
                f.seek(self._index_pos)
                data = _read_block(f, self.block)
        except OSError:
            return False
        end = data.rfind(b"\n") + 1
        if end == 0:
            return False
        self._index_pos += end
        found = _ENTRIES.findall(data, 0, end)
        offsets = [int(o) for o, _ in found]
        times = [float(t) for _, t in found]
        if offsets and (offsets[0] < self._last_offset or offsets != sorted(offsets)):
            kept = []  # rare: drop each entry whose offset goes back
            last = self._last_offset
            for o, t in zip(offsets, times, strict=True):
                if o >= last:
                    kept.append((o, t))
                    last = o
            offsets = [o for o, _ in kept]
            times = [t for _, t in kept]
        if offsets:
            self._last_offset = offsets[-1]
        self._offsets, self._times, self._next = offsets, times, 0
        return True

    def has_news(self) -> bool:
        """Whether the log changed size since it was last read (a truncated log is read again
        from its start)."""
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return False
        if size < self.pos:
            self._reset()
        return size != self.pos

    def lines(
        self,
        *,
        whole_only: bool,
        since: float | None = None,
        grep: Callable[[str], object] | None = None,
    ) -> Iterator[Line]:
        """The lines from `pos` on, each as a Line, `pos` moving past each one taken.
        `whole_only`: stop before a last line without its newline. `since`: only lines timed
        at or after it. `grep`: only lines whose text it accepts."""
        rank = self.rank
        offset = self.pos
        cur = self._cur
        offsets, times, nxt = self._offsets, self._times, self._next
        count = len(offsets)
        index_done = False
        try:
            while True:
                try:
                    with self.path.open("rb") as f:
                        mtime = os.fstat(f.fileno()).st_mtime
                        f.seek(offset)
                        data = _read_block(f, self.block)
                except OSError:
                    return
                raws = data.split(b"\n")
                tail = raws.pop()  # empty, or a last line without its newline: the file's end
                if tail and not whole_only:
                    raws.append(tail)
                for raw in raws:
                    # The time of the last entry at or before this line (before the first
                    # entry: the first entry's), reading on in the index while it may hold one.
                    while True:
                        while nxt < count and offsets[nxt] <= offset:
                            cur = times[nxt]
                            nxt += 1
                        if nxt < count or index_done:
                            break
                        index_done = not self._read_index()
                        offsets, times, nxt = self._offsets, self._times, 0
                        count = len(offsets)
                    if cur is not None:
                        ts = cur
                    elif nxt < count:
                        ts = times[nxt]
                    else:
                        ts = mtime
                    start = offset
                    offset += len(raw) + 1
                    if since is not None and ts < since:
                        continue
                    text = raw.decode("utf-8", "replace")
                    if grep is not None and not grep(text):
                        continue
                    yield (ts, rank, start, text, self)
                if tail:
                    if not whole_only:
                        offset -= 1  # that last line had no newline
                    return
                if not data:
                    return
        finally:
            self.pos = offset
            self._cur = cur
            self._next = nxt


def _read_block(f: BinaryIO, size: int) -> bytes:
    """About `size` bytes from where `f` is, ending at the end of a line or of the file."""
    data = f.read(size)
    if len(data) == size and not data.endswith(b"\n"):
        data += f.readline()
    return data


# -- the pods of a run -----------------------------------------------------------------------


class LogSet:
    """The selected pods' logs in a run's `logs/` directory, pods found as their files appear.

    `spec_tags`: the run's (tag, replicas) in the spec's order, if known: it orders the pods
    (otherwise, and for a tag it lacks: by tag name, after the spec's), gives each a stable
    colour, and sets the width of the names to that of the longest selected pod's."""

    def __init__(
        self,
        logs_dir: Path,
        selection: Selection | None = None,
        spec_tags: Sequence[tuple[str, int]] = (),
        *,
        since: float | None = None,
        grep: Callable[[str], object] | None = None,
    ) -> None:
        self.logs_dir = logs_dir
        self.selection = selection = selection or Selection()
        self.since = since
        self.grep = grep
        self._tag_rank = {tag: i for i, (tag, _) in enumerate(spec_tags)}
        self._first_colour: dict[str, int] = {}
        total = 0
        for tag, replicas in spec_tags:
            self._first_colour[tag] = total
            total += replicas
        self.pods: list[PodLog] = []
        self._known: set[str] = set()
        self.width = max((len(name) for name in _widest_names(spec_tags, selection)), default=0)

    def refresh(self) -> None:
        """Pick up the logs of pods that appeared since the last look."""
        try:
            with os.scandir(self.logs_dir) as entries:
                names = [e.name for e in entries if e.name not in self._known]
        except OSError:
            return
        added = False
        for filename in names:
            self._known.add(filename)
            found = pod_of(filename)
            if found is None or not self.selection.wants(*found):
                continue
            tag, pod_id = found
            first = self._first_colour.get(tag)
            colour = first + pod_id if first is not None else zlib.crc32(filename.encode())
            self.pods.append(PodLog(tag, pod_id, self.logs_dir / filename, colour))
            self.width = max(self.width, len(self.pods[-1].name))
            added = True
        if added:
            last = len(self._tag_rank)
            self.pods.sort(key=lambda p: (self._tag_rank.get(p.tag, last), p.tag, p.pod_id))
            block = min(BLOCK, max(MIN_BLOCK, BLOCKS_BUDGET // len(self.pods)))
            for rank, pod in enumerate(self.pods):
                pod.rank = rank
                pod.block = block

    def lines(self, *, whole_only: bool) -> Iterator[Line]:
        """The selected pods' lines written since the last call, merged in time order."""
        return heapq.merge(
            *(
                pod.lines(whole_only=whole_only, since=self.since, grep=self.grep)
                for pod in self.pods
                if pod.has_news()
            )
        )


def _widest_names(spec_tags: Sequence[tuple[str, int]], selection: Selection) -> Iterator[str]:
    """Per selected tag of the spec, the longest name of a pod the selection keeps."""
    for tag, replicas in spec_tags:
        if selection.tags and tag not in selection.tags:
            continue
        if selection.ids or selection.pods:
            ids = [n for n in selection.ids if n < replicas]
            ids += [n for t, n in selection.pods if t == tag and n < replicas]
        else:
            ids = [replicas - 1]
        if ids:
            yield f"{tag}-{max(ids)}"


# -- output ----------------------------------------------------------------------------------


def render(
    lines: Iterable[Line], width: int, *, colour: bool = False, timestamps: bool = False
) -> Iterator[str]:
    """Each line as printed, newline included: `name | text`, the names padded to `width`
    (colour: the name and bar in the pod's colour; timestamps: local `HH:MM:SS.mmm` first)."""
    prefixes: dict[PodLog, str] = {}
    last_second = -1
    clock = ""
    for ts, _, _, text, pod in lines:
        prefix = prefixes.get(pod)
        if prefix is None:
            name = pod.name.ljust(width)
            if colour:
                prefix = f"\x1b[{PALETTE[pod.colour % len(PALETTE)]}m{name} |\x1b[0m "
            else:
                prefix = f"{name} | "
            prefixes[pod] = prefix
        if timestamps:
            second = int(ts)
            if second != last_second:
                last_second = second
                clock = time.strftime("%H:%M:%S", time.localtime(second))
            yield f"{prefix}{clock}.{int((ts - second) * 1000):03d} {text}\n"
        else:
            yield f"{prefix}{text}\n"


# -- --since ---------------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_AMOUNT = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"(?:{_AMOUNT}(?:ns|us|µs|ms|s|m|h))+")
_PART = re.compile(rf"({_AMOUNT})(ns|us|µs|ms|s|m|h)")
_UNIX = re.compile(rf"{_AMOUNT}")


def parse_since(value: str, now: float | None = None) -> float:
    """`--since` as docker reads it: a duration back from now (`10s`, `1.5m`, `1h30m`, `500ms`),
    a unix timestamp (`1763781284.5`), or an ISO-8601 time (`2026-11-22T03:14:44`, `...Z`,
    `...+01:00`; local time without a zone); also a time of day (`03:14:44.392`: today)."""
    text = value.strip()
    if _DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
        return (time.time() if now is None else now) - seconds
    if _UNIX.fullmatch(text):
        return float(text)
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text).timestamp()
    with contextlib.suppress(ValueError):
        return datetime.combine(date.today(), dtime.fromisoformat(text)).timestamp()
    raise UsageError(
        f"--since {value!r}: expected a duration back from now (10s, 1.5m, 1h30m), "
        "an ISO-8601 time (2026-11-22T03:14:44) or a unix timestamp"
    )
