"""A hostile pod: tries every wire-level trick against its own experiment and writes what
each attempt got to `hostile.json` (in its working directory), then registers `hostile-done`.

It uses raw nats-py with the pod's own credentials, as an attacker inside a pod would.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import tempfile
from pathlib import Path

import nats
import nats.errors

E = os.environ
EXP = E["EXP_ID"]
COUNTS, PODS = f"tricks-{EXP}-counts", f"tricks-{EXP}-pods"
report: dict[str, object] = {}
errors: list[str] = []
news = asyncio.Condition()


async def on_error(exc: Exception) -> None:
    async with news:
        errors.append(str(exc).lower())
        news.notify_all()


def denied(subject: str) -> bool:
    return any("permissions violation" in e and subject.lower() in e for e in errors)


async def refused(nc: nats.NATS, subject: str, body: bytes = b"", **headers: str) -> bool:
    """Publish, then wait for the server's -ERR (nats-py reports it from a task of its own);
    no error within 10 s means the publish was allowed."""
    await nc.publish(subject, body, headers=headers or None)
    await nc.flush()
    try:
        async with asyncio.timeout(10), news:
            await news.wait_for(lambda: denied(subject))
    except TimeoutError:
        return False
    return True


def found_credentials() -> list[tuple[str, str, str]]:
    """Every (file, user, password) this pod can read at the default places."""
    found = []
    state = E.get("TRICKS_NATS_STATE_DIR") or str(Path.home() / ".local/state/tricks-nats")
    for path in glob.glob(f"{state}/*.json"):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if data.get("user"):
            found.append((path, data["user"], data.get("password") or ""))
    for path in glob.glob(f"{tempfile.gettempdir()}/tricks-nats-*/*.conf"):
        text = Path(path).read_text(errors="replace")
        for user in json.loads(text).get("authorization", {}).get("users", []):
            found.append((path, user["user"], user["password"]))
    return found


async def try_credentials(url: str) -> dict[str, str]:
    """What each found credential can do to the counts (it must not purge them)."""
    out = {}
    for path, user, password in found_credentials():
        try:
            nc = await nats.connect(url, user=user, password=password, max_reconnect_attempts=1)
        except Exception as exc:
            out[f"{path}:{user}"] = f"cannot connect: {exc}"
            continue
        try:
            reply = await nc.request(f"$JS.API.STREAM.PURGE.KV_{COUNTS}", b"", timeout=2)
            out[f"{path}:{user}"] = "purged" if b'"success":true' in reply.data else "refused"
        except nats.errors.Error as exc:
            out[f"{path}:{user}"] = f"refused ({type(exc).__name__})"
        finally:
            await nc.close()
    return out


async def main() -> None:
    url = E["TRICKS_NATS_URL"]
    nc = await nats.connect(
        url,
        user=E["TRICKS_NATS_USER"],
        password=E["TRICKS_NATS_PASSWORD"],
        inbox_prefix=f"_INBOX_{EXP}",
        error_cb=on_error,
    )
    # -- counts: only +1 per registration, and only through the coordinator ----------------
    report["incr_1000"] = await refused(nc, f"$KV.{COUNTS}.go", **{"Nats-Incr": "1000"})
    report["incr_minus"] = await refused(nc, f"$KV.{COUNTS}.go", **{"Nats-Incr": "-2000"})
    reply = await nc.request(
        f"tricks.{EXP}.event.go",
        b"",
        timeout=10,
        headers={"Nats-Incr": "1000", "Nats-Msg-Id": "c.victim-0.stop"},
    )
    report["event_with_incr_1000"] = json.loads(reply.data)
    reply = await nc.request(f"tricks.{EXP}.event.victim_stop", b"", timeout=10)
    report["lifecycle_event"] = json.loads(reply.data)
    # -- notifications and consumers: nothing a waiter trusts can be aimed by a pod --------
    report["forged_notification"] = await refused(nc, f"tricks.{EXP}.reached.go.3", b"{}")
    consumer = {
        "stream_name": f"KV_{PODS}",
        "config": {"deliver_subject": f"tricks.{EXP}.reached.go.3", "ack_policy": "none"},
    }
    body = json.dumps(consumer).encode()
    report["push_consumer"] = await refused(nc, f"$JS.API.CONSUMER.CREATE.KV_{PODS}", body)
    durable = f"$JS.API.CONSUMER.DURABLE.CREATE.KV_{PODS}.d1"
    report["durable_consumer"] = await refused(nc, durable, body)
    report["purge"] = await refused(nc, f"$JS.API.STREAM.PURGE.KV_{COUNTS}")
    report["delete"] = await refused(nc, f"$JS.API.STREAM.DELETE.KV_{COUNTS}")
    report["roster_write"] = await refused(nc, f"$KV.{PODS}.victim", b'{"tag":"victim"}')
    report["other_experiment"] = await refused(nc, "tricks.other-20260101-000000-0000.event.go")
    # -- secrets ---------------------------------------------------------------------------
    report["credentials_found"] = await try_credentials(url)
    report["secret_env"] = sorted(k for k, v in E.items() if "PASSWORD" in k and v)
    Path("hostile.json").write_text(json.dumps(report, indent=1))  # noqa: ASYNC240
    await nc.request(f"tricks.{EXP}.event.hostile-done", b"", timeout=10)
    await nc.close()


asyncio.run(main())
