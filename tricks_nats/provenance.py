"""What a run needs to be run again and trusted later: versions, platform, the spec's commit.

Kept in `summary.json` (`provenance`). Collecting never fails a run: what cannot be found
(no git, a spec outside a checkout) is left out.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import msgspec

#: Seconds a git command may take (a huge or networked checkout must not delay a run).
GIT_TIMEOUT_S = 5.0


class Provenance(msgspec.Struct, omit_defaults=True):
    tricks_nats: str
    python: str
    platform: str
    #: The command line of `up`.
    argv: list[str] = []
    #: The spec file as given, and where it was (absolute).
    spec_path: str | None = None
    nats_server: str | None = None
    #: The commit of the git checkout holding the spec, and whether tracked files differed
    #: from it (untracked files do not count: run records often live in the checkout).
    git_commit: str | None = None
    git_dirty: bool | None = None


def collect(spec_path: str | Path | None) -> Provenance:
    out = Provenance(
        tricks_nats=_version(),
        python=sys.version.split()[0],
        platform=platform.platform(),
        argv=list(sys.argv),
    )
    if spec_path is None or str(spec_path).startswith("<"):
        return out
    where = Path(spec_path).resolve()
    out.spec_path = str(where)
    commit = _git(where.parent, "rev-parse", "HEAD")
    if commit:
        out.git_commit = commit
        status = _git(where.parent, "status", "--porcelain", "--untracked-files=no")
        out.git_dirty = None if status is None else bool(status)
    return out


def _version() -> str:
    try:
        return metadata.version("tricks-nats")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git(cwd: Path, *args: str) -> str | None:
    """git's output, stripped; None if git is missing, fails or takes too long."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return None
