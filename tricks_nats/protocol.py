"""Wire names and message shapes (protocol version 2): pure data, no I/O.

drivers/PROTOCOL.md is the prose twin of this module; change both or neither.
"""

from __future__ import annotations

from operator import attrgetter

import msgspec

from tricks_nats.wirenames import (  # re-exported: the names beside the message shapes
    DUPLICATE_WINDOW_S as DUPLICATE_WINDOW_S,
)
from tricks_nats.wirenames import (
    EXPERIMENT_RE as EXPERIMENT_RE,
)
from tricks_nats.wirenames import (
    INCR_HEADER as INCR_HEADER,
)
from tricks_nats.wirenames import (
    JS_ID_IN_PROCESS as JS_ID_IN_PROCESS,
)
from tricks_nats.wirenames import (
    JS_NO_MESSAGE as JS_NO_MESSAGE,
)
from tricks_nats.wirenames import (
    JSON_TYPE as JSON_TYPE,
)
from tricks_nats.wirenames import (
    LABEL_RE as LABEL_RE,
)
from tricks_nats.wirenames import (
    MAX_BATCH_BYTES as MAX_BATCH_BYTES,
)
from tricks_nats.wirenames import (
    MAX_LABEL_VALUE as MAX_LABEL_VALUE,
)
from tricks_nats.wirenames import (
    MAX_LABELS as MAX_LABELS,
)
from tricks_nats.wirenames import (
    MAX_MSG_ID as MAX_MSG_ID,
)
from tricks_nats.wirenames import (
    MAX_TOPIC_BYTES as MAX_TOPIC_BYTES,
)
from tricks_nats.wirenames import (
    METRICS_STREAM_BYTES as METRICS_STREAM_BYTES,
)
from tricks_nats.wirenames import (
    MSG_ID_HEADER as MSG_ID_HEADER,
)
from tricks_nats.wirenames import (
    NAME_RE as NAME_RE,
)
from tricks_nats.wirenames import (
    POD_HEADER as POD_HEADER,
)
from tricks_nats.wirenames import (
    RESERVED_LABELS as RESERVED_LABELS,
)
from tricks_nats.wirenames import (
    TOPICS_STREAM_BYTES as TOPICS_STREAM_BYTES,
)
from tricks_nats.wirenames import (
    TYPE_HEADER as TYPE_HEADER,
)
from tricks_nats.wirenames import (
    VERSION as VERSION,
)
from tricks_nats.wirenames import (
    check_label as check_label,
)
from tricks_nats.wirenames import (
    check_name as check_name,
)
from tricks_nats.wirenames import (
    check_tag_known as check_tag_known,
)
from tricks_nats.wirenames import (
    count_subject as count_subject,
)
from tricks_nats.wirenames import (
    counts_bucket as counts_bucket,
)
from tricks_nats.wirenames import (
    event_msg_id as event_msg_id,
)
from tricks_nats.wirenames import (
    event_subject as event_subject,
)
from tricks_nats.wirenames import (
    experiment_of_stream as experiment_of_stream,
)
from tricks_nats.wirenames import (
    group_msg_id as group_msg_id,
)
from tricks_nats.wirenames import (
    inbox_prefix as inbox_prefix,
)
from tricks_nats.wirenames import (
    journal_stream as journal_stream,
)
from tricks_nats.wirenames import (
    journal_subject as journal_subject,
)
from tricks_nats.wirenames import (
    lifecycle_msg_id as lifecycle_msg_id,
)
from tricks_nats.wirenames import (
    metrics_msg_id as metrics_msg_id,
)
from tricks_nats.wirenames import (
    metrics_stream as metrics_stream,
)
from tricks_nats.wirenames import (
    metrics_subject as metrics_subject,
)
from tricks_nats.wirenames import (
    new_experiment_id as new_experiment_id,
)
from tricks_nats.wirenames import (
    parse_tags as parse_tags,
)
from tricks_nats.wirenames import (
    pod_dedup_id as pod_dedup_id,
)
from tricks_nats.wirenames import (
    pod_name as pod_name,
)
from tricks_nats.wirenames import (
    pods_bucket as pods_bucket,
)
from tricks_nats.wirenames import (
    reached_subject as reached_subject,
)
from tricks_nats.wirenames import (
    roster_subject as roster_subject,
)
from tricks_nats.wirenames import (
    start_event as start_event,
)
from tricks_nats.wirenames import (
    stop_event as stop_event,
)
from tricks_nats.wirenames import (
    stored_subject as stored_subject,
)
from tricks_nats.wirenames import (
    stream_of as stream_of,
)
from tricks_nats.wirenames import (
    topic_msg_id as topic_msg_id,
)
from tricks_nats.wirenames import (
    topic_subject as topic_subject,
)
from tricks_nats.wirenames import (
    topics_stream as topics_stream,
)


class MetricsBatch(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """Body of a batch: `samples` are `[ts, name, value]` or `[ts, name, value, {labels}]`
    (ts: seconds since the epoch in the pod; value: a finite number; labels: strings);
    `dropped`: samples this pod has dropped so far (cumulative: a full buffer, a refused
    batch); `intervals`: expected milliseconds between samples, by metric name (declared
    for coordination-omission correction)."""

    samples: list[list[object]] = []
    dropped: int = 0
    intervals: dict[str, float] = {}


# gc=False: these hold only strings and numbers (no cycles), and a discover of 1000 pods makes
# 1000 of them; the collector need not track them.
class PodRecord(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    """One running pod, as `discover` returns it."""

    tag: str
    pod_id: int
    ip: str
    name: str = ""


class RosterPod(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    pod_id: int
    ip: str = ""


_POD_ID = attrgetter("pod_id")


class Roster(msgspec.Struct, forbid_unknown_fields=False):
    """Value of a tag's key in the pods bucket: the running pods of the tag, by pod id."""

    tag: str
    pods: list[RosterPod] = []

    def records(self) -> list[PodRecord]:
        """The pods as `discover` returns them, sorted by pod id (the coordinator writes them
        sorted: then sorting costs one pass). Positional arguments: 1000 of them cost half of
        what keywords do, and a discover of a whole tag makes that many for every pod."""
        tag, record = self.tag, PodRecord
        pods = sorted(self.pods, key=_POD_ID)
        return [record(tag, r.pod_id, r.ip, f"{tag}-{r.pod_id}") for r in pods]


class CounterValue(msgspec.Struct, forbid_unknown_fields=False):
    """Body of a counter message and of a direct get on the counts stream."""

    val: str


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


class EventReply(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """The coordinator's reply to a registration: the count right after it, or an error."""

    val: str | None = None
    error: ApiError | None = None


def parse_count(data: bytes) -> int | None:
    """A counter body's value, or None for anything that is not one (logged by callers)."""
    try:
        return int(msgspec.json.decode(data, type=CounterValue).val)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None


class Reached(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """The body of a notification on `tricks.<exp>.reached.<event>.<n>`; for `<tag>_start`
    once all the tag's pods run, also the tag's roster (PROTOCOL.md 6.4: a blocking discover
    then needs no read)."""

    event: str
    value: int
    roster: Roster | None = None


#: A notification carries a roster up to this size (encoded): past it, discover reads it.
MAX_NOTICE_ROSTER = 512 * 1024


def reached_roster(data: bytes, tag: str) -> list[PodRecord] | None:
    """The roster of `tag` a `<tag>_start` notification carries, or None when it has none."""
    try:
        reached = msgspec.json.decode(data, type=Reached)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if reached.roster is None or reached.roster.tag != tag:
        return None
    if reached.event != start_event(tag):
        return None
    return reached.roster.records()


class _ReachedValue(msgspec.Struct, forbid_unknown_fields=False):
    event: str
    value: int


def reached_value(data: bytes, event: str) -> int | None:
    """The count a notification says `event` reached, or None when the body is not one (a
    roster it carries is skipped here, not decoded: see `reached_roster`)."""
    try:
        reached = msgspec.json.decode(data, type=_ReachedValue)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return reached.value if reached.event == event else None


def pod_permissions(exp: str) -> dict[str, dict[str, list[str]]]:
    """What a pod's NATS user may do: ask the coordinator to count its events, read its own
    experiment's counts and rosters, hear its notifications, store its metrics batches and
    its topics' messages (bounded streams that count nothing), and read its topics.
    No other JetStream writes, no consumers: a pod cannot change a count but through the
    coordinator (+1 per call), nor aim a delivery at a subject that others trust."""
    counts, pods = stream_of(counts_bucket(exp)), stream_of(pods_bucket(exp))
    api = "$JS.API"
    return {
        "publish": {
            "allow": [
                event_subject(exp, "*"),
                metrics_subject(exp),
                topic_subject(exp, "*"),
                f"{api}.STREAM.MSG.GET.{topics_stream(exp)}",
                f"{api}.DIRECT.GET.{counts}.>",
                f"{api}.DIRECT.GET.{pods}.>",
                f"{api}.STREAM.INFO.{counts}",
            ]
        },
        "subscribe": {
            "allow": [
                f"{inbox_prefix(exp)}.>",
                f"tricks.{exp}.reached.>",
                journal_subject(exp),
                stored_subject(exp, "*"),
            ]
        },
    }


def observer_permissions(exp: str) -> dict[str, dict[str, list[str]]]:
    """What `watch` and `status` need (the credentials in the state file): read the journal
    and the counts, nothing else; never the coordinator's own user. Consumers only ephemeral
    ones on the journal (waiters never trust a delivery alone, see `Bus.wait_count`)."""
    counts, journal = stream_of(counts_bucket(exp)), journal_stream(exp)
    api = "$JS.API"
    return {
        "publish": {
            "allow": [
                f"{api}.STREAM.NAMES",
                f"{api}.STREAM.LIST",
                f"{api}.DIRECT.GET.{counts}.>",
                f"{api}.STREAM.INFO.{counts}",
                f"{api}.STREAM.INFO.{journal}",
                f"{api}.STREAM.MSG.GET.{journal}",
                f"{api}.CONSUMER.CREATE.{journal}",
                f"{api}.CONSUMER.DELETE.{journal}.>",
                f"{api}.CONSUMER.INFO.{journal}.>",
                f"$JS.FC.{journal}.>",
                f"$JS.ACK.{journal}.>",
            ]
        },
        "subscribe": {"allow": [f"{inbox_prefix(exp)}.>", journal_subject(exp)]},
    }
