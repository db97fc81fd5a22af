"""Faults declared like workflows: the spec's `faults:` entries, validated, and what a runtime
is asked to do. Pure: no I/O, no clock.

A fault fires when an event reaches a count (`when: {name, value}`), `after` seconds later,
then again every `every` seconds, `times` times in all. Each firing chooses its pods among the
selected tag's running pods (ids, `count`, or `percent`, drawn with a seeded generator whose
seed is recorded, so a run can be replayed) and hands the runtime one `FaultAction`.

Process faults act on pods (`kill`, `pause`, `restart`); network faults act on links between
two sets of pods (`delay`, `loss`, `partition`), in one direction or both, and heal after
`duration` (or at the end of the run).
"""

from __future__ import annotations

import random
import re
import signal
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

#: A time span: seconds as a number, or text with a unit (`100ms`, `2s`, `1.5m`).
Duration = float | str

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

PROCESS_KINDS = ("kill", "pause", "restart")
NETWORK_KINDS = ("delay", "loss", "partition")
KINDS = PROCESS_KINDS + NETWORK_KINDS
Kind = Literal["kill", "pause", "restart", "delay", "loss", "partition"]
Direction = Literal["both", "one"]
RestartOn = Literal["failure", "preemption", "always"]

#: Most firings of one fault (`times`), and most filters one network fault may install.
MAX_TIMES = 10_000


def seconds(value: object) -> float | None:
    """A Duration in seconds; None if `value` is not one (bool is not a number here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if isinstance(value, str) and (m := _DURATION_RE.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    return None


def signal_number(name: object) -> int | None:
    """`SIGKILL`, `KILL`, `kill` or `9` as a signal number; None if it names none."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name if name in {s.value for s in signal.Signals} else None
    if not isinstance(name, str):
        return None
    text = name.strip().upper()
    if text.isdigit():
        return signal_number(int(text))
    text = text if text.startswith("SIG") else "SIG" + text
    sig = getattr(signal.Signals, text, None)
    return None if sig is None else int(sig)


# -- the spec's shapes (msgspec, checked like the rest of the spec) -------------------------


class PodSelector(msgspec.Struct, forbid_unknown_fields=True):
    """Pods of one tag: all of them, or `ids`, or `count` of them, or `percent` of them
    (chosen at random among those running, with `seed`)."""

    tag: str
    ids: list[Annotated[int, msgspec.Meta(ge=0)]] | None = None
    count: Annotated[int, msgspec.Meta(ge=1)] | None = None
    percent: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None


class When(msgspec.Struct, forbid_unknown_fields=True):
    """`{name: EVENT, value: COUNT}` as a workflow's start, plus when after it and how often."""

    name: str
    value: Annotated[int, msgspec.Meta(ge=1)]
    after: Duration = 0.0
    every: Duration | None = None
    times: Annotated[int, msgspec.Meta(ge=1, le=MAX_TIMES)] | None = None


class KillSpec(PodSelector, forbid_unknown_fields=True):
    signal: str | int = "SIGKILL"


class PauseSpec(PodSelector, forbid_unknown_fields=True):
    duration: Duration = 1.0


class RestartSpec(PodSelector, forbid_unknown_fields=True):
    pass


class _Link(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    from_: PodSelector = msgspec.field(name="from")
    to: PodSelector
    #: both: traffic either way between the two sets; one: from `from` to `to` only.
    direction: Direction = "both"
    #: How long until the link heals; none: at the end of the run.
    duration: Duration | None = None


class DelaySpec(_Link, forbid_unknown_fields=True, kw_only=True):
    delay: Duration
    jitter: Duration = 0.0


class LossSpec(_Link, forbid_unknown_fields=True, kw_only=True):
    percent: Annotated[float, msgspec.Meta(gt=0, le=100)]


class PartitionSpec(_Link, forbid_unknown_fields=True, kw_only=True):
    pass


class FaultSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One entry of `faults:`: `when`, and exactly one of the kinds."""

    when: When
    name: str | None = None
    kill: KillSpec | None = None
    pause: PauseSpec | None = None
    restart: RestartSpec | None = None
    delay: DelaySpec | None = None
    loss: LossSpec | None = None
    partition: PartitionSpec | None = None
    #: Seed of the random choice of pods (`count`, `percent`); recorded in the journal.
    seed: int | None = None
    #: Whether a pod this fault stops is judged by its exit code (default: it is not).
    judge_exit: bool = False


class RestartPolicy(msgspec.Struct, forbid_unknown_fields=True):
    """A tag's pods that die outside a fault and outside the workflow are started again:
    on `failure` (exit code not 0), `preemption` (killed or evicted by something other than
    tricks-nats), or `always`; at most `max` times per pod."""

    on: RestartOn = "failure"
    max: Annotated[int, msgspec.Meta(ge=0)] = 3


# -- validated ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    tag: str
    ids: tuple[int, ...] | None = None
    count: int | None = None
    percent: float | None = None

    def choose(self, running: list[int], rng: random.Random) -> list[int]:
        """The pods of one firing among `running` (the tag's running pod ids, sorted)."""
        if self.ids is not None:
            wanted = set(self.ids)
            return [i for i in running if i in wanted]
        if self.count is not None:
            k = min(self.count, len(running))
        elif self.percent is not None:
            k = min(len(running), max(1, round(len(running) * self.percent / 100)))
        else:
            return list(running)
        return sorted(rng.sample(running, k))


@dataclass(frozen=True)
class Fault:
    """One validated fault."""

    index: int
    name: str
    kind: Kind
    event: str
    value: int
    after: float
    every: float | None
    times: int
    seed: int
    pods: Selector
    #: Network faults: the other end of the link (`pods` is its `from`).
    to: Selector | None = None
    direction: Direction = "both"
    duration: float | None = None
    signal: int = int(signal.SIGKILL)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_percent: float = 0.0
    judge_exit: bool = False

    @property
    def network(self) -> bool:
        return self.kind in NETWORK_KINDS

    def rng(self, firing: int) -> random.Random:
        """The generator of one firing: the same seed, fault and firing choose the same pods."""
        return random.Random(f"{self.seed}/{self.index}/{firing}")


@dataclass(frozen=True)
class FaultAction:
    """What a runtime is asked to do for one firing of a fault (and undo at `heal`)."""

    #: `<fault name>#<firing>`, unique in a run.
    id: str
    kind: Kind
    #: Process faults: the pods; network faults: the `from` end.
    pods: tuple[tuple[str, int], ...]
    #: Network faults: the `to` end.
    peers: tuple[tuple[str, int], ...] = ()
    direction: Direction = "both"
    signal: int = int(signal.SIGKILL)
    duration: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_percent: float = 0.0


def of_spec(index: int, spec: FaultSpec, default_seed: int) -> Fault:
    """A FaultSpec already checked by `problems` as a Fault."""
    kind, body = _kind(spec)
    assert kind is not None and body is not None
    when = spec.when
    every = seconds(when.every) if when.every is not None else None
    times = when.times if when.times is not None else (MAX_TIMES if every is not None else 1)
    common: dict[str, object] = {
        "index": index,
        "name": spec.name or f"{kind}-{index}",
        "kind": kind,
        "event": when.name,
        "value": when.value,
        "after": seconds(when.after) or 0.0,
        "every": every,
        "times": times,
        "seed": spec.seed if spec.seed is not None else default_seed,
        "judge_exit": spec.judge_exit,
    }
    if isinstance(body, _Link):
        extra: dict[str, object] = {
            "pods": _selector(body.from_),
            "to": _selector(body.to),
            "direction": body.direction,
            "duration": seconds(body.duration) if body.duration is not None else None,
        }
        if isinstance(body, DelaySpec):
            extra["delay_ms"] = (seconds(body.delay) or 0.0) * 1000
            extra["jitter_ms"] = (seconds(body.jitter) or 0.0) * 1000
        if isinstance(body, LossSpec):
            extra["loss_percent"] = body.percent
        return Fault(**common, **extra)  # type: ignore[arg-type]
    extra = {"pods": _selector(body)}
    if isinstance(body, KillSpec):
        extra["signal"] = signal_number(body.signal) or int(signal.SIGKILL)
    if isinstance(body, PauseSpec):
        extra["duration"] = seconds(body.duration)
    return Fault(**common, **extra)  # type: ignore[arg-type]


def _selector(s: PodSelector) -> Selector:
    return Selector(
        tag=s.tag,
        ids=tuple(s.ids) if s.ids is not None else None,
        count=s.count,
        percent=s.percent,
    )


def _kind(spec: FaultSpec) -> tuple[Kind | None, PodSelector | _Link | None]:
    for kind in KINDS:
        body = getattr(spec, kind)
        if body is not None:
            return kind, body  # type: ignore[return-value]
    return None, None


# -- checks across fields (on the raw data, located by the spec's reader) --------------------

Problem = tuple[tuple[str | int, ...], str]


def problems(data: object, replicas: dict[str, int]) -> list[Problem]:
    """Every mistake in `faults:` that its shape alone does not show: (path, message).
    `replicas`: the spec's tags and their pod counts (when valid)."""
    if not isinstance(data, list):
        return []
    found: list[Problem] = []
    names: set[str] = set()
    for i, entry in enumerate(data):
        if isinstance(entry, dict):
            found += _entry_problems(("faults", i), entry, replicas, names)
    return found


def _entry_problems(
    at: tuple[str | int, ...], entry: dict[str, object], replicas: dict[str, int], names: set[str]
) -> list[Problem]:
    found: list[Problem] = []
    kinds = [k for k in KINDS if k in entry]
    if not kinds:
        found.append((at, f"a fault needs one of {', '.join(KINDS)}"))
    elif len(kinds) > 1:
        found.append(((*at, kinds[1]), f"a fault does one thing: {' and '.join(kinds)} given"))
    name = entry.get("name")
    if isinstance(name, str):
        if name in names:
            found.append(((*at, "name"), f"fault name {name!r} is used twice"))
        names.add(name)
    when = entry.get("when")
    if isinstance(when, dict):
        found += _durations((*at, "when"), when, ("after", "every"))
        every, times = when.get("every"), when.get("times")
        if every is not None and seconds(every) == 0:
            found.append(((*at, "when", "every"), "every must be more than 0 seconds"))
        if every is None and isinstance(times, int) and not isinstance(times, bool) and times > 1:
            found.append(((*at, "when", "times"), f"times: {times} needs `every` (how often)"))
    for kind in kinds[:1]:
        body = entry.get(kind)
        if isinstance(body, dict):
            found += _body_problems((*at, kind), kind, body, replicas)
    return found


def _body_problems(
    at: tuple[str | int, ...], kind: str, body: dict[str, object], replicas: dict[str, int]
) -> list[Problem]:
    if kind in PROCESS_KINDS:
        found = _selector_problems(at, body, replicas)
        if kind == "kill" and "signal" in body and signal_number(body["signal"]) is None:
            found.append(((*at, "signal"), f"{body['signal']!r} is not a signal (e.g. SIGKILL)"))
        if kind == "pause":
            found += _durations(at, body, ("duration",), positive=True)
        return found
    found = []
    for end in ("from", "to"):
        sel = body.get(end)
        if isinstance(sel, dict):
            found += _selector_problems((*at, end), sel, replicas)
    found += _durations(at, body, ("duration", "jitter"))
    if kind == "delay":
        found += _durations(at, body, ("delay",), positive=True)
    return found


def _selector_problems(
    at: tuple[str | int, ...], sel: dict[str, object], replicas: dict[str, int]
) -> list[Problem]:
    tag = sel.get("tag")
    if not isinstance(tag, str):
        return []
    if tag not in replicas:
        return [((*at, "tag"), f"tag {tag!r} does not exist")]
    have = replicas[tag]
    ways = [k for k in ("ids", "count", "percent") if k in sel]
    if len(ways) > 1:
        return [((*at, ways[1]), f"choose pods one way: {' and '.join(ways)} given")]
    found: list[Problem] = []
    ids = sel.get("ids")
    for j, pod_id in enumerate(ids if isinstance(ids, list) else []):
        if isinstance(pod_id, int) and not isinstance(pod_id, bool) and pod_id >= have > 0:
            message = f"tag {tag!r} has no pod {pod_id} (ids 0 to {have - 1})"
            found.append(((*at, "ids", j), message))
    count = sel.get("count")
    if isinstance(count, int) and not isinstance(count, bool) and count > have > 0:
        found.append(((*at, "count"), f"tag {tag!r} has {have} pods, not {count}"))
    return found


def _durations(
    at: tuple[str | int, ...],
    body: dict[str, object],
    keys: tuple[str, ...],
    positive: bool = False,
) -> list[Problem]:
    found: list[Problem] = []
    for key in keys:
        if key not in body or body[key] is None:
            continue
        value = seconds(body[key])
        if value is None:
            found.append(
                ((*at, key), f"{key}: {body[key]!r} is not a duration (e.g. 2s, 100ms, 1.5m, 3)")
            )
        elif positive and value <= 0:
            found.append(((*at, key), f"{key} must be more than 0 seconds"))
    return found
