"""Samples as text, for `tricks-nats record -`: `NAME VALUE [KEY=VALUE ...]` or a JSON object
per line (`{"name": ..., "value": ..., "labels": {...}, "ts": ...}`)."""

from __future__ import annotations

import json
import math

from tricks_nats.errors import UsageError


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"bad label {text!r}: use KEY=VALUE")
    return key, value


def parse_line(line: str) -> tuple[str, float, dict[str, str], float | None]:
    """(name, value, labels, ts or None); ValueError saying what is wrong."""
    text = line.strip()
    if text.startswith("{"):
        return _json(text)
    words = text.split()
    if len(words) < 2:
        raise ValueError(f"expected `NAME VALUE [KEY=VALUE ...]`, got {text[:80]!r}")
    labels = {}
    for word in words[2:]:
        try:
            key, value = parse_label(word)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        labels[key] = value
    return words[0], _number(words[1]), labels, None


def _json(text: str) -> tuple[str, float, dict[str, str], float | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('a JSON sample needs "name" (a string) and "value"')
    value = obj.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f'"value" {value!r} is not a number')
    labels = obj.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError('"labels" must be an object')
    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)):
        raise ValueError(f'"ts" {ts!r} is not seconds since the epoch')
    return obj["name"], float(value), labels, ts


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"value {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"value {text!r} is not finite")
    return value
