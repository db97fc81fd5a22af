"""A spec as the runs it asks for: one experiment per configuration (`config:`, `matrix:`), each
run `repeat` times. A plain spec is a study of one run.

Every configuration's spec is substituted and validated before anything runs (a typo in the
fourth configuration must not surface after three hours of runs), and each error is located in
the user's file: an error every configuration shares is said once, others name their
configuration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tricks_nats import variables as v
from tricks_nats.errors import SpecError
from tricks_nats.located_yaml import (
    MAX_ERRORS,
    _compose,
    _Located,
    _TooMany,
)
from tricks_nats.spec import (
    Experiment,
    _collector_paused,
    _env_as_written,
    experiment_of,
    read,
    validate_data,
    wants_text,
)
from tricks_nats.words import plural


@dataclass(frozen=True)
class Run:
    """One run of a study: a configuration and a repetition."""

    index: int  # 1-based, in the order runs are made
    config: int  # 0-based
    repetition: int  # 1-based
    variables: dict[str, v.Scalar]


@dataclass(frozen=True)
class Study:
    name: str
    source: str
    text: str
    experiments: tuple[Experiment, ...]  # one per configuration
    configurations: tuple[v.Configuration, ...]
    repeat: int
    #: Records go in a campaign directory (the spec has config:, matrix: or repeat:, or
    #: `up --repeat` was given); a plain spec's run goes straight in runs/.
    campaign: bool
    variables: tuple[str, ...]

    @property
    def runs(self) -> list[Run]:
        """Every configuration once, then again: an interruption leaves whole rounds, and a
        drift in the machine spreads over every configuration rather than the last ones."""
        out: list[Run] = []
        for rep in range(1, self.repeat + 1):
            for c in self.configurations:
                out.append(Run(len(out) + 1, c.index, rep, dict(c.variables)))
        return out

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> str:
        """`12 runs (4 configurations x 3 repetitions)`."""
        n, c, r = len(self.configurations) * self.repeat, len(self.configurations), self.repeat
        if not self.campaign:
            return plural(n, "run")
        return f"{plural(n, 'run')} ({plural(c, 'configuration')} x {plural(r, 'repetition')})"


def parse(
    text: str,
    source: str = "<spec>",
    *,
    runtime: str | None = None,
    base_dir: Path | None = None,
    repeat: int | None = None,
) -> Study:
    """Validate `text` and every configuration it defines; raise SpecError with every located
    problem, or return the study. `repeat` (from `up --repeat`) wins over the spec's."""
    with _collector_paused():
        return _parse(text, source, runtime, base_dir, repeat)


def load(path: str | Path, *, runtime: str | None = None, repeat: int | None = None) -> Study:
    """Read and validate a spec file; a missing or unreadable file is a SpecError too."""
    text = read(path)
    base_dir = Path(path).resolve().parent
    return parse(text, str(path), runtime=runtime, base_dir=base_dir, repeat=repeat)


def _parse(
    text: str, source: str, runtime: str | None, base_dir: Path | None, repeat: int | None
) -> Study:
    data, loc = _compose(text, source)
    if loc.errors:
        raise SpecError(loc.errors)
    _env_as_written(data, loc)
    campaign = repeat is not None or (isinstance(data, dict) and "repeat" in data)
    if not v.is_campaign(data):
        spec, chosen, where = validate_data(data, loc, runtime, base_dir)
        if spec is None:
            raise SpecError(loc.errors)
        exp = experiment_of(spec, chosen, source, text, where)
        return Study(
            name=exp.name,
            source=source,
            text=text,
            experiments=(exp,),
            configurations=(v.Configuration(0, {}),),
            repeat=repeat or spec.repeat or 1,
            campaign=campaign,
            variables=(),
        )
    configs: list[v.Configuration] = []
    reps = 1
    sites = v.Sites([])
    try:
        configs = v.configurations(data, loc)
        reps = v.repeat(data, loc)
        sites = v.Sites.find(data)
        v.check_uses(sites, configs, loc)
    except _TooMany:
        pass
    if loc.found:
        raise SpecError(loc.errors)
    experiments = _each_configuration(data, loc, sites, configs, runtime, base_dir, source)
    names = tuple(dict.fromkeys(n for c in configs for n in c.variables))
    return Study(
        name=experiments[0].name,
        source=source,
        text=text,
        experiments=tuple(experiments),
        configurations=tuple(configs),
        repeat=repeat or reps,
        campaign=True,
        variables=names,
    )


def _each_configuration(
    data: dict[str, Any],
    loc: _Located,
    sites: v.Sites,
    configs: list[v.Configuration],
    runtime: str | None,
    base_dir: Path | None,
    source: str,
) -> list[Experiment]:
    """Substitute and validate every configuration (in place: errors keep their positions)."""
    defining = {k: data.pop(k) for k in v.CAMPAIGN_KEYS if k in data}
    experiments: list[Experiment] = []
    problems: list[list[tuple[int, int, str]]] = []
    try:
        for c in configs:
            sites.apply(c, wants_text)
            loc.found, loc.stopped = [], False
            try:
                spec, chosen, where = validate_data(data, loc, runtime, base_dir)
                if spec is not None:
                    text = _substituted(data, source, c, where)
                    experiments.append(
                        experiment_of(spec, chosen, source, text, where, c.variables)
                    )
            finally:
                sites.restore()
            problems.append(loc.found)
    finally:
        data.update(defining)
    if any(problems):
        loc.found, loc.stopped = _merged(problems, configs), False
        raise SpecError(loc.errors)
    return experiments


def _merged(
    problems: list[list[tuple[int, int, str]]], configs: list[v.Configuration]
) -> list[tuple[int, int, str]]:
    """An error of every configuration once, as is; the others with their configuration."""
    common = set(problems[0]).intersection(*problems[1:]) if len(problems) > 1 else set()
    out = list(common) if len(configs) > 1 else list(problems[0])
    if len(configs) > 1:
        for c, found in zip(configs, problems, strict=True):
            for line, col, message in found:
                if (line, col, message) not in common:
                    out.append((line, col, f"in {c.shown}: {message}"))
                    if len(out) >= MAX_ERRORS:
                        return out
    return out[:MAX_ERRORS]


def _substituted(data: dict[str, Any], source: str, c: v.Configuration, where: Path) -> str:
    """The spec of one configuration, runnable on its own (`tricks-nats up spec.yaml` from the
    run's directory): variables replaced, `workdir` where the original's pods started."""
    stem = Path(source).stem if source and not source.startswith("<") else "experiment"
    out = {"name": stem, **data, "workdir": str(where.resolve())}
    about = f"{source}, {c.shown}.".replace("\r", "\\r").replace("\n", "\\n")  # one line
    head = (
        f"# {about}\n"
        "# Written by tricks-nats: `tricks-nats up` on this file runs this configuration again.\n"
    )
    dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return head + yaml.dump(out, Dumper=dumper, sort_keys=False, allow_unicode=True, width=100)
