"""How many copies of an experiment's streams JetStream keeps: 3 on a cluster, else 1.

On a NATS cluster (manifests/nats.yaml: three servers) every stream of a run (the counts, the
pods bucket, the journal, the metrics) is kept by 3 servers, so losing one server loses no
acknowledged count and stops nothing: each stream that had its leader there elects another.

Who decides: the server says whether it is part of a cluster (`cluster`, the cluster's name,
in the INFO it sends every client); if it is, the coordinator asks JetStream for 3 replicas,
and JetStream, which knows its peers (also one that is away for the moment), places them or
answers that it cannot (too few JetStream servers): then 1, with a warning. Counting the
servers ourselves (INFO's `connect_urls`) would be wrong as soon as one is down: a cluster of
3 with one away lists 2, where JetStream still places 3 replicas (and fills the third when
the server comes back). A single server (the embedded one) gets 1 without asking.

`TRICKS_NATS_REPLICAS=N` (1 to 5) in the coordinator's environment fixes the number: never
lowered, a refusal fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from tricks_nats.errors import UsageError

ENV = "TRICKS_NATS_REPLICAS"
#: Replicas on a cluster: a majority (2) survives the loss of any one server.
ON_A_CLUSTER = 3
#: JetStream's own limit on a stream's replicas.
MOST = 5
#: JetStream's answers meaning "not that many replicas here": no suitable peers for placement
#: (fewer JetStream servers than replicas: nats-server 2.15), insufficient resources (the same
#: in older servers), replicas asked of a server that is in no cluster.
TOO_FEW_SERVERS = frozenset({10005, 10023, 10074})


@dataclass(frozen=True)
class Replication:
    """The replicas to ask for, in order: the first that JetStream accepts is kept."""

    tries: tuple[int, ...]
    #: Why, in a few words (logged).
    reason: str

    def lower(self, replicas: int, err_code: int | None) -> int | None:
        """What to ask for after JetStream refused `replicas` with `err_code`; None: nothing
        (the refusal stands)."""
        if err_code not in TOO_FEW_SERVERS or replicas not in self.tries:
            return None
        rest = self.tries[self.tries.index(replicas) + 1 :]
        return rest[0] if rest else None


def choose(
    server_info: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> Replication:
    """From the INFO of the server the coordinator is connected to, and its environment."""
    env = os.environ if environ is None else environ
    fixed = env.get(ENV, "").strip()
    if fixed:
        return Replication((_parse(fixed),), f"{ENV}={fixed}")
    cluster = server_info.get("cluster")
    if cluster:
        return Replication((ON_A_CLUSTER, 1), f"NATS cluster {cluster!r}")
    return Replication((1,), "a single NATS server")


def _parse(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MOST:
        raise UsageError(f"{ENV}: expected a number of replicas from 1 to {MOST}, got {text!r}")
    return n
