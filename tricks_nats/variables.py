"""Tricks' `config:` variables: `$var` in a spec, one configuration per entry (or per point of a
`matrix:`), each configuration one experiment. Pure: data in, data out, located errors.

A variable stands for a whole scalar (`replicas: $clients` keeps the value's type) or for a part
of a string (`"--ops=$ops"`, `"${ops}x"`); `$$` is a literal `$`. Only a spec with `config:` or
`matrix:` has variables: a plain spec's `$HOME` is left alone.

Substitution is done in place on the data the YAML reader built, because every error position
hangs off the identity of its mapping or list: replacing scalars (never containers) keeps every
error located in the user's file, for every configuration. `Sites.apply` returns what `restore`
needs to put the original text back.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tricks_nats.located_yaml import PathT, _Located, _shown

Scalar = str | int | float | bool

#: `$name`, `${name}` or `$$`.
_REF = re.compile(r"\$(?:(\$)|([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\})")
#: A key of a `config:` entry or of `matrix:`.
_DEFINED = re.compile(r"^\$[A-Za-z_][A-Za-z0-9_]*$")
#: The keys that define variables and repetitions (never substituted themselves).
CAMPAIGN_KEYS = ("config", "matrix", "repeat")
#: Runs one campaign may have (configurations times repetitions).
MAX_RUNS = 100_000


def is_campaign(data: Any) -> bool:
    """Whether the spec defines variables (`config:` or `matrix:`)."""
    return isinstance(data, dict) and ("config" in data or "matrix" in data)


def render(value: Scalar) -> str:
    """A value inside a string, as YAML writes it (`true`, not `True`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def label(variables: Mapping[str, Scalar]) -> str:
    """`$a=1, $b=x`: a configuration as a user reads it."""
    return ", ".join(f"${k}={render(v)}" for k, v in variables.items())


@dataclass(frozen=True)
class Configuration:
    """One set of values; `line` is where its `config:` entry is written (0: from matrix only)."""

    index: int
    variables: dict[str, Scalar]
    line: int = 0
    #: Each value as written (`1.10`, `010`, `yes`), for use inside text and in env values.
    texts: dict[str, str] = field(default_factory=dict)

    def text(self, name: str) -> str:
        return self.texts.get(name) or render(self.variables[name])

    @property
    def shown(self) -> str:
        where = f", line {self.line}" if self.line else ""
        shown = ", ".join(f"${k}={self.text(k)}" for k in self.variables) or "no variables"
        return f"configuration {self.index + 1} ({shown}{where})"


# --- uses --------------------------------------------------------------------------------------


@dataclass
class _Site:
    container: Any  # the dict or list holding the string
    key: Any
    path: PathT
    text: str
    #: The variable when the string is exactly one reference (it takes the value's type).
    whole: str | None
    names: tuple[str, ...]


class Sites:
    """Every string of a spec that references a variable or holds `$$`."""

    def __init__(self, sites: list[_Site]) -> None:
        self._sites = sites

    @classmethod
    def find(cls, data: Any) -> Sites:
        """Walk the spec once, outside `config`, `matrix` and `repeat`; a container shared
        through an alias is walked once."""
        found: list[_Site] = []
        seen: set[int] = set()
        top = [(k, v) for k, v in data.items() if k not in CAMPAIGN_KEYS]
        stack: list[tuple[Any, Any, Any, PathT]] = [(data, k, v, (k,)) for k, v in reversed(top)]
        while stack:
            container, key, value, path = stack.pop()
            if isinstance(value, str):
                if "$" in value:
                    site = _site(container, key, path, value)
                    if site is not None:
                        found.append(site)
            elif isinstance(value, dict | list) and id(value) not in seen:
                seen.add(id(value))
                items = value.items() if isinstance(value, dict) else enumerate(value)
                stack.extend((value, k, v, (*path, k)) for k, v in reversed(list(items)))
        return cls(found)

    def uses(self) -> dict[str, list[PathT]]:
        """Each variable used, with where."""
        out: dict[str, list[PathT]] = {}
        for s in self._sites:
            for name in s.names:
                out.setdefault(name, []).append(s.path)
        return out

    def apply(self, config: Configuration, wants_text: Callable[[PathT], bool]) -> None:
        """Put a configuration's values in every site (one it lacks stays as written). A whole
        scalar takes the value's type, except where the spec wants text (`wants_text`): there
        it is the value as written."""
        values = config.variables
        for s in self._sites:
            if s.whole is not None and not wants_text(s.path):
                if s.whole in values:
                    s.container[s.key] = values[s.whole]
            else:
                s.container[s.key] = _REF.sub(lambda m: _expand(m, config), s.text)

    def restore(self) -> None:
        for s in self._sites:
            s.container[s.key] = s.text


def _site(container: Any, key: Any, path: PathT, text: str) -> _Site | None:
    refs = list(_REF.finditer(text))
    if not refs:
        return None
    names = tuple(dict.fromkeys(m.group(2) or m.group(3) for m in refs if not m.group(1)))
    whole = None
    if len(refs) == 1 and refs[0].span() == (0, len(text)) and not refs[0].group(1):
        whole = names[0]
    return _Site(container, key, path, text, whole, names)


def _expand(m: re.Match[str], config: Configuration) -> str:
    if m.group(1):
        return "$"
    name = m.group(2) or m.group(3)
    return config.text(name) if name in config.variables else m.group()


# --- definitions -------------------------------------------------------------------------------


def configurations(data: dict[str, Any], loc: _Located) -> list[Configuration]:
    """The configurations `config:` and `matrix:` define (each config entry crossed with the
    matrix, the matrix's first variable varying slowest), their shapes checked; errors go to
    `loc`."""
    entries = _config_entries(data, loc)
    axes = _matrix(data, loc)
    if "config" in data and "matrix" in data:
        both = {k for _, e in entries for k in e} & set(axes)
        for name in sorted(both):
            loc.at(
                ("matrix", f"${name}"), f"${name} is defined in both config and matrix", key=True
            )
    names = list(axes)
    points = itertools.product(*(axes[n] for n in names))
    grid = [dict(zip(names, p, strict=True)) for p in points]
    bases = entries if "config" in data else [(0, {})]
    out: list[Configuration] = []
    if len(bases) * len(grid) > MAX_RUNS:
        loc.at(("matrix",) if axes else ("config",), f"more than {MAX_RUNS} configurations")
        return out
    for line, entry in bases:
        for point in grid:
            values = {
                **{k: v for k, (v, _) in entry.items()},
                **{k: v for k, (v, _) in point.items()},
            }
            texts = {k: t for k, (_, t) in (*entry.items(), *point.items()) if t is not None}
            out.append(Configuration(len(out), values, line, texts))
    return out


_Valued = dict[str, tuple[Scalar, str | None]]  # name -> (value, its text when not a string)


def _config_entries(data: dict[str, Any], loc: _Located) -> list[tuple[int, _Valued]]:
    config = data.get("config")
    if "config" not in data:
        return []
    if not isinstance(config, list) or not config:
        loc.at(("config",), "config: expected a non-empty list of mappings ($name: value)")
        return []
    entries = []
    for i, entry in enumerate(config):
        if not isinstance(entry, dict):
            loc.at(("config", i), f"expected a mapping ($name: value), got {_shown(entry)}")
            continue
        raw = loc.raw.get(id(entry), {})
        values: _Valued = {}
        for key, value in entry.items():
            name = _definition(key, ("config", i, key), loc)
            if name is not None and _value_ok(value, ("config", i, key), loc):
                values[name] = (value, raw.get(key))
        entries.append((loc.where(("config", i))[0], values))
    return entries


def _matrix(data: dict[str, Any], loc: _Located) -> dict[str, list[tuple[Scalar, str | None]]]:
    matrix = data.get("matrix")
    if "matrix" not in data:
        return {}
    if not isinstance(matrix, dict) or not matrix:
        loc.at(("matrix",), "matrix: expected a mapping of $name: [values]")
        return {}
    axes = {}
    for key, values in matrix.items():
        name = _definition(key, ("matrix", key), loc)
        if not isinstance(values, list) or not values:
            loc.at(("matrix", key), f"{_shown(key)}: expected a non-empty list of values")
            continue
        raw = loc.raw.get(id(values), {})
        if name is not None and all(
            _value_ok(v, ("matrix", key, j), loc) for j, v in enumerate(values)
        ):
            axes[name] = [(v, raw.get(str(j))) for j, v in enumerate(values)]
    return axes


def _definition(key: Any, path: PathT, loc: _Located) -> str | None:
    if isinstance(key, str) and _DEFINED.match(key):
        return key[1:]
    loc.at(
        path,
        f"{_shown(key)} is not a variable: write $ then letters, digits or '_' ($op_number)",
        key=True,
    )
    return None


def _value_ok(value: Any, path: PathT, loc: _Located) -> bool:
    if isinstance(value, str | int | float | bool):
        return True
    loc.at(path, f"a variable's value is a number, a string or a boolean, got {_shown(value)}")
    return False


def repeat(data: dict[str, Any], loc: _Located) -> int:
    """`repeat: N` (default 1): each configuration is run N times."""
    n = data.get("repeat", 1)
    if type(n) is not int or not 1 <= n <= MAX_RUNS:
        loc.at(("repeat",), f"repeat: expected an integer from 1 to {MAX_RUNS}, got {_shown(n)}")
        return 1
    return n


def check_uses(sites: Sites, configs: Sequence[Configuration], loc: _Located) -> None:
    """A variable used but missing from a configuration, or defined but never used."""
    uses = sites.uses()
    for name, paths in uses.items():
        missing = [c for c in configs if name not in c.variables]
        if not missing:
            continue
        if len(missing) == len(configs):
            message = f"${name} is not defined in any configuration"
        else:
            shown = "; ".join(c.shown for c in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            message = f"${name} is not defined in {shown}{more}"
        for path in paths:
            loc.at(path, f"{message} (a literal $ is written $$)")
    for path, name in _definitions(loc.root):
        if name not in uses:
            loc.at(path, f"${name} is defined but never used", key=True)


def _definitions(data: dict[str, Any]) -> Iterator[tuple[PathT, str]]:
    seen: set[str] = set()
    config = data.get("config")
    for i, entry in enumerate(config if isinstance(config, list) else []):
        for key in entry if isinstance(entry, dict) else ():
            if isinstance(key, str) and _DEFINED.match(key) and key not in seen:
                seen.add(key)
                yield ("config", i, key), key[1:]
    matrix = data.get("matrix")
    for key in matrix if isinstance(matrix, dict) else ():
        if isinstance(key, str) and _DEFINED.match(key) and key not in seen:
            seen.add(key)
            yield ("matrix", key), key[1:]
