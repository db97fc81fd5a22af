"""`tricks-nats down`: `up --runtime kubernetes` options and `down` (issue 4 fills this in)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
