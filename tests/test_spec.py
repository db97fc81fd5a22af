"""Table tests of the spec: every located error, defaults, both env forms."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from tricks_nats.errors import SpecError
from tricks_nats.spec import json_schema, parse

from .conftest import ROOT, cli_env

OK = """\
apiVersion: v1
experiment:
- tag: server
  command: [python, server.py]
  replicas: 2
"""


def errors(text: str, runtime: str | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(textwrap.dedent(text), "s.yaml", runtime=runtime)
    return info.value.errors


def test_defaults() -> None:
    exp = parse("experiment:\n- {tag: a, command: x}\n", "dir/my-exp.yaml")
    (tag,) = exp.tags
    assert (tag.replicas, tag.start, tag.stop, tag.env) == (1, None, None, {})
    assert tag.command == ("/bin/sh", "-c", "x")
    assert (exp.name, exp.timeout, exp.runtime) == ("my-exp", None, "local")


def test_env_list_and_mapping_forms_are_equivalent() -> None:
    a = parse(
        "experiment:\n- {tag: a, command: x, env: [{name: N, value: 6}, {name: B, value: true}]}\n"
    )
    b = parse("experiment:\n- {tag: a, command: x, env: {N: 6, B: true}}\n")
    assert a.tags[0].env == b.tags[0].env == {"N": "6", "B": "true"}


@pytest.mark.parametrize(
    ("written", "taken"),
    [("7000", "7000"), ("true", "true"), ("0o17", "0o17"), ("1e3", "1e3"), ("'010'", "010")],
)
def test_env_values_keep_their_text(written: str, taken: str) -> None:
    exp = parse(f"experiment:\n- {{tag: a, command: x, env: {{V: {written}}}}}\n")
    assert exp.tags[0].env == {"V": taken}


def test_anchors_aliases_and_merge_keys() -> None:
    exp = parse(
        """\
        experiment:
        - tag: a
          command: &cmd [python, pod.py]
          env: &common {A: '1', B: '2'}
        - tag: b
          command: *cmd
          env: {<<: *common, B: '3'}
        - tag: c
          command: *cmd
          env: {<<: [{B: '4', C: '5'}, *common], A: '6'}
        """.replace("        ", "")
    )
    assert [t.command for t in exp.tags] == [("python", "pod.py")] * 3
    assert [t.env for t in exp.tags] == [
        {"A": "1", "B": "2"},
        {"A": "1", "B": "3"},
        {"A": "6", "B": "4", "C": "5"},
    ]


def test_an_error_inside_an_aliased_value_points_where_it_is_written() -> None:
    found = errors("""\
        experiment:
        - {tag: a, command: x, workflow: &w {start: {name: go, value: zero}}}
        - {tag: b, command: x, workflow: *w}
        """)
    assert found == [
        "s.yaml:2:63: experiment[0].workflow.start.value: expected int, got 'zero'",
        "s.yaml:2:63: experiment[1].workflow.start.value: expected int, got 'zero'",
    ]


def test_workflow_conditions() -> None:
    exp = parse(
        OK + "  workflow: {start: {name: go, value: 3}, stop: {name: server_stop, value: 1}}\n"
    )
    t = exp.tags[0]
    assert (t.start.name, t.start.value, t.stop.name) == ("go", 3, "server_stop")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "experiment:\n- {tag: a, command: x, replicas: 0}\n",
            "s.yaml:2:34: experiment[0].replicas: expected int >= 1, got 0",
        ),
        (
            "experiment:\n- {tag: a, command: x, replica: 2}\n",
            "s.yaml:2:24: experiment[0].replica: unknown key 'replica' (did you mean 'replicas'?)",
        ),
        (
            "experiment:\n- {tag: a, command: x}\n- {tag: a, command: y}\n",
            "s.yaml:3:9: experiment[1].tag: duplicate tag 'a'",
        ),
        (
            "experiment:\n- {tag: a, command: x, workflow: {start: {name: 'a b', value: 1}}}\n",
            "s.yaml:2:49: experiment[0].workflow.start.name: event name 'a b' must be",
        ),
        (
            "experiment:\n- {tag: a, command: x, workflow: {start: {name: zz_stop, value: 1}}}\n",
            "s.yaml:2:49: experiment[0].workflow.start.name: 'zz_stop' refers to tag 'zz'",
        ),
        (
            "experiment:\n- {tag: a, command: x, workflow: {start: {name: a_start, value: 1}}}\n",
            "tag 'a' cannot wait for its own start",
        ),
        (
            "experiment:\n- {tag: a}\n",
            "s.yaml:2:3: experiment[0]: tag 'a' has no 'command': the local runtime needs one",
        ),
        (
            "experiment:\n- {tag: a, command: x, env: {POD_ID: '3'}}\n",
            "s.yaml:2:30: experiment[0].env.POD_ID: env 'POD_ID' is set by tricks-nats",
        ),
        (
            "experiment:\n- {tag: a, command: x, env: [{name: X}, {value: 1}]}\n",
            "experiment[0].env[1]: missing required key 'name'",
        ),
        (
            "experiment:\n- {tag: a, command: x, workflow: {start: {name: b}}}\n",
            "experiment[0].workflow.start: missing required key 'value'",
        ),
        ("experiment: [{tag: a, command: x}\n", "s.yaml:2:1: YAML syntax error"),
        ("", "s.yaml:1:1: the spec is empty"),
        ("- a\n", "s.yaml:1:1: expected a mapping, got a list"),
        ("experiment: []\n", "s.yaml:1:13: experiment: needs at least 1 entry"),
        (
            "experiment:\n- {tag: a, command: x}\ntimeout: soon\n",
            "s.yaml:3:10: timeout: expected float, got 'soon'",
        ),
        (
            "experiment:\n- {tag: a, command: x}\nruntime: docker\n",
            "s.yaml:3:10: runtime: expected one of local, kubernetes, got 'docker'",
        ),
        (
            "apiVersion: v2\nexperiment:\n- {tag: a, command: x}\n",
            "s.yaml:1:13: apiVersion: expected one of v1, got 'v2'",
        ),
        (
            "experiment:\n- {tag: a, command: x}\nexperiment: []\n",
            "s.yaml:3:1: experiment: duplicate key 'experiment'",
        ),
        ("experiment:\n- {tag: a, command: [1, 2]}\n", "experiment[0].command"),
        (
            "experiment:\n- {tag: a, command: x}\ntimeout: .nan\n",
            "s.yaml:3:10: timeout: expected float >= 0.0, got nan",
        ),
        (
            "experiment:\n- {tag: a, command: x}\ntimeout: -1\n",
            "s.yaml:3:10: timeout: expected float >= 0.0, got -1",
        ),
        (
            "experiment:\n- {tag: a, command: x, env: {A: ~}}\n",
            "s.yaml:2:33: experiment[0].env.A: expected bool | int | float | str, got None",
        ),
        (
            "experiment:\n- {tag: a, command: x}\n---\nexperiment: []\n",
            "s.yaml:3:1: a spec is one YAML document, and another one starts here",
        ),
        (
            "experiment:\n- {tag: a, command: x, env: {<<: 3}}\n",
            "s.yaml:2:34: experiment[0].env.<<: merges a mapping or a list of mappings, not an",
        ),
        # found by hypothesis: a non-string env name crashed the reserved-name check
        ("experiment:\n- {tag: a, command: x, env: [{name: []}]}\n", "s.yaml:2:37: "),
    ],
)
def test_errors_are_located(text: str, expected: str) -> None:
    found = errors(text)
    assert any(expected in e for e in found), found


def test_every_error_is_reported_at_once() -> None:
    found = errors("""\
        apiVersion: v1
        experiment:
        - tag: server
          command: [python, server.py]
          replcas: 6
        - tag: client
          command: [python, client.py]
          replicas: six
          workflow:
            start: {name: nope_stop, value: 6}
        """)
    assert [e.split(": ", 1)[0] for e in found] == ["s.yaml:5:3", "s.yaml:8:13", "s.yaml:10:19"]


def test_errors_inside_unions_are_each_located_by_their_path() -> None:
    found = errors("""\
        experiment:
        - tag: a
          command: [python, 3]
          env: [{name: A, value: [1]}, {name: B, value: {x: 1}}, {name: 3}, 4, {nam: C}]
          workflow: {start: {name: go, value: 0}, stop: {name: go}}
          resources: {requests: {cpu: [1]}, limits: 2}
        runtime: 3
        timeout: -0.5
        """)
    assert found == [
        "s.yaml:3:21: experiment[0].command[1]: expected str, got 3",
        "s.yaml:4:26: experiment[0].env[0].value: expected bool | int | float | str, got [1]",
        "s.yaml:4:49: experiment[0].env[1].value: expected bool | int | float | str, got {'x': 1}",
        "s.yaml:4:65: experiment[0].env[2].name: expected str, got 3",
        "s.yaml:4:69: experiment[0].env[3]: expected a mapping, got an integer",
        "s.yaml:4:72: experiment[0].env[4]: missing required key 'name'",
        "s.yaml:4:73: experiment[0].env[4].nam: unknown key 'nam' (did you mean 'name'?); "
        "known keys: name, value",
        "s.yaml:5:39: experiment[0].workflow.start.value: expected int >= 1, got 0",
        "s.yaml:5:49: experiment[0].workflow.stop: missing required key 'value'",
        "s.yaml:6:31: experiment[0].resources.requests.cpu: expected int | float | str, got [1]",
        "s.yaml:6:45: experiment[0].resources.limits: expected a mapping, got an integer",
        "s.yaml:7:10: runtime: expected one of local, kubernetes, got 3",
        "s.yaml:8:10: timeout: expected float >= 0.0, got -0.5",
    ]


def test_wrong_types_deep_in_lists_of_mappings_are_located() -> None:
    found = errors("""\
        experiment:
        - tag: server
          command: [python, server.py]
          env:
          - name: PORT
            value: 7000
          - name: MODE
            value: [fast]
        - tag: client
          command: [python, client.py]
          replicas: 2.0
          env:
            PEERS: {server: 1}
          workflow:
            start: {value: 1}
            stop: [client_stop]
        """)
    assert found == [
        "s.yaml:8:12: experiment[0].env[1].value: expected bool | int | float | str, got ['fast']",
        "s.yaml:11:13: experiment[1].replicas: expected int, got 2.0",
        "s.yaml:13:12: experiment[1].env.PEERS: expected bool | int | float | str, "
        "got {'server': 1}",
        "s.yaml:15:12: experiment[1].workflow.start: missing required key 'name'",
        "s.yaml:16:11: experiment[1].workflow.stop: expected a mapping, got a list",
    ]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        # a Literal given a non-string: msgspec's text said "expected str"
        ("runtime: 3", "3:10: runtime: expected one of local, kubernetes, got 3"),
        ("apiVersion: 1", "3:13: apiVersion: expected one of v1, got 1"),
        (
            "tag: a, on_failure: ~",
            "2:24: experiment[0].on_failure: expected one of stop, continue, got None",
        ),
        # a struct in a union: msgspec's text said "expected object, got [...]"
        ("tag: a, workflow: [go]", "2:22: experiment[0].workflow: expected a mapping, got a list"),
        # NaN passes JSON Schema's bounds, not msgspec's (nor so the spec's)
        ("timeout: .nan", "3:10: timeout: expected float >= 0.0, got nan"),
        # a bound applies to a value of its type only: one error, the type's, as msgspec finds
        ("tag: a, replicas: .nan", "2:22: experiment[0].replicas: expected int, got nan"),
        ("tag: a, replicas: -0.5", "2:22: experiment[0].replicas: expected int, got -0.5"),
        # JSON Schema's integer takes 2.0; msgspec, and so the spec, do not
        ("tag: a, replicas: 2.0", "2:22: experiment[0].replicas: expected int, got 2.0"),
        # an int no float can hold is still an int, checked against its bound...
        (
            "tag: a, replicas: " + "9" * 400,
            "2:22: experiment[0].replicas: expected int <= 100000 (a run has at most 100000 pods), "
            f"got {'9' * 18}...{'9' * 19}",
        ),
        # ...but it is no float (msgspec: "Number out of range")
        ("timeout: 1" + "0" * 400, f"3:10: timeout: expected float, got 1{'0' * 17}...{'0' * 19}"),
    ],
)
def test_errors_from_structured_paths(written: str, expected: str) -> None:
    """Where JSON Schema and msgspec differ, or msgspec's text said less; `written` goes in the
    one tag if it starts with `tag: `, else at the top level."""
    tag, top = (written, "") if written.startswith("tag: ") else ("tag: a", written)
    text = f"experiment:\n- {{{tag}, command: x}}\n{top}\n"
    assert errors(text) == [f"s.yaml:{expected}"]


def test_each_missing_key_is_its_own_error() -> None:
    assert errors("experiment:\n- {tag: a, command: x, workflow: {start: {}}}\n") == [
        "s.yaml:2:42: experiment[0].workflow.start: missing required key 'name'",
        "s.yaml:2:42: experiment[0].workflow.start: missing required key 'value'",
    ]


def test_a_valid_spec_does_not_import_the_schema_validator() -> None:
    probe = (
        "import sys\nfrom tricks_nats.spec import load\nload('examples/ring/ring.yaml')\n"
        "print('jsonschema' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.stdout.strip() == "False", result.stdout + result.stderr


def test_kubernetes_runtime_needs_an_image_not_a_command() -> None:
    assert parse("experiment:\n- {tag: a, image: busybox}\n", runtime="kubernetes").tags
    assert "has no 'image'" in errors("experiment:\n- {tag: a, command: x}\n", "kubernetes")[0]


def test_garbage_is_an_error_not_a_crash() -> None:
    assert errors("\x00\x01")[0].startswith("s.yaml:1:1: YAML error")
    # Where it is said depends on how far PyYAML looks ahead (column 65, or its own limit of
    # 1000 levels from 6.0.4 on): the message is ours either way.
    (deep,) = errors("[" * 10000)
    assert re.fullmatch(r"s\.yaml:1:\d+: the spec is nested too deeply \(at most 64 levels\)", deep)
    assert errors("a: " + "[" * 70 + "]" * 70) == [  # within PyYAML's look-ahead: exact
        "s.yaml:1:67: the spec is nested too deeply (at most 64 levels)"
    ]
    assert "undefined alias" in errors("a: *nope\n")[0]


def test_json_schema_names_the_fields() -> None:
    schema = json_schema()
    assert "TagSpec" in schema["$defs"]
    assert set(schema["$defs"]["TagSpec"]["properties"]) >= {
        "tag",
        "command",
        "replicas",
        "workflow",
        "env",
        "image",
    }


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tricks_nats.cli.app", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=60,
    )


def test_validate_cli_names_both_lines(tmp_path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "apiVersion: v1\nexperiment:\n- tag: a\n  command: x\n  replcas: 2\n"
        "- tag: b\n  command: y\n  replicas: six\n"
    )
    result = run_cli("validate", str(spec))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"{spec}:5:") and lines[1].startswith(f"{spec}:8:")
    assert "Traceback" not in result.stderr


def test_validate_cli_ok_and_missing_file(tmp_path) -> None:
    ok = run_cli("validate", "examples/ring/ring.yaml")
    assert (ok.returncode, ok.stdout.strip()) == (
        0,
        "examples/ring/ring.yaml: ok (2 tags, 12 pods, runtime local)",
    )
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read the spec" in missing.stderr


def test_metrics_patterns_and_intervals() -> None:
    exp = parse(
        textwrap.dedent(
            r"""
            experiment:
            - tag: a
              command: x
              metrics:
              - name: lat_ms
                pattern: '(?P<op>\w+) took (?P<value>[0-9.]+)ms'
                expected_interval_ms: 10
              - {name: size_bytes}
            """
        ),
        "s.yaml",
    )
    (lat, size) = exp.tag("a").metrics
    assert (lat.name, lat.expected_interval_ms, size.pattern) == ("lat_ms", 10, None)


def test_bad_metrics_are_located_errors() -> None:
    found = errors(
        r"""
        experiment:
        - tag: a
          command: x
          metrics:
          - {name: lat_ms, pattern: 'latency=(?P<val>[0-9.]+)'}
          - {name: lat_ms, pattern: '(?P<value>[0-9.]+'}
          - {name: "bad name", pattern: '(?P<value>\d+) (?P<tag>\w+)'}
          - {name: ok, expected_interval_ms: -1}
          - {name: ok2, patern: x}
        """
    )
    assert found == [
        "s.yaml:6:29: experiment[0].metrics[0].pattern: pattern 'latency=(?P<val>[0-9.]+)' "
        "has no group (?P<value>...) for the sample's value",
        "s.yaml:7:12: experiment[0].metrics[1].name: metric 'lat_ms' is declared twice in this tag",
        "s.yaml:7:29: experiment[0].metrics[1].pattern: bad pattern '(?P<value>[0-9.]+': "
        "missing ), unterminated subpattern at position 0",
        "s.yaml:8:12: experiment[0].metrics[2].name: metric name 'bad name' must be letters, "
        "digits, '-' or '_' (starting with a letter or digit, at most 100)",
        "s.yaml:8:33: experiment[0].metrics[2].pattern: pattern group 'tag' cannot be a label: "
        "use a name other than name, pod_id, tag",
        "s.yaml:9:38: experiment[0].metrics[3].expected_interval_ms: expected float > 0.0, got -1",
        "s.yaml:10:17: experiment[0].metrics[4].patern: unknown key 'patern' (did you mean "
        "'pattern'?); known keys: name, pattern, expected_interval_ms",
    ]
