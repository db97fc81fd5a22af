"""Where a running `up` says it is, so `watch` and `status` in another terminal need no flags.

One small JSON file per experiment under the user's state directory (0600: it holds the
coordinator's NATS credentials while the run lasts). When the run ends, the file is rewritten
without secrets and keeps pointing at the run's records, so `watch EXP` can replay it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import msgspec

#: Finished runs' files are kept this long (for `watch EXP` from elsewhere), at most this many.
KEEP_FINISHED_S = 24 * 3600.0
KEEP_FINISHED = 20


class RunState(msgspec.Struct, omit_defaults=True):
    experiment: str
    run_dir: str
    pid: int
    started_at: float
    nats_url: str | None = None
    user: str | None = None
    password: str | None = None
    finished: bool = False
    #: Where `up` was started: `watch` and `status` default to the runs started there.
    cwd: str | None = None


def state_dir() -> Path:
    explicit = os.environ.get("TRICKS_NATS_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tricks-nats"


def path_of(experiment: str) -> Path:
    return state_dir() / f"{experiment}.json"


def write(state: RunState) -> None:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = path_of(state.experiment)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(state))
    os.replace(tmp, path)


def finish(state: RunState) -> None:
    """Forget the secrets, keep where the records are; prune old runs' files."""
    write(msgspec.structs.replace(state, nats_url=None, user=None, password=None, finished=True))
    prune()


def prune(now: float | None = None) -> None:
    """Remove the files of runs that ended more than a day ago (finished, or whose `up` is
    gone), and of all but the newest KEEP_FINISHED ended runs."""
    now = time.time() if now is None else now
    ended = sorted(
        (s for s in all_states() if s.finished or not _alive(s.pid)),
        key=lambda s: s.started_at,
        reverse=True,
    )
    for rank, old in enumerate(ended):
        if rank >= KEEP_FINISHED or now - old.started_at > KEEP_FINISHED_S:
            with contextlib.suppress(OSError):
                path_of(old.experiment).unlink()


def here() -> str:
    """This process's directory, as `cwd` records it."""
    return os.path.realpath(os.getcwd())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def all_states() -> list[RunState]:
    out: list[RunState] = []
    directory = state_dir()
    if not directory.is_dir():
        return out
    for path in directory.glob("*.json"):
        try:
            state = msgspec.json.decode(path.read_bytes(), type=RunState)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        out.append(state)
    return out


def running() -> list[RunState]:
    """Runs whose `up` is still alive, newest first."""
    live = [s for s in all_states() if not s.finished and _alive(s.pid)]
    return sorted(live, key=lambda s: s.started_at, reverse=True)


def lookup(experiment: str) -> RunState | None:
    path = path_of(experiment)
    try:
        return msgspec.json.decode(path.read_bytes(), type=RunState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
