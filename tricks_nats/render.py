"""One human line per journal entry, for `up` and `watch` (colour only when asked)."""

from __future__ import annotations

import time
from typing import Any

_STATE_COLOURS = {
    "running": "green",
    "exited": "green",
    "stopped": "blue",
    "failed": "red",
    "pending": "white",
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


def describe(entry: dict[str, Any], *, colour: bool = False) -> str:
    ts = float(entry.get("ts", 0))
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    kind = entry.get("kind")
    if kind == "pod":
        state = str(entry.get("state"))
        extra = f" (exit {entry['exit_code']})" if entry.get("exit_code") is not None else ""
        if entry.get("reason"):
            extra += f": {entry['reason']}"
        painted = _paint(state, _STATE_COLOURS.get(state), colour)
        text = f"{entry.get('tag')}-{entry.get('pod_id')} {painted}{extra}"
    elif kind == "event":
        by = f" by {entry['pod']}" if entry.get("pod") else ""
        text = f"event {_paint(str(entry.get('name')), 'cyan', colour)} = {entry.get('count')}{by}"
    elif kind == "workflow":
        c = entry.get("condition") or {}
        action = "starting" if entry.get("action") == "start" else "stopping"
        label = f"{action} {entry.get('tag')}"
        text = f"{c.get('name')} {c.get('value')} -> {_paint(label, 'magenta', colour)}"
    elif kind == "verdict":
        verdict = str(entry.get("verdict"))
        text = f"verdict {_paint(verdict, _VERDICT_COLOURS.get(verdict), colour)}"
        if entry.get("reason"):
            text += f": {entry['reason']}"
    else:
        text = str({k: v for k, v in entry.items() if k not in ("ts", "experiment")})
    return f"{stamp} {text}"


def matches(entry: dict[str, Any], tags: list[str], kinds: list[str]) -> bool:
    """The `--tag` / `--kind` filters of `watch`."""
    if kinds and entry.get("kind") not in kinds:
        return False
    if not tags or entry.get("kind") == "verdict":
        return True
    if entry.get("tag") in tags:
        return True
    name, pod = str(entry.get("name", "")), str(entry.get("pod", ""))
    return any(name in (f"{t}_start", f"{t}_stop") or pod.startswith(f"{t}-") for t in tags)
