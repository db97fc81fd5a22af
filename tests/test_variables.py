"""Campaign specs: `$var` substitution in every position, located errors for every
configuration, matrix and repeat expansion (pure: no run)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from tricks_nats import spec as specmod
from tricks_nats import study
from tricks_nats.errors import SpecError

# Tricks' own README example, with commands for the local runtime.
TRICKS_README = """\
apiVersion: v1
config:
  - $op_number: 100
    $client_number: 3
  - $op_number: 200
    $client_number: 3
  - $op_number: 100
    $client_number: 6
  - $op_number: 200
    $client_number: 6
experiment:
  - tag: server
    image: vitorenesduarte/tricks-example
    command: [sh, -c, "exit 0"]
    replicas: 3
    env:
    - name: TYPE
      value: server
    workflow:
      stop:
        name: client_stop
        value: $client_number
  - tag: client
    image: vitorenesduarte/tricks-example
    command: [sh, -c, "exit 0"]
    replicas: $client_number
    env:
    - name: TYPE
      value: client
    - name: OP_NUMBER
      value: $op_number
    workflow:
      start:
        name: server_start
        value: 3
"""


def parse(text: str, **kw: object) -> study.Study:
    return study.parse(textwrap.dedent(text), "study.yaml", **kw)  # type: ignore[arg-type]


def errors(text: str, **kw: object) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(text, **kw)
    return info.value.errors


def test_tricks_readme_campaign_validates_as_four_experiments() -> None:
    s = study.parse(TRICKS_README, "study.yaml")
    assert s.campaign and s.variables == ("op_number", "client_number")
    assert [c.variables for c in s.configurations] == [
        {"op_number": 100, "client_number": 3},
        {"op_number": 200, "client_number": 3},
        {"op_number": 100, "client_number": 6},
        {"op_number": 200, "client_number": 6},
    ]
    for exp, clients, ops in zip(s.experiments, (3, 3, 6, 6), (100, 200, 100, 200), strict=True):
        assert exp.tag("client").replicas == clients
        stop = exp.tag("server").stop
        assert stop is not None and stop.value == clients
        assert exp.tag("client").env["OP_NUMBER"] == str(ops)
        assert exp.variables == {"op_number": ops, "client_number": clients}
    assert s.describe() == "4 runs (4 configurations x 1 repetition)"


def test_matrix_is_the_cartesian_product_in_written_order() -> None:
    readme = study.parse(TRICKS_README, "study.yaml")
    config = TRICKS_README[TRICKS_README.index("config:") : TRICKS_README.index("experiment:")]
    text = TRICKS_README.replace(
        config, "matrix: {$client_number: [3, 6], $op_number: [100, 200]}\n"
    )
    s = study.parse(text, "study.yaml")
    assert [c.variables for c in s.configurations] == [
        {"client_number": 3, "op_number": 100},
        {"client_number": 3, "op_number": 200},
        {"client_number": 6, "op_number": 100},
        {"client_number": 6, "op_number": 200},
    ]
    # the same four experiments as Tricks' config list
    for m, c in zip(s.experiments, readme.experiments, strict=True):
        assert m.tags == c.tags and m.variables == c.variables


def test_config_crossed_with_matrix_and_repeat_orders_runs_by_round() -> None:
    s = parse(
        """\
        config:
          - $mode: fast
          - $mode: safe
        matrix:
          $n: [1, 2]
        repeat: 2
        experiment:
          - tag: a
            command: "run --mode=$mode -n $n"
        """
    )
    assert [c.variables for c in s.configurations] == [
        {"mode": "fast", "n": 1},
        {"mode": "fast", "n": 2},
        {"mode": "safe", "n": 1},
        {"mode": "safe", "n": 2},
    ]
    runs = s.runs
    assert len(runs) == 8 and s.describe() == "8 runs (4 configurations x 2 repetitions)"
    # every configuration once, then again
    assert [(r.index, r.config, r.repetition) for r in runs[:5]] == [
        (1, 0, 1),
        (2, 1, 1),
        (3, 2, 1),
        (4, 3, 1),
        (5, 0, 2),
    ]
    assert s.experiments[3].tags[0].command == ("/bin/sh", "-c", "run --mode=safe -n 2")
    assert (
        parse(
            """\
        matrix: {$n: [1]}
        repeat: 2
        experiment: [{tag: a, command: "echo $n"}]
        """,
            repeat=5,
        ).repeat
        == 5
    )


def test_substitution_in_every_position() -> None:
    s = parse(
        """\
        name: study-$size
        timeout: $limit
        runtime: $where
        matrix:
          $size: [2]
          $limit: [30.5]
          $where: [local]
          $img: [v1.10]
          $flag: [true]
          $ops: [100]
        experiment:
          - tag: a
            image: "repo/app:$img"
            command: [prog, "--ops=$ops", "${ops}x", "$$HOME", "$$$ops", $ops]
            replicas: $size
            env:
              OPS: $ops
              FLAG: $flag
              MIXED: "f=$flag"
            metrics:
              - name: lat_ms
                expected_interval_ms: $limit
          - tag: b
            command: "echo $1 $? ${HOME:-x} $$"
            workflow:
              start: {name: a_start, value: $size}
        """
    )
    exp = s.experiments[0]
    a, b = exp.tag("a"), exp.tag("b")
    assert exp.name == "study-2" and exp.timeout == 30.5 and exp.runtime == "local"
    assert a.image == "repo/app:v1.10"  # as written, not the number 1.1
    assert a.command == ("prog", "--ops=100", "100x", "$HOME", "$100", "100")
    assert a.replicas == 2
    assert a.env == {"OPS": "100", "FLAG": "true", "MIXED": "f=true"}
    assert a.metrics[0].expected_interval_ms == 30.5
    # `$` not followed by a name is left alone; only `$$` becomes `$`
    assert b.command == ("/bin/sh", "-c", "echo $1 $? ${HOME:-x} $")
    assert b.start is not None and b.start.value == 2


def test_a_plain_spec_keeps_its_dollars() -> None:
    s = parse(
        """\
        experiment:
          - tag: a
            command: "echo $HOME $$"
        """
    )
    assert not s.campaign and len(s.runs) == 1
    assert s.experiments[0].tag("a").command == ("/bin/sh", "-c", "echo $HOME $$")
    assert s.experiments[0].text.startswith("experiment:")  # the file as written


def test_repeat_alone_makes_a_campaign_without_variables() -> None:
    s = parse("repeat: 3\nexperiment: [{tag: a, command: 'echo $HOME'}]\n")
    assert s.campaign and s.repeat == 3 and s.variables == ()
    assert s.experiments[0].tag("a").command == ("/bin/sh", "-c", "echo $HOME")


def test_undefined_variable_names_the_configuration_and_its_line() -> None:
    found = errors(
        """\
        config:
          - $a: 1
            $b: 2
          - $a: 3
        experiment:
          - tag: t
            command: "echo $a $b"
        """
    )
    assert found == [
        "study.yaml:7:14: experiment[0].command: $b is not defined in configuration 2 "
        "($a=3, line 4) (a literal $ is written $$)"
    ]


def test_variable_defined_nowhere_and_unused_variables_are_located() -> None:
    found = errors(
        """\
        config:
          - $a: 1
            $unused: 2
        matrix:
          $also_unused: [1, 2]
        experiment:
          - tag: t
            command: "echo $a $HOME"
        """
    )
    assert found == [
        "study.yaml:3:5: config[0].$unused: $unused is defined but never used",
        "study.yaml:5:3: matrix.$also_unused: $also_unused is defined but never used",
        "study.yaml:8:14: experiment[0].command: $HOME is not defined in any configuration "
        "(a literal $ is written $$)",
    ]


def test_every_configuration_is_validated_before_any_run() -> None:
    found = errors(
        """\
        matrix:
          $n: [2, 1, 0, "many"]
        experiment:
          - tag: t
            command: "echo"
            replicas: $n
            workflow:
              stop: {name: t_stop, value: 2}
            bogus: 1
        """
    )
    # shared by every configuration: said once, as is
    assert "study.yaml:9:5: experiment[0].bogus: unknown key 'bogus'" in found[-1]
    assert found[:-1] == [
        "study.yaml:6:15: in configuration 3 ($n=0, line 0): experiment[0].replicas: "
        "expected int >= 1, got 0".replace(", line 0", ""),
        "study.yaml:6:15: in configuration 4 ($n=many): experiment[0].replicas: "
        "expected int, got 'many'",
        "study.yaml:8:35: in configuration 2 ($n=1): experiment[0].workflow.stop.value: "
        "'t_stop' can never reach 2: tag 't' has 1 replica",
    ]


def test_the_fourth_configuration_fails_validation_not_the_fourth_run() -> None:
    text = TRICKS_README.replace(
        "  - $op_number: 200\n    $client_number: 6\n",
        "  - $op_number: 200\n    $client_number: 0\n",
    )
    found = errors(text)
    fourth = "in configuration 4 ($op_number=200, $client_number=0, line 9): "
    assert found == [  # the server's stop value and the client's replicas: $client_number
        f"study.yaml:22:16: {fourth}experiment[0].workflow.stop.value: expected int >= 1, got 0",
        f"study.yaml:26:15: {fourth}experiment[1].replicas: expected int >= 1, got 0",
    ]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("config: []", "study.yaml:1:9: config: config: expected a non-empty list"),
        ("config: [3]", "config[0]: expected a mapping ($name: value), got 3"),
        ("config: [{n: 1}]", "config[0].n: 'n' is not a variable: write $ then letters"),
        ("config: [{$n: [1]}]", "config[0].$n: a variable's value is a number, a string"),
        ("matrix: {$n: []}", "matrix.$n: '$n': expected a non-empty list of values"),
        ("matrix: {$n: 3}", "matrix.$n: '$n': expected a non-empty list of values"),
        ("matrix: [1]", "matrix: matrix: expected a mapping of $name: [values]"),
        ("matrix: {$n: [1]}\nconfig: [{$n: 2}]", "$n is defined in both config and matrix"),
        ("matrix: {$n: [1]}\nrepeat: 0", "repeat: repeat: expected an integer from 1 to 100000"),
        ("matrix: {$n: [1]}\nrepeat: yes", "expected an integer from 1 to 100000, got True"),
        ("matrix: {$1n: [1]}", "matrix.$1n: '$1n' is not a variable"),
    ],
)
def test_bad_definitions_are_located(block: str, message: str) -> None:
    found = errors(block + "\nexperiment: [{tag: t, command: 'echo $n'}]\n")
    assert any(message in line for line in found), found


def test_too_many_configurations_is_refused_before_building_them() -> None:
    axis = "[" + ", ".join(map(str, range(400))) + "]"
    found = errors(
        f"matrix:\n  $a: {axis}\n  $b: {axis}\nexperiment: [{{tag: t, command: 'echo $a $b'}}]\n"
    )
    assert found == ["study.yaml:2:3: matrix: more than 100000 configurations"]


def test_substituted_spec_runs_alone_from_anywhere(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    path = tmp_path / "study.yaml"
    path.write_text(
        "config: [{$n: 2, $word: 'yes'}]\nworkdir: bin\n"
        "experiment:\n  - tag: a\n    command: [echo, $word]\n    replicas: $n\n"
        "    env: {W: $word, N: '$n'}\n"
    )
    s = study.load(path)
    text = s.experiments[0].text
    assert text.startswith(f"# {path}, configuration 1 ($n=2, $word=yes, line 1).\n")
    data = yaml.safe_load(text)
    assert "config" not in data and data["workdir"] == str((tmp_path / "bin").resolve())
    assert data["name"] == "study"
    elsewhere = tmp_path / "runs" / "r1"
    elsewhere.mkdir(parents=True)
    (elsewhere / "spec.yaml").write_text(text)
    again = specmod.load(elsewhere / "spec.yaml")
    original = s.experiments[0]
    assert again.tags == original.tags and again.base_dir == original.base_dir
    assert again.tag("a").command == ("echo", "yes")  # the string 'yes', not a boolean
    assert again.tag("a").env == {"W": "yes", "N": "2"}


def test_workdir_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("workdir: nowhere\nexperiment: [{tag: a, command: echo}]\n")
    with pytest.raises(SpecError) as info:
        specmod.load(path)
    assert info.value.errors == [
        f"{path}:1:10: workdir: workdir 'nowhere': no such directory ({tmp_path}/nowhere)"
    ]


def test_spec_parse_refuses_a_campaign_with_a_located_hint() -> None:
    with pytest.raises(SpecError) as info:
        specmod.parse(TRICKS_README, "study.yaml")
    assert info.value.errors[0].startswith("study.yaml:2:1: config: this spec defines variables")


def test_schema_describes_config_matrix_and_repeat() -> None:
    props = specmod.json_schema()["$defs"]["Spec"]["properties"]
    assert "crossed with every point of the matrix" in str(props["config"])
    assert "cartesian product" in str(props["matrix"])
    assert props["repeat"]["anyOf"][0]["minimum"] == 1


def test_a_value_with_a_newline_stays_in_the_substituted_specs_comment() -> None:
    s = parse(
        """\
        config: [{$msg: "hi\\nexperiment: []"}]
        experiment: [{tag: a, command: [echo, $msg]}]
        """
    )
    text = s.experiments[0].text
    assert text.splitlines()[0] == (
        "# study.yaml, configuration 1 ($msg=hi\\nexperiment: [], line 1)."
    )
    assert yaml.safe_load(text)["experiment"][0]["command"] == ["echo", "hi\nexperiment: []"]
