"""The experiment spec (Tricks format): parse, default and validate. Pure, no I/O but reading text.

msgspec stops at the first error and reports a path, not a line. Users want every mistake at once,
each pointing into their file, so we build the data from the YAML parser's events ourselves
(keeping each value's position). A valid spec converts at once; an invalid one is validated
against the spec's JSON Schema, whose every error has a structured path, hence a position.
No spec can exhaust the machine: reading and checking are linear in the spec, and the
MAX_* bounds below (size, nesting, aliases, pods, tag length) are located errors like any other.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import operator
import re
import secrets
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from tricks_nats import env as envnames
from tricks_nats.errors import SpecError
from tricks_nats.faults import Fault, FaultSpec, RestartPolicy, of_spec
from tricks_nats.faults import problems as fault_problems
from tricks_nats.located_yaml import (
    _UNFIT,
    MAX_SPEC_BYTES,
    PathT,
    _compose,
    _Located,
    _shown,
    _too_big,
    _TooMany,
    _type_name,
)
from tricks_nats.protocol import (
    LABEL_RE,
    NAME_RE,
    RESERVED_LABELS,
    start_event,
    stop_event,
)

#: Bounds on a spec (with those on its YAML, in located_yaml): each is a located error.
#: Pods of one run (the sum of every tag's replicas).
MAX_PODS = 100_000
#: A tag names events (`<tag>_start`, `<tag>_stop`: at most 100) and Kubernetes labels (63).
MAX_TAG_LENGTH = 63

#: Tags: letters, digits, `-` and `_`, starting with a letter or digit, at most MAX_TAG_LENGTH.
TAG_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_TAG_LENGTH - 1}}}$")

Scalar = str | int | float | bool
Runtime = Literal["local", "kubernetes"]
OnFailure = Literal["stop", "continue"]


class Condition(msgspec.Struct, forbid_unknown_fields=True):
    """`{name: EVENT, value: COUNT}`: met once EVENT has been registered COUNT times."""

    name: str
    value: Annotated[int, msgspec.Meta(ge=1)]


class Workflow(msgspec.Struct, forbid_unknown_fields=True):
    start: Condition | None = None
    stop: Condition | None = None


class EnvVar(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    value: Scalar = ""


class Resources(msgspec.Struct, forbid_unknown_fields=True):
    """Kubernetes container resources, e.g. `{requests: {cpu: 100m}, limits: {memory: 1Gi}}`."""

    requests: dict[str, str | int | float] | None = None
    limits: dict[str, str | int | float] | None = None


class MetricSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A metric of a tag: with `pattern`, samples read from the pods' log lines (group `value`
    the sample, group `ts` its time, other named groups its labels); `expected_interval_ms`
    declares the interval between samples, for coordination-omission correction."""

    name: str
    pattern: str | None = None
    expected_interval_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None


class TagSpec(msgspec.Struct, forbid_unknown_fields=True):
    tag: str
    image: str | None = None
    command: list[str] | str | None = None
    replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_PODS)] = 1
    env: list[EnvVar] | dict[str, Scalar] | None = None
    workflow: Workflow | None = None
    resources: Resources | None = None  # kubernetes runtime only
    metrics: list[MetricSpec] | None = None
    #: stop: the first failed pod fails the run and the rest are stopped after the grace
    #: period; continue: a failure is recorded and the run goes on.
    on_failure: OnFailure = "stop"
    #: Start pods again that die outside the workflow and outside a fault.
    restart: RestartPolicy | None = None


class Spec(msgspec.Struct, forbid_unknown_fields=True):
    experiment: Annotated[list[TagSpec], msgspec.Meta(min_length=1)]
    apiVersion: Literal["v1"] = "v1"
    name: str | None = None
    timeout: (
        Annotated[
            float,
            msgspec.Meta(ge=0, description="Seconds before the run is stopped; 0: no limit."),
        ]
        | None
    ) = None
    runtime: Runtime | None = None
    #: Faults injected when events reach counts (kill, pause, restart, delay, loss, partition).
    faults: list[FaultSpec] | None = None
    #: Seed of the faults' random choices of pods (default: drawn, and recorded).
    seed: int | None = None
    #: Where the local runtime starts pods, relative to the spec's directory (the default).
    workdir: str | None = None
    config: (
        Annotated[
            list[dict[str, Scalar]],
            msgspec.Meta(
                min_length=1,
                description="Configurations: each entry ($name: value) is one experiment, "
                "with $name replaced by value anywhere in the spec ($$ is a literal $). "
                "Combined with matrix: each entry is crossed with every point of the matrix.",
            ),
        ]
        | None
    ) = None
    matrix: (
        Annotated[
            dict[str, list[Scalar]],
            msgspec.Meta(
                description="$name: [values]: one configuration per point of the cartesian "
                "product (the first variable varies slowest); crossed with config if both.",
            ),
        ]
        | None
    ) = None
    repeat: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1, description="Runs of each configuration (up --repeat wins over it)."
            ),
        ]
        | None
    ) = None


@dataclass(frozen=True)
class Tag:
    """One validated tag: what a runtime needs to launch its pods."""

    tag: str
    replicas: int
    command: tuple[str, ...] | None
    image: str | None
    env: dict[str, str]
    start: Condition | None
    stop: Condition | None
    resources: dict[str, dict[str, str]] | None = None
    on_failure: str = "stop"
    metrics: tuple[MetricSpec, ...] = ()
    restart: RestartPolicy | None = None


@dataclass(frozen=True)
class Experiment:
    """A validated spec, ready to plan and run."""

    name: str
    tags: tuple[Tag, ...]
    timeout: float | None
    runtime: str | None
    source: str
    text: str
    base_dir: Path = field(default=Path("."))
    #: The configuration's values (no `$`), for a spec with `config:` or `matrix:`.
    variables: dict[str, Scalar] = field(default_factory=dict)
    faults: tuple[Fault, ...] = ()
    #: The seed the faults' random choices use (recorded in the journal).
    seed: int = 0

    def tag(self, name: str) -> Tag:
        return self._by_tag[name]

    @functools.cached_property
    def _by_tag(self) -> dict[str, Tag]:
        """Found once: a run asks for a tag at every pod's exit (thousands of tags, of pods)."""
        return {t.tag: t for t in self.tags}

    @functools.cached_property
    def lifecycle(self) -> frozenset[str]:
        """The coordinator's own events: `<tag>_start` and `<tag>_stop` of every tag."""
        return frozenset(e for t in self.tags for e in (start_event(t.tag), stop_event(t.tag)))

    @property
    def pod_count(self) -> int:
        return sum(t.replicas for t in self.tags)


# --- structural checks ---------------------------------------------------------------------

#: JSON Schema types by msgspec's names for them, in msgspec's order in a union.
_TYPE_NAMES = {
    "boolean": "bool",
    "integer": "int",
    "number": "float",
    "string": "str",
    "object": "object",
    "array": "array",
    "null": "null",
}
#: JSON Schema's bounds, as msgspec writes them.
_BOUNDS = {
    "minimum": (">=", operator.ge),
    "maximum": ("<=", operator.le),
    "exclusiveMinimum": (">", operator.gt),
    "exclusiveMaximum": ("<", operator.lt),
}
#: JSON Schema sorts a Literal's values; a message lists them as written.
_WRITTEN = {frozenset(typing.get_args(t)): typing.get_args(t) for t in (Runtime, OnFailure)}


@functools.cache
def _validator() -> Any:
    """The spec's JSON Schema, checked as msgspec checks it: 2.0 is no int, a number is a float
    only if a float can hold it, a bound is checked on a value of its type, and NaN is within
    no bound."""
    import jsonschema  # only for an invalid spec

    base = jsonschema.Draft202012Validator

    def bound(keyword: str) -> Any:
        shown, within = _BOUNDS[keyword]

        def check(validator: Any, limit: Any, instance: Any, schema: Any) -> Iterator[Any]:
            # only on a value of the bound's type (-0.5 for an int has one error, the type's);
            # NaN is within no bound
            typed = validator.is_type(instance, schema.get("type", "number"))
            if typed and not within(instance, limit):
                yield jsonschema.ValidationError(f"{instance!r} is not {shown} {limit}")

        return check

    types = base.TYPE_CHECKER.redefine_many(
        {
            "integer": lambda _, v: type(v) is int,
            "number": lambda _, v: type(v) is float or (type(v) is int and abs(v) < 2**1024),
        }
    )
    bounds = {keyword: bound(keyword) for keyword in _BOUNDS}
    cls = jsonschema.validators.extend(base, validators=bounds, type_checker=types)  # type: ignore[no-untyped-call]
    return cls(json_schema())


def _check_schema(data: Any, loc: _Located) -> None:
    """Every structural error, located by the path JSON Schema validation gives it."""
    # a mapping missing two keys has two `required` errors, and each names both
    seen: set[tuple[PathT, str]] = set()
    for error in _validator().iter_errors(data):
        for path, message, key in _messages(error):
            if (path, message) not in seen:
                seen.add((path, message))
                loc.at(path, message, key=key)


def _messages(error: Any) -> Iterator[tuple[PathT, str, bool]]:
    """(path, message, whether it is about the key) for one JSON Schema error."""
    path: PathT = tuple(error.absolute_path)
    kind, want, value, schema = error.validator, error.validator_value, error.instance, error.schema
    if kind == "anyOf":
        branch = _branch(error.context)
        if branch is not None:
            for inner in branch:
                yield from _messages(inner)
        else:
            wanted = [e.validator_value for e in error.context if _wrong_type(e)]
            yield path, _expected(wanted, value), False
    elif kind == "additionalProperties":
        known = list(schema.get("properties", {}))
        for name in value:
            if name not in known:
                yield (*path, name), _unknown_key(name, known), True
    elif kind == "required":
        for name in want:
            if name not in value:
                yield path, f"missing required key {name!r}", False
    elif kind == "type":
        yield path, _expected([want], value), False
    elif kind == "enum":
        allowed = ", ".join(map(str, _WRITTEN.get(frozenset(want), want)))
        yield path, f"expected one of {allowed}, got {_shown(value)}", False
    elif kind in _BOUNDS:
        typ = schema.get("type", "number")
        bound = float(want) if typ == "number" else want
        message = f"expected {_TYPE_NAMES.get(typ, typ)} {_BOUNDS[kind][0]} {bound}"
        if path[-1:] == ("replicas",) and kind == "maximum":
            message += f" (a run has at most {MAX_PODS} pods)"
        yield path, f"{message}, got {_shown(value)}", False
    elif kind == "minItems":
        yield path, f"needs at least {want} entr{'y' if want == 1 else 'ies'}", False
    else:  # a keyword the spec's schema does not use (yet)
        yield path, error.message, False


def _wrong_type(error: Any) -> bool:
    """Whether `error` says its schema is for another type of value than the one given."""
    return bool(error.validator == "type" and not error.relative_path)


def _branch(errors: list[Any]) -> list[Any] | None:
    """The errors of the first union member for the value's type (a list for a list...): the
    ones to report. None if no member is for that type."""
    branches: dict[Any, list[Any]] = {}
    for e in errors:
        branches.setdefault(e.relative_schema_path[0], []).append(e)
    fitting = (b for b in branches.values() if not any(map(_wrong_type, b)))
    return next(fitting, None)


def _expected(types: list[str], value: Any) -> str:
    types = sorted(set(types) - {"null"} or types, key=list(_TYPE_NAMES).index)
    if types in (["object"], ["array"]):
        shape = "a mapping" if types == ["object"] else "a list"
        return f"expected {shape}, got {_type_name(value)}"
    return f"expected {' | '.join(_TYPE_NAMES[t] for t in types)}, got {_shown(value)}"


def _unknown_key(name: str, known: list[str]) -> str:
    # a hint for a typo, not for a novel (difflib is quadratic in the key's length)
    hint = [] if len(name) > 40 else difflib.get_close_matches(name, known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown key {_shown(name)}{suggestion}; known keys: {', '.join(known)}"


# --- cross-field checks ------------------------------------------------------------------


def _check_semantics(data: Any, loc: _Located, runtime: str) -> None:
    """Checks across fields, on the raw data so they run even beside structural errors."""
    if not isinstance(data, dict) or not isinstance(data.get("experiment"), list):
        return
    entries = [(i, t) for i, t in enumerate(data["experiment"]) if isinstance(t, dict)]
    tags = {t["tag"] for _, t in entries if isinstance(t.get("tag"), str)}
    replicas = {t["tag"]: t.get("replicas", 1) for _, t in entries if isinstance(t.get("tag"), str)}
    seen: set[str] = set()
    for i, t in entries:
        p: PathT = ("experiment", i)
        tag = t.get("tag")
        if isinstance(tag, str):
            if not TAG_RE.match(tag):
                loc.at(
                    (*p, "tag"),
                    f"tag {_shown(tag)} must be 1 to {MAX_TAG_LENGTH} letters, digits, '-' or "
                    "'_', starting with a letter or digit (it names the events <tag>_start and "
                    "<tag>_stop, and Kubernetes labels)",
                )
            elif tag in seen:
                loc.at((*p, "tag"), f"duplicate tag {tag!r}")
            seen.add(tag)
        shown = _shown(tag) if isinstance(tag, str) else f"#{i}"
        if runtime == "local" and not t.get("command"):
            loc.at(p, f"tag {shown} has no 'command': the local runtime needs one")
        if runtime == "kubernetes" and not t.get("image"):
            loc.at(p, f"tag {shown} has no 'image': the kubernetes runtime needs one")
        _check_env(t.get("env"), (*p, "env"), loc)
        _check_metrics(t.get("metrics"), (*p, "metrics"), loc)
        _check_command(t.get("command"), (*p, "command"), loc)
        workflow = t.get("workflow")
        for which in ("start", "stop"):
            cond = workflow.get(which) if isinstance(workflow, dict) else None
            name = cond.get("name") if isinstance(cond, dict) else None
            if isinstance(name, str):
                _check_condition(name, which, tag, tags, (*p, "workflow", which, "name"), loc)
                _check_reachable(cond, replicas, (*p, "workflow", which, "value"), loc)
    _check_pods(entries, loc)
    _check_faults(data.get("faults"), tags, replicas, loc)


def _check_faults(faults: Any, tags: set[str], replicas: dict[str, Any], loc: _Located) -> None:
    """A fault's event is checked as a workflow's start; the rest in `faults.problems`."""
    for i, f in enumerate(faults if isinstance(faults, list) else []):
        when = f.get("when") if isinstance(f, dict) else None
        name = when.get("name") if isinstance(when, dict) else None
        if isinstance(name, str):
            _check_condition(name, "fault", None, tags, ("faults", i, "when", "name"), loc)
            _check_reachable(when, replicas, ("faults", i, "when", "value"), loc)
    counts = {t: n for t, n in replicas.items() if type(n) is int}
    for path, message in fault_problems(faults, counts):
        loc.at(path, message)


def _pods(t: dict[str, Any]) -> int:
    """A tag's replicas when valid (an invalid count has its own error), else 0."""
    n = t.get("replicas", 1)
    return n if type(n) is int and 1 <= n <= MAX_PODS else 0


def _check_pods(entries: list[tuple[int, dict[str, Any]]], loc: _Located) -> None:
    """Every pod is a process or a Kubernetes pod, and `up` plans them all at once."""
    total = sum(_pods(t) for _, t in entries)
    if total <= MAX_PODS:
        return
    running = 0
    for i, t in entries:
        running += _pods(t)
        if running > MAX_PODS:
            where: PathT = ("experiment", i, "replicas") if "replicas" in t else ("experiment", i)
            loc.at(where, f"the run would have {total} pods; a run has at most {MAX_PODS} pods")
            return


def _bad_text(value: str) -> str | None:
    """Why a process cannot be given `value` (in its environment or arguments), if it cannot."""
    bad = _UNFIT.search(value)
    if bad is None:
        return None
    return "a NUL character" if bad.group() == "\0" else "a lone surrogate (not UTF-8)"


def _check_env(env: Any, path: PathT, loc: _Located) -> None:
    """Reserved names, and what `execve` refuses: `=` or NUL in a name, NUL in a value."""
    if isinstance(env, list):
        items = [
            ((*path, j, "name"), e.get("name"), False, (*path, j, "value"), e.get("value"))
            for j, e in enumerate(env)
            if isinstance(e, dict)
        ]
    elif isinstance(env, dict):
        items = [((*path, k), k, True, (*path, k), v) for k, v in env.items()]
    else:
        return
    for where, name, is_key, value_at, value in items:
        # a non-string name is a type error msgspec reports; only strings can be reserved
        if isinstance(name, str):
            if name in envnames.RESERVED:
                message = f"env {name!r} is set by tricks-nats and may not be overridden"
            elif not name:
                message = "an env name may not be empty"
            elif "=" in name:
                message = f"env name {_shown(name)} may not contain '='"
            elif (bad := _bad_text(name)) is not None:
                message = f"env name {_shown(name)} may not contain {bad}"
            else:
                message = ""
            if message:
                loc.at(where, message, key=is_key)
        if isinstance(value, str) and (bad := _bad_text(value)) is not None:
            loc.at(value_at, f"an env value may not contain {bad}")


def _check_metrics(metrics: Any, path: PathT, loc: _Located) -> None:
    """Names are event names; a pattern compiles, has a group `value`, and its other named
    groups are label keys (or `ts`)."""
    seen: set[str] = set()
    for j, m in enumerate(metrics if isinstance(metrics, list) else []):
        if not isinstance(m, dict):
            continue
        name, pattern = m.get("name"), m.get("pattern")
        if isinstance(name, str):
            if not NAME_RE.match(name):
                loc.at(
                    (*path, j, "name"),
                    f"metric name {_shown(name)} must be letters, digits, '-' or '_' "
                    "(starting with a letter or digit, at most 100)",
                )
            elif name in seen:
                loc.at((*path, j, "name"), f"metric {name!r} is declared twice in this tag")
            seen.add(name)
        if isinstance(pattern, str):
            problem = pattern_problem(pattern)
            if problem is not None:
                loc.at((*path, j, "pattern"), problem)


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot read samples from log lines, if it cannot."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"bad pattern {_shown(pattern)}: {exc}"
    groups = set(compiled.groupindex)
    if "value" not in groups:
        return f"pattern {_shown(pattern)} has no group (?P<value>...) for the sample's value"
    for group in sorted(groups - {"value", "ts"}):
        if not LABEL_RE.match(group) or group in RESERVED_LABELS:
            return (
                f"pattern group {group!r} cannot be a label: use a name other than "
                f"{', '.join(sorted(RESERVED_LABELS - {'value', 'ts'}))}"
            )
    return None


def _check_command(command: Any, path: PathT, loc: _Located) -> None:
    items = [(path, command)] if isinstance(command, str) else []
    if isinstance(command, list):
        items = [((*path, j), c) for j, c in enumerate(command) if isinstance(c, str)]
    for where, text in items:
        if (bad := _bad_text(text)) is not None:
            loc.at(where, f"a command may not contain {bad}")


def _env_as_written(data: Any, loc: _Located) -> None:
    """Env values are text, exactly as written: YAML 1.1 reads `010` as 8, `0x1F` as 31, `1_000`
    as 1000, `yes` and `on` as true and `12:30` as 750; a plain env value keeps its source text.
    """
    tags = data.get("experiment") if isinstance(data, dict) else None
    for t in tags if isinstance(tags, list) else []:
        env = t.get("env") if isinstance(t, dict) else None
        mappings = [env] if isinstance(env, dict) else env if isinstance(env, list) else []
        for m in mappings:
            raw = loc.raw.get(id(m), {}) if isinstance(m, dict) else {}
            for key, text in raw.items():
                if m is env or key == "value":
                    m[key] = text


def _check_reachable(cond: Any, replicas: dict[str, Any], path: PathT, loc: _Located) -> None:
    """`<tag>_start`/`<tag>_stop` count pods: they can never exceed the tag's replicas."""
    name, value = cond.get("name"), cond.get("value")
    if not isinstance(name, str) or not isinstance(value, int) or isinstance(value, bool):
        return
    for suffix in ("_start", "_stop"):
        owner = name[: -len(suffix)] if name.endswith(suffix) else None
        have = replicas.get(owner) if owner else None
        if isinstance(have, int) and not isinstance(have, bool) and 1 <= have < value:
            loc.at(
                path,
                f"{name!r} can never reach {value}: tag {owner!r} has {have} "
                f"replica{'s' if have != 1 else ''}",
            )


def _check_condition(
    name: str, which: str, tag: Any, tags: set[str], path: PathT, loc: _Located
) -> None:
    if not NAME_RE.match(name):
        loc.at(
            path,
            f"event name {_shown(name)} must be letters, digits, '-' or '_' "
            "(starting with a letter or digit, at most 100)",
        )
        return
    for suffix in ("_start", "_stop"):
        if name.endswith(suffix):
            owner = name[: -len(suffix)]
            if owner not in tags:
                loc.at(path, f"{name!r} refers to tag {owner!r}, which does not exist")
            elif which == "start" and owner == tag:
                loc.at(path, f"tag {tag!r} cannot wait for its own {suffix[1:]}")


def _env_names(t: TagSpec) -> list[str]:
    if isinstance(t.env, list):
        return [e.name for e in t.env]
    return list(t.env or {})


def _env_dict(t: TagSpec) -> dict[str, str]:
    items = [(e.name, e.value) for e in t.env] if isinstance(t.env, list) else (t.env or {}).items()
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in items}


def _resources(t: TagSpec) -> dict[str, dict[str, str]] | None:
    if t.resources is None:
        return None
    out = {
        which: {k: str(v) for k, v in values.items()}
        for which, values in (("requests", t.resources.requests), ("limits", t.resources.limits))
        if values
    }
    return out or None


def _command(t: TagSpec) -> tuple[str, ...] | None:
    if t.command is None:
        return None
    if isinstance(t.command, str):
        return ("/bin/sh", "-c", t.command)
    return tuple(t.command)


# --- entry points --------------------------------------------------------------------------


def parse(
    text: str, source: str = "<spec>", *, runtime: str | None = None, base_dir: Path | None = None
) -> Experiment:
    """Validate `text`; raise SpecError with EVERY located problem, or return the experiment.

    `runtime` (e.g. from `--runtime`) wins over the spec's own `runtime:`; default local.
    """
    with _collector_paused():
        return _parse(text, source, runtime, base_dir)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """A spec builds many containers and no cycle: the cyclic garbage collector would walk them
    again and again as they pile up (a third of the time of a large spec), for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse(text: str, source: str, runtime: str | None, base_dir: Path | None) -> Experiment:
    data, loc = _compose(text, source)
    if loc.errors:
        raise SpecError(loc.errors)
    _env_as_written(data, loc)
    if isinstance(data, dict) and ("config" in data or "matrix" in data):
        loc.at(
            ("config" if "config" in data else "matrix",),
            "this spec defines variables, so it is a campaign of experiments: run it with "
            "tricks-nats up (or read it with tricks_nats.study.load)",
            key=True,
        )
        raise SpecError(loc.errors)
    spec, chosen, where = validate_data(data, loc, runtime, base_dir)
    if spec is None:
        raise SpecError(loc.errors)
    return experiment_of(spec, chosen, source, text, where)


#: Fields of a tag whose values are text (a variable there is its value as written).
_TAG_TEXT = frozenset({"tag", "image", "command", "env"})


def wants_text(path: PathT) -> bool:
    """Whether the spec wants text at `path` (names, images, commands, env values...)."""
    if len(path) == 1:
        return path[0] in ("name", "workdir", "apiVersion")
    if path[0] == "faults":
        return path[-1] in ("name", "tag", "signal")
    if path[0] != "experiment" or len(path) < 3:
        return False
    field = path[2]
    return field in _TAG_TEXT or (
        field in ("workflow", "metrics") and path[-1] in ("name", "pattern")
    )


def validate_data(
    data: Any, loc: _Located, runtime: str | None, base_dir: Path | None
) -> tuple[Spec | None, str, Path]:
    """The spec (None: every problem is in `loc`), the runtime chosen, and where pods start
    (`workdir`, relative to `base_dir`, the spec's directory)."""
    declared = data.get("runtime") if isinstance(data, dict) else None
    chosen = runtime or (declared if declared in ("local", "kubernetes") else None) or "local"
    spec: Spec | None = None
    where = base_dir or Path(".")
    with contextlib.suppress(_TooMany):
        try:  # fast, and enough for a valid spec; the schema finds (and places) every error
            spec = msgspec.convert(data, Spec)
        except msgspec.ValidationError as exc:
            _check_schema(data, loc)
            if not loc.found:  # the schema should find what msgspec found; never hide it
                loc.add(1, 1, f"invalid spec: {exc}")
        _check_semantics(data, loc, chosen)
        if spec is not None and spec.workdir is not None:
            where = where / spec.workdir
            if not where.is_dir():
                loc.at(("workdir",), f"workdir {spec.workdir!r}: no such directory ({where})")
    return (None if loc.found else spec), chosen, where


def experiment_of(
    spec: Spec,
    chosen: str,
    source: str,
    text: str,
    base_dir: Path,
    variables: dict[str, Scalar] | None = None,
) -> Experiment:
    stem = Path(source).stem if source and not source.startswith("<") else "experiment"
    tags = tuple(
        Tag(
            tag=t.tag,
            replicas=t.replicas,
            command=_command(t),
            image=t.image,
            env=_env_dict(t),
            start=t.workflow.start if t.workflow else None,
            stop=t.workflow.stop if t.workflow else None,
            resources=_resources(t),
            on_failure=t.on_failure,
            metrics=tuple(t.metrics or ()),
            restart=t.restart,
        )
        for t in spec.experiment
    )
    seed = spec.seed if spec.seed is not None else (secrets.randbelow(2**31) if spec.faults else 0)
    return Experiment(
        name=spec.name or stem,
        tags=tags,
        timeout=spec.timeout or None,  # 0: no limit, as `up --timeout 0`
        runtime=chosen,
        source=source,
        text=text,
        base_dir=base_dir,
        variables=dict(variables or {}),
        faults=tuple(of_spec(i, f, seed) for i, f in enumerate(spec.faults or ())),
        seed=seed,
    )


def load(path: str | Path, *, runtime: str | None = None) -> Experiment:
    """Read and validate a spec file; a missing or unreadable file is a SpecError too."""
    text = read(path)
    return parse(text, str(path), runtime=runtime, base_dir=Path(path).resolve().parent)


def read(path: str | Path) -> str:
    """A spec file's text; a missing, unreadable, huge or non-UTF-8 file is a SpecError."""
    p = Path(path)
    try:
        with p.open("rb") as f:  # not read_bytes: /dev/zero must not fill the memory
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"{path}: cannot read the spec: {exc.strerror or exc}"]) from exc
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"{path}:1:1: {_too_big()}"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}:1:1: the spec is not UTF-8 text ({exc.reason})"]) from exc
    return text


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema, for editors (`tricks-nats schema`)."""
    return msgspec.json.schema(Spec)


__all__ = [
    "MAX_PODS",
    "MAX_TAG_LENGTH",
    "TAG_RE",
    "Condition",
    "Experiment",
    "Spec",
    "Tag",
    "json_schema",
    "load",
    "parse",
    "start_event",
    "stop_event",
]
