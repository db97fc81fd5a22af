"""YAML with positions: Python data built from the parser's events, and where each value was
written, so every spec error points into the user's file (`FILE:LINE:COL: message`).

Linear in the text and bounded: one pass over the events with no recursion, aliased values
shared (never rebuilt), and the MAX_* bounds below are located errors like any other.
"""

from __future__ import annotations

import re
import reprlib
import types
from collections.abc import Hashable
from typing import Any

import yaml

#: Bounds on what YAML may make, so that no spec can exhaust the machine.
#: The spec file itself (a bigger one, or /dev/zero, is refused before it is read).
MAX_SPEC_BYTES = 16 * 1024 * 1024
#: Nesting of mappings and lists (a spec needs 5); aliases count where they are used.
MAX_DEPTH = 64
#: Values that aliases (`*name`, `<<: *name`) may add in all: refuses "billion laughs".
MAX_ALIAS_VALUES = 100_000
#: Characters of a plain number (Python refuses long integers; `1:2:3:...` is quadratic).
MAX_NUMBER_LENGTH = 1000
#: Errors reported at once; the rest are counted.
MAX_ERRORS = 200


PathT = tuple[str | int, ...]


Mark = tuple[int, int]

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_VALUE = "tag:yaml.org,2002:value"
_INT = "tag:yaml.org,2002:int"
_NUMBERS = frozenset({_INT, "tag:yaml.org,2002:float"})
#: What YAML's reader refuses, found up front so the error has its line and column.
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
#: What no process can be given in an argument or the environment (PyYAML's own parser lets
#: `"\ud800"` through).
_UNFIT = re.compile("[\0\ud800-\udfff]")
#: libyaml's parser when PyYAML has it (ten times faster), else PyYAML's own.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 5
_repr.maxlevel = 3


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


def _shown(value: Any) -> str:
    """`repr`, cut short: an error never repeats a huge or deeply nested value."""
    return _repr.repr(value)


class _TooMany(Exception):
    """MAX_ERRORS are found: the rest of the spec is not checked."""


class _Located:
    """Python data built from YAML events, plus where each value and each key was written.

    Positions hang off each mapping and list, by id (registered as it is made, so an id reused
    after a dropped duplicate is overwritten): nothing is stored per path, and a value shared
    through an alias points where it was written.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.root: Any = None
        self.values: dict[int, Any] = {}  # id(container) -> {key: mark} or [mark, ...]
        self.keys: dict[int, dict[str, Mark]] = {}  # id(mapping) -> {key: the key's mark}
        #: id(container) -> {key, or index as text: source text} of plain scalars YAML did not
        #: read as strings.
        self.raw: dict[int, dict[str, str]] = {}
        self.found: list[tuple[int, int, str]] = []
        self.stopped = False

    @property
    def errors(self) -> list[str]:
        """Every problem as `FILE:LINE:COL: message`, in file order (the first MAX_ERRORS)."""
        found = sorted(self.found)
        lines = [f"{self.source}:{ln}:{col}: {msg}" for ln, col, msg in found]
        if self.stopped:
            ln, col, _ = found[-1]
            lines.append(f"{self.source}:{ln}:{col}: validation stopped after {MAX_ERRORS} errors")
        return lines

    def add(self, line: int, col: int, message: str) -> None:
        if len(self.found) >= MAX_ERRORS:
            self.stopped = True
            raise _TooMany
        self.found.append((line, col, message))

    def where(self, path: PathT, *, key: bool = False) -> Mark:
        """Where `path` was written; a path that is not there points at its nearest ancestor."""
        node, mark = self.root, (1, 1)
        for i, part in enumerate(path):
            marks = self.values.get(id(node)) if isinstance(node, dict | list) else None
            if marks is None:
                break
            if isinstance(node, dict):
                if part not in node:
                    break
                if key and i == len(path) - 1:
                    return self.keys[id(node)].get(str(part)) or marks[part]
            elif not (isinstance(part, int) and 0 <= part < len(node)):
                break
            node, mark = node[part], marks[part]
        return mark

    def at(self, path: PathT, message: str, *, key: bool = False) -> None:
        shown = _dotted(path)
        prefix = f"{shown}: " if shown else ""
        self.add(*self.where(path, key=key), f"{prefix}{message}")


def _dotted(path: PathT) -> str:
    out = ""
    for part in path:
        if isinstance(part, str) and len(part) > 40:
            part = part[:37] + "..."
        if isinstance(part, str) and (part.strip() != part or not part.isprintable() or not part):
            out += f"[{part!r}]"  # a key of blanks (`\xa0`) must not read as no key at all
        else:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _line_col(text: str, index: int) -> Mark:
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


class _Refused(Exception):
    """The spec crossed a bound while being read: reading stops at this one located error."""

    def __init__(self, mark: Mark, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class _MergeKey:
    """The plain key `<<`: the keys of its value (a mapping, or a list of them) are merged in."""


class _Frame:
    """A mapping or a list being built."""

    __slots__ = (
        "at",
        "data",
        "has_key",
        "height",
        "key",
        "key_mark",
        "keys",
        "mark",
        "marks",
        "merges",
        "parent",
        "raw",
        "size",
    )

    def __init__(self, data: Any, marks: Any, mark: Mark, parent: _Frame | None, at: Any) -> None:
        self.data = data
        self.marks = marks
        self.mark = mark
        self.parent = parent  # the path is kept as links, spelled out only for an error
        self.at = at  # where in the parent: an index, a key, or None (in a key)
        self.keys: dict[str, Mark] = {}
        self.raw: dict[str, str] | None = None
        self.merges: list[tuple[Any, Mark]] | None = None
        self.size = 1  # values in it, itself included, aliases expanded
        self.height = 1  # levels of nesting in it, itself included
        self.has_key = False  # a mapping holding a key that waits for its value
        self.key: Any = None
        self.key_mark: Mark = mark

    @property
    def path(self) -> PathT:
        parts: list[str | int] = []
        frame: _Frame | None = self
        while frame is not None:
            if isinstance(frame.at, str | int):
                parts.append(frame.at)
            frame = frame.parent
        return tuple(reversed(parts))


def _mark(event: Any) -> Mark:
    m = event.start_mark
    return m.line + 1, m.column + 1


class _Builder:
    """Python data from YAML events, every value located, within the bounds.

    One pass over the parser's events, no recursion: nothing is built twice. An aliased value is
    shared (as PyYAML does) and counted each time it is used, against MAX_ALIAS_VALUES.
    """

    def __init__(self, loader: Any, loc: _Located) -> None:
        self.loader = loader
        self.loc = loc
        self.stack: list[_Frame] = []
        self.done: list[Any] = []
        self.anchors: dict[str, tuple[Any, int, int, str | None]] = {}  # value, size, height, raw
        self.opening: dict[int, str] = {}  # depth -> anchor of the collection being built there
        self.aliased = 0
        #: plain scalar text -> (value, text if YAML did not read it as text), when immutable
        self.plain: dict[str, tuple[Any, str | None]] = {}

    def build(self) -> tuple[bool, Any]:
        """(False, None) for an empty stream, else (True, the document's value)."""
        get, peek = self.loader.get_event, self.loader.peek_event
        get()  # stream start
        if isinstance(peek(), yaml.StreamEndEvent):
            return False, None
        get()  # document start
        scalar_event, plain, attach = yaml.ScalarEvent, self.plain, self.attach
        starts = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
        # PyYAML finds a plain scalar's type by its first character: most have none to try
        implicit = self.loader.yaml_implicit_resolvers
        wildcard = None in implicit
        ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
        while not self.done:
            event: Any = get()
            if type(event) is scalar_event:
                if event.tag is None and event.anchor is None:  # the usual case, made short
                    m: Any = event.start_mark
                    if not event.implicit[0]:  # quoted: text
                        attach(event.value, (m.line + 1, m.column + 1), 1, 0, None)
                        continue
                    text = event.value
                    if text[:1] not in implicit and not wildcard:  # no resolver: text
                        attach(text, (m.line + 1, m.column + 1), 1, 0, None)
                        continue
                    known = plain.get(text)
                    if known is not None:
                        attach(known[0], (m.line + 1, m.column + 1), 1, 0, known[1])
                        continue
                value, raw = self.scalar(event)
                if event.anchor is not None:
                    self.anchors[event.anchor] = (value, 1, 0, raw)
                attach(value, _mark(event), 1, 0, raw)
            elif type(event) in ends:
                self.close()
            elif type(event) in starts:
                self.open(event)
            elif isinstance(event, yaml.AliasEvent):
                self.alias(event)
        get()  # document end
        if not isinstance(peek(), yaml.StreamEndEvent):
            raise _Refused(
                _mark(peek()), "a spec is one YAML document, and another one starts here"
            )
        return True, self.done[0]

    def prefix(self) -> str:
        """`path: ` of the value being read, for an error about it."""
        shown = _dotted(self.child_path())
        return f"{shown}: " if shown else ""

    def child_path(self) -> PathT:
        if not self.stack:
            return ()
        parent = self.stack[-1]
        if isinstance(parent.data, list):
            return (*parent.path, len(parent.data))
        if parent.has_key and isinstance(parent.key, str):
            return (*parent.path, parent.key)
        return parent.path

    def scalar(self, event: Any) -> tuple[Any, str | None]:
        """A scalar's value, and its text when it is plain and YAML did not read it as text."""
        tag, text = event.tag, event.value
        plain = tag is None and event.implicit[0]
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, text, event.implicit)
        if tag in (_STR, _VALUE):  # YAML 1.1's `=` is no one's intent: text
            value: Any = text
        elif tag == _MERGE:
            value = _MergeKey
        else:
            value = self.construct(event, tag)
        raw = text if plain and tag not in (_STR, _VALUE, _NULL, _MERGE) else None
        if plain and isinstance(value, Hashable):
            self.plain[text] = (value, raw)
        return value, raw

    def construct(self, event: Any, tag: str) -> Any:
        text = event.value
        if tag in _NUMBERS and len(text) > MAX_NUMBER_LENGTH:
            raise _Refused(
                _mark(event),
                f"{self.prefix()}a number of {len(text)} characters "
                f"(at most {MAX_NUMBER_LENGTH}); quote it if it is text",
            )
        if tag == _INT and text.isdigit() and (text[0] != "0" or text == "0"):
            return int(text)  # the usual integer, without PyYAML's general path
        constructors = self.loader.yaml_constructors
        construct = constructors.get(tag, constructors.get(None))
        node = yaml.ScalarNode(tag, text, event.start_mark, event.end_mark, event.style)
        try:
            value = construct(self.loader, node)
            if isinstance(value, types.GeneratorType):  # a collection's tag on a scalar
                generator, value = value, next(value)
                for _ in generator:
                    pass
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            # PyYAML checks the value of an explicit tag only this far (`!!int x`, `!!bool x`)
            raise _Refused(
                _mark(event), f"{self.prefix()}{_shown(text)} is not a valid {tag}"
            ) from exc
        return value

    def open(self, event: Any) -> None:
        stack = self.stack
        m = event.start_mark
        mark = (m.line + 1, m.column + 1)
        if len(stack) >= MAX_DEPTH:
            raise _Refused(mark, f"the spec is nested too deeply (at most {MAX_DEPTH} levels)")
        parent = stack[-1] if stack else None
        at: Any = None
        if parent is not None:
            if type(parent.data) is list:
                at = len(parent.data)
            elif parent.has_key:
                at = parent.key
        if type(event) is yaml.MappingStartEvent:
            frame = _Frame({}, {}, mark, parent, at)
            self.loc.keys[id(frame.data)] = frame.keys
        else:
            frame = _Frame([], [], mark, parent, at)
        self.loc.values[id(frame.data)] = frame.marks
        if event.anchor is not None:
            self.anchors.pop(event.anchor, None)
            self.opening[len(stack)] = event.anchor
        stack.append(frame)

    def close(self) -> None:
        frame = self.stack.pop()
        if frame.merges:
            self.merge(frame)
        if frame.raw:
            self.loc.raw[id(frame.data)] = frame.raw
        anchor = self.opening.pop(len(self.stack), None) if self.opening else None
        if anchor is not None:
            self.anchors[anchor] = (frame.data, frame.size, frame.height, None)
        self.attach(frame.data, frame.mark, frame.size, frame.height, None)

    def alias(self, event: Any) -> None:
        name, mark = event.anchor, _mark(event)
        if name in self.opening.values():
            raise _Refused(mark, f"{self.prefix()}alias *{name} is inside its own anchor")
        if name not in self.anchors:
            raise _Refused(mark, f"{self.prefix()}undefined alias *{name} (no &{name} before it)")
        value, size, height, raw = self.anchors[name]
        self.aliased += size
        if self.aliased > MAX_ALIAS_VALUES:
            raise _Refused(
                mark,
                f"{self.prefix()}too many aliases: with *{name}, aliases add more than "
                f"{MAX_ALIAS_VALUES} values to the spec",
            )
        if len(self.stack) + height > MAX_DEPTH:
            raise _Refused(
                mark,
                f"{self.prefix()}the spec is nested too deeply through *{name} "
                f"(at most {MAX_DEPTH} levels)",
            )
        self.attach(value, mark, size, height, raw)

    def attach(self, value: Any, mark: Mark, size: int, height: int, raw: str | None) -> None:
        """Put a value built (or aliased) into the mapping or list being built."""
        if not self.stack:
            self.done.append(value)
            return
        parent = self.stack[-1]
        parent.size += size
        if height >= parent.height:
            parent.height = height + 1
        data = parent.data
        if type(data) is list:
            if raw is not None:  # a variable's values in `matrix:` keep their text
                if parent.raw is None:
                    parent.raw = {}
                parent.raw[str(len(data))] = raw
            data.append("<<" if value is _MergeKey else value)
            parent.marks.append(mark)
            return
        if not parent.has_key:
            if type(value) is bool and raw is not None:  # `on:`, `yes:`: a key is its text
                value = raw
            parent.has_key, parent.key, parent.key_mark = True, value, mark
            return
        parent.has_key = False
        key = parent.key
        if key is _MergeKey:
            if parent.merges is None:
                parent.merges = []
            parent.merges.append((value, mark))
        elif type(key) is not str:
            path = _dotted((*parent.path, _shown(key)))
            self.loc.add(*parent.key_mark, f"{path}: keys must be strings, got {_shown(key)}")
        elif key in data:
            path = _dotted((*parent.path, key))
            self.loc.add(*parent.key_mark, f"{path}: duplicate key {_shown(key)}")
        else:
            data[key] = "<<" if value is _MergeKey else value
            parent.marks[key] = mark
            parent.keys[key] = parent.key_mark
            if raw is not None:
                if parent.raw is None:
                    parent.raw = {}
                parent.raw[key] = raw

    def merge(self, frame: _Frame) -> None:
        """`<<: *base` or `<<: [*a, *b]`: keys written in the mapping win, then a's over b's."""
        data = frame.data
        for value, mark in frame.merges or []:
            for source in value if isinstance(value, list) else [value]:
                if not isinstance(source, dict):
                    self.loc.add(
                        *mark,
                        f"{_dotted((*frame.path, '<<'))}: merges a mapping or a list of "
                        f"mappings, not {_type_name(source)}",
                    )
                    break
                marks, keys = self.loc.values[id(source)], self.loc.keys[id(source)]
                raw = self.loc.raw.get(id(source), {})
                for key, item in source.items():
                    if key not in data:
                        data[key] = item
                        frame.marks[key] = marks[key]
                        frame.keys[key] = keys[key]
                        if key in raw:
                            if frame.raw is None:
                                frame.raw = {}
                            frame.raw[key] = raw[key]


def _too_big() -> str:
    size = MAX_SPEC_BYTES
    shown = f"{size // 2**20} MiB" if size % 2**20 == 0 else f"{size} bytes"
    return f"the spec is larger than {shown}, the most a spec may be"


def _compose(text: str, source: str) -> tuple[Any, _Located]:
    loc = _Located(source)
    if len(text) > MAX_SPEC_BYTES:
        loc.add(1, 1, _too_big())
        return None, loc
    bad = _NON_PRINTABLE.search(text)
    if bad:
        loc.add(
            *_line_col(text, bad.start()),
            f"YAML error: character #x{ord(bad.group()):04x} is not allowed in YAML",
        )
        return None, loc
    loader = _Loader(text)
    try:
        found, loc.root = _Builder(loader, loc).build()
        if not found:
            loc.add(1, 1, "the spec is empty")
    except _Refused as exc:
        loc.add(*exc.mark, exc.message)
    except _TooMany:
        pass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        if "maximum nesting depth" in what:  # PyYAML >= 6.0.4 looks ahead past our limit
            loc.add(line, col, f"the spec is nested too deeply (at most {MAX_DEPTH} levels)")
        else:
            loc.add(line, col, f"YAML syntax error: {what}")
    except yaml.YAMLError as exc:
        loc.add(1, 1, f"YAML error: {exc}")
    finally:
        loader.dispose()
    return loc.root, loc
