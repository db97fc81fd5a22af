"""The experiment spec (Tricks format): parse, default and validate. Pure, no I/O but reading text.

msgspec stops at the first error and reports a path, not a line. Users want every mistake at once,
each pointing into their file, so we compose the YAML ourselves (keeping each node's position),
walk the msgspec types collecting every error, and only then convert.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from tricks_nats import env as envnames
from tricks_nats.errors import SpecError
from tricks_nats.protocol import NAME_RE, start_event, stop_event

Scalar = str | int | float | bool
PathT = tuple[str | int, ...]


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


class TagSpec(msgspec.Struct, forbid_unknown_fields=True):
    tag: str
    image: str | None = None
    command: list[str] | str | None = None
    replicas: Annotated[int, msgspec.Meta(ge=1)] = 1
    env: list[EnvVar] | dict[str, Scalar] | None = None
    workflow: Workflow | None = None
    resources: Resources | None = None  # kubernetes runtime only
    #: stop: the first failed pod fails the run and the rest are stopped after the grace
    #: period; continue: a failure is recorded and the run goes on.
    on_failure: Literal["stop", "continue"] = "stop"


class Spec(msgspec.Struct, forbid_unknown_fields=True):
    experiment: Annotated[list[TagSpec], msgspec.Meta(min_length=1)]
    apiVersion: Literal["v1"] = "v1"
    name: str | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    runtime: Literal["local", "kubernetes"] | None = None


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

    def tag(self, name: str) -> Tag:
        return next(t for t in self.tags if t.tag == name)

    @property
    def pod_count(self) -> int:
        return sum(t.replicas for t in self.tags)


# --- YAML with positions -------------------------------------------------------------------


class _Located:
    """Python data built from YAML nodes, plus the (line, col) of every value and every key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.values: dict[PathT, tuple[int, int]] = {}
        self.keys: dict[PathT, tuple[int, int]] = {}
        self.found: list[tuple[int, int, str]] = []

    @property
    def errors(self) -> list[str]:
        """Every problem as `FILE:LINE:COL: message`, in file order."""
        return [f"{self.source}:{ln}:{col}: {msg}" for ln, col, msg in sorted(self.found)]

    def add(self, line: int, col: int, message: str) -> None:
        self.found.append((line, col, message))

    def at(self, path: PathT, message: str, *, key: bool = False) -> None:
        where = (self.keys.get(path) if key else None) or self.values.get(path)
        probe = path
        while where is None and probe:
            probe = probe[:-1]
            where = self.values.get(probe)
        line, col = where or (1, 1)
        shown = _dotted(path)
        prefix = f"{shown}: " if shown else ""
        self.add(line, col, f"{prefix}{message}")


def _dotted(path: PathT) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: PathT, loc: _Located) -> Any:
    loc.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                loc.values[(*path, str(key))] = _mark(key_node)
                loc.at((*path, str(key)), f"keys must be strings, got {key!r}")
                continue
            child = (*path, key)
            loc.keys[child] = _mark(key_node)
            if key in out:
                loc.at(child, f"duplicate key {key!r}", key=True)
                continue
            out[key] = _build(loader, value_node, child, loc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*path, i), loc) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _compose(text: str, source: str) -> tuple[Any, _Located]:
    loc = _Located(source)
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        loc.add(1, 1, f"YAML error: {exc.reason if hasattr(exc, 'reason') else exc}")
        return None, loc
    try:
        node = loader.get_single_node()
        if node is None:
            loc.add(1, 1, "the spec is empty")
            return None, loc
        return _build(loader, node, (), loc), loc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        loc.add(line, col, f"YAML syntax error: {what}")
    except yaml.YAMLError as exc:
        loc.add(1, 1, f"YAML error: {exc}")
    except RecursionError:
        loc.add(1, 1, "the spec is nested too deeply")
    finally:
        loader.dispose()
    return None, loc


# --- schema walk ---------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _check(value: Any, typ: Any, path: PathT, loc: _Located) -> None:
    info = msgspec.inspect.type_info(typ)
    if isinstance(info, msgspec.inspect.StructType):
        _check_struct(value, info, path, loc)
    elif isinstance(info, msgspec.inspect.ListType):
        if not isinstance(value, list):
            loc.at(path, f"expected a list, got {_type_name(value)}")
            return
        if info.min_length and len(value) < info.min_length:
            loc.at(path, f"needs at least {info.min_length} entry")
        item_type = _list_item(typ)
        for i, item in enumerate(value):
            _check(item, item_type, (*path, i), loc)
    elif isinstance(info, msgspec.inspect.UnionType):
        _check_union(value, typ, info, path, loc)
    else:
        _check_leaf(value, typ, path, loc)


def _list_item(typ: Any) -> Any:
    if typing.get_origin(typ) is Annotated:
        typ = typing.get_args(typ)[0]
    return typing.get_args(typ)[0]


def _check_struct(value: Any, info: msgspec.inspect.StructType, path: PathT, loc: _Located) -> None:
    if not isinstance(value, dict):
        loc.at(path, f"expected a mapping, got {_type_name(value)}")
        return
    names = {f.encode_name: f for f in info.fields}
    for key in value:
        if key not in names:
            hint = difflib.get_close_matches(key, list(names), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            known = ", ".join(names)
            loc.at((*path, key), f"unknown key {key!r}{suggestion}; known keys: {known}", key=True)
    for name, f in names.items():
        if name in value:
            if value[name] is None and f.default is None:
                continue
            _check(value[name], _field_type(info.cls, f.name), (*path, name), loc)
        elif f.required:
            loc.at(path, f"missing required key {name!r}")


def _field_type(cls: type, attr: str) -> Any:
    return typing.get_type_hints(cls, include_extras=True)[attr]


def _check_union(
    value: Any, typ: Any, info: msgspec.inspect.UnionType, path: PathT, loc: _Located
) -> None:
    options = [a for a in typing.get_args(typ) if a is not type(None)]
    if value is None and len(options) < len(typing.get_args(typ)):
        return
    # Descend into the option that matches the value's shape, for located inner errors.
    for option in options:
        origin = typing.get_origin(option) or option
        if isinstance(value, list) and origin is list:
            _check(value, option, path, loc)
            return
        if isinstance(value, dict) and (
            origin is dict or (isinstance(origin, type) and issubclass(origin, msgspec.Struct))
        ):
            if origin is dict:
                _check_dict(value, option, path, loc)
            else:
                _check(value, option, path, loc)
            return
    _check_leaf(value, typ, path, loc)


def _check_dict(value: dict[Any, Any], typ: Any, path: PathT, loc: _Located) -> None:
    _, value_type = typing.get_args(typ)
    for key, item in value.items():
        _check_leaf(item, value_type, (*path, key), loc)


def _check_leaf(value: Any, typ: Any, path: PathT, loc: _Located) -> None:
    try:
        msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        message = str(exc).split(" - at `", 1)[0].split(", got ", 1)[0].replace("`", "")
        message = message.replace(" | null", "")
        if message.startswith("Invalid enum value"):
            options = [typ, *typing.get_args(typ)]
            literals = [
                a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)
            ]
            allowed = ", ".join(map(str, literals))
            message = f"expected one of {allowed}"
        message = message[0].lower() + message[1:] if message else "invalid value"
        loc.at(path, f"{message}, got {value!r}")


# --- cross-field checks ------------------------------------------------------------------


def _check_semantics(data: Any, loc: _Located, runtime: str) -> None:
    """Checks across fields, on the raw data so they run even beside structural errors."""
    if not isinstance(data, dict) or not isinstance(data.get("experiment"), list):
        return
    entries = [(i, t) for i, t in enumerate(data["experiment"]) if isinstance(t, dict)]
    tags = [t["tag"] for _, t in entries if isinstance(t.get("tag"), str)]
    replicas = {t["tag"]: t.get("replicas", 1) for _, t in entries if isinstance(t.get("tag"), str)}
    seen: set[str] = set()
    for i, t in entries:
        p: PathT = ("experiment", i)
        tag = t.get("tag")
        if isinstance(tag, str):
            if not NAME_RE.match(tag):
                loc.at(
                    (*p, "tag"),
                    f"tag {tag!r} must be letters, digits, '-' or '_' "
                    "(starting with a letter or digit, at most 100)",
                )
            elif tag in seen:
                loc.at((*p, "tag"), f"duplicate tag {tag!r}")
            seen.add(tag)
        shown = repr(tag) if isinstance(tag, str) else f"#{i}"
        if runtime == "local" and not t.get("command"):
            loc.at(p, f"tag {shown} has no 'command': the local runtime needs one")
        if runtime == "kubernetes" and not t.get("image"):
            loc.at(p, f"tag {shown} has no 'image': the kubernetes runtime needs one")
        _check_env_names(t.get("env"), (*p, "env"), loc)
        workflow = t.get("workflow")
        for which in ("start", "stop"):
            cond = workflow.get(which) if isinstance(workflow, dict) else None
            name = cond.get("name") if isinstance(cond, dict) else None
            if isinstance(name, str):
                _check_condition(name, which, tag, tags, (*p, "workflow", which, "name"), loc)
                _check_reachable(cond, replicas, (*p, "workflow", which, "value"), loc)


def _check_env_names(env: Any, path: PathT, loc: _Located) -> None:
    if isinstance(env, list):
        named = [
            ((*path, j, "name"), e.get("name"), False)
            for j, e in enumerate(env)
            if isinstance(e, dict)
        ]
    elif isinstance(env, dict):
        named = [((*path, k), k, True) for k in env]
    else:
        return
    for where, name, is_key in named:
        # a non-string name is a type error msgspec reports; only strings can be reserved
        if isinstance(name, str) and name in envnames.RESERVED:
            loc.at(
                where, f"env {name!r} is set by tricks-nats and may not be overridden", key=is_key
            )


def _check_reachable(cond: Any, replicas: dict[str, Any], path: PathT, loc: _Located) -> None:
    """`<tag>_start`/`<tag>_stop` count pods: they can never exceed the tag's replicas."""
    name, value = cond.get("name"), cond.get("value")
    if not isinstance(name, str) or not isinstance(value, int) or isinstance(value, bool):
        return
    for suffix in ("_start", "_stop"):
        owner = name[: -len(suffix)] if name.endswith(suffix) else None
        have = replicas.get(owner) if owner else None
        if isinstance(have, int) and not isinstance(have, bool) and value > have:
            loc.at(
                path,
                f"{name!r} can never reach {value}: tag {owner!r} has {have} "
                f"replica{'s' if have != 1 else ''}",
            )


def _check_condition(
    name: str, which: str, tag: Any, tags: list[str], path: PathT, loc: _Located
) -> None:
    if not NAME_RE.match(name):
        loc.at(
            path,
            f"event name {name!r} must be letters, digits, '-' or '_' "
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
    data, loc = _compose(text, source)
    if loc.errors:
        raise SpecError(loc.errors)
    _check(data, Spec, (), loc)
    declared = data.get("runtime") if isinstance(data, dict) else None
    chosen = runtime or (declared if declared in ("local", "kubernetes") else None) or "local"
    _check_semantics(data, loc, chosen)
    if loc.errors:
        raise SpecError(loc.errors)
    spec = msgspec.convert(data, Spec)
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
        )
        for t in spec.experiment
    )
    return Experiment(
        name=spec.name or stem,
        tags=tags,
        timeout=spec.timeout,
        runtime=chosen,
        source=source,
        text=text,
        base_dir=base_dir or Path("."),
    )


def load(path: str | Path, *, runtime: str | None = None) -> Experiment:
    """Read and validate a spec file; a missing or unreadable file is a SpecError too."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError([f"{path}: cannot read the spec: {exc.strerror or exc}"]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}:1:1: the spec is not UTF-8 text ({exc.reason})"]) from exc
    return parse(text, str(path), runtime=runtime, base_dir=p.resolve().parent)


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema, for editors (`tricks-nats schema`)."""
    return msgspec.json.schema(Spec)


def conditions(exp: Experiment) -> list[tuple[Tag, str, Condition]]:
    """Every (tag, 'start'|'stop', condition) of the experiment."""
    out = []
    for t in exp.tags:
        if t.start:
            out.append((t, "start", t.start))
        if t.stop:
            out.append((t, "stop", t.stop))
    return out


__all__ = [
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
