"""Property-based: whatever a user feeds `validate`, the answer is exit 0 or a located error
(exit 2), never a traceback."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tricks_nats.cli.app import app
from tricks_nats.errors import SpecError
from tricks_nats.protocol import parse_count
from tricks_nats.spec import parse

LOCATED = re.compile(r"^s\.yaml:\d+:\d+: \S")
KEYS = [
    "apiVersion",
    "experiment",
    "tag",
    "image",
    "command",
    "replicas",
    "env",
    "workflow",
    "start",
    "stop",
    "name",
    "value",
    "timeout",
    "runtime",
    "replcas",
    "x",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["v1", "local", "a_stop", "a", "6"]),
)
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)
# Spec-shaped trees find the deep checks more often than fully random ones.
tags = st.fixed_dictionaries(
    {"tag": st.sampled_from(["a", "b", "a b", ""])}, optional={k: trees for k in KEYS[3:8]}
)
specs = st.fixed_dictionaries(
    {"experiment": st.lists(tags, max_size=3)},
    optional={k: trees for k in ("apiVersion", "timeout", "runtime", "name", "extra")},
)


def check(text: str) -> None:
    try:
        parse(text, "s.yaml")
    except SpecError as exc:
        assert exc.errors
        for line in exc.errors:
            assert LOCATED.match(line), line


@given(trees)
@settings(max_examples=300, deadline=None)
def test_random_yaml_trees(tree: Any) -> None:
    check(yaml.safe_dump(tree))


@given(specs)
@settings(max_examples=300, deadline=None)
def test_random_spec_shaped_trees(tree: Any) -> None:
    check(yaml.safe_dump(tree, sort_keys=False))


@given(st.text(max_size=200))
@example("\xa0:")  # a key of blanks: its path must still show (it once printed as nothing)
@settings(max_examples=300, deadline=None)
def test_random_text(text: str) -> None:
    check(text)


@given(st.binary(max_size=300))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_through_the_cli(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_bytes(data)
        result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


@given(st.binary(max_size=64))
def test_random_counter_bodies_never_raise(data: bytes) -> None:
    value = parse_count(data)
    assert value is None or isinstance(value, int)
