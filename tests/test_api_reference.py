"""docs/api.md stays in step with the drivers: every public method of the Python drivers with
its parameters, every field of `Config` and `Peer`, every method of the JavaScript driver's
published types, every shell command and option. Adding one without its line fails here."""

from __future__ import annotations

import dataclasses
import inspect
import re

import msgspec
import pytest
import typer.main

from tricks_nats.cli import shell_driver
from tricks_nats.driver import Config, Driver, Peer, SyncDriver

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
    assert sorted(group.commands) == ["discover", "event", "record", "wait"]  # type: ignore[attr-defined]
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
