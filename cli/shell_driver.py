"""`tricks-nats event/wait/discover`: the driver API for shell scripts (issue 5 fills this in)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
