"""The last lines of `up` for one run: the verdict, then what a user looks at next, the same
in a terminal and in a pipe: how each tag's pods ended, the final event counts, the failing
pods' last log lines, where the records are and the command that reports them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tricks_nats import outcomes
from tricks_nats.words import plural

if TYPE_CHECKING:
    from tricks_nats.coordinator import Outcome
    from tricks_nats.spec import Experiment

#: Log lines shown per failing pod, and failing pods shown.
LOG_LINES = 5
FAILED_SHOWN = 3
#: Events listed at most (the rest are counted).
EVENTS_SHOWN = 10


def verdict_line(outcome: Outcome) -> str:
    s = outcome.summary
    line = f"{outcome.verdict}: {s.experiment} ({plural(len(s.pods), 'pod')}, {duration(outcome)})"
    return line + (f": {outcome.reason}" if outcome.reason else "")


def duration(outcome: Outcome) -> str:
    """The run's duration: the one figure the live view's clock ends on too."""
    s = outcome.summary
    return f"{s.ended_at - s.started_at:.1f}s"


def details(
    outcome: Outcome, exp: Experiment, records: Path | None, *, live: bool = False
) -> list[str]:
    """What follows the verdict line. After a live view, which stays on screen with the pods'
    outcomes, the events and the failing pods' logs, only where the records are."""
    s = outcome.summary
    lines = []
    if not live:
        for tag in exp.tags:
            ended = [outcomes.of(p, s.verdict) for p in s.pods if p.tag == tag.tag]
            lines.append(f"  {tag.tag}: {outcomes.counted(ended)}")
        shown = events_shown(exp, s.events)
        if shown:
            lines.append("  events: " + shown)
        lines += _failing_logs(outcome, records)
    if records is not None:
        lines.append(f"  records: {records}")
        lines.append(f"  next: tricks-nats report {records}")
    return lines


def events_shown(exp: Experiment, counts: dict[str, int]) -> str:
    """`server-connected=6, client_stop=6`: the user's events and those the workflows wait
    on, in the order they first counted (not every pod's start and stop)."""
    used = {c.name for t in exp.tags for c in (t.start, t.stop) if c is not None}
    names = [n for n in counts if n not in exp.lifecycle or n in used]
    text = ", ".join(f"{n}={counts[n]}" for n in names[:EVENTS_SHOWN])
    if len(names) > EVENTS_SHOWN:
        text += f", and {len(names) - EVENTS_SHOWN} more"
    return text


def printable(line: str) -> str:
    """A pod's log line as safe to print on a terminal: a control character (an escape
    sequence a pod wrote) shows as `\x1b`, not as what it would do to the user's terminal."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)


def _failing_logs(outcome: Outcome, records: Path | None) -> list[str]:
    s = outcome.summary
    failed = [p for p in s.pods if outcomes.of(p, s.verdict) == outcomes.FAILED]
    failed.sort(key=lambda p: (f"{p.tag}-{p.pod_id}" != s.cause, p.stopped_at or 0.0))
    lines = []
    for pod in failed[:FAILED_SHOWN]:
        name = f"{pod.tag}-{pod.pod_id}"
        what = "caused the failure" if name == s.cause else "failed"
        where = f" ({records / 'logs' / f'{name}.log'})" if records is not None else ""
        tail = (pod.last_log_lines or [])[-LOG_LINES:]
        lines.append(
            f"  {name} {what} (exit {pod.exit_code}); "
            + (f"last lines of its log{where}:" if tail else f"its log is empty{where}")
        )
        lines += [f"    | {printable(line)}" for line in tail]
    if len(failed) > FAILED_SHOWN:
        lines.append(f"  and {plural(len(failed) - FAILED_SHOWN, 'more failed pod')}")
    return lines
