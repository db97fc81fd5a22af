"""Help text a user can read: `SPEC`, `--timeout SECONDS`, `--runtime [local|kubernetes]`,
never typer's `{spec}`, `<float range>` or `<list[str]>`.

Typer renders a parameter by its Python type; one table here names each by its meaning
instead, so every command's help reads alike. `tests/test_help.py` checks every command.
"""

from __future__ import annotations

from typing import Any

import typer
import typer.core
import typer.main

#: An option's value, by the option's name (its Python parameter name).
OPTION_METAVARS: dict[str, str] = {
    "timeout": "SECONDS",
    "grace": "SECONDS",
    "schedule_timeout": "SECONDS",
    "expected_interval_ms": "MS",
    "runs_dir": "DIR",
    "store_dir": "DIR",
    "resume": "CAMPAIGN_DIR",
    "nats_url": "URL",
    "pod_nats_url": "URL",
    "kubeconfig": "FILE",
    "context": "NAME",
    "namespace": "NAME",
    "host": "ADDRESS",
    "port": "PORT",
    "repeat": "N",
    "count": "N",
    "key": "ID",
    "label": "KEY=VALUE",
    "tag": "TAG",
    "pod": "POD",
    "kind": "KIND",
    "output": "FILE",
    "title": "TEXT",
    "x": "VAR",
    "series": "VAR",
    "plot.kind": "[cdf|line|rate|bar|hist]",
    "by": "[tag|pod]",
    "stat": "[count|mean|p50|p90|p99]",
    "error": "[minmax|ci95]",
    "fmt": "[svg|pdf|png|html]",
}
#: By type, for an option the table does not name.
TYPE_METAVARS: dict[str, str] = {"int": "N", "float": "NUMBER", "str": "TEXT", "Path": "PATH"}


def command() -> Any:
    """The app as a click command, its help tidied (what `tricks-nats` runs)."""
    from tricks_nats.cli.app import app

    group = typer.main.get_command(app)
    tidy(group)
    return group


def tidy(group: Any) -> None:
    """Give every parameter of every command of `group` a readable name for its value."""
    from tricks_nats.entries import KINDS
    from tricks_nats.runtimes import REGISTRY

    names = {
        **OPTION_METAVARS,
        "runtime": "[" + "|".join(REGISTRY) + "]",
        "kind": "[" + "|".join(KINDS) + "]",
    }
    for cmd_name, cmd in getattr(group, "commands", {}).items():
        for param in cmd.params:
            if isinstance(param, typer.core.TyperArgument):
                _argument(param)
            elif isinstance(param, typer.core.TyperOption) and not param.is_flag:
                _option(param, names.get(f"{cmd_name}.{param.name}") or names.get(param.name or ""))


def _argument(param: typer.core.TyperArgument) -> None:
    name = param.metavar or (param.name or "value").upper()
    usage = name if param.required else f"[{name}]"
    # instance attributes: typer shows `{name}` in the usage line and `<type>` beside it
    param._usage_display_name = lambda: usage  # type: ignore[method-assign]
    param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
    param._rich_display_name = lambda: name  # type: ignore[method-assign]


def _option(param: typer.core.TyperOption, named: str | None) -> None:
    if param.metavar is not None:
        return
    desc = param.type_descriptor
    if desc.is_choice:
        param.metavar = "[" + "|".join(str(c) for c in desc.choices or ()) + "]"
        return
    if named is None:
        bare = getattr(desc.annotation, "__name__", str(desc.annotation))
        named = TYPE_METAVARS.get(bare, "VALUE")
    param.metavar = named
