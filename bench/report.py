"""Rows, the Markdown table, the side-by-side ratios and the verdict on each target."""

from __future__ import annotations

import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NATS = "tricks-nats"
FLOOR = "nats (raw)"
ZK = "zookeeper"
REDIS = "redis"


@dataclass
class Row:
    system: str
    measure: str
    n: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    ops_per_s: float | None = None
    deliveries: float | None = None  # server messages out per operation (barrier, fan-out, ...)
    rss_mb: float | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def latency_row(
    system: str, measure: str, n: int, seconds: list[float], note: str = "", **extra: Any
) -> Row:
    return Row(
        system,
        measure,
        n,
        p50_ms=percentile(seconds, 50) * 1000,
        p99_ms=percentile(seconds, 99) * 1000,
        note=note,
        **extra,
    )


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = "| system | measure | n | p50 ms | p99 ms | ops/s | deliveries/op | RSS MB | note |"
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.measure} | {r.n} | {_fmt(r.p50_ms, 2)} | {_fmt(r.p99_ms, 2)} "
            f"| {_fmt(r.ops_per_s, 0)} | {_fmt(r.deliveries, 2)} | {_fmt(r.rss_mb)} "
            f"| {r.note} |"
        )
    return "\n".join(lines)


def find(rows: list[Row], system: str, measure: str, n: int) -> Row | None:
    for r in rows:
        if r.system == system and r.measure == measure and r.n == n:
            return r
    return None


def side_by_side(rows: list[Row], measure: str = "barrier release") -> str:
    """Barrier release p50 (p99) per system and N, with the ratio to tricks-nats; `measure`:
    "barrier release" (from the last arrival acknowledged) or "barrier release from send"."""
    sizes = sorted({r.n for r in rows if r.measure == measure})
    lines = [
        "| N | raw NATS fan-out, callbacks | raw NATS fan-out, one-shot (floor) | tricks-nats "
        "| ZooKeeper | Redis | tricks-nats / floor | ZK / tricks-nats | Redis / tricks-nats |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def cell(r: Row | None) -> str:
        if r is None or r.p50_ms is None:
            return "n/a"
        return f"{_fmt(r.p50_ms, 2)} ({_fmt(r.p99_ms, 2)})"

    def ratio(a: Row | None, b: Row | None) -> str:
        if a is None or b is None or not a.p50_ms or not b.p50_ms:
            return "n/a"
        return f"{a.p50_ms / b.p50_ms:.1f}x"

    for n in sizes:
        ours = find(rows, NATS, measure, n)
        zk = find(rows, ZK, measure, n)
        redis = find(rows, REDIS, measure, n)
        fan = find(rows, FLOOR, "publish fan-out", n)
        floor = find(rows, FLOOR, "one-shot fan-out", n)
        lines.append(
            f"| {n} | {cell(fan)} | {cell(floor)} | {cell(ours)} | {cell(zk)} | {cell(redis)} "
            f"| {ratio(ours, floor)} | {ratio(zk, ours)} | {ratio(redis, ours)} |"
        )
    return "\n".join(lines)


@dataclass
class Verdict:
    target: str
    met: bool | None  # None: not measured
    figure: str

    def line(self) -> str:
        mark = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"- {mark}: {self.target}: {self.figure}"


def targets(rows: list[Row]) -> list[Verdict]:
    out: list[Verdict] = []

    # Protocol v2: the pod's registration is acknowledged by the coordinator after it has
    # published the notification, so "barrier release" (from that acknowledgement) can start
    # after the waiters were woken. The verdict takes the release from the last arrival SENT
    # (registration round trip included), an upper bound that does not depend on the order.
    b1000 = find(rows, NATS, "barrier release", 1000)
    s1000 = find(rows, NATS, "barrier release from send", 1000)
    judged = s1000 if s1000 and s1000.p99_ms is not None else b1000
    if judged and judged.p99_ms is not None:
        floor = find(rows, FLOOR, "one-shot fan-out", 1000)
        bound = ""
        if floor and floor.p99_ms is not None:
            bound = f" (raw NATS one-shot fan-out, same connections: p99 {floor.p99_ms:.1f} ms)"
        acked = ""
        if judged is s1000 and b1000 and b1000.p99_ms is not None:
            acked = f"; from the last arrival acknowledged: p99 {b1000.p99_ms:.1f} ms"
        out.append(
            Verdict(
                "barrier release p99 <= 50 ms at N = 1000",
                judged.p99_ms <= 50,
                f"p99 {judged.p99_ms:.1f} ms, {judged.measure}{acked}{bound}",
            )
        )
    else:
        out.append(Verdict("barrier release p99 <= 50 ms at N = 1000", None, "no row"))

    # Compared from the last arrival sent for both (see above); from the acknowledgement too.
    measure = "barrier release from send"
    if not find(rows, NATS, measure, 100) or not find(rows, ZK, measure, 100):
        measure = "barrier release"
    ours, zk = find(rows, NATS, measure, 100), find(rows, ZK, measure, 100)
    ours_a, zk_a = find(rows, NATS, "barrier release", 100), find(rows, ZK, "barrier release", 100)
    ours_t, zk_t = find(rows, NATS, "barrier total", 100), find(rows, ZK, "barrier total", 100)
    if ours and zk and ours.p50_ms and zk.p50_ms:
        r = zk.p50_ms / ours.p50_ms
        extra = ""
        if measure != "barrier release" and ours_a and zk_a and ours_a.p50_ms and zk_a.p50_ms:
            extra += f"; from the acknowledgement: {zk_a.p50_ms / ours_a.p50_ms:.1f}x"
        if ours_t and zk_t and ours_t.p50_ms and zk_t.p50_ms:
            extra += f"; whole barrier (all arrive at once): {zk_t.p50_ms / ours_t.p50_ms:.1f}x"
        out.append(
            Verdict(
                f">= 5x faster than the ZooKeeper barrier at N = 100 ({measure} p50)",
                r >= 5,
                f"{r:.1f}x ({zk.p50_ms:.2f} ms vs {ours.p50_ms:.2f} ms){extra}",
            )
        )
    else:
        why = zk.note if zk else "no row"
        out.append(Verdict(">= 5x faster than the ZooKeeper barrier at N = 100", None, why))

    if b1000 and b1000.deliveries is not None:
        per_n = b1000.deliveries / 1000
        out.append(
            Verdict(
                "server deliveries per barrier <= 4N at N = 1000",
                per_n <= 4,
                f"{b1000.deliveries:.0f} = {per_n:.2f} N",
            )
        )
    else:
        out.append(Verdict("server deliveries per barrier <= 4N", None, "no row"))
    growth = [
        (r.n, r.deliveries / r.n)
        for r in rows
        if r.system == NATS and r.measure == "barrier release" and r.deliveries
    ]
    if len(growth) >= 2:
        per = [g for _, g in growth]
        out.append(
            Verdict(
                "deliveries per barrier grow as O(N) (per participant flat within 1.5x)",
                max(per) <= 1.5 * min(per),
                ", ".join(f"N={n}: {g:.2f}/participant" for n, g in growth),
            )
        )

    found = [
        (r.n, r.deliveries / r.n)
        for r in rows
        if r.system == NATS and r.measure == "discovery" and r.deliveries
    ]
    if len(found) >= 2:
        per = [g for _, g in found]
        out.append(
            Verdict(
                "discover(tag, N) deliveries grow as O(N), not N^2 (per pod flat within 1.5x)",
                max(per) <= 1.5 * min(per),
                ", ".join(f"N={n}: {g:.1f}/pod" for n, g in found),
            )
        )
    else:
        out.append(Verdict("discover(tag, N) deliveries grow as O(N)", None, "no rows"))

    inc = find(rows, NATS, "event increments", 50)
    if inc and inc.ops_per_s:
        out.append(
            Verdict(
                ">= 10,000 increments/s with 50 writers",
                inc.ops_per_s >= 10_000,
                f"{inc.ops_per_s:,.0f}/s",
            )
        )
    else:
        out.append(Verdict(">= 10,000 increments/s with 50 writers", None, "no row"))

    up = find(rows, NATS, "up overhead (workflow barrier)", 1000)
    if up and up.p50_ms is not None:
        out.append(
            Verdict(
                "1000-pod `up` overhead (total wall minus the pods' own work) <= 5 s",
                up.p50_ms <= 5000,
                f"{up.p50_ms / 1000:.2f} s, {up.measure}",
            )
        )
    else:
        out.append(Verdict("1000-pod `up` overhead <= 5 s", None, up.note if up else "no row"))
    shelled = find(rows, NATS, "up total (driver barrier)", 200)
    if shelled and shelled.p50_ms is not None:
        out.append(
            Verdict(
                "200 shell-driver pods (`event` then `wait`), `up` total <= 15 s",
                shelled.p50_ms <= 15_000,
                f"{shelled.p50_ms / 1000:.2f} s",
            )
        )
    out.extend(_against_redis(rows))

    helped = find(rows, NATS, "cli --help", 1)
    if helped and helped.p50_ms is not None:
        out.append(
            Verdict(
                "`tricks-nats --help` <= 0.3 s (p50)",
                helped.p50_ms <= 300,
                f"p50 {helped.p50_ms / 1000:.3f} s, p99 {(helped.p99_ms or 0) / 1000:.3f} s",
            )
        )
    else:
        out.append(Verdict("`tricks-nats --help` <= 0.3 s", None, "no row"))
    shell = [r for r in rows if r.measure.startswith("shell ") and "fast path" in r.note]
    if shell and all(r.p50_ms is not None for r in shell):
        worst = max(shell, key=lambda r: r.p50_ms or 0.0)
        full = {r.measure: r for r in rows if r.measure.startswith("shell ") and r not in shell}
        slow = full.get(worst.measure)
        out.append(
            Verdict(
                "a shell-driver call <= 60 ms (p50, each command)",
                (worst.p50_ms or 0.0) <= 60,
                f"slowest: {worst.measure} p50 {worst.p50_ms:.1f} ms"
                + (f" (full command: {slow.p50_ms:.0f} ms)" if slow and slow.p50_ms else ""),
            )
        )
    else:
        out.append(Verdict("a shell-driver call <= 60 ms", None, "no row"))
    return out


def machine(nats_version: str, zk_version: str, redis_version: str) -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "nats-server": nats_version,
        "zookeeper": zk_version,
        "redis-server": redis_version,
        "load average at start": load,
    }


def nats_server_version() -> str:
    from tricks_nats.natsserver import find_binary

    try:
        out = subprocess.run([find_binary(), "--version"], capture_output=True, text=True)
        return out.stdout.strip().split()[-1]
    except Exception:
        return "?"


def _against_redis(rows: list[Row]) -> list[Verdict]:
    """Issue 13's targets: at least as fast as Redis in the same run, and the release at the
    one-shot fan-out floor."""
    out = []
    for n in (100, 1000):
        ours, redis = find(rows, NATS, "barrier total", n), find(rows, REDIS, "barrier total", n)
        if ours and redis and ours.p50_ms and redis.p50_ms:
            out.append(
                Verdict(
                    f"barrier total (all arrive at once) p50 <= Redis at N = {n}",
                    ours.p50_ms <= redis.p50_ms,
                    f"{ours.p50_ms:.1f} ms vs Redis {redis.p50_ms:.1f} ms "
                    f"({ours.p50_ms / redis.p50_ms:.2f}x)",
                )
            )
    ours, redis = (
        find(rows, NATS, "event increments", 50),
        find(rows, REDIS, "event increments", 50),
    )
    if ours and redis and ours.ops_per_s and redis.ops_per_s:
        out.append(
            Verdict(
                "increments/s with 50 writers >= Redis",
                ours.ops_per_s >= redis.ops_per_s,
                f"{ours.ops_per_s:,.0f}/s vs Redis {redis.ops_per_s:,.0f}/s "
                f"({ours.ops_per_s / redis.ops_per_s:.2f}x)",
            )
        )
    sent, floor = (
        find(rows, NATS, "barrier release from send", 1000),
        find(rows, FLOOR, "one-shot fan-out", 1000),
    )
    if sent and floor and sent.p99_ms and floor.p99_ms:
        out.append(
            Verdict(
                "barrier release p99 at N = 1000 <= 1.0x the one-shot fan-out floor",
                sent.p99_ms <= floor.p99_ms,
                f"{sent.p99_ms:.1f} ms vs floor {floor.p99_ms:.1f} ms "
                f"({sent.p99_ms / floor.p99_ms:.2f}x), from the last arrival sent",
            )
        )
    return out
