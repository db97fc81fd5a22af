"""Wire names and message shapes (protocol version 1): pure data, no I/O.

drivers/PROTOCOL.md is the prose twin of this module; change both or neither.
"""

from __future__ import annotations

import re
import secrets
import time

import msgspec

VERSION = "1"

#: Event names and tags: one NATS subject token, one KV key, a Kubernetes-friendly word.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
EXPERIMENT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

INCR_HEADER = "Nats-Incr"
MSG_ID_HEADER = "Nats-Msg-Id"
POD_HEADER = "Tricks-Pod"

#: How long the server remembers message ids: a retried publish within it counts once.
#: Far longer than a driver's retries (bus.RECOVERY_S) and a script's retry of `event --id`;
#: short enough that the server's id table stays small at thousands of increments a second
#: (it holds every id of the window; one hour cost ~15% more server CPU per increment).
DUPLICATE_WINDOW_S = 300.0


def new_experiment_id(name: str) -> str:
    """`<name>-<yyyymmdd-hhmmss>-<4 hex>`: sortable, unique, a valid subject token and bucket."""
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:30] or "experiment"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{base}-{stamp}-{secrets.token_hex(2)}"


def counts_bucket(exp: str) -> str:
    return f"tricks-{exp}-counts"


def pods_bucket(exp: str) -> str:
    return f"tricks-{exp}-pods"


def stream_of(bucket: str) -> str:
    return f"KV_{bucket}"


def count_subject(exp: str, event: str) -> str:
    """Publishing here with `Nats-Incr: 1` adds one to `event`."""
    return f"$KV.{counts_bucket(exp)}.{event}"


def reached_subject(exp: str, event: str, value: int) -> str:
    """The coordinator publishes here once when `event` first reaches `value`."""
    return f"tricks.{exp}.reached.{event}.{value}"


def journal_subject(exp: str, kind: str = ">") -> str:
    """Journal entries of one kind (pod, event, workflow, verdict); `>` for all of them."""
    return f"tricks.{exp}.journal.{kind}"


def journal_stream(exp: str) -> str:
    """The stream that keeps an experiment's journal, for `watch --from-start` and `status`."""
    return f"tricks-{exp}-journal"


def experiment_of_stream(stream: str) -> str | None:
    """The experiment id behind a counts stream name (`status` lists experiments this way)."""
    prefix, suffix = "KV_tricks-", "-counts"
    if stream.startswith(prefix) and stream.endswith(suffix):
        return stream[len(prefix) : -len(suffix)]
    return None


def experiment_subjects(exp: str) -> str:
    return f"tricks.{exp}.>"


def inbox_prefix(exp: str) -> str:
    """Replies for an experiment's clients come back under their own prefix (isolation)."""
    return f"_INBOX_{exp}"


def pod_name(tag: str, pod_id: int) -> str:
    return f"{tag}-{pod_id}"


def pod_key(tag: str, pod_id: int) -> str:
    """Key of a running pod in the pods bucket."""
    return f"{tag}.{pod_id}"


def event_msg_id(exp: str, pod: str, event: str, nonce: str) -> str:
    """Unique per driver call, identical across that call's retries: counted exactly once."""
    return f"{exp}.{pod}.{event}.{nonce}"


def lifecycle_msg_id(exp: str, tag: str, pod_id: int, what: str) -> str:
    """Deterministic, so a restarted coordinator cannot count a pod's start or stop twice."""
    return f"{exp}.coordinator.{tag}-{pod_id}.{what}"


def start_event(tag: str) -> str:
    return f"{tag}_start"


def stop_event(tag: str) -> str:
    return f"{tag}_stop"


class PodRecord(msgspec.Struct, forbid_unknown_fields=False):
    """Value of a pods-bucket key: one running pod, as `discover` returns it."""

    tag: str
    pod_id: int
    ip: str
    name: str = ""


class CounterValue(msgspec.Struct, forbid_unknown_fields=False):
    """Body of a counter message and of a direct get on the counts stream."""

    val: str


class PubAck(msgspec.Struct, forbid_unknown_fields=False):
    stream: str = ""
    seq: int = 0
    val: str | None = None
    duplicate: bool = False


class ApiError(msgspec.Struct, forbid_unknown_fields=False):
    code: int = 0
    err_code: int = 0
    description: str = ""


class ApiReply(msgspec.Struct, forbid_unknown_fields=False):
    """Any JetStream API reply, read only for its error."""

    error: ApiError | None = None


class PubAckOrError(msgspec.Struct, forbid_unknown_fields=False):
    stream: str = ""
    seq: int = 0
    val: str | None = None
    duplicate: bool = False
    error: ApiError | None = None


def parse_count(data: bytes) -> int | None:
    """A counter body's value, or None for anything that is not one (logged by callers)."""
    try:
        return int(msgspec.json.decode(data, type=CounterValue).val)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None


def pod_permissions(exp: str) -> dict[str, dict[str, list[str]]]:
    """What a pod's NATS user may do: its own experiment's counts, pods and subjects, no more."""
    counts, pods = stream_of(counts_bucket(exp)), stream_of(pods_bucket(exp))
    api = "$JS.API"
    return {
        "publish": {
            "allow": [
                f"$KV.{counts_bucket(exp)}.>",
                f"{api}.DIRECT.GET.{counts}",
                f"{api}.DIRECT.GET.{counts}.>",
                f"{api}.DIRECT.GET.{pods}.>",
                f"{api}.STREAM.INFO.{counts}",
                f"{api}.STREAM.INFO.{pods}",
                f"{api}.CONSUMER.CREATE.{pods}",
                f"{api}.CONSUMER.CREATE.{pods}.>",
                f"{api}.CONSUMER.DELETE.{pods}.>",
                f"{api}.CONSUMER.INFO.{pods}.>",
                f"$JS.FC.{pods}.>",
                f"$JS.ACK.{pods}.>",
            ]
        },
        "subscribe": {
            "allow": [
                f"{inbox_prefix(exp)}.>",
                f"tricks.{exp}.reached.>",
                journal_subject(exp),
            ]
        },
    }
