"""The environment contract between the coordinator and every pod, in one place.

Every driver (Python, JavaScript, shell, yours) depends on these names; drivers/PROTOCOL.md
documents them. Tricks' names come first so Tricks programs run unchanged.
"""

from __future__ import annotations

TAG = "TAG"
REPLICAS = "REPLICAS"
POD_ID = "POD_ID"
EXP_ID = "EXP_ID"
POD_IP = "POD_IP"
TRICKS_IP = "TRICKS_IP"
TRICKS_PORT = "TRICKS_PORT"
NATS_URL = "TRICKS_NATS_URL"
NATS_USER = "TRICKS_NATS_USER"
NATS_PASSWORD = "TRICKS_NATS_PASSWORD"
PROTOCOL = "TRICKS_PROTOCOL"
#: The experiment's tags, comma-separated: a driver refuses to discover a tag not among them.
TAGS = "TRICKS_TAGS"
#: Longer than this (characters), TRICKS_TAGS is not set.
TAGS_MAX = 16384
#: Marks every process of a run (local runtime), so nothing of it outlives the run.
RUN_TOKEN = "TRICKS_RUN_TOKEN"

#: Names a spec's `env` may not set: the coordinator owns them.
RESERVED = frozenset(
    {
        TAG,
        REPLICAS,
        POD_ID,
        EXP_ID,
        POD_IP,
        TRICKS_IP,
        TRICKS_PORT,
        NATS_URL,
        NATS_USER,
        NATS_PASSWORD,
        PROTOCOL,
        TAGS,
        RUN_TOKEN,
    }
)
#: Names that carry secrets: never written to logs, journal or summary.
SECRET = frozenset({NATS_PASSWORD})
