"""Delaying packets in user space: an NFQUEUE reader and the nftables rule that feeds it.

Kernels without `sch_netem` (and without nft's `queue` statement) still have nfnetlink_queue
and nft_compat's `NFQUEUE` target. A rule sends a fault's packets to a queue; a thread of the
owning process holds each one and gives it back `delay +- jitter` later (uniform, so packets
may be reordered, as netem does). The queue is bound with bypass: if its owner dies, packets
flow undelayed. Standard library only: raw netlink messages.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import random
import select
import socket
import struct
import threading
import time

from tricks_nats.errors import RuntimeFailure

log = logging.getLogger(__name__)

#: Packets one delay fault may hold at once (the kernel drops beyond).
QUEUE_MAXLEN = 20_000
#: Queue numbers tried for delay faults (global to the machine: chosen at random, retried).
_QUEUE_RANGE = (20_000, 60_000)

# -- netlink (nfnetlink_queue and nf_tables' compat target), standard library only ------------

_NETLINK_NETFILTER = 12
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_CREATE, _NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
_NLMSG_ERROR = 2
_NLA_F_NESTED = 0x8000
_NFNL_SUBSYS_QUEUE, _NFNL_SUBSYS_NFTABLES = 3, 10
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 16, 17
_NFT_MSG_NEWRULE = 6
_NFQNL_MSG_PACKET, _NFQNL_MSG_VERDICT, _NFQNL_MSG_CONFIG = 0, 1, 2
_NFQA_PACKET_HDR, _NFQA_VERDICT_HDR = 1, 2
_NFQA_CFG_CMD, _NFQA_CFG_PARAMS, _NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
_NFQNL_CFG_CMD_BIND, _NFQNL_CFG_CMD_UNBIND = 1, 2
_NFQNL_COPY_META = 1
_NF_ACCEPT = 1
_NFQ_FLAG_BYPASS = 0x1


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    payload = struct.pack("!BBH", family, 0, res_id) + body  # nfgenmsg: res_id big-endian
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload after the netlink header) of each message in a datagram."""
    out = []
    at = 0
    while at + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, at)
        if length < 16:
            break
        out.append((kind, data[at + 16 : at + length]))
        at += (length + 3) & ~3
    return out


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    at = 0
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[at + 4 : at + length]
        at += (length + 3) & ~3
    return out


def _check_acks(sock: socket.socket, seqs: set[int], what: str) -> None:
    """Read the kernel's answers to `seqs` (sent with NLM_F_ACK); raise on an error."""
    while seqs:
        for kind, payload in _messages(sock.recv(65536)):
            if kind != _NLMSG_ERROR:
                continue
            code, _, _, _, seq = struct.unpack_from("=iIHHI", payload)
            seqs.discard(seq)
            if code:
                raise RuntimeFailure(f"{what}: {os.strerror(-code)}")


def add_nfqueue_rule(table: str, chain: str, queue: int) -> None:
    """Append `NFQUEUE --queue-num queue --queue-bypass` (xt target, revision 3, through
    nft_compat) to an nf_tables chain of family ip."""
    info = struct.pack("=HHH", queue, 1, _NFQ_FLAG_BYPASS) + b"\0\0"  # XT_ALIGN(6) = 8
    target = _nested(
        2,  # NFTA_EXPR_DATA
        _attr(1, b"NFQUEUE\0"),  # NFTA_TARGET_NAME
        _attr(2, struct.pack("!I", 3)),  # NFTA_TARGET_REV
        _attr(3, info),  # NFTA_TARGET_INFO
    )
    expr = _nested(1, _attr(1, b"target\0"), target)  # NFTA_LIST_ELEM: NFTA_EXPR_NAME, DATA
    rule = (
        _attr(1, table.encode() + b"\0")  # NFTA_RULE_TABLE
        + _attr(2, chain.encode() + b"\0")  # NFTA_RULE_CHAIN
        + _nested(4, expr)  # NFTA_RULE_EXPRESSIONS
    )
    seq = int(time.monotonic_ns() & 0x7FFFFFFF)
    batch = (
        _message(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, seq, 0, _NFNL_SUBSYS_NFTABLES, b"")
        + _message(
            (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWRULE,
            _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_APPEND | _NLM_F_ACK,
            seq + 1,
            socket.AF_INET,
            0,
            rule,
        )
        + _message(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, seq + 2, 0, _NFNL_SUBSYS_NFTABLES, b"")
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.settimeout(5)
        sock.send(batch)
        _check_acks(sock, {seq + 1}, f"adding an NFQUEUE rule to {table}/{chain}")


class DelayQueue:
    """An nfnetlink queue whose packets are given back `delay +- jitter` seconds after they
    arrive, by a thread of its own (the event loop's load does not shorten delays)."""

    def __init__(self, delay_s: float, jitter_s: float, name: str) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.name = name
        self.packets = 0  # packets delayed so far
        self.queue = -1
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stop = False
        self._thread: threading.Thread | None = None
        self._seq = 0

    def open(self) -> None:
        """Bind a free queue number (one at random, retried if taken) and start the thread."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.settimeout(5)
            rng = random.SystemRandom()
            for _ in range(64):
                queue = rng.randrange(*_QUEUE_RANGE)
                try:
                    self._config(sock, queue, struct.pack("=BxH", _NFQNL_CFG_CMD_BIND, 0))
                except RuntimeFailure as exc:
                    if os.strerror(errno.EBUSY) in str(exc):
                        continue  # another process holds that queue
                    raise
                break
            else:
                raise RuntimeFailure("no free netfilter queue number for a delay fault")
            self.queue = queue
            params = struct.pack("!IB", 0, _NFQNL_COPY_META)  # nfqnl_msg_config_params
            self._config(sock, queue, b"", _attr(_NFQA_CFG_PARAMS, params))
            self._config(
                sock, queue, b"", _attr(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
            )
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"delay {self.name}", daemon=True)
        self._thread.start()

    def _config(self, sock: socket.socket, queue: int, cmd: bytes, extra: bytes = b"") -> None:
        self._seq += 1
        body = (_attr(_NFQA_CFG_CMD, cmd) if cmd else b"") + extra
        kind = (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_CONFIG
        sock.send(_message(kind, _NLM_F_REQUEST | _NLM_F_ACK, self._seq, 0, queue, body))
        _check_acks(sock, {self._seq}, f"configuring netfilter queue {queue}")

    def _verdict(self, packet_id: int) -> None:
        assert self._sock is not None
        kind = (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_VERDICT
        body = _attr(_NFQA_VERDICT_HDR, struct.pack("!II", _NF_ACCEPT, packet_id))
        with contextlib.suppress(OSError):
            self._sock.send(_message(kind, _NLM_F_REQUEST, 0, 0, self.queue, body))

    def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        pending: list[tuple[float, int, int]] = []  # (due, arrival order, packet id)
        order = 0
        try:
            while not self._stop:
                timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
                readable, _, _ = select.select([sock.fileno(), self._wake_r], [], [], timeout)
                if sock.fileno() in readable:
                    while True:
                        try:
                            data = sock.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # ENOBUFS: packets lost to us, not fatal
                            log.warning("delay %s: %s", self.name, exc)
                            break
                        now = time.monotonic()
                        for kind, payload in _messages(data):
                            if kind != (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
                                continue
                            header = _attrs(payload[4:]).get(_NFQA_PACKET_HDR)
                            if header is None:
                                continue
                            (packet_id,) = struct.unpack_from("!I", header)
                            wait = self.delay_s + random.uniform(-self.jitter_s, self.jitter_s)
                            order += 1
                            heapq.heappush(pending, (now + max(0.0, wait), order, packet_id))
                            self.packets += 1
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    self._verdict(heapq.heappop(pending)[2])
        finally:
            for _, _, packet_id in pending:  # healed: what is held goes now
                self._verdict(packet_id)

    def close(self) -> None:
        """Stop the thread, give back the packets held, unbind the queue; idempotent."""
        self._stop = True
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            with contextlib.suppress(OSError, RuntimeFailure):
                self._sock.setblocking(True)
                self._sock.settimeout(2)
                self._config(self._sock, self.queue, struct.pack("=BxH", _NFQNL_CFG_CMD_UNBIND, 0))
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
