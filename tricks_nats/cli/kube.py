"""`tricks-nats down EXPERIMENT`: remove the pods a killed `up --runtime kubernetes` left behind;
and the Kubernetes options that `up` and `down` share.

kubernetes_asyncio is imported inside the command only, so `tricks-nats --help` stays fast.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from tricks_nats.cli.output import fail
from tricks_nats.errors import TricksError
from tricks_nats.runtimes.kube_options import KubeOptions

# -- options shared by the commands that use a cluster ----------------------------------------

KubeconfigOpt = Annotated[
    str | None, typer.Option("--kubeconfig", help="kubernetes: the kubeconfig file.")
]
ContextOpt = Annotated[
    str | None, typer.Option("--context", help="kubernetes: the kubeconfig context.")
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="kubernetes: namespace of the pods (tricks-nats)."),
]
ScheduleTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--schedule-timeout",
        min=0,
        metavar="SECONDS",
        help="kubernetes: a pod the scheduler cannot place for this long fails, with the "
        "scheduler's message (e.g. '0/3 nodes are available: insufficient cpu').",
    ),
]
#: The default of --schedule-timeout.
SCHEDULE_TIMEOUT = KubeOptions.schedule_timeout


def down(
    experiment: Annotated[str, typer.Argument(help="The experiment id (as `up` printed it).")],
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    grace: Annotated[
        float, typer.Option("--grace", min=0, help="Seconds the pods get to stop.")
    ] = 5.0,
) -> None:
    """Delete every pod of an experiment on Kubernetes, and its faults' Chaos Mesh objects (by
    their labels)."""

    async def run() -> list[str]:
        from tricks_nats.runtimes import kube_objects as ko
        from tricks_nats.runtimes import load

        load("tricks_nats.runtimes.kube_api", "kubernetes")  # one line if the extra is missing
        from tricks_nats.runtimes import kube_api

        async with kube_api.session(kubeconfig, context) as (core, hinted):
            ns = namespace or hinted or ko.DEFAULT_NAMESPACE
            chaos = await kube_api.delete_chaos(kube_api.custom_api(core), ns, experiment)
            return chaos + await kube_api.delete_experiment(core, ns, experiment, grace)

    try:
        names = asyncio.run(run())
    except TricksError as exc:
        fail(exc)
    pods = [n for n in names if "/" not in n]
    for name in names:
        typer.echo(f"deleted {'' if '/' in name else 'pod '}{name}")
    typer.echo(f"{experiment}: {len(pods)} pod(s) deleted")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command()(down)
