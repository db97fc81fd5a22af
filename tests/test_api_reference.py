"""docs/api.md stays in step with the drivers: every public method of the Python drivers with
its parameters (constructors too), every field of `Config` and `Peer`, every error class, every
member of the JavaScript `Driver` as src/index.js defines it and as index.d.ts publishes it,
every shell command and option, and a docstring on every public Python member (what `help()`
shows). Adding one without its line fails here."""

from __future__ import annotations

import dataclasses
import inspect
import re

import msgspec
import pytest
import typer.main

import tricks_nats.driver as driver_module
from tricks_nats.cli import shell_driver
from tricks_nats.driver import Config, Driver, Peer, SyncDriver, TricksError

from .conftest import ROOT

DOC = (ROOT / "docs" / "api.md").read_text()
PYTHON, _, REST = DOC.partition("## JavaScript")
JAVASCRIPT, _, SHELL = REST.partition("## Shell")


def rendered(name: str, fn: object) -> str:
    """`discover(tag, count=None, timeout=None)`, as the page writes a call."""
    parts = []
    for p in list(inspect.signature(fn).parameters.values())[1:]:  # type: ignore[arg-type]
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def public(cls: type) -> dict[str, object]:
    return {n: inspect.getattr_static(cls, n) for n in dir(cls) if not n.startswith("_")}


@pytest.mark.parametrize("cls", [Driver, SyncDriver])
def test_every_python_method_is_there_with_its_parameters(cls: type) -> None:
    for name, member in public(cls).items():
        if isinstance(member, property):
            assert f"`{name}`" in PYTHON, f"{cls.__name__}.{name}"
        elif isinstance(member, classmethod):  # `await Driver.connect(config=None)`
            assert f".{rendered(name, member.__func__)}`" in PYTHON, name
        else:
            assert f"`{rendered(name, member)}`" in PYTHON, rendered(name, member)


def test_every_field_of_config_and_peer_is_there() -> None:
    for field in [f.name for f in dataclasses.fields(Config)] + ["pod"]:
        assert f"| `{field}` |" in PYTHON, field
    for field in msgspec.structs.fields(Peer):
        assert f"| `{field.name}` |" in PYTHON, field.name


def test_every_javascript_method_is_there() -> None:
    types = (ROOT / "drivers" / "js" / "index.d.ts").read_text()
    body = types[types.index("export declare class Driver") :]
    body = body[: body.index("\n}\n")]
    members = re.findall(r"^  (?:static |readonly |get )?(\w+)[(:]", body, re.M)
    assert {"discover", "registerEvent", "waitEvent", "record", "close"} <= set(members)
    for name in set(members) - {"constructor", "requestTimeoutMs", "recoveryMs", "bufferSamples"}:
        assert re.search(rf"[` ]{name}[(`]", JAVASCRIPT), name
    for tuning in ("requestTimeoutMs", "recoveryMs", "bufferSamples"):
        assert tuning in JAVASCRIPT


def test_every_shell_command_and_option_is_there() -> None:
    app = typer.Typer()
    shell_driver.register(app)
    group = typer.main.get_command(app)
    assert {"barrier", "discover", "event", "record", "wait"} <= set(group.commands)  # type: ignore[attr-defined]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert f"`tricks-nats {name} " in SHELL, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in SHELL, f"{name} {opt}"


def test_a_method_left_out_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above would see a new public method."""

    def shiny(self: Driver, x: int) -> None: ...

    monkeypatch.setattr(Driver, "shiny", shiny, raising=False)
    with pytest.raises(AssertionError, match="shiny"):
        test_every_python_method_is_there_with_its_parameters(Driver)


JS_SOURCE = (ROOT / "drivers" / "js" / "src" / "index.js").read_text()
JS_TYPES = (ROOT / "drivers" / "js" / "index.d.ts").read_text()


def call_form(name: str, fn: object) -> str:
    """`Driver(config=None, *, record_buffer=None)`: the signature without types or `self`."""
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    plain = sig.replace(parameters=params, return_annotation=sig.empty)
    return f"{name}{plain}"


def js_class_body(source: str, head: str = "export class Driver {") -> str:
    start = source.index(head)
    return source[start : source.index("\n}\n", start)]


def js_members(source: str) -> set[str]:
    """Public methods, getters and fields of the exported `Driver` class (not `#private`)."""
    body = js_class_body(source)
    methods = re.findall(
        r"^  (?:static )?(?:async )?(?:get |set )?([A-Za-z_$][\w$]*)\s*\(", body, re.M
    )
    constructor = body[body.index("  constructor(") :]
    constructor = constructor[: constructor.index("\n  }\n")]
    fields = re.findall(r"^    this\.([A-Za-z_$][\w$]*) = ", constructor, re.M)
    return (set(methods) | set(fields)) - {"constructor"}


def undocumented_js(source: str, doc: str, types: str) -> list[str]:
    """Members of the source's `Driver` missing from the doc's JavaScript section or from the
    published types."""
    declared = js_class_body(types, "export declare class Driver {")
    missing = []
    for name in sorted(js_members(source)):
        if not re.search(rf"\b{re.escape(name)}\b", doc):
            missing.append(f"{name} (docs/api.md)")
        if not re.search(rf"^  (?:static |readonly |get )?{re.escape(name)}[(:?]", declared, re.M):
            missing.append(f"{name} (index.d.ts)")
    return missing


def test_the_js_source_class_is_documented_and_typed() -> None:
    members = js_members(JS_SOURCE)
    # the parse itself works: the calls a pod makes, the tuning fields, no private member
    assert {"connect", "discover", "registerEvent", "waitEvent", "count", "close"} <= members
    assert {"record", "flush", "dropped", "bufferSamples", "config"} <= members
    assert not any(name.startswith("#") for name in members)
    assert undocumented_js(JS_SOURCE, JAVASCRIPT, JS_TYPES) == []


def test_a_js_method_left_out_fails() -> None:
    """A method added to src/index.js and nowhere else is caught (the doc and the types)."""
    shiny = "export class Driver {\n  async shiny(x) {\n    return x;\n  }\n"
    source = JS_SOURCE.replace("export class Driver {\n", shiny, 1)
    assert undocumented_js(source, JAVASCRIPT, JS_TYPES) == [
        "shiny (docs/api.md)",
        "shiny (index.d.ts)",
    ]


def js_typedef(name: str) -> list[str]:
    block = re.search(rf"@typedef {{object}} {name}\n(.*?)\*/", JS_SOURCE, re.S)
    assert block, name
    return re.findall(r"@property \{[^}]*\} \[?(\w+)", block.group(1))


@pytest.mark.parametrize("typedef", ["Config", "Peer"])
def test_js_config_and_peer_fields_are_there(typedef: str) -> None:
    fields = js_typedef(typedef)
    assert len(fields) >= 4, fields
    for field in fields:
        assert re.search(rf"\b{field}\b", JAVASCRIPT), f"{typedef}.{field}"


@pytest.mark.parametrize("cls", [Driver, SyncDriver])
def test_python_constructors_are_there_with_their_parameters(cls: type) -> None:
    form = call_form(cls.__name__, inspect.getattr_static(cls, "__init__"))
    assert "record_buffer=None" in form, form
    assert f"`{form}`" in " ".join(PYTHON.split()), form  # the page may wrap it


def test_the_password_is_said_to_be_a_secret() -> None:
    row = next(line for line in PYTHON.splitlines() if line.startswith("| `nats_password` |"))
    assert "secret" in row
    assert "natsPassword" in JAVASCRIPT and "never printed" in JAVASCRIPT


def python_errors() -> list[str]:
    return [
        name
        for name in driver_module.__all__
        if isinstance(getattr(driver_module, name), type)
        and issubclass(getattr(driver_module, name), TricksError)
    ]


def test_every_error_is_there() -> None:
    assert {"ConfigError", "UnknownTag", "WaitTimeout", "TricksError"} <= set(python_errors())
    for name in python_errors():
        assert f"`{name}`" in PYTHON, name
    js_errors = re.findall(r"^export class (\w+) extends TricksError", JS_SOURCE, re.M)
    assert "UnknownTag" in js_errors
    for name in js_errors:
        assert f"`{name}`" in JAVASCRIPT, name


@pytest.mark.parametrize("cls", [Driver, SyncDriver])
def test_every_public_python_member_has_a_docstring(cls: type) -> None:
    for name, member in public(cls).items():
        target = member.__func__ if isinstance(member, classmethod | staticmethod) else member
        doc = inspect.getdoc(target)
        assert doc and doc.strip(), f"{cls.__name__}.{name} has no docstring"


def test_a_python_method_without_a_docstring_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def shiny(self: Driver) -> None: ...

    monkeypatch.setattr(Driver, "shiny", shiny, raising=False)
    with pytest.raises(AssertionError, match="shiny"):
        test_every_public_python_member_has_a_docstring(Driver)
