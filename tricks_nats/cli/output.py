"""What every command prints the same way: a line that survives a closed pipe, and an error as
one line (each located line of a spec error) with its exit code."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

import typer

from tricks_nats.errors import SpecError, TricksError

_closed: set[bool] = set()  # which of stdout (False) / stderr (True) a reader has closed


def say(line: str, *, err: bool = False) -> None:
    """Print a line; a closed pipe (`up | head -1`) means "stop printing" there, never an
    error: the run goes on to its verdict and exit code."""
    if err in _closed:
        return
    try:
        typer.echo(line, err=err)
    except (BrokenPipeError, ValueError, OSError):
        _closed.add(err)
        stream = sys.stderr if err else sys.stdout
        # Python flushes the stream again at exit: point it at /dev/null so that stays quiet.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def fail(problem: TricksError | str, code: int | None = None) -> NoReturn:
    """Exit with `problem` on stderr: a TricksError's own exit code unless `code` is given
    (a plain message exits 1 unless told)."""
    if isinstance(problem, SpecError):
        lines = list(problem.errors)
    else:
        lines = [f"tricks-nats: error: {problem}"]
    for line in lines:
        say(line, err=True)
    if code is None:
        code = problem.exit_code if isinstance(problem, TricksError) else 1
    raise typer.Exit(code)
