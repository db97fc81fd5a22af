"""`tricks-nats logs`: the pods' logs of a run merged in time order, filtered, followed.

Run directories are built by hand: logs with their `.ts` indexes (logtimes), a spec, and a
summary (a verdict: finished; blank space: still running)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tricks_nats import logmerge, logtimes, statefile
from tricks_nats.cli.app import app
from tricks_nats.errors import UsageError
from tricks_nats.logmerge import LogSet, PodLog, Selection, parse_since

from .conftest import ROOT, cli_env

TRICKS = [sys.executable, "-m", "tricks_nats.cli.app"]
T0 = 1_763_781_284.0  # 2025-11-22T03:14:44Z
WAIT = 60.0  # seconds a test waits for output that is due (a generous bound, never a verdict)


# -- building runs ---------------------------------------------------------------------------


def make_run(
    tmp_path: Path, tags: dict[str, int] | None, *, finished: bool = True, name: str = "exp-1"
) -> Path:
    """A run directory: journal, spec (tags -> replicas, in order; None: no spec), summary."""
    run = tmp_path / "runs" / name
    (run / "logs").mkdir(parents=True)
    (run / "journal.jsonl").write_text("")
    if tags is not None:
        spec = "name: exp\nexperiment:\n" + "".join(
            f"- tag: {tag}\n  command: [python, x.py]\n  replicas: {n}\n" for tag, n in tags.items()
        )
        (run / "spec.yaml").write_text(spec)
    if finished:
        finish(run)
    else:
        (run / "summary.json").write_bytes(b" " * 4096)  # the space `up` reserves at the start
    return run


def finish(run: Path) -> None:
    tmp = run / "summary.tmp"
    tmp.write_text('{"verdict": "succeeded"}\n')
    os.replace(tmp, run / "summary.json")


def append(run: Path, pod: str, lines: list[tuple[float | None, str]], *, end: bool = True) -> None:
    """Append lines to a pod's log, each with an index entry unless its time is None;
    `end=False`: the last one without its newline. The index entry goes first."""
    log = run / "logs" / f"{pod}.log"
    offset = log.stat().st_size if log.exists() else 0
    data: list[bytes] = []
    entries: list[str] = []
    for i, (ts, text) in enumerate(lines):
        if ts is not None:
            entries.append(f"{offset} {ts:.6f}\n")
        data.append(text.encode() + (b"\n" if end or i < len(lines) - 1 else b""))
        offset += len(data[-1])
    if entries:
        with log.with_suffix(".ts").open("a") as f:
            f.write("".join(entries))
    with log.open("ab") as f:
        f.write(b"".join(data))


def cli(*args: str, code: int = 0) -> tuple[str, str]:
    result = CliRunner().invoke(app, ["logs", *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result.stdout_bytes.decode(), result.stderr


def texts(out: str) -> list[str]:
    """The lines' texts, without their `pod | ` prefixes."""
    return [line.split(" | ", 1)[1] for line in out.splitlines()]


# -- merge order, ties, names ----------------------------------------------------------------


def test_lines_of_all_pods_are_merged_in_time_order(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"server": 2, "client": 1})
    append(run, "server-0", [(T0 + 0, "s0 a"), (T0 + 3, "s0 b"), (T0 + 6, "s0 c")])
    append(run, "server-1", [(T0 + 1, "s1 a"), (T0 + 4, "s1 b")])
    append(run, "client-0", [(T0 + 2, "c0 a"), (T0 + 5, "c0 b"), (T0 + 7, "c0 c")])
    out, err = cli(str(run))
    assert err == ""
    assert out.splitlines() == [
        "server-0 | s0 a",
        "server-1 | s1 a",
        "client-0 | c0 a",
        "server-0 | s0 b",
        "server-1 | s1 b",
        "client-0 | c0 b",
        "server-0 | s0 c",
        "client-0 | c0 c",
    ]


def test_ties_keep_each_pods_order_then_the_spec_order_of_pods(tmp_path: Path) -> None:
    """`client` sorts before `server` by name, but the spec lists servers first."""
    run = make_run(tmp_path, {"server": 2, "client": 1})
    append(run, "client-0", [(T0, "c0 one"), (None, "c0 two")])  # one read, two lines
    append(run, "server-1", [(T0, "s1 one"), (T0, "s1 two")])
    append(run, "server-0", [(T0, "s0 one"), (T0 + 1, "s0 later")])
    out, _ = cli(str(run))
    assert texts(out) == ["s0 one", "s1 one", "s1 two", "c0 one", "c0 two", "s0 later"]


def test_without_a_spec_pods_go_by_tag_name_then_id(tmp_path: Path) -> None:
    run = make_run(tmp_path, None)
    for pod in ("b-10", "b-2", "a-1"):
        append(run, pod, [(T0, pod)])
    out, _ = cli(str(run))
    assert out.splitlines() == ["a-1  | a-1", "b-2  | b-2", "b-10 | b-10"]


def test_names_are_padded_to_the_longest_selected_pod_so_the_bars_align(tmp_path: Path) -> None:
    """The width comes from the spec (server-11 may write later), not only the files so far."""
    run = make_run(tmp_path, {"db": 1, "server": 12})
    append(run, "db-0", [(T0, "db ready")])
    append(run, "server-0", [(T0 + 1, "server ready")])
    out, _ = cli(str(run))
    assert out.splitlines() == ["db-0      | db ready", "server-0  | server ready"]
    out, _ = cli(str(run), "--tag", "db")
    assert out.splitlines() == ["db-0 | db ready"]


def test_an_experiment_id_is_looked_up_in_the_runs_dir(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 1})
    append(run, "t-0", [(T0, "hello")])
    out, _ = cli("exp-1", "--runs-dir", str(tmp_path / "runs"))
    assert out == "t-0 | hello\n"


def test_timestamps_show_each_lines_local_time(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 1})
    append(run, "t-0", [(T0 + 0.25, "first"), (T0 + 61.5, "second")])
    out, _ = cli(str(run), "-t")
    first = time.strftime("%H:%M:%S", time.localtime(T0))
    second = time.strftime("%H:%M:%S", time.localtime(T0 + 61))
    assert out.splitlines() == [f"t-0 | {first}.250 first", f"t-0 | {second}.500 second"]


# -- filters ---------------------------------------------------------------------------------


@pytest.fixture
def three_tags(tmp_path: Path) -> Path:
    run = make_run(tmp_path, {"server": 3, "client": 2, "probe": 1})
    for tag, n in (("server", 3), ("client", 2), ("probe", 1)):
        for i in range(n):
            append(run, f"{tag}-{i}", [(T0 + i, f"{tag}-{i} says hi"), (T0 + 9, f"{tag} bye")])
    return run


def pods_in(out: str) -> set[str]:
    return {line.split(" | ", 1)[0].strip() for line in out.splitlines()}


@pytest.mark.parametrize(
    ("options", "pods"),
    [
        (["--tag", "client"], {"client-0", "client-1"}),
        (["--tag", "client", "--tag", "probe"], {"client-0", "client-1", "probe-0"}),
        (["--pod", "1"], {"server-1", "client-1"}),
        (["--pod", "server-2", "--pod", "client-0"], {"server-2", "client-0"}),
        (["--tag", "server", "--pod", "0"], {"server-0"}),
        (["--tag", "server", "--pod", "1", "--pod", "client-1"], {"server-1"}),
    ],
)
def test_tag_and_pod_select_pods(three_tags: Path, options: list[str], pods: set[str]) -> None:
    out, _ = cli(str(three_tags), *options)
    assert pods_in(out) == pods


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--tag", "nope"],
            "--tag 'nope': no such tag in this run (its tags: server, client, probe)",
        ),
        (["--pod", "server-3"], "--pod server-3: server has pods 0 to 2"),
        (["--pod", "nope-0"], "--pod nope-0: no tag 'nope' in this run"),
        (["--tag", "probe", "--pod", "1"], "--pod 1: no selected tag has a pod 1"),
        (["--pod", "server"], "--pod 'server': expected a pod id (3) or TAG-ID (server-3)"),
        (["--pod", "-1"], "--pod '-1': expected a pod id (3) or TAG-ID (server-3)"),
    ],
)
def test_a_selection_the_run_cannot_have_is_one_line_exit_2(
    three_tags: Path, options: list[str], message: str
) -> None:
    out, err = cli(str(three_tags), *options, code=2)
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"tricks-nats: error: {message}"), err


def test_grep_keeps_matching_lines(three_tags: Path) -> None:
    out, _ = cli(str(three_tags), "--grep", r"^(server|probe)-\d says")
    assert texts(out) == [
        "server-0 says hi",
        "probe-0 says hi",
        "server-1 says hi",
        "server-2 says hi",
    ]


def test_a_bad_regex_is_one_line_exit_2(three_tags: Path) -> None:
    out, err = cli(str(three_tags), "--grep", "says (hi", code=2)
    assert out == ""
    assert err.splitlines() == [
        "tricks-nats: error: --grep 'says (hi': not a regular expression: "
        "missing ), unterminated subpattern at position 5"
    ]


def test_since_a_duration_back_from_now(tmp_path: Path) -> None:
    now = time.time()
    run = make_run(tmp_path, {"t": 2})
    append(run, "t-0", [(now - 7200, "two hours ago"), (now - 60, "a minute ago")])
    append(run, "t-1", [(now - 1800, "half an hour ago"), (now - 30, "half a minute ago")])
    out, _ = cli(str(run), "--since", "1h")
    assert texts(out) == ["half an hour ago", "a minute ago", "half a minute ago"]
    out, _ = cli(str(run), "--since", "1h59m")
    assert len(texts(out)) == 3


def test_since_an_absolute_time(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 1})
    append(run, "t-0", [(T0, "before"), (T0 + 1.5, "at"), (T0 + 2, "after")])
    iso = datetime.fromtimestamp(T0 + 1.5, UTC).isoformat().replace("+00:00", "Z")
    for since in (iso, str(T0 + 1.5), datetime.fromtimestamp(T0 + 1.5).isoformat()):
        out, _ = cli(str(run), "--since", since)
        assert texts(out) == ["at", "after"], since


def test_parse_since_reads_what_docker_reads() -> None:
    now = 10_000.0
    assert parse_since("10s", now) == now - 10
    assert parse_since("1.5s", now) == now - 1.5
    assert parse_since("5m", now) == now - 300
    assert parse_since("1h30m", now) == now - 5400
    assert parse_since("250ms", now) == now - 0.25
    assert parse_since("1763781284", now) == 1763781284.0
    assert parse_since("1763781284.5", now) == 1763781284.5
    assert parse_since("2025-11-22T03:14:44Z", now) == T0
    assert parse_since("2025-11-22T04:14:44+01:00", now) == T0
    local = datetime.fromtimestamp(T0)
    assert parse_since(local.isoformat(), now) == T0
    assert parse_since(local.strftime("%Y-%m-%d %H:%M:%S"), now) == T0
    today = datetime.combine(datetime.now().date(), local.time()).timestamp()
    assert parse_since(local.strftime("%H:%M:%S"), now) == today
    for bad in ("", "10x", "-5s", "yesterday", "1h 30m", "s"):
        with pytest.raises(UsageError, match="--since"):
            parse_since(bad, now)


# -- what the files hold ---------------------------------------------------------------------


def test_a_missing_run_is_one_line_exit_2(tmp_path: Path) -> None:
    out, err = cli("nope", "--runs-dir", str(tmp_path / "runs"), code=2)
    assert out == ""
    assert err == (
        f"tricks-nats: error: no run 'nope': not a run directory, and nothing in "
        f"{tmp_path / 'runs' / 'nope'}\n"
    )


def test_a_torn_last_index_entry_is_ignored(tmp_path: Path) -> None:
    """The last entry was being written: until it ends, its line has the previous entry's
    time (t-0's third line sorts before u-0's line, not after it)."""
    run = make_run(tmp_path, {"t": 1, "u": 1})
    append(run, "t-0", [(T0, "one"), (None, "two")])
    with (run / "logs" / "t-0.ts").open("a") as f:
        f.write(f"{(run / 'logs' / 't-0.log').stat().st_size} {T0 + 5}")  # no newline: torn
    append(run, "t-0", [(None, "three")])
    append(run, "u-0", [(T0 + 1, "u")])
    out, _ = cli(str(run))
    assert texts(out) == ["one", "two", "three", "u"]


def test_a_log_without_an_index_is_timed_by_its_files_mtime(tmp_path: Path) -> None:
    """An old run (or a pod whose index is not there): its lines all come at the time the log
    was last written, in their own order."""
    run = make_run(tmp_path, {"new": 1, "old": 1})
    append(run, "new-0", [(T0, "new 0"), (T0 + 1, "new 1"), (T0 + 2, "new 2")])
    append(run, "old-0", [(None, "old a"), (None, "old b")])
    os.utime(run / "logs" / "old-0.log", (T0 + 1.5, T0 + 1.5))
    out, _ = cli(str(run), "-t")
    assert texts(out)[1:4] == [
        time.strftime("%H:%M:%S.000 new 1", time.localtime(T0 + 1)),
        time.strftime("%H:%M:%S.500 old a", time.localtime(T0 + 1)),
        time.strftime("%H:%M:%S.500 old b", time.localtime(T0 + 1)),
    ]


def test_a_last_line_without_newline_shows_once_the_run_is_over(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 1}, finished=False)
    append(run, "t-0", [(T0, "whole"), (T0 + 1, "still being wri")], end=False)
    out, _ = cli(str(run))
    assert out == "t-0 | whole\n"  # running: that pod may still be writing it
    finish(run)
    out, _ = cli(str(run))
    assert out == "t-0 | whole\nt-0 | still being wri\n"


def test_bad_bytes_and_other_files_do_not_get_in_the_way(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 1})
    (run / "logs" / "t-0.log").write_bytes(b"caf\xe9\r\n\n\xff\n")
    (run / "logs" / "notes.txt").write_text("not a log\n")
    (run / "logs" / "t-01.log").write_text("not pod 1's log either\n")
    out, _ = cli(str(run))
    assert out == "t-0 | caf\ufffd\r\nt-0 | \nt-0 | \ufffd\n"


# -- the reader against logtimes, and incremental reading -------------------------------------


def read_all(pod: PodLog, *, whole_only: bool) -> list[tuple[float, int, str]]:
    return [(ts, offset, text) for ts, _, offset, text, _ in pod.lines(whole_only=whole_only)]


@st.composite
def logs_and_indexes(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A log (text with odd bytes, maybe no newline at the end) and an index of some of its
    line starts, with junk, an offset going back and maybe a torn last entry."""
    lines = draw(st.lists(st.text(alphabet="ab \t\r\xe9\u20ac\x00", max_size=12), max_size=30))
    log = "\n".join(lines).encode() + draw(st.sampled_from([b"", b"\n"]))
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line.encode()) + 1)
    chosen = sorted(draw(st.sets(st.sampled_from(starts), min_size=1)))
    ts = T0
    entries = []
    for offset in chosen:
        ts += draw(st.floats(0, 5))
        entries.append(f"{offset} {ts:.3f}\n".encode())
        if draw(st.booleans()):
            entries.append(draw(st.sampled_from([b"junk\n", b"\n", b"1 2 3\n", b"0 1.5\n"])))
    entries.append(draw(st.sampled_from([b"", b"9", f"{len(log)} {ts + 1}".encode()])))
    return log, b"".join(entries)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=logs_and_indexes(), block=st.sampled_from([1, 7, 64, logmerge.BLOCK]))
def test_a_pods_lines_and_times_are_those_logtimes_reads(
    data: tuple[bytes, bytes], block: int
) -> None:
    """Read in blocks of any size, all at once or as the log grows, with the index written
    ahead: the same lines, offsets and times as logtimes.read_lines."""
    log_bytes, index_bytes = data
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "t-0.log"
        log.write_bytes(log_bytes)
        logtimes.index_path(log).write_bytes(index_bytes)
        for whole_only in (False, True):
            expected = [
                (x.ts, x.offset, x.text) for x in logtimes.read_lines(log, 0, whole_only=whole_only)
            ]
            pod = PodLog("t", 0, log)
            pod.block = block
            assert read_all(pod, whole_only=whole_only) == expected
        # Growing: a few bytes at a time, whole lines while it grows, the rest at the end.
        log.write_bytes(b"")
        pod = PodLog("t", 0, log)
        pod.block = block
        got: list[tuple[float, int, str]] = []
        for i in range(0, len(log_bytes), 5):
            with log.open("ab") as f:
                f.write(log_bytes[i : i + 5])
            got += read_all(pod, whole_only=True)
        got += read_all(pod, whole_only=False)
        assert got == [(x.ts, x.offset, x.text) for x in logtimes.read_lines(log)]


def test_a_truncated_log_is_read_again_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "t-0.log"
    log.write_bytes(b"one\ntwo\n")
    pod = PodLog("t", 0, log)
    assert pod.has_news()
    assert [t for _, _, t in read_all(pod, whole_only=True)] == ["one", "two"]
    assert not pod.has_news()
    log.write_bytes(b"new\n")
    assert pod.has_news()
    assert [t for _, _, t in read_all(pod, whole_only=True)] == ["new"]


def test_a_log_set_picks_up_new_pods_and_gives_only_new_lines(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a": 1, "b": 1}, finished=False)
    logs = LogSet(run / "logs", Selection(), [("a", 1), ("b", 1)])
    logs.refresh()
    assert list(logs.lines(whole_only=True)) == []
    append(run, "b-0", [(T0 + 1, "b one")])
    logs.refresh()
    assert [x[3] for x in logs.lines(whole_only=True)] == ["b one"]
    append(run, "a-0", [(T0, "a one")])
    append(run, "b-0", [(T0 + 2, "b two")])
    logs.refresh()
    assert [(x[3], x[4].name) for x in logs.lines(whole_only=True)] == [
        ("a one", "a-0"),
        ("b two", "b-0"),
    ]
    assert list(logs.lines(whole_only=True)) == []


def test_colours_go_by_pod_order_and_are_stable_under_filters(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a": 2, "b": 1})
    for pod in ("a-0", "a-1", "b-0"):
        append(run, pod, [(T0, pod)])
    for selection, expected in (
        (Selection(), ["36", "33", "32"]),
        (Selection.parse(["b"]), ["32"]),
    ):
        logs = LogSet(run / "logs", selection, [("a", 2), ("b", 1)])
        logs.refresh()
        out = list(logmerge.render(logs.lines(whole_only=False), logs.width, colour=True))
        assert [re.match(r"\x1b\[(\d+)m", line)[1] for line in out] == expected  # type: ignore[index]
    assert out == ["\x1b[32mb-0 |\x1b[0m b-0\n"]


# -- the command as a process: terminals, pipes, following -----------------------------------


def on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """Run the command with a pseudo-terminal as its stdout; what it printed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*TRICKS, *args], stdout=slave, stderr=subprocess.PIPE, env=env, cwd=ROOT
    )
    os.close(slave)
    out = b""
    try:
        while chunk := os.read(master, 65536):  # EIO once the command has closed the terminal
            out += chunk
    except OSError:
        pass
    finally:
        os.close(master)
        assert proc.wait(timeout=WAIT) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == b""
        proc.stderr.close()
    return out.decode().replace("\r\n", "\n")


def test_colours_on_a_terminal_only_and_never_with_no_color(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 2})
    append(run, "t-0", [(T0, "zero")])
    append(run, "t-1", [(T0 + 1, "one")])
    env = cli_env()
    env.pop("NO_COLOR", None)
    assert on_a_terminal("logs", str(run), env=env) == (
        "\x1b[36mt-0 |\x1b[0m zero\n\x1b[33mt-1 |\x1b[0m one\n"
    )
    assert on_a_terminal("logs", str(run), "--no-color", env=env) == "t-0 | zero\nt-1 | one\n"
    assert (
        on_a_terminal("logs", str(run), env={**env, "NO_COLOR": "1"}) == "t-0 | zero\nt-1 | one\n"
    )
    out = subprocess.run(
        [*TRICKS, "logs", str(run)], capture_output=True, env=env, cwd=ROOT, timeout=WAIT
    )
    assert out.stdout == b"t-0 | zero\nt-1 | one\n"  # a pipe: no colours


def test_a_closed_pipe_ends_it_quietly(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 2})
    for pod in ("t-0", "t-1"):
        append(run, pod, [(T0 + i / 1000, f"{pod} line {i} " + "x" * 40) for i in range(20_000)])
    proc = subprocess.Popen(
        [*TRICKS, "logs", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline().startswith(b"t-0 | t-0 line 0 ")
        proc.stdout.close()  # like `head -1` exiting
        assert proc.wait(timeout=WAIT) == 0
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


class Follower:
    """`logs -f` as a subprocess: read its lines as they come (never wait on a clock)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def lines(self, n: int) -> list[str]:
        assert self.proc.stdout is not None
        got: list[str] = []
        for _ in range(n):
            line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT)
            assert line, f"ended early after {got}"
            got.append(line.decode().rstrip("\n"))
        return got

    async def end(self) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), WAIT)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def following(*args: str) -> AsyncIterator[Follower]:
    proc = await asyncio.create_subprocess_exec(
        *TRICKS,
        "logs",
        "-f",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        yield Follower(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def test_follow_prints_new_lines_and_new_pods_and_ends_with_the_run(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"server": 1, "client": 1}, finished=False)
    append(run, "server-0", [(T0, "s0 first"), (T0 + 2, "s0 second")])
    async with following(str(run)) as f:
        assert await f.lines(2) == ["server-0 | s0 first", "server-0 | s0 second"]
        # server-0 begins a line; then a new pod writes a whole one: only that one shows.
        append(run, "server-0", [(T0 + 3, "s0 thi")], end=False)
        append(run, "client-0", [(T0 + 4, "c0 first")])
        assert await f.lines(1) == ["client-0 | c0 first"]
        with (run / "logs" / "server-0.log").open("ab") as log:
            log.write(b"rd\n")
        assert await f.lines(1) == ["server-0 | s0 third"]
        append(run, "client-0", [(T0 + 5, "c0 one"), (T0 + 6, "c0 last words")], end=False)
        append(run, "server-0", [(T0 + 5.5, "s0 bye")])
        finish(run)
        code, out, err = await f.end()
    assert (code, err) == (0, "")
    assert out == "client-0 | c0 one\nserver-0 | s0 bye\nclient-0 | c0 last words\n"


async def test_follow_a_finished_run_prints_it_and_exits(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 1})
    append(run, "t-0", [(T0, "done")], end=False)
    async with following(str(run), "--grep", "do") as f:
        assert await f.end() == (0, "t-0 | done\n", "")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("how", ["dead", "vanished"])
async def test_follow_ends_when_up_is_gone_without_a_verdict(tmp_path: Path, how: str) -> None:
    run = make_run(tmp_path, {"t": 1}, finished=False)
    append(run, "t-0", [(T0, "one"), (T0 + 1, "cut sh")], end=False)
    state = statefile.RunState(
        experiment=run.name,
        run_dir=str(run.resolve()),
        pid=dead_pid() if how == "dead" else os.getpid(),
        started_at=T0,
    )
    statefile.write(state)
    async with following(str(run)) as f:
        assert await f.lines(1) == ["t-0 | one"]
        if how == "vanished":  # `up` was killed: its watchdog removes the state file
            statefile.path_of(run.name).unlink()
        code, out, err = await f.end()
    assert code == 1
    assert out == "t-0 | cut sh\n"
    assert err == f"tricks-nats: error: {run.name} ended without a verdict (was `up` killed?)\n"


def test_without_follow_a_run_whose_up_died_shows_its_last_partial_line(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"t": 1}, finished=False)
    append(run, "t-0", [(T0, "one"), (T0 + 1, "cut sh")], end=False)
    statefile.write(
        statefile.RunState(
            experiment=run.name, run_dir=str(run.resolve()), pid=dead_pid(), started_at=T0
        )
    )
    assert cli(str(run)) == ("t-0 | one\nt-0 | cut sh\n", "")


def test_register_adds_the_command_to_an_app() -> None:
    import typer

    from tricks_nats.cli import logs

    def other() -> None:
        """A second command, so `logs` is a subcommand."""

    fresh = typer.Typer()
    logs.register(fresh)
    fresh.command()(other)
    result = CliRunner().invoke(fresh, ["logs", "--help"])
    assert result.exit_code == 0
    assert "--follow" in result.stdout


@pytest.mark.slow
def test_logs_of_a_real_run_are_merged_in_the_order_things_happened(tmp_path: Path) -> None:
    """Two pods take turns (each waits for the other's event before printing): the merged log
    has their lines in that order, whatever the pods' files hold."""
    from .test_up import only_run, up

    spec = tmp_path / "turns.yaml"
    spec.write_text(
        textwrap.dedent(
            """
            experiment:
            - tag: a
              command: |
                echo a1; tricks-nats event a1 >/dev/null
                tricks-nats wait b1 1 >/dev/null; echo a2; tricks-nats event a2 >/dev/null
            - tag: b
              command: |
                tricks-nats wait a1 1 >/dev/null; echo b1; tricks-nats event b1 >/dev/null
                tricks-nats wait a2 1 >/dev/null; echo b2
            """
        )
    )
    result = up(str(spec), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path / "runs")
    out = subprocess.run(
        [*TRICKS, "logs", str(run)], capture_output=True, text=True, env=cli_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["a-0 | a1", "b-0 | b1", "a-0 | a2", "b-0 | b2"]
