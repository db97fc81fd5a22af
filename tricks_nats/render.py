"""One human line per journal entry, for `up` and `watch` (colour only when asked)."""

from __future__ import annotations

import time
from typing import assert_never

from tricks_nats import outcomes
from tricks_nats.entries import (
    Entry,
    EventEntry,
    FaultEntry,
    PodEntry,
    VerdictEntry,
    WorkflowEntry,
)

_STATE_COLOURS = {
    "running": "green",
    "pending": "white",
    outcomes.SUCCEEDED: "green",
    outcomes.BY_WORKFLOW: "blue",
    outcomes.BY_FAULT: "magenta",
    outcomes.RESTARTED: "magenta",
    outcomes.FAILED: "red",
    outcomes.NEVER_STARTED: "white",
}
_VERDICT_COLOURS = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "error": "red",
    "interrupted": "yellow",
}


def _paint(text: str, colour: str | None, enabled: bool) -> str:
    if not enabled or colour is None:
        return text
    import typer

    return typer.style(text, fg=colour)


def describe(entry: Entry, *, colour: bool = False) -> str:
    ts = entry.ts
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    match entry:
        case PodEntry():
            extra = f" (exit {entry.exit_code})" if entry.exit_code is not None else ""
            if entry.reason:
                extra += f": {entry.reason}"
            shown = entry.outcome or entry.state  # an ended pod: how it ended
            painted = _paint(shown, _STATE_COLOURS.get(shown, "yellow"), colour)
            text = f"{entry.tag}-{entry.pod_id} {painted}{extra}"
        case EventEntry():
            by = f" by {entry.pod}" if entry.pod else ""
            text = f"event {_paint(entry.name, 'cyan', colour)} = {entry.count}{by}"
        case WorkflowEntry():
            c = entry.condition
            action = "starting" if entry.action == "start" else "stopping"
            label = f"{action} {entry.tag}"
            text = f"{c.name} {c.value} -> {_paint(label, 'magenta', colour)}"
        case FaultEntry():
            text = fault_line(entry, colour)
        case VerdictEntry():
            text = f"verdict {_paint(entry.verdict, _VERDICT_COLOURS.get(entry.verdict), colour)}"
            if entry.reason:
                text += f": {entry.reason}"
        case _:
            assert_never(entry)
    return f"{stamp} {text}"


def fault_line(entry: FaultEntry, colour: bool) -> str:
    """`fault kill-server #1 kill injected: server-2 (server_start 3)`."""
    label = _paint(f"fault {entry.fault} #{entry.firing}", "magenta", colour)
    state = _paint(entry.state, "red" if entry.state == "failed" else None, colour)
    pods = ", ".join(entry.pods[:8]) + (" ..." if len(entry.pods) > 8 else "")
    if entry.peers is not None:
        peers = ", ".join(entry.peers[:8]) + (" ..." if len(entry.peers) > 8 else "")
        pods = f"{pods} <-> {peers}"
    text = f"{label} {entry.action} {state}: {pods or 'no pod'}"
    if entry.state == "injected" and entry.duration is not None:
        text += f" for {entry.duration:g}s"
    if entry.condition is not None and entry.state in ("injected", "skipped"):
        text += f" ({entry.condition.name} {entry.condition.value})"
    if entry.reason:
        text += f": {entry.reason}"
    return text


def matches(entry: Entry, tags: list[str], kinds: list[str]) -> bool:
    """The `--tag` / `--kind` filters of `watch`."""
    if kinds and entry.kind not in kinds:
        return False
    if not tags:
        return True
    match entry:
        case PodEntry() | WorkflowEntry():
            return entry.tag in tags
        case EventEntry():
            pod = entry.pod or ""
            return any(
                entry.name in (f"{t}_start", f"{t}_stop") or pod.startswith(f"{t}-") for t in tags
            )
        case FaultEntry():
            names = entry.pods + (entry.peers or [])
            return any(name.startswith(f"{t}-") for t in tags for name in names)
        case VerdictEntry():
            return True
        case _:
            assert_never(entry)
