"""`tricks-nats down EXPERIMENT`: remove the pods a killed `up --runtime kubernetes` left behind.

kubernetes_asyncio is imported inside the command only, so `tricks-nats --help` stays fast.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from tricks_nats.errors import TricksError


def down(
    experiment: Annotated[str, typer.Argument(help="The experiment id (as `up` printed it).")],
    kubeconfig: Annotated[
        str | None, typer.Option("--kubeconfig", help="The kubeconfig file.")
    ] = None,
    context: Annotated[
        str | None, typer.Option("--context", help="The kubeconfig context.")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Namespace of the pods (tricks-nats).")
    ] = None,
    grace: Annotated[
        float, typer.Option("--grace", min=0, help="Seconds the pods get to stop.")
    ] = 5.0,
) -> None:
    """Delete every pod of an experiment on Kubernetes (by its labels)."""
    from tricks_nats.cli.app import _fail

    async def run() -> list[str]:
        from tricks_nats.runtimes import kube_api
        from tricks_nats.runtimes import kube_objects as ko

        async with kube_api.session(kubeconfig, context) as (core, hinted):
            ns = namespace or hinted or ko.DEFAULT_NAMESPACE
            return await kube_api.delete_experiment(core, ns, experiment, grace)

    try:
        names = asyncio.run(run())
    except TricksError as exc:
        _fail(exc)
    for name in names:
        typer.echo(f"deleted pod {name}")
    typer.echo(f"{experiment}: {len(names)} pod(s) deleted")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command()(down)
