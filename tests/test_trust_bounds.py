"""Resource bounds: no spec can exhaust the machine.

Every bound is a located error (`FILE:LINE:COL: message`) that says what the bound is, like any
other spec error. No test here decides by timing: a timeout marker only turns a hang (or an
explosion in time) into a failure, and the CLI runs under a memory limit so that an explosion
in memory is a failure too, not a machine brought down.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from tricks_nats import located_yaml as located
from tricks_nats.errors import SpecError
from tricks_nats.protocol import NAME_RE, start_event, stop_event
from tricks_nats.runtimes import kube_objects as ko
from tricks_nats.spec import MAX_PODS, MAX_TAG_LENGTH, json_schema, load, parse

from .conftest import ROOT, cli_env

LOCATED = re.compile(r"^s\.yaml:\d+:\d+: \S")
HANG_GUARD_S = 60  # far beyond an honest validation (about a second here): only a blow-up


def errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(textwrap.dedent(text), "s.yaml")
    assert all(LOCATED.match(e) for e in info.value.errors), info.value.errors
    return info.value.errors


def one_error(text: str) -> str:
    found = errors(text)
    assert len(found) == 1, found
    return found[0]


def validate_limited(path: Path) -> subprocess.CompletedProcess[str]:
    """`tricks-nats validate PATH` with at most 1 GiB of address space."""
    program = (
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
        "sys.argv = ['tricks-nats', 'validate', sys.argv[1]]; "
        "runpy.run_module('tricks_nats.cli.app', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", program, str(path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=HANG_GUARD_S,
    )


# -- 1. aliases: "billion laughs" and nesting ------------------------------------------------


def laughs(levels: int) -> str:
    """A spec of about 540 bytes whose aliases expand to 10**levels values."""
    lines = ["l0: &l0 [lol,lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join([*lines, "experiment: [{tag: a, command: x}]", ""])


@pytest.mark.timeout(HANG_GUARD_S)
def test_billion_laughs_is_refused_where_the_aliases_run_over(tmp_path: Path) -> None:
    text = laughs(10)
    assert len(text) < 600
    error = one_error(text)
    # l4's tenth alias of l3 (1,111 values each) takes the aliased values past 100,000
    assert error.startswith("s.yaml:5:"), error
    assert "too many aliases" in error and f"{located.MAX_ALIAS_VALUES}" in error
    spec = tmp_path / "laughs.yaml"
    spec.write_text(text)
    result = validate_limited(spec)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"{spec}:5:") and "too many aliases" in result.stderr
    assert "Traceback" not in result.stderr


def test_aliases_may_add_up_to_the_bound_and_no_more() -> None:
    # one list of 1,000 values (1,001 with the list itself), aliased n times
    big = "[" + ", ".join(["x"] * 1000) + "]"
    uses = located.MAX_ALIAS_VALUES // 1001

    def spec(n: int) -> str:
        return f"big: &big {big}\nuses: [{', '.join(['*big'] * n)}]\nexperiment: [{{tag: a}}]\n"

    within = errors(spec(uses))
    assert not any("aliases" in e for e in within), within
    beyond = errors(spec(uses + 1))
    assert len(beyond) == 1 and "too many aliases" in beyond[0], beyond


def test_an_alias_inside_its_own_anchor_is_a_located_error() -> None:
    assert one_error("a: &a [x, *a]\n") == "s.yaml:1:11: a[1]: alias *a is inside its own anchor"


def test_nesting_through_aliases_is_bounded() -> None:
    depth = located.MAX_DEPTH + 10
    chain = ["n0: &n0 [x]"] + [f"n{i}: &n{i} [*n{i - 1}]" for i in range(1, depth)]
    error = one_error("\n".join(chain) + "\nexperiment: [{tag: a, command: x}]\n")
    # n63 is [*n62]: 64 levels inside the mapping is one too many
    line = located.MAX_DEPTH
    assert error.startswith(f"s.yaml:{line}:"), error
    assert f"nested too deeply through *n{line - 2} (at most {located.MAX_DEPTH} levels)" in error


def test_deep_block_nesting_is_located_where_it_goes_too_deep() -> None:
    text = "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "experiment: []\n"
    error = one_error(text)
    # the root mapping is the first level, k0's value the second, ...
    assert error.startswith(f"s.yaml:{located.MAX_DEPTH + 1}:"), error
    assert "nested too deeply" in error


# -- 2. size: linear, bounded, and brief about it -------------------------------------------


def many_tags(n: int, last: str = "") -> str:
    """n tags, each waiting for the previous one to stop, with env in both forms."""
    out = ["experiment:"]
    for i in range(n):
        out.append(f"- tag: t{i}\n  command: [python, pod.py, --n, '{i}']\n")
        out.append(f"  env: [{{name: INDEX, value: {i}}}, {{name: MODE, value: fast}}]\n")
        if i:
            out.append(f"  workflow: {{start: {{name: t{i - 1}_stop, value: 1}}}}\n")
    return "\n".join(out) + last


@pytest.mark.timeout(HANG_GUARD_S)
def test_20000_tags_validate() -> None:
    exp = parse(many_tags(20_000), "s.yaml")
    assert exp.pod_count == 20_000
    assert exp.tags[-1].start is not None and exp.tags[-1].start.name == "t19998_stop"
    assert exp.tag("t12345").env == {"INDEX": "12345", "MODE": "fast"}


@pytest.mark.timeout(HANG_GUARD_S)
def test_the_one_error_of_20000_tags_is_located_in_the_last_tag() -> None:
    text = many_tags(20_000, "  replicas: six\n")
    line = text.count("\n")
    assert errors(text) == [
        f"s.yaml:{line}:13: experiment[19999].replicas: expected int, got 'six'"
    ]


def test_type_information_is_computed_per_type_not_per_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = msgspec.inspect.type_info

    def counted(t: object) -> msgspec.inspect.Type:
        calls.append(t)
        return real(t)

    monkeypatch.setattr(msgspec.inspect, "type_info", counted)
    errors(many_tags(500, "  replicas: six\n"))
    assert len(calls) < 50, f"{len(calls)} type_info calls for a spec of 500 tags"


def test_a_spec_file_over_the_size_bound_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "huge.yaml"
    with spec.open("wb") as f:
        f.truncate(located.MAX_SPEC_BYTES + 1)  # sparse: no disk, and not a valid spec either
    with pytest.raises(SpecError) as info:
        load(spec)
    assert info.value.errors == [
        f"{spec}:1:1: the spec is larger than 16 MiB, the most a spec may be"
    ]


def test_errors_stop_after_the_bound() -> None:
    text = "experiment:\n" + "".join(
        f"- {{tag: t{i}, command: x, replcas: 2}}\n" for i in range(900)
    )
    found = errors(text)
    assert len(found) == located.MAX_ERRORS + 1
    assert found[-1].endswith(f"validation stopped after {located.MAX_ERRORS} errors")


def test_errors_quote_big_values_briefly() -> None:
    numbers = "[" + ", ".join(map(str, range(100_000))) + "]"
    long_key = "k" * 1000
    found = errors(f"experiment: [{{tag: a, command: x, '{long_key}': 1}}]\ntimeout: {numbers}\n")
    assert len(found) == 2
    assert all(len(e) < 300 for e in found), [e[:300] for e in found]


def test_a_huge_number_is_a_located_error_not_a_traceback() -> None:
    digits = "1" * 5000
    error = one_error(f"experiment:\n- {{tag: a, command: x, replicas: {digits}}}\n")
    assert error.startswith("s.yaml:2:34: experiment[0].replicas: a number of 5000 characters")


def test_a_long_sexagesimal_number_is_refused_not_computed() -> None:
    # YAML 1.1 reads 1:2:3 in base 60; the cost grows with the square of its length
    error = one_error("x: 1" + ":1" * 100_000 + "\nexperiment: [{tag: a, command: x}]\n")
    assert error.startswith("s.yaml:1:4: x: a number of 200001 characters")


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("!!int abc", "'abc' is not a valid tag:yaml.org,2002:int"),
        ("!!float abc", "'abc' is not a valid tag:yaml.org,2002:float"),
        ("!!bool maybe", "'maybe' is not a valid tag:yaml.org,2002:bool"),
        ("!!timestamp soon", "'soon' is not a valid tag:yaml.org,2002:timestamp"),
    ],
)
def test_an_explicit_tag_on_a_bad_value_is_a_located_error(written: str, why: str) -> None:
    error = one_error(f"experiment:\n- {{tag: a, command: x, replicas: {written}}}\n")
    assert error == f"s.yaml:2:34: experiment[0].replicas: {why}"


# -- 3. pods ------------------------------------------------------------------------------------


def test_a_billion_replicas_are_refused_naming_the_bound() -> None:
    error = one_error("experiment:\n- {tag: a, command: x, replicas: 1000000000}\n")
    assert error == (
        "s.yaml:2:34: experiment[0].replicas: expected int <= 100000 "
        "(a run has at most 100000 pods), got 1000000000"
    )


def test_pods_of_a_run_are_bounded_across_tags() -> None:
    text = (
        "experiment:\n"
        "- {tag: a, command: x, replicas: 60000}\n"
        "- {tag: b, command: x}\n"
        "- {tag: c, command: x, replicas: 40000}\n"
    )
    assert errors(text) == [
        "s.yaml:4:34: experiment[2].replicas: the run would have 100001 pods; "
        "a run has at most 100000 pods"
    ]


def test_exactly_max_pods_is_fine() -> None:
    assert MAX_PODS == 100_000
    one = parse(f"experiment:\n- {{tag: a, command: x, replicas: {MAX_PODS}}}\n")
    two = parse(
        "experiment:\n- {tag: a, command: x, replicas: 50000}\n"
        "- {tag: b, command: x, replicas: 50000}\n"
    )
    assert one.pod_count == two.pod_count == MAX_PODS
    schema = json_schema()["$defs"]["TagSpec"]["properties"]["replicas"]
    assert schema["maximum"] == MAX_PODS


# -- 4. tag names -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [MAX_TAG_LENGTH + 1, 95, 100])
def test_a_tag_too_long_for_its_derived_names_is_refused(length: int) -> None:
    tag = "t" * length
    error = one_error(f"experiment:\n- {{tag: {tag}, command: x}}\n")
    assert error.startswith("s.yaml:2:9: experiment[0].tag: tag 'ttt")
    assert f"must be 1 to {MAX_TAG_LENGTH} letters" in error


def test_the_longest_tag_has_valid_derived_names_and_one_more_is_refused() -> None:
    tag = "T" + "a_-9" * 15 + "zz"
    assert len(tag) == MAX_TAG_LENGTH
    exp = parse(f"experiment:\n- {{tag: {tag}, command: x, replicas: {MAX_PODS}}}\n", "s.yaml")
    assert exp.tags[0].tag == tag
    assert NAME_RE.match(start_event(tag)) and NAME_RE.match(stop_event(tag))
    assert ko.label_value(tag) == tag
    name = ko.pod_name("a" * 51, tag, MAX_PODS - 1)
    assert len(name) <= 63 and re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name)
    assert "must be 1 to 63" in one_error(f"experiment:\n- {{tag: {tag}x, command: x}}\n")


# -- 5. env that no process can be given -------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ('{A: "x\\0y"}', "s.yaml:2:33: experiment[0].env.A: an env value may not contain a NUL"),
        (
            '[{name: A, value: "x\\0y"}]',
            "s.yaml:2:47: experiment[0].env[0].value: an env value may not contain a NUL",
        ),
        ('{"A=B": x}', "s.yaml:2:30: experiment[0].env.A=B: env name 'A=B' may not contain '='"),
        (
            "[{name: A=B, value: x}]",
            "s.yaml:2:37: experiment[0].env[0].name: env name 'A=B' may not contain '='",
        ),
        ('{"": x}', "s.yaml:2:30: experiment[0].env['']: an env name may not be empty"),
        (
            "[{name: '', value: x}]",
            "s.yaml:2:37: experiment[0].env[0].name: an env name may not be empty",
        ),
        ('{"A\\0": x}', "s.yaml:2:30: experiment[0].env['A\\x00']: env name 'A\\x00' may not"),
    ],
)
def test_env_that_execve_refuses_is_refused_by_validate(env: str, expected: str) -> None:
    error = one_error(f"experiment:\n- {{tag: a, command: x, env: {env}}}\n")
    assert error.startswith(expected), error


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ('"x\\0y"', "s.yaml:2:21: experiment[0].command: a command may not contain a NUL"),
        ('[sh, "x\\0y"]', "s.yaml:2:26: experiment[0].command[1]: a command may not contain a NUL"),
    ],
)
def test_a_command_with_nul_is_refused_by_validate(command: str, expected: str) -> None:
    error = one_error(f"experiment:\n- {{tag: a, command: {command}}}\n")
    assert error.startswith(expected), error


# -- 6. env values are taken as written (no YAML 1.1 surprises) -------------------------------

#: What YAML 1.1 reads as something else than the text: octal, hex, binary, `_` in numbers,
#: trailing zeros, signs, infinity, yes/on/off, capitalised booleans, base 60, dates.
AS_WRITTEN = [
    "010",
    "0x1F",
    "0b101",
    "1_000",
    "1.50",
    "+12",
    ".inf",
    "yes",
    "on",
    "Off",
    "True",
    "12:30",
    "190:20:30",
    "2001-12-14",
]


@pytest.mark.parametrize("written", AS_WRITTEN)
def test_env_values_are_taken_exactly_as_written(written: str) -> None:
    listed = parse(f"experiment:\n- {{tag: a, command: x, env: [{{name: V, value: {written}}}]}}\n")
    mapped = parse(f"experiment:\n- {{tag: a, command: x, env: {{V: {written}}}}}\n")
    assert listed.tags[0].env == mapped.tags[0].env == {"V": written}


def test_env_values_through_aliases_and_merges_are_taken_as_written() -> None:
    exp = parse(
        "experiment:\n"
        "- {tag: a, command: x, env: &base {HEX: 0x1F, SWITCH: on, MODE: &octal 010}}\n"
        "- {tag: b, command: x, env: {<<: *base, SWITCH: off, MORE: *octal}}\n"
        "- {tag: c, command: x, env: [{name: MODE, value: *octal}]}\n"
    )
    assert exp.tag("a").env == {"HEX": "0x1F", "SWITCH": "on", "MODE": "010"}
    assert exp.tag("b").env == {"HEX": "0x1F", "SWITCH": "off", "MODE": "010", "MORE": "010"}
    assert exp.tag("c").env == {"MODE": "010"}
