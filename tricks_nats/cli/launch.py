"""The `tricks-nats` program: the shell driver's plain calls take the fast path (`fastpath`,
a few milliseconds of imports); everything else loads the full typer app."""

from __future__ import annotations

import sys


def main() -> None:
    from tricks_nats.cli import fastpath

    code = fastpath.run(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from tricks_nats.cli.app import main as full

    full()


if __name__ == "__main__":
    main()
