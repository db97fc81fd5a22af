"""The typed journal (`tricks_nats.entries`): one reader, one writer, and the bytes they keep.

`tests/data/journals/` holds two recorded runs (see its README): their `journal.jsonl` and
what `watch` and `report` printed for them before the journal was typed. Decoding and
encoding the journal, and the commands run on it, must give those bytes back exactly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from typer.testing import CliRunner

from tricks_nats import entries
from tricks_nats import protocol as p
from tricks_nats.bus import Bus
from tricks_nats.cli.app import app
from tricks_nats.entries import (
    Condition,
    Entry,
    EventEntry,
    PodEntry,
    VerdictEntry,
    WorkflowEntry,
    decode,
    encode,
)
from tricks_nats.journal import JournalPublisher
from tricks_nats.records import RunRecords
from tricks_nats.rundir import spec_tags
from tricks_nats.watching import _replay

DATA = Path(__file__).parent / "data" / "journals"
RUNS = ("ring", "broken")


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`watch` prints local times; the recordings were made in UTC."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def cli(*args: str) -> bytes:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


# -- recorded journals: the same bytes back -------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_a_recorded_journal_decodes_and_encodes_to_the_same_bytes(run: str) -> None:
    raw = (DATA / run / "journal.jsonl").read_bytes()
    journal = entries.read(DATA / run / "journal.jsonl")
    assert len(journal) == raw.count(b"\n")  # every line is an entry
    assert b"".join(encode(e) + b"\n" for e in journal) == raw


def test_the_recordings_hold_every_kind_and_every_optional_field() -> None:
    journal = [e for run in RUNS for e in entries.read(DATA / run / "journal.jsonl")]
    # recorded before faults existed: test_faults reads and writes back a journal with them
    assert {e.kind for e in journal} == set(entries.KINDS) - {"fault"}
    pods = [e for e in journal if isinstance(e, PodEntry)]
    assert any(e.ip for e in pods) and any(e.reason for e in pods)
    assert any(e.exit_code == 0 for e in pods) and any(e.exit_code for e in pods)
    assert any(isinstance(e, EventEntry) and e.pod for e in journal)
    assert {e.action for e in journal if isinstance(e, WorkflowEntry)} == {"start", "stop"}
    assert any(not e.isascii() for e in (e.reason or "" for e in pods))  # `--json` escapes it


@pytest.mark.parametrize("run", RUNS)
def test_watch_json_prints_what_it_printed_before(run: str) -> None:
    expected = (DATA / run / "watch.json").read_bytes()
    journal = entries.read(DATA / run / "journal.jsonl")
    assert "".join(entries.json_line(e) + "\n" for e in journal).encode() == expected
    assert cli("watch", str(DATA / run), "--json") == expected


def tag_options(run: str, *tags: str) -> list[str]:
    """`--tag T` for each of `tags` the run has: since `watch` refuses a tag a run does not
    have, the recorded filters (`client` and `ghost`, `server` and `crasher`) keep the ones
    each run has; the others matched nothing."""
    known = {t for t, _ in spec_tags(DATA / run)}
    return [x for t in tags if t in known for x in ("--tag", t)]


@pytest.mark.parametrize("run", RUNS)
def test_watch_filters_print_what_they_printed_before(run: str) -> None:
    tags = cli("watch", str(DATA / run), "--json", *tag_options(run, "client", "ghost"))
    assert tags == (DATA / run / "watch-tags.json").read_bytes()
    kinds = ["--kind", "pod", "--kind", "verdict", "--kind", "workflow"]
    only = cli("watch", str(DATA / run), "--json", *tag_options(run, "server", "crasher"), *kinds)
    assert only == (DATA / run / "watch-kinds.json").read_bytes()
    typo = CliRunner().invoke(app, ["watch", str(DATA / run), "--tag", "nosuchtag"])
    assert typo.exit_code == 2 and "no such tag in this run" in typo.output


@pytest.mark.parametrize("run", RUNS)
def test_watch_and_report_print_the_same_text_as_before(run: str, utc: None) -> None:
    assert cli("watch", str(DATA / run)) == (DATA / run / "watch.txt").read_bytes()
    assert cli("report", str(DATA / run)) == (DATA / run / "report.txt").read_bytes()


# -- the writer -----------------------------------------------------------------------------


def test_encode_puts_ts_experiment_kind_first_and_leaves_out_only_none() -> None:
    entry = PodEntry(
        ts=1.5, experiment="e-1", tag="a", pod_id=0, state="failed", exit_code=0, reason=""
    )
    assert encode(entry) == (
        b'{"ts":1.5,"experiment":"e-1","kind":"pod","tag":"a","pod_id":0,"state":"failed",'
        b'"exit_code":0,"reason":""}'
    )
    flow = WorkflowEntry(tag="b", action="stop", condition=Condition("x", 2))
    assert encode(flow) == (
        b'{"ts":0.0,"experiment":"","kind":"workflow","tag":"b","action":"stop",'
        b'"condition":{"name":"x","value":2}}'
    )
    assert entries.to_dict(VerdictEntry(verdict="failed")) == {
        "ts": 0.0,
        "experiment": "",
        "kind": "verdict",
        "verdict": "failed",
    }


#: The entries the coordinator and `up` wrote as `journal(kind, **fields)` before the journal
#: was typed, and the fields each one gave.
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("pod", {"tag": "s", "pod_id": 0, "state": "pending"}),
    ("pod", {"tag": "s", "pod_id": 0, "state": "running", "ip": "127.0.0.2"}),
    ("pod", {"tag": "s", "pod_id": 0, "state": "exited", "exit_code": 0, "reason": None}),
    ("pod", {"tag": "s", "pod_id": 1, "state": "failed", "exit_code": 127, "reason": "gone"}),
    ("event", {"name": "s_start", "count": 1, "pod": None}),
    ("event", {"name": "ready", "count": 2, "pod": "s-1"}),
    ("workflow", {"tag": "c", "action": "start", "condition": {"name": "ready", "value": 2}}),
    ("verdict", {"verdict": "succeeded", "reason": None}),
    ("verdict", {"verdict": "failed", "reason": "s-1 exited with 127 (gone)"}),
]


def test_typed_entries_are_written_as_the_untyped_journal_wrote_them(tmp_path: Path) -> None:
    records = RunRecords(tmp_path, "e-1")
    typed = [
        msgspec.convert({"kind": kind, **{k: v for k, v in fields.items() if v is not None}}, Entry)
        for kind, fields in CALLS
    ]
    returned = [records.write(entry) for entry in typed]
    lines = (tmp_path / "journal.jsonl").read_bytes().splitlines()
    for line, (kind, fields), entry in zip(lines, CALLS, returned, strict=True):
        ts = json.loads(line)["ts"]
        before = {"ts": ts, "experiment": "e-1", "kind": kind}
        before.update({k: v for k, v in fields.items() if v is not None})
        assert line == msgspec.json.encode(before)  # the writer of old, byte for byte
        assert decode(line) == entry and entry.kind == kind
    records.close()


def test_write_stamps_flushes_and_tells_listeners(tmp_path: Path) -> None:
    records = RunRecords(tmp_path, "e-1")
    heard: list[Entry] = []

    def broken(entry: Entry) -> None:
        raise BrokenPipeError("closed")

    records.listeners += [broken, heard.append]
    given = EventEntry(name="ready", count=1, pod="a-0")
    before = time.time()
    written = records.write(given)
    assert type(written) is EventEntry and given.ts == 0.0  # a stamped copy
    assert written.experiment == "e-1" and before <= written.ts <= time.time()
    assert (tmp_path / "journal.jsonl").read_bytes() == encode(written) + b"\n"  # not closed
    assert heard == [written] and records.listeners == [heard.append]  # `broken` was dropped
    records.close()  # the file cannot be written any more: counted, not raised
    again = records.write(VerdictEntry(verdict="error"))
    assert records.journal_lost == 1 and heard == [written, again]


# -- the reader ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"[1, 2]",
        b'"pod"',
        b'{"kind": "pod"}',  # fields missing
        b'{"kind": "nope", "ts": 1.0}',  # a kind this version does not know
        b'{"tag": "a", "pod_id": 0, "state": "running"}',  # no kind
        b'{"kind": "pod", "tag": "a", "pod_id": "0", "state": "running"}',
        b'{"kind": "event", "name": "e", "count": 1.5}',
        b'{"kind": "workflow", "tag": "a", "action": "pause", "condition": {"name": "e"}}',
        b'{"kind": "verdict", "verdict": "ok", "ts": null}',
        b'{"kind": "verdict", "verdict": "succ',  # cut short
        b"\xff\xfe{}",
    ],
)
def test_decode_returns_none_for_anything_but_an_entry(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="tricks_nats.entries"):
        assert decode(data) is None
    assert "not a journal entry" in caplog.text


def test_decode_ignores_fields_it_does_not_know() -> None:
    line = b'{"ts":2.0,"experiment":"e","kind":"verdict","verdict":"failed","later":[1]}'
    assert decode(line) == VerdictEntry(ts=2.0, experiment="e", verdict="failed")


def test_read_skips_lines_that_are_not_entries(tmp_path: Path) -> None:
    odd = "a reason with a line separator\u2028and more"  # str.splitlines would cut here
    good = [
        PodEntry(ts=1.0, experiment="e", tag="a", pod_id=0, state="failed", reason=odd),
        VerdictEntry(ts=2.0, experiment="e", verdict="failed"),
    ]
    path = tmp_path / "journal.jsonl"
    path.write_bytes(
        encode(good[0])
        + b"\n\nnot json\n"
        + b'{"kind":"nope"}\n'
        + encode(good[1])
        + b'\n{"ts":3.0,"experiment":"e","kind":"ev'  # a line still being written
    )
    assert entries.read(path) == good
    with pytest.raises(OSError):
        entries.read(tmp_path / "missing.jsonl")


def test_replay_resumes_after_the_last_entry_seen() -> None:
    journal = entries.read(DATA / "ring" / "journal.jsonl")
    emitted: list[Entry] = []
    assert _replay(journal, emitted.append, after=journal[9]) == "succeeded"
    assert emitted == journal[10:]
    emitted.clear()
    assert _replay(journal[:-1], emitted.append, after=EventEntry(name="x", count=1)) is None
    assert emitted == journal[:-1]  # an entry it never saw: everything


# -- publishing ------------------------------------------------------------------------------


class FakeBus:
    exp_id = "e-1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.calls = 0

    async def publish(self, subject: str, data: bytes) -> None:
        await asyncio.sleep(0)
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("NATS is away")
        self.sent.append((subject, data))

    async def flush(self) -> None:
        pass


async def test_the_publisher_sends_each_entry_encoded_on_its_kinds_subject() -> None:
    """In order; one that fails to go out is not retried and does not stop the rest."""
    bus = FakeBus()
    publisher = JournalPublisher(cast(Bus, bus))
    publisher.start()
    journal = entries.read(DATA / "broken" / "journal.jsonl")
    for entry in journal:
        publisher(entry)
    await publisher.aclose()
    assert bus.sent == [(p.journal_subject("e-1", e.kind), encode(e)) for e in journal[1:]]
