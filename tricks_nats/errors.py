"""One exception tree for everything a user can get wrong or a peer can break.

Library errors (nats-py, OS, YAML) are translated at one boundary each (`raise X from exc`);
the CLI turns a `TricksError` into one line and `exit_code`. A traceback means a bug of ours.
"""

from __future__ import annotations


class TricksError(Exception):
    """Base of every error we raise on purpose."""

    exit_code = 1


class SpecError(TricksError):
    """The spec is wrong; `errors` holds every located message (`FILE:LINE:COL: message`)."""

    exit_code = 2

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class UsageError(TricksError):
    """A bad command-line option or a missing piece of configuration."""

    exit_code = 2


class ConfigError(UsageError):
    """The pod environment lacks a variable the driver needs, or holds a bad value."""


class UnknownTag(UsageError):
    """`discover` of a tag the experiment does not have (a typo): said at once, exit 2,
    instead of an empty list or a wait that can never end."""


class NatsUnavailable(TricksError):
    """NATS could not be reached, refused our credentials, or went away for good."""

    exit_code = 3


class WaitTimeout(TricksError, TimeoutError):
    """A blocking driver call (wait, discover) ran out of time."""

    exit_code = 1


class RuntimeFailure(TricksError):
    """A runtime could not do what the coordinator asked (spawn a process, create a pod)."""


class PermissionDenied(TricksError):
    """NATS refused a subject to these credentials: a wrong EXP_ID, or a pod reaching beyond
    its experiment. Reported at once, never retried as if NATS were away."""

    exit_code = 1
