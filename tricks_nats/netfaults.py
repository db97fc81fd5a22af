"""Network faults between local pods: delay (with jitter), loss and partition, on loopback.

Local pods are processes, each with its own loopback address `127.<net>.x.y`, but a pod that
connects without binding its address sends from 127.0.0.1 (the kernel's choice on `lo`): the
source address alone does not say which pod sent a packet. So, for one run:

- a private cgroup v1 `net_cls` hierarchy is mounted, and each pod index gets a child cgroup
  with its own `net_cls.classid` (`net << 16 | index + 1`); the pod's launcher joins it
  (`join_path`) before exec'ing the pod, and every socket of the pod carries that classid;
- an nftables table `tricks_<token>` (family ip) holds a map classid -> pod address and a
  nat postrouting chain `ip daddr 127.<net>.0.0/16 snat ip to meta cgroup map @pods`: the first
  packet of a connection (or UDP flow) from a pod to another pod leaves with the sender's pod
  address, conntrack does the rest, and from then on every packet between two pods has pod
  addresses as source and destination, both ways. Traffic to anything else (the NATS server
  on 127.0.0.1, another run's pods) is neither translated nor touched by a fault.

Each firing of a fault gets two sets (its `pods`, its `peers`), an action chain, and rules in
the run's one fault chain, hooked at postrouting after source NAT (priority 200, so it sees pod
addresses), that send packets from one set to the other (both ways for `direction: both`) to
the action. A reply whose destination NAT has already turned back into 127.0.0.1 (at output,
before postrouting) is recognised by its conntrack entry (`ct reply ip daddr`).

- partition: `drop`; loss: `numgen random mod 10000 < P drop` (P in hundredths of a percent);
  a packet from a pod to another is dropped where it is sent, so a UDP send fails at once
  (EPERM) and a TCP connection times out;
- delay: the `NFQUEUE` target (nfqueue.py: nft_compat, added over netlink: the `queue` statement
  of nft needs nft_queue, which kernels built without it lack, as does sch_netem here) hands the
  packet to a thread of this process that gives it back `delay +- jitter` later (uniform;
  packets may be reordered by jitter, as netem does). The queue is bound with bypass: if this
  process dies, packets flow undelayed until the watchdog deletes the table. The kernel drops
  every packet held in any queue whenever a netfilter hook is unregistered on the machine
  (nfqnl_nf_hook_drop): the run's fault chain is made once for that reason, but another run's
  end, or another tool removing a base chain, loses the packets a delay holds then.
  No `tc` is used: kernels without sch_netem (this one) exist, and this works without it.

Every change is registered with the watchdog before it is made (a command that undoes it), so a
SIGKILL of the owner leaves nothing behind: the table, the cgroups, the mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence

from tricks_nats.errors import RuntimeFailure, TricksError, UsageError
from tricks_nats.faults import FaultAction
from tricks_nats.nfqueue import DelayQueue, add_nfqueue_rule
from tricks_nats.watchdog import Watchdog, rmdir_cgroup

log = logging.getLogger(__name__)

#: Priority of the fault chains at postrouting: after source NAT (100), so they see pod addresses.
FAULT_PRIORITY = 200
#: How long removing the cgroups of a run may take at close (processes still exiting).
RMDIR_S = 5.0

_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_TOKEN_RE = re.compile(r"^[0-9a-f]{1,16}$")


# -- helpers ------------------------------------------------------------------------------------


def _capabilities() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _net_cls_enabled() -> bool:
    with contextlib.suppress(OSError), open("/proc/cgroups") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[0] == "net_cls":
                return fields[3] == "1"
    return False


def _net_cls_mounts() -> list[str]:
    """Mount points of cgroup v1 hierarchies holding net_cls, as this process sees them."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if "-" not in fields:
                continue
            tail = fields[fields.index("-") + 1 :]
            if len(tail) >= 3 and tail[0] == "cgroup" and "net_cls" in tail[2].split(","):
                found.append(fields[4].replace("\\040", " "))
    return found


async def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run a command; its stdout, or a RuntimeFailure naming it and its stderr's first line."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise RuntimeFailure(f"cannot run {' '.join(argv)}: {exc.strerror or exc}") from exc
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        first = lines[0] if lines else f"exit status {proc.returncode}"
        raise RuntimeFailure(f"`{' '.join(argv)}` failed: {first}")
    return out.decode(errors="replace")


@dataclasses.dataclass
class _Firing:
    slot: int
    queue: DelayQueue | None = None
    handles: list[int] = dataclasses.field(default_factory=list)  # its rules in `faults`


# -- the faults of one run ---------------------------------------------------------------------


class NetFaults:
    """Network faults between the pods of one local run (see the module's docstring)."""

    def __init__(self, net: int, token: str, watchdog: Watchdog) -> None:
        if not 1 <= net <= 254:
            raise ValueError(f"a run's network is 1..254, not {net}")
        if not _TOKEN_RE.match(token):
            raise ValueError(f"a run's token is 1 to 16 lowercase hex digits, not {token!r}")
        self.net = net
        self.token = token
        self.table = f"tricks_{token}"
        self._watchdog = watchdog
        self._subnet = ipaddress.ip_network(f"127.{net}.0.0/16")
        self._nft = "nft"
        self._mountpoint = os.path.join(tempfile.gettempdir(), f"tricks-netcls-{token}")
        self._mounted = False
        self._root: str | None = None  # the net_cls hierarchy we use, mounted by us or not
        self._rundir: str | None = None
        self._table_made = False
        self._commands: list[list[str]] = []  # registered with the watchdog, in order
        self._firings: dict[str, _Firing] = {}
        self._slots = 0
        self._pods = 0
        self._started = False
        self._closed = False

    # -- what the machine needs ----------------------------------------------------------------

    @staticmethod
    def problems() -> list[str]:
        """Why network faults cannot run here, one sentence each with its fix; empty: fine."""
        found = []
        caps = _capabilities()
        if os.geteuid() != 0 and not (caps >> _CAP_NET_ADMIN & 1 and caps >> _CAP_SYS_ADMIN & 1):
            found.append(
                "network faults change the firewall and mount a cgroup hierarchy: run as root "
                "(or with CAP_NET_ADMIN and CAP_SYS_ADMIN)."
            )
        if shutil.which("nft") is None:
            found.append(
                "`nft` is not on PATH: install the nftables package (apt-get install nftables)."
            )
        for tool in ("mount", "umount"):
            if shutil.which(tool) is None:
                found.append(
                    f"`{tool}` is not on PATH: install util-linux (the `mount` package on "
                    "Debian and Ubuntu)."
                )
        if not _net_cls_enabled():
            found.append(
                "the kernel has no enabled net_cls cgroup controller (/proc/cgroups): use a "
                "kernel built with CONFIG_CGROUP_NET_CLASSID, without cgroup_no_v1=net_cls or "
                "cgroup_disable=net_cls on its command line."
            )
        return found

    # -- setup -------------------------------------------------------------------------------

    def _register(self, argv: list[str]) -> None:
        self._watchdog.run_on_death(argv)
        self._commands.append(argv)

    def _forget(self, argv: list[str]) -> None:
        if argv in self._commands:
            self._commands.remove(argv)
            self._watchdog.forget_command(argv)

    async def start(self, pods: int) -> None:
        """Make the cgroups of pod indexes 0..pods-1, the table and its source-NAT map."""
        if self._started or self._closed:
            raise RuntimeFailure("network faults of a run start once")
        if not 0 <= pods <= 0xFFFE:
            raise UsageError(f"network faults address at most {0xFFFE} pods, not {pods}")
        problems = self.problems()
        if problems:
            raise UsageError("network faults cannot run here: " + " ".join(problems))
        self._started = True
        self._pods = pods
        self._nft = shutil.which("nft") or "nft"
        try:
            await self._mount()
            await asyncio.to_thread(self._make_cgroups, pods)
            await self._make_table(pods)
        except BaseException:
            await self.close()
            raise

    async def _mount(self) -> None:
        rmdir = [shutil.which("rmdir") or "rmdir", self._mountpoint]
        umount = [shutil.which("umount") or "umount", self._mountpoint]
        self._register(rmdir)
        try:
            os.mkdir(self._mountpoint, 0o755)
        except OSError as exc:
            self._forget(rmdir)
            raise RuntimeFailure(f"cannot make {self._mountpoint}: {exc.strerror}") from exc
        self._register(umount)
        try:
            await _run(
                ["mount", "-t", "cgroup", "-o", "net_cls", f"tricks-{self.token}", self._mountpoint]
            )
        except RuntimeFailure as exc:
            # Mounted already with other options (net_cls,net_prio): use that mount.
            self._forget(umount)
            with contextlib.suppress(OSError):
                os.rmdir(self._mountpoint)
            self._forget(rmdir)
            existing = _net_cls_mounts()
            if not existing:
                raise RuntimeFailure(f"cannot mount a net_cls cgroup hierarchy: {exc}") from exc
            log.info("net_cls is mounted at %s already (%s): using it", existing[0], exc)
            self._root = existing[0]
            return
        self._mounted = True
        self._root = self._mountpoint

    def _make_cgroups(self, pods: int) -> None:
        assert self._root is not None
        rundir = os.path.join(self._root, f"tricks-nats-{self.token}")
        # Removed (its pods' cgroups first) when the parent dies, before the commands run.
        self._watchdog.kill_cgroup_on_death(rundir)
        self._rundir = rundir
        try:
            os.mkdir(rundir)
            for index in range(pods):
                path = os.path.join(rundir, f"pod-{index}")
                os.mkdir(path)
                with open(os.path.join(path, "net_cls.classid"), "w") as f:
                    f.write(str(self._classid(index)))
        except OSError as exc:
            raise RuntimeFailure(f"cannot make the net_cls cgroups: {exc}") from exc

    def _classid(self, index: int) -> int:
        return (self.net << 16) | (index + 1)

    def address(self, index: int) -> str:
        """The loopback address of pod index `index` (as the local runtime gives them)."""
        return f"127.{self.net}.{index // 250}.{index % 250 + 1}"

    async def _make_table(self, pods: int) -> None:
        self._register([self._nft, "delete", "table", "ip", self.table])
        self._table_made = True
        script = [
            f"add table ip {self.table}",
            f"add map ip {self.table} pods {{ typeof meta cgroup : ip saddr ; }}",
            f"add chain ip {self.table} podnat "
            "{ type nat hook postrouting priority srcnat ; policy accept ; }",
            f"add rule ip {self.table} podnat ip daddr {self._subnet} "
            "snat ip to meta cgroup map @pods",
            # One base chain for the run's faults, made once: removing a base chain
            # unregisters a hook, and the kernel then drops every packet a delay holds.
            f"add chain ip {self.table} faults {{ type filter hook postrouting priority "
            f"{FAULT_PRIORITY} ; policy accept ; }}",
        ]
        step = 1000
        for first in range(0, pods, step):
            elements = ", ".join(
                f"{self._classid(n)} : {self.address(n)}"
                for n in range(first, min(pods, first + step))
            )
            script.append(f"add element ip {self.table} pods {{ {elements} }}")
        await self._nft_script(script)

    async def _nft_script(self, lines: list[str], *, echo: bool = False) -> str:
        flags = ["-e", "-a"] if echo else []
        return await _run([self._nft, *flags, "-f", "-"], "\n".join(lines) + "\n")

    def join_path(self, index: int) -> str:
        """The net_cls cgroup directory that pod index `index` joins (write 0 to its
        cgroup.procs) before exec'ing the pod."""
        if self._rundir is None:
            raise RuntimeFailure("network faults are not started")
        if not 0 <= index < self._pods:
            raise UsageError(f"pod index {index} is not among the {self._pods} of this run")
        return os.path.join(self._rundir, f"pod-{index}")

    # -- faults ------------------------------------------------------------------------------

    def _addresses(self, ips: list[str]) -> list[str]:
        out = []
        for ip in ips:
            try:
                addr = ipaddress.IPv4Address(ip)
            except ValueError as exc:
                raise UsageError(f"{ip!r} is not an IPv4 address") from exc
            if addr not in self._subnet:
                raise UsageError(f"{ip} is not a pod address of this run ({self._subnet})")
            out.append(str(addr))
        return sorted(set(out))

    async def apply(self, action: FaultAction, src: list[str], dst: list[str]) -> None:
        """Install one firing: from the pods at `src` to those at `dst` (and back for
        direction `both`)."""
        if not self._table_made or self._closed:
            raise RuntimeFailure("network faults are not started")
        if action.id in self._firings:
            raise RuntimeFailure(f"network fault {action.id} is in force already")
        a, b = self._addresses(src), self._addresses(dst)
        if action.kind == "partition":
            verdict = "drop"
        elif action.kind == "loss":
            hundredths = round(action.loss_percent * 100)
            if not 0 < hundredths <= 10_000:
                raise UsageError(f"loss of {action.loss_percent}% is not in (0, 100]")
            verdict = (
                "drop" if hundredths >= 10_000 else f"numgen random mod 10000 < {hundredths} drop"
            )
        elif action.kind == "delay":
            if action.delay_ms < 0 or action.jitter_ms < 0:
                raise UsageError("a delay and its jitter are not negative")
            verdict = None
        else:
            raise UsageError(f"{action.kind} is not a network fault")
        self._slots += 1
        slot = self._slots
        firing = _Firing(slot)
        t, name, act = self.table, f"f{slot}", f"f{slot}x"
        script = [
            f"add set ip {t} {name}a {{ type ipv4_addr ; }}",
            f"add set ip {t} {name}b {{ type ipv4_addr ; }}",
        ]
        for half, ips in (("a", a), ("b", b)):
            if ips:
                script.append(f"add element ip {t} {name}{half} {{ {', '.join(ips)} }}")
        script.append(f"add chain ip {t} {act}")
        if verdict is not None:
            script.append(f"add rule ip {t} {act} {verdict}")
        # Drops first, delays last: a packet a delay holds goes on to the next hook, past
        # whatever follows in this chain.
        where = "insert" if verdict is not None else "add"
        links = [("a", "b"), ("b", "a")] if action.direction == "both" else [("a", "b")]
        for x, y in links:
            # A packet from X to Y: its addresses say so, except a reply whose destination
            # NAT has already turned back into 127.0.0.1 (at output, before postrouting):
            # its conntrack entry still holds the pod address it was sent to.
            script += [
                f"{where} rule ip {t} faults ip saddr @{name}{x} ip daddr @{name}{y} "
                f"counter jump {act}",
                f"{where} rule ip {t} faults ct direction reply ip saddr @{name}{x} "
                f"ct reply ip daddr @{name}{y} counter jump {act}",
            ]
        self._firings[action.id] = firing
        try:
            if action.kind == "delay":
                firing.queue = DelayQueue(
                    action.delay_ms / 1000, action.jitter_ms / 1000, action.id
                )
                await asyncio.to_thread(firing.queue.open)
                await self._nft_script([f"add chain ip {t} {act}"])
                await asyncio.to_thread(add_nfqueue_rule, t, act, firing.queue.queue)
            echoed = await self._nft_script(script, echo=True)
            firing.handles = [
                int(m.group(1))
                for m in re.finditer(
                    rf"^(?:add|insert) rule ip {t} faults .* # handle (\d+)$", echoed, re.M
                )
            ]
        except BaseException:
            with contextlib.suppress(TricksError):
                await self._remove(action.id, quiet=True)
            raise

    async def packets(self, action_id: str) -> int:
        """Packets a firing in force has matched so far (the kernel's counters of its rules);
        0 for an id not in force."""
        firing = self._firings.get(action_id)
        if firing is None:
            return 0
        listing = await _run([self._nft, "list", "chain", "ip", self.table, "faults"])
        counted = rf"counter packets (\d+) bytes \d+ jump f{firing.slot}x$"
        return sum(int(n) for n in re.findall(counted, listing, re.M))

    def delayed_packets(self, action_id: str) -> int:
        """Packets a delay fault in force has held so far (0 for any other id)."""
        firing = self._firings.get(action_id)
        return firing.queue.packets if firing is not None and firing.queue is not None else 0

    async def remove(self, action_id: str) -> None:
        """Heal one firing; an unknown id (healed already) is fine."""
        await self._remove(action_id, quiet=False)

    async def _remove(self, action_id: str, *, quiet: bool) -> None:
        firing = self._firings.pop(action_id, None)
        if firing is None:
            return
        t, name = self.table, f"f{firing.slot}"
        lines = [f"delete rule ip {t} faults handle {h}" for h in firing.handles]
        lines += [f"delete chain ip {t} {name}x", f"delete set ip {t} {name}a"]
        lines += [f"delete set ip {t} {name}b"]
        try:
            try:
                await self._nft_script(lines)
            except RuntimeFailure:
                if not quiet:
                    raise
                # A half-made firing lacks some of them: each on its own.
                for line in lines:
                    with contextlib.suppress(RuntimeFailure):
                        await self._nft_script([line])
        finally:
            if firing.queue is not None:
                await asyncio.to_thread(firing.queue.close)

    # -- the end -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Remove everything (faults, table, cgroups, mount); idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        for action_id in list(self._firings):
            try:
                await self._remove(action_id, quiet=True)
            except Exception as exc:
                log.warning("network fault %s: %s", action_id, exc)
        if self._table_made:
            argv = [self._nft, "delete", "table", "ip", self.table]
            try:
                await _run(argv)
            except Exception as exc:
                if self.table in await _run_quiet([self._nft, "list", "tables"]):
                    log.warning("cannot delete nftables table %s: %s", self.table, exc)
            self._forget(argv)
            self._table_made = False
        if self._rundir is not None:
            rundir = self._rundir
            gone = await asyncio.to_thread(self._remove_cgroups, rundir)
            if gone:
                self._watchdog.forget_cgroup(rundir)
                self._rundir = None
            else:
                log.warning("cannot remove the net_cls cgroups %s", rundir)
        if self._mounted:
            umount = [shutil.which("umount") or "umount", self._mountpoint]
            try:
                await _run(["umount", self._mountpoint])
                self._mounted = False
            except Exception as exc:
                log.warning("cannot unmount %s: %s", self._mountpoint, exc)
            else:
                self._forget(umount)
        if not self._mounted:
            rmdir = [shutil.which("rmdir") or "rmdir", self._mountpoint]
            if rmdir in self._commands:
                try:
                    os.rmdir(self._mountpoint)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("cannot remove %s: %s", self._mountpoint, exc.strerror)
                self._forget(rmdir)

    def _remove_cgroups(self, rundir: str) -> bool:
        """Move what is left in the pods' cgroups to the hierarchy's root, remove them."""
        assert self._root is not None
        root_procs = os.path.join(self._root, "cgroup.procs")
        deadline = time.monotonic() + RMDIR_S
        while True:
            for d, _, _ in os.walk(rundir, topdown=False):
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids = f.read().split()
                except OSError:
                    continue
                for pid in pids:
                    with contextlib.suppress(OSError), open(root_procs, "w") as f:
                        f.write(pid)
            if rmdir_cgroup(rundir):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


async def _run_quiet(argv: Sequence[str]) -> str:
    try:
        return await _run(argv)
    except TricksError:
        return ""
