"""Every command's help reads as a user expects: values named by meaning (`SPEC`,
`--timeout SECONDS`, `--runtime [local|kubernetes]`), never typer's `{spec}`, `<float range>`
or `<list[str]>`, and every option says what it does."""

from __future__ import annotations

import re

import pytest

from tricks_nats.cli.helptext import command

GROUP = command()
COMMANDS = sorted(GROUP.commands)
PLACEHOLDER = re.compile(r"<(str|int|float|path|list|bool)[^>]*>|\{[a-z_]+\}")


def help_of(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        GROUP.main(args=[*args, "--help"], prog_name="tricks-nats")
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", COMMANDS)
def test_no_type_placeholders(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of([name], capsys)
    assert text.startswith(f"Usage: tricks-nats {name} ")
    assert not PLACEHOLDER.search(text), PLACEHOLDER.search(text)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_described(name: str) -> None:
    for param in GROUP.commands[name].params:
        assert param.help, f"{name} {param.name}: no help text"


def test_values_are_named_by_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    up = help_of(["up"], capsys)
    assert "Usage: tricks-nats up [OPTIONS] SPEC\n" in up
    assert re.search(r"--runtime \[local\|kubernetes\]", up)
    assert "--timeout SECONDS" in up and "--runs-dir DIR" in up and "--nats-url URL" in up
    record = help_of(["record"], capsys)
    assert "NAME [VALUE]" in record and "--label KEY=VALUE" in record
    assert "--kind [pod|event|workflow|fault|verdict]" in help_of(["watch"], capsys)
    assert "--kind [cdf|line|rate|bar|hist]" in help_of(["plot"], capsys)
