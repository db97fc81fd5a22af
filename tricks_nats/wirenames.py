"""The protocol's names and rules that need no library: subjects, buckets, message ids, name
and label checks (version 2). Imported by the shell commands' fast path, which must start in a
few milliseconds (msgspec alone costs 30 ms); `protocol` re-exports all of it beside the
message shapes.
"""

from __future__ import annotations

import os
import re
import time

from tricks_nats.errors import TricksError, UnknownTag, UsageError

VERSION = "2"

#: Event names and tags: one NATS subject token, one KV key, a Kubernetes-friendly word.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
EXPERIMENT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_name(name: object, what: str = "event name") -> str:
    """`name` if it is a valid event name or tag (NAME_RE), else a UsageError saying why: the
    one check every API (driver, shell driver, bus) makes before a name reaches a subject."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"bad {what} {name!r}: letters, digits, '-' or '_' only")
    return name


def parse_tags(value: str | None) -> tuple[str, ...] | None:
    """The experiment's tags from TRICKS_TAGS (comma-separated); None when unset or empty
    (a hand-made environment, or too many tags to pass): then no tag is refused."""
    return tuple(value.split(",")) if value else None


def check_tag_known(tag: str, tags: tuple[str, ...] | None, exp: str) -> None:
    """An UnknownTag error when `tags` is known and lacks `tag` (PROTOCOL.md, section 6.4)."""
    if tags is not None and tag not in tags:
        shown = ", ".join(tags[:20]) + (", ..." if len(tags) > 20 else "")
        raise UnknownTag(f"no tag {tag!r} in experiment {exp} (its tags: {shown})")


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
    return f"{base}-{stamp}-{os.urandom(2).hex()}"


def counts_bucket(exp: str) -> str:
    return f"tricks-{exp}-counts"


def pods_bucket(exp: str) -> str:
    return f"tricks-{exp}-pods"


def stream_of(bucket: str) -> str:
    return f"KV_{bucket}"


def count_subject(exp: str, event: str) -> str:
    """The counter of `event` in the counts stream; only the coordinator writes it."""
    return f"$KV.{counts_bucket(exp)}.{event}"


def event_subject(exp: str, event: str) -> str:
    """Pods register `event` with a request here; the coordinator adds exactly one."""
    return f"tricks.{exp}.event.{event}"


def roster_subject(exp: str, tag: str) -> str:
    """The last message here is the roster of `tag`: its running pods."""
    return f"$KV.{pods_bucket(exp)}.{tag}"


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


def metrics_subject(exp: str, pod: str = "*") -> str:
    """Pods publish their batches of samples here (a JetStream publish: the reply is the
    metrics stream's acknowledgement); `pod` is `<tag>-<pod_id>`."""
    return f"tricks.{exp}.metrics.{pod}"


def metrics_stream(exp: str) -> str:
    """The stream that holds the batches until the coordinator has written them."""
    return f"tricks-{exp}-metrics"


def metrics_msg_id(exp: str, pod: str, nonce: str) -> str:
    """One per batch, identical across that batch's retries: stored and written once."""
    return f"{exp}.{pod}.metrics.{nonce}"


#: A batch's body is at most this many bytes (the stream refuses larger ones).
MAX_BATCH_BYTES = 1 << 20
#: What the metrics stream may hold at once: past it, batches are refused (and counted as
#: dropped by the pod), so a pod that floods cannot fill the coordinator's disk.
METRICS_STREAM_BYTES = 1 << 30
#: Label keys: short identifiers; these five are the CSV's own columns.
LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
RESERVED_LABELS = frozenset({"ts", "tag", "pod_id", "name", "value"})
MAX_LABELS = 8
MAX_LABEL_VALUE = 200


def topic_subject(exp: str, topic: str) -> str:
    """Pods publish a topic's messages here (a JetStream publish: the reply is the topics
    stream's acknowledgement, its `seq` the message's place in the run)."""
    return f"tricks.{exp}.topic.{topic}"


def stored_subject(exp: str, topic: str) -> str:
    """The topics stream republishes every message it stores here, with `Nats-Sequence` and
    `Nats-Last-Sequence` (the previous message of the same topic): subscribers listen here,
    and only the server can publish here."""
    return f"tricks.{exp}.stored.{topic}"


def topics_stream(exp: str) -> str:
    """The stream that keeps every topic's messages for the whole run."""
    return f"tricks-{exp}-topics"


def topic_msg_id(exp: str, pod: str, topic: str, nonce: str) -> str:
    """One per `publish` call, identical across its retries: stored once."""
    return f"{exp}.{pod}.topic.{topic}.{nonce}"


#: A topic message's data is at most this many bytes (1 MB; the headers fit in the rest of
#: NATS's default 1 MiB payload).
MAX_TOPIC_BYTES = 1_000_000
#: What the topics stream may hold in all: past it, publishes are refused.
TOPICS_STREAM_BYTES = 1 << 30
#: JetStream's err_code for a message get that found nothing (code 404; a stream that does not
#: exist is a 404 too, err_code 10059).
JS_NO_MESSAGE = 10037
#: JetStream's err_code for a publish whose message id an earlier publish, not yet applied,
#: carries ("duplicate message id is in process": a stream whose leader just changed).
JS_ID_IN_PROCESS = 10158
#: Header of a topic message whose data is JSON (`publish --json`, a non-bytes value).
TYPE_HEADER = "Tricks-Type"
JSON_TYPE = "json"


def inbox_prefix(exp: str) -> str:
    """Replies for an experiment's clients come back under their own prefix (isolation)."""
    return f"_INBOX_{exp}"


def pod_name(tag: str, pod_id: int) -> str:
    return f"{tag}-{pod_id}"


def event_msg_id(exp: str, pod: str, event: str, nonce: str) -> str:
    """Unique per driver call, identical across that call's retries: counted exactly once."""
    return f"{exp}.{pod}.{event}.{nonce}"


#: A pod's message id is at most this long (the coordinator refuses longer ones).
MAX_MSG_ID = 200


def pod_dedup_id(msg_id: str) -> str:
    """The counts stream's message id for a pod's registration: in the `p.` namespace, so no
    id a pod sends can collide with the coordinator's own (`c.`)."""
    return f"p.{msg_id}"


def group_msg_id(token: str) -> str:
    """The counts stream's message id for one group write of pods' registrations (`b.`: no
    pod's id can reach it, see `pod_dedup_id`); the registrar keeps it across the retries of
    that write."""
    return f"b.{token}"


def lifecycle_msg_id(tag: str, pod_id: int, what: str, incarnation: int = 0) -> str:
    """Deterministic, so a restarted coordinator cannot count a pod's start or stop twice;
    in the `c.` namespace, which no pod can reach (see `pod_dedup_id`). A pod started again
    (a restart) is counted again: its incarnation is part of the id."""
    base = f"c.{tag}-{pod_id}.{what}"
    return f"{base}.{incarnation}" if incarnation else base


def start_event(tag: str) -> str:
    return f"{tag}_start"


def stop_event(tag: str) -> str:
    return f"{tag}_stop"


def check_label(key: object, value: object) -> str:
    """A sample's label as it is stored (numbers become text), or a TricksError saying why
    it cannot be one (PROTOCOL.md 6.6)."""
    if not isinstance(key, str) or not LABEL_RE.match(key):
        raise TricksError(
            f"bad label {key!r}: a letter or '_', then letters, digits or '_' (at most 32)"
        )
    if key in RESERVED_LABELS:
        raise TricksError(f"label {key!r} is a column of metrics.csv: use another name")
    if value.__class__ is not str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise TricksError(f"label {key}={value!r}: use a string or a number")
        value = str(value)
    assert isinstance(value, str)
    if len(value) > MAX_LABEL_VALUE:
        raise TricksError(f"label {key}: longer than {MAX_LABEL_VALUE} characters")
    return value
