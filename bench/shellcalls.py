"""`shell`: what one `tricks-nats event/wait/discover/record` call costs a pod, wall time per
process, the fast path (`tricks_nats.cli.fastpath`) and the full command
(`TRICKS_SHELL_FAST=0`) side by side in the same run, inside a real one-pod experiment."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from bench.localrun import TRICKS, _env
from bench.report import NATS, Row, latency_row

#: The pod: each call `runs` times per mode, then one JSON line of wall seconds per call.
POD = """\
import json, os, subprocess, time
calls = {{"event": ["event", "x"], "wait": ["wait", "x", "1"], "discover": ["discover", "a"],
          "record": ["record", "took_ms", "1.5", "--label", "op=get"]}}
subprocess.run(["tricks-nats", "event", "x"], check=True, stdout=subprocess.DEVNULL)
out = {{}}
for mode in ("1", "0"):
    env = {{**os.environ, "TRICKS_SHELL_FAST": mode}}
    for name, args in calls.items():
        times = []
        for _ in range({runs} if mode == "1" else max(3, {runs} // 3)):
            start = time.perf_counter()
            subprocess.run(["tricks-nats", *args], env=env, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        out[f"{{name}} {{mode}}"] = times
print("TIMES " + json.dumps(out))
"""


def shell_calls(runs: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="tricks-bench-shell-") as tmp:
        root = Path(tmp)
        (root / "pod.py").write_text(POD.format(runs=runs))
        (root / "shell.yaml").write_text(
            "timeout: 600\nexperiment:\n- tag: a\n  command: [python, pod.py]\n"
        )
        done = subprocess.run(
            [TRICKS, "up", str(root / "shell.yaml"), "--runs-dir", str(root / "runs"), "-q"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=900,
        )
        logs = list((root / "runs").glob("*/logs/a-0.log"))
        text = logs[0].read_text() if logs else ""
    line = next((x for x in text.splitlines() if x.startswith("TIMES ")), None)
    if done.returncode != 0 or line is None:
        return [Row(NATS, "shell call", 1, note=f"FAILED: {done.stderr.strip()[-200:]!r}")]
    times: dict[str, list[float]] = json.loads(line[len("TIMES ") :])
    rows = []
    for key, seconds in times.items():
        name, mode = key.split()
        how = "fast path" if mode == "1" else "full command (TRICKS_SHELL_FAST=0)"
        rows.append(
            latency_row(
                NATS, f"shell {name}", 1, seconds, f"{len(seconds)} calls, wall per process; {how}"
            )
        )
    return rows
