"""The journal's schema: one typed entry per line of `journal.jsonl`, one reader, one writer.

Every entry has `ts` (Unix seconds, stamped by `RunRecords.write`), `experiment` and `kind`,
then the fields of its kind, in the order the classes below declare them; a field that is None
is left out of the line. `watch --json` streams the same objects.

- `pod`: `tag`, `pod_id`, `state` (pending, running, exited, stopped, failed), `exit_code`
  when known, `reason` when there is one, `ip` when it runs;
- `event`: `name`, `count`, `pod` when a pod registered it;
- `workflow`: `tag`, `action` (start or stop), `condition` `{name, value}`;
- `fault`: `fault` (its name), `action` (kill, pause, restart, delay, loss, partition),
  `firing` (1, 2, ...), `state` (injected, failed, skipped, then healed), `pods` and, for a
  network fault, `peers` (pod names), `condition`, `seed`, `duration`, `reason`;
- `verdict`: `verdict`, `reason`.

A new kind is a subclass of `_Entry` with its own tag, added to `Entry`: `encode`, `decode`
and `read` know it from then on (and mypy points at every reader that must handle it).
Readers ignore fields they do not know, so older readers skip new fields, not lines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import msgspec

log = logging.getLogger(__name__)


class Condition(msgspec.Struct, frozen=True):
    """A workflow condition as the journal records it: an event reaching a value."""

    name: str
    value: int


class _Entry(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    #: Unix seconds; `RunRecords.write` stamps it (and `experiment`).
    ts: float = 0.0
    experiment: str = ""

    @property
    def kind(self) -> str:
        """pod, event, workflow or verdict: the `kind` of the entry's line."""
        return cast(str, self.__struct_config__.tag)


class PodEntry(_Entry, frozen=True, kw_only=True, tag="pod"):
    tag: str
    pod_id: int
    state: str
    exit_code: int | None = None
    reason: str | None = None
    ip: str | None = None
    #: When it ended: how, in the words of `outcomes`.
    outcome: str | None = None


class EventEntry(_Entry, frozen=True, kw_only=True, tag="event"):
    name: str
    count: int
    #: The pod that registered it (as it names itself); None for the coordinator's own.
    pod: str | None = None


class WorkflowEntry(_Entry, frozen=True, kw_only=True, tag="workflow"):
    tag: str
    action: Literal["start", "stop"]
    condition: Condition


class FaultEntry(_Entry, frozen=True, kw_only=True, tag="fault"):
    """One firing of a fault: `injected` (or `failed`, `skipped`), later `healed`."""

    fault: str
    action: str
    firing: int
    state: Literal["injected", "healed", "failed", "skipped"]
    pods: list[str]
    peers: list[str] | None = None
    condition: Condition | None = None
    seed: int | None = None
    duration: float | None = None
    reason: str | None = None


class VerdictEntry(_Entry, frozen=True, kw_only=True, tag="verdict"):
    verdict: str
    reason: str | None = None


Entry = PodEntry | EventEntry | WorkflowEntry | FaultEntry | VerdictEntry
#: Any one kind of entry (`RunRecords.write` returns what it was given, stamped).
EntryT = TypeVar("EntryT", bound=Entry)

_CLASSES: tuple[type[_Entry], ...] = get_args(Entry)
#: Every kind, in the order of `Entry`.
KINDS: tuple[str, ...] = tuple(cast(str, c.__struct_config__.tag) for c in _CLASSES)


# -- the writer ------------------------------------------------------------------------------
#
# msgspec writes a tagged struct's tag first; the journal has always had `ts, experiment, kind`
# first. So each kind gets a plain "wire" struct with the fields in the journal's order, every
# field after `kind` defaulting to None and `omit_defaults` on: exactly "None is left out".


def _wire_type(cls: type[_Entry]) -> type[msgspec.Struct]:
    fields = cls.__struct_fields__
    if fields[:2] != ("ts", "experiment"):  # kw_only everywhere keeps the base's fields first
        raise TypeError(f"{cls.__name__}: fields {fields} do not start with ts, experiment")
    return msgspec.defstruct(
        f"_{cls.__name__}Line",
        [("ts", Any), ("experiment", Any), ("kind", Any), *((f, Any, None) for f in fields[2:])],
        omit_defaults=True,
    )


_WIRE: dict[type[_Entry], tuple[str, type[msgspec.Struct]]] = {
    cls: (cast(str, cls.__struct_config__.tag), _wire_type(cls)) for cls in _CLASSES
}
_encoder = msgspec.json.Encoder()


def _line(entry: Entry) -> msgspec.Struct:
    kind, wire = _WIRE[type(entry)]
    values = msgspec.structs.astuple(entry)
    return wire(values[0], values[1], kind, *values[2:])


def encode(entry: Entry) -> bytes:
    """One journal line, without its newline: what the journal file and NATS carry."""
    return _encoder.encode(_line(entry))


def to_dict(entry: Entry) -> dict[str, Any]:
    """The JSON object of the entry's line, as a dict in the line's key order."""
    return cast(dict[str, Any], msgspec.to_builtins(_line(entry)))


def json_line(entry: Entry) -> str:
    """The entry as `watch --json` (and `up --json`) print it: Python's `json.dumps` layout
    (`", "`, `": "`, non-ASCII escaped), as they always have; the journal file is compact."""
    return json.dumps(to_dict(entry))


# -- the reader ------------------------------------------------------------------------------

_decoder: msgspec.json.Decoder[Entry] = msgspec.json.Decoder(Entry)


def decode(data: bytes) -> Entry | None:
    """One journal line (or NATS message); None for anything that is not a known entry:
    garbage, an unknown kind, a field of the wrong type. Never raises."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        log.debug("not a journal entry (%s): %.200r", exc, data)
        return None


def read(path: Path) -> list[Entry]:
    """Every entry of a journal file, in order, skipping lines that are not entries (a line
    cut short by a full disk or a writer still at it). Raises OSError if it cannot be read."""
    found = []
    for line in path.read_bytes().splitlines():
        if line.strip() and (entry := decode(line)) is not None:
            found.append(entry)
    return found
