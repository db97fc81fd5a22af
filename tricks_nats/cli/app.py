"""Typer commands: gather options, call one coroutine, turn our errors into one line + exit code.

Heavy imports (nats-py, the coordinator) happen inside the commands that need them, so
`tricks-nats --help` and `validate` stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from tricks_nats.cli import campaigns, kube
from tricks_nats.cli.output import fail, say
from tricks_nats.errors import TricksError

app = typer.Typer(
    name="tricks-nats",
    help="Experiments on distributed systems as code: run a Tricks spec on NATS.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RuntimeOpt = Annotated[
    str | None, typer.Option("--runtime", help="local (default) or kubernetes; wins over the spec.")
]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("nats").setLevel(logging.CRITICAL)


@app.command()
def validate(
    spec: Annotated[Path, typer.Argument(help="The experiment spec (YAML).")],
    runtime: RuntimeOpt = None,
) -> None:
    """Check a spec (every configuration of a campaign); print every error as
    FILE:LINE:COL: message (exit 2)."""
    from tricks_nats import study as studymod
    from tricks_nats.words import plural

    try:
        found = studymod.load(spec, runtime=runtime)
    except TricksError as exc:
        fail(exc)
    exp = found.experiments[0]
    pods = {e.pod_count for e in found.experiments}
    shown = f"{min(pods)} to {max(pods)} pods" if len(pods) > 1 else plural(exp.pod_count, "pod")
    line = f"{spec}: ok ({plural(len(exp.tags), 'tag')}, {shown}, runtime {exp.runtime}"
    if found.campaign:
        line += f"; {found.describe()}"
    typer.echo(line + ")")


@app.command()
def up(
    spec: Annotated[Path, typer.Argument(help="The experiment spec (YAML).")],
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where run records go.")] = Path(
        "runs"
    ),
    nats_url: Annotated[
        str | None,
        typer.Option(
            "--nats-url",
            help="Use this NATS (nats://[user:password@]host:port) instead of an embedded server.",
        ),
    ] = None,
    runtime: RuntimeOpt = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace", min=0, help="Seconds between SIGTERM and SIGKILL when stopping a pod."
        ),
    ] = 5.0,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0,
            help="Seconds before the run is stopped (verdict timed_out); wins over the spec's "
            "timeout; 0: no limit.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the verdict.")] = False,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="With --nats-url: keep the experiment's streams after the run."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Journal entries as JSON lines.")] = False,
    kubeconfig: kube.KubeconfigOpt = None,
    context: kube.ContextOpt = None,
    namespace: kube.NamespaceOpt = None,
    schedule_timeout: kube.ScheduleTimeoutOpt = kube.SCHEDULE_TIMEOUT,
    pod_nats_url: Annotated[
        str | None,
        typer.Option(
            "--pod-nats-url",
            help="NATS as the pods reach it (kubernetes default: nats://nats.tricks-nats.svc:4222).",
        ),
    ] = None,
    repeat: Annotated[
        int | None,
        typer.Option(
            "--repeat", min=1, help="Run each configuration N times (wins over the spec's repeat)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the runs and their variables; run nothing.")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="A campaign directory (runs/<campaign-id>): run only what has no verdict yet.",
        ),
    ] = None,
    fail_fast: campaigns.FailFastOpt = False,
    retry_failed: campaigns.RetryFailedOpt = False,
    force: campaigns.ForceOpt = False,
) -> None:
    """Run an experiment, or every run of a campaign (a spec with config:, matrix: or repeat:),
    to its end: exit 0 succeeded (every run), 1 failed, 2 bad input, 130 interrupted."""
    from tricks_nats import study as studymod
    from tricks_nats.running import UpOptions
    from tricks_nats.runtimes.kube_options import KubeOptions

    try:
        found = studymod.load(spec, runtime=runtime, repeat=repeat)
        if dry_run:
            campaigns.dry_run(found)
            return
        opts = UpOptions(
            runs_dir=runs_dir,
            nats_url=nats_url,
            runtime=runtime,
            grace=grace,
            timeout=timeout,
            on_notice=lambda text: say(f"tricks-nats: note: {text}", err=True),
            keep=keep,
            runtime_options={
                "kubernetes": KubeOptions(
                    kubeconfig=kubeconfig,
                    context=context,
                    namespace=namespace,
                    pod_nats_url=pod_nats_url,
                    schedule_timeout=schedule_timeout,
                )
            },
        )
        show = campaigns.Show(quiet=quiet, as_json=as_json, live=sys.stdout.isatty())
        if found.campaign or resume is not None:
            flags = campaigns.Flags(fail_fast, retry_failed, force)
            code = campaigns.up(found, opts, show, flags, resume)
        else:
            code = campaigns.single(found.experiments[0], opts, show)
    except TricksError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@app.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editors)."""
    from tricks_nats.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def server(
    port: Annotated[int, typer.Option("--port", help="Port; -1 picks a free one.")] = 4222,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    store_dir: Annotated[
        Path | None,
        typer.Option("--store-dir", help="JetStream's store (default: a temporary directory)."),
    ] = None,
) -> None:
    """Run the embedded NATS server (JetStream) in the foreground until Ctrl-C."""
    from tricks_nats.natsserver import EmbeddedServer

    async def serve() -> None:
        async with EmbeddedServer(host=host, port=port, store_dir=store_dir) as srv:
            typer.echo(f"nats-server listening on {srv.url} (Ctrl-C stops it)")
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except TricksError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _register_extensions() -> None:
    """Command groups that live in their own modules (each cheap to import)."""
    from tricks_nats.cli import campaigns, kube, logs, observe, shell_driver

    for module in (shell_driver, kube, observe, logs, campaigns):
        module.register(app)


_register_extensions()


def main() -> None:
    from tricks_nats.cli.helptext import command

    try:
        command()(prog_name="tricks-nats")
    except TricksError as exc:  # raised outside a command's own handling
        typer.echo(f"tricks-nats: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, like cat
        _drop_stdout()
        sys.exit(1)
    except OSError as exc:  # our own output could not be written (a full disk)
        _drop_stdout()
        typer.echo(f"tricks-nats: error: cannot write the output: {exc.strerror or exc}", err=True)
        sys.exit(1)


def _drop_stdout() -> None:
    """Nothing more reaches stdout (Python's flush at exit would fail again, loudly)."""
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    main()
