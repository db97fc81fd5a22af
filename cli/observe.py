"""`tricks-nats watch/status/report`: watching runs (issue 3 fills this in)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
