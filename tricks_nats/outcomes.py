"""How a pod ended, in one vocabulary for the live view, `watch`, the summary, `report` and the
timeline: the user reads the same words everywhere.

A pod that ran ends one way: it *succeeded* (exit 0) or *failed* (any other exit, a crash, a
kill by someone else) on its own, or tricks-nats stopped it: *stopped by workflow* (its stop
condition), *stopped by fault* (a `kill` fault), *stopped after a failure* (another pod failed
the run), *stopped at timeout*, *interrupted* (Ctrl-C), *stopped after an error* (tricks-nats
itself could not go on). A pod that never ran *never started*. A pod started again (a
`restart` fault, a restart policy) is *restarted* in the journal; its last run decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tricks_nats.records import PodSummary

SUCCEEDED = "succeeded"
FAILED = "failed"
BY_WORKFLOW = "stopped by workflow"
AFTER_FAILURE = "stopped after a failure"
AT_TIMEOUT = "stopped at timeout"
INTERRUPTED = "interrupted"
AFTER_ERROR = "stopped after an error"
NEVER_STARTED = "never started"
BY_FAULT = "stopped by fault"
#: Not an end: the pod was stopped to be started again (a fault, its tag's restart policy).
RESTARTED = "restarted"

#: Display order: what went well, what tricks-nats did, what went wrong.
ORDER = (
    SUCCEEDED,
    BY_WORKFLOW,
    BY_FAULT,
    AFTER_FAILURE,
    AT_TIMEOUT,
    INTERRUPTED,
    AFTER_ERROR,
    FAILED,
    NEVER_STARTED,
)


def stopped_as_run_ended(verdict: str) -> str:
    """The outcome of a pod tricks-nats stopped because the run ended with `verdict`."""
    return {
        "timed_out": AT_TIMEOUT,
        "interrupted": INTERRUPTED,
        "error": AFTER_ERROR,
    }.get(verdict, AFTER_FAILURE)


def of(pod: PodSummary, verdict: str) -> str:
    """A pod's outcome: as recorded, or (a summary written before outcomes were) derived."""
    if pod.outcome:
        return pod.outcome
    if pod.started_at is None:
        return NEVER_STARTED
    if pod.stopped_by_workflow:
        return BY_WORKFLOW
    if pod.state == "stopped":
        return stopped_as_run_ended(verdict)
    return SUCCEEDED if pod.exit_code == 0 else FAILED


def counted(outcomes: list[str]) -> str:
    """`5 stopped by workflow, 1 failed`, in display order."""
    return ", ".join(f"{outcomes.count(o)} {o}" for o in ORDER if o in outcomes)
