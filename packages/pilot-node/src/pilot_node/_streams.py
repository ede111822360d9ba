"""Reliable Pilot streams: a sans-IO connection state machine and its asyncio driver.

:class:`Connection` is pure: it takes packets, writes, reads and the current time,
and produces packets (``take_outbox``) and a next deadline. :class:`StreamLayer`
drives many connections for one node: it routes packets, runs one timer task,
paces dials and hands out :class:`PilotStream` objects.

Behaviour, and the Go daemon (``pilotprotocol`` 1.18.0) facts it is built around:

* Sequence numbers count bytes; SYN and FIN each take one. The window field counts
  segments: the 1.18.0 daemon sends up to 1,152 payload bytes per segment and reads
  our window in those units, so we advertise in 1,152-byte units and read the
  peer's in 1,024-byte units (safe both ways). The daemon honours a window of 0 as
  "stop" (not "no limit" as the specification says), so we never advertise 0
  unless our buffer is full.
* The daemon's keepalive probe is a pure ACK that carries window 0; a pure ACK
  that acknowledges nothing new while nothing is in flight does not shrink our
  view of the peer's window. A real zero window is probed with one byte of data
  (a pure ACK gets no answer from the daemon), backing off from 0.5 s to 30 s.
* The daemon drops its receive buffer when a FIN arrives, even with data
  missing. So our FIN goes out only after every byte we sent was acknowledged,
  and :meth:`PilotStream.aclose` waits for that (bounded by ``close_linger``).
  A FIN that arrives while bytes before it are missing is held for
  ``fin_hole_timeout``; if the hole does not fill, the reader gets
  :class:`StreamTruncatedError`, never a silent short read.
* A FIN is acknowledged with an ACK (half-close: we may go on writing). If we
  have already sent our own FIN we answer FIN|ACK, as the daemon does; a FIN|ACK
  is never answered with another FIN|ACK (two daemons that did so looped).
* The daemon admits only a few new connections per second per source node and
  drops the rest silently; :class:`StreamLayer` paces dials per destination node
  with a token bucket (``dial_burst``, ``dial_rate``) and retransmits a SYN after
  0.25 s, doubling.
* SACK: when segments arrive out of order we acknowledge at once with up to four
  SACK blocks; blocks from the peer mark segments that need no retransmission
  and trigger a fast retransmit of the holes below them. Three duplicate ACKs do
  the same. The RTO follows RFC 6298 (0.2 s to 10 s) and gives up after
  ``max_retransmits`` tries with :class:`StreamResetError`.
* A segment whose payload starts with ``SACK`` and a count byte 1..4 would be
  swallowed by the daemon as SACK data; such a segment is split so that it
  starts one byte later.
* Writes leave at once (no Nagle delay, no cork): a segment shorter than ``mss``
  is sent when nothing more is queued. A reply carries the ACK of the data it
  answers (the delayed ACK is then not sent).
* Congestion: slow start from ten segments, then additive increase; halved on a
  fast retransmit, one segment after a timeout. Sending is paced at twice the
  congestion window per smoothed RTT, with a small burst allowance.
* Keepalive: an idle established stream sends a probe every
  ``keepalive_interval`` seconds (the daemon closes streams idle for 120 s). The
  daemon does not answer a pure ACK, so the probe is one byte the peer already
  acknowledged (the sequence number just below ``snd_nxt``): the daemon, and our
  own connections, discard it as a duplicate and answer with an ACK. Any packet
  from the peer counts as the answer; after ``keepalive_probes`` unanswered
  probes the stream is reset with :class:`StreamResetError`, so a vanished peer
  is detected about ``keepalive_interval * (keepalive_probes + 1)`` seconds after
  it last spoke. Once either side has sent a FIN the probe is a plain ACK and
  expects nothing (the daemon does not answer a probe after our FIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ._aio import cancel_and_wait
from ._packet import (
    Address,
    Flags,
    Packet,
    Protocol,
    SackBlock,
    decode_sack,
    encode_sack,
    is_sack_payload,
    seq_diff,
)
from .errors import (
    DialTimeoutError,
    StreamClosedError,
    StreamError,
    StreamRefusedError,
    StreamResetError,
    StreamTruncatedError,
)

__all__ = [
    "ADVERTISE_UNIT",
    "WINDOW_UNIT",
    "ConnState",
    "Connection",
    "DialTimeoutError",
    "PilotListener",
    "PilotStream",
    "StreamClosedError",
    "StreamConfig",
    "StreamError",
    "StreamLayer",
    "StreamRefusedError",
    "StreamResetError",
    "StreamTruncatedError",
]

_log = logging.getLogger("pilot_node.streams")

WINDOW_UNIT: Final = 1024
"""Bytes we assume per unit of a peer's window field (the smaller of the two segment sizes
in use: 1,024 in older daemons and ours, 1,152 in the 1.18.0 daemon)."""

ADVERTISE_UNIT: Final = 1152
"""Bytes per unit when we advertise our window: the 1.18.0 daemon multiplies our window by
its 1,152-byte segment size, so a smaller unit would invite more than we can hold."""

_MASK: Final = 0xFFFFFFFF
# Plain ints: bit tests on the hot path skip the enum machinery.
_SYN: Final = int(Flags.SYN)
_ACK: Final = int(Flags.ACK)
_FIN: Final = int(Flags.FIN)
_RST: Final = int(Flags.RST)
EPHEMERAL_MIN: Final = 49152
ECHO_PORT: Final = 7


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Limits and timers of the stream layer (all times in seconds, sizes in bytes).

    Attributes:
        mss: payload bytes per data segment we send (1,152, the 1.18.0 daemon's own).
        recv_buffer: bytes buffered for the reader (in order and out of order);
            it is what we advertise as our window. The daemon bursts up to the
            window; a window larger than the UDP socket's receive buffer turns those
            bursts into losses it repairs one segment per RTO, so keep the two matched.
        send_buffer: bytes accepted from the writer and not yet acknowledged.
        max_ooo_segments: out-of-order segments kept per connection.
        initial_rto, min_rto, max_rto: retransmission timeout (RFC 6298).
        max_retransmits: tries of one segment before the connection is reset.
        syn_rto: first SYN retransmission (doubling up to 2 s).
        syn_retries: SYN retransmissions before :class:`DialTimeoutError`.
        initial_cwnd_segments: the initial congestion window.
        max_cwnd: the congestion window's ceiling.
        delayed_ack: how long an ACK for one in-order segment may wait.
        keepalive_interval: idle time after which a keepalive probe is sent, and
            the interval between unanswered probes (25 s; the daemon closes streams
            idle for 120 s).
        keepalive_probes: unanswered keepalive probes after which the stream is
            reset with :class:`StreamResetError` (3: a silent peer is detected
            after about 100 s); 0 keeps sending probes but never resets.
        close_linger: how long ``aclose`` waits for our data (and FIN) to be acknowledged.
        fin_hole_timeout: how long a FIN that arrived with data missing waits for it.
        time_wait: how long a closed connection still answers retransmitted FINs.
        zero_window_probe: first zero-window probe interval (doubling up to 30 s).
        dial_burst, dial_rate: per-destination-node dial token bucket.
        accept_backlog: inbound streams waiting for ``accept`` per listener (and
            streams the built-in echo serves at once).
        max_connections: connections per layer; further SYNs are answered with RST.
    """

    mss: int = 1152
    recv_buffer: int = 256 * 1024
    send_buffer: int = 1024 * 1024
    max_ooo_segments: int = 1024
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 10.0
    max_retransmits: int = 8
    syn_rto: float = 0.25
    syn_retries: int = 8
    initial_cwnd_segments: int = 10
    max_cwnd: int = 2 * 1024 * 1024
    delayed_ack: float = 0.005
    keepalive_interval: float = 25.0
    keepalive_probes: int = 3
    close_linger: float = 10.0
    fin_hole_timeout: float = 5.0
    time_wait: float = 5.0
    zero_window_probe: float = 0.5
    dial_burst: int = 32
    dial_rate: float = 6.0
    accept_backlog: int = 64
    max_connections: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.mss <= 65535 - 64:
            raise ValueError(f"mss={self.mss} is outside 1..65471")
        if self.recv_buffer < 2 * ADVERTISE_UNIT or self.send_buffer < self.mss:
            raise ValueError("recv_buffer must be >= 2048 and send_buffer >= mss")
        if not self.keepalive_interval > 0:
            raise ValueError(f"keepalive_interval={self.keepalive_interval} must be positive")
        if self.keepalive_probes < 0:
            raise ValueError(f"keepalive_probes={self.keepalive_probes} must be >= 0")


class ConnState(enum.Enum):
    """Where a connection is in its life."""

    SYN_SENT = "syn-sent"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(slots=True)
class _Segment:
    offset: int
    data: bytes
    sent_at: float
    first_sent: float
    attempts: int = 1
    sacked: bool = False
    lost: bool = False  # queued for retransmission
    epoch: int = -1  # the recovery episode that last retransmitted it


class Connection:
    """One stream's state machine (sans-IO).

    Offsets are unwrapped: byte 0 is the first data byte in each direction; the
    wire sequence number of offset ``o`` is ``isn + 1 + o`` (mod 2**32).
    """

    def __init__(
        self,
        *,
        local: Address,
        local_port: int,
        remote: Address,
        remote_port: int,
        isn: int,
        now: float,
        config: StreamConfig,
    ) -> None:
        self.local = local
        self.local_port = local_port
        self.remote = remote
        self.remote_port = remote_port
        self.key: tuple[int, Address, int] = (local_port, remote, remote_port)
        """``(local port, remote address, remote port)``."""
        self.config = config
        self.isn = isn & _MASK
        self.state = ConnState.SYN_SENT
        self.error: StreamError | None = None
        self.created = now
        self._outbox: list[Packet] = []
        # Send side.
        self._pending = bytearray()
        self._pend_pos = 0  # bytes of _pending already segmented
        self._inflight: dict[int, _Segment] = {}
        self._retx_queue: list[int] = []
        self.snd_una = 0
        self.snd_nxt = 0
        self.write_closed = False  # write_eof or close called
        self.fin_offset: int | None = None  # our FIN, once sent
        self.fin_acked = False
        self._fin_sent_at = 0.0
        self._fin_attempts = 0
        self.cwnd = config.initial_cwnd_segments * config.mss
        self.ssthresh = config.max_cwnd
        self.peer_window = config.initial_cwnd_segments * WINDOW_UNIT
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = config.initial_rto
        self._dupacks = 0
        self._recovery_point: int | None = None
        self._epoch = 0
        self._highest_sacked = 0
        self.lost_bytes = 0  # bytes written that a failure discarded unacknowledged
        self._pace_tokens = float(config.initial_cwnd_segments)
        self._pace_at = now
        self._zwp_at: float | None = None
        self._zwp_interval = config.zero_window_probe
        # Receive side.
        self.peer_isn = 0
        self.rcv_nxt = 0
        self._ready = bytearray()
        self._ooo: dict[int, bytes] = {}
        self._ooo_bytes = 0
        self._last_ooo: int | None = None
        self.peer_fin: int | None = None
        self.eof = False  # reader reached the peer's end
        self._fin_hole_since: float | None = None
        self.read_closed = False  # local close: discard inbound data
        self._ack_pending = 0
        self._ack_due: float | None = None
        self._last_adv_window = self._window_units()
        # Timers and liveness.
        self._syn_attempts = 0
        self._syn_at = now
        self.last_sent = now
        self.last_received = now
        self.keepalives_unanswered = 0  # probes sent since the peer last spoke
        self.closed_at: float | None = None
        self.linger_deadline: float | None = None
        self.stats = {
            "retransmits": 0,
            "fast_retransmits": 0,
            "sacks_sent": 0,
            "sacks_received": 0,
            "keepalives": 0,
        }

    # ---------------------------------------------------------------- helpers

    def _wire(self, offset: int) -> int:
        return (self.isn + 1 + offset) & _MASK

    def _peer_wire(self, offset: int) -> int:
        return (self.peer_isn + 1 + offset) & _MASK

    def _unwrap_ack(self, ack: int) -> int:
        return self.snd_una + seq_diff(ack, self._wire(self.snd_una))

    def _unwrap_seq(self, seq: int) -> int:
        return self.rcv_nxt + seq_diff(seq, self._peer_wire(self.rcv_nxt))

    def _window_units(self) -> int:
        free = self.config.recv_buffer - len(self._ready) - self._ooo_bytes
        return max(0, min(0xFFFF, free // ADVERTISE_UNIT))

    def _window_units_with(self, extra: int) -> int:
        # The window we would advertise with ``extra`` more bytes buffered.
        free = self.config.recv_buffer - len(self._ready) - extra - self._ooo_bytes
        return max(0, min(0xFFFF, free // ADVERTISE_UNIT))

    def _packet(self, flags: Flags, *, seq: int, payload: bytes = b"") -> Packet:
        window = self._window_units()
        self._last_adv_window = window
        return Packet(
            flags=flags,
            protocol=Protocol.STREAM,
            src=self.local,
            dst=self.remote,
            src_port=self.local_port,
            dst_port=self.remote_port,
            seq=seq,
            ack=self._peer_wire(self.rcv_nxt + (1 if self._fin_consumed() else 0))
            if int(flags) & _ACK
            else 0,
            window=window,
            payload=payload,
        )

    def _fin_consumed(self) -> bool:
        return self.peer_fin is not None and self.rcv_nxt == self.peer_fin

    def _emit(self, packet: Packet, now: float) -> None:
        self._outbox.append(packet)
        self.last_sent = now

    @property
    def has_output(self) -> bool:
        """Whether packets wait in the outbox."""
        return bool(self._outbox)

    def take_outbox(self) -> list[Packet]:
        """Packets to send now, in order (the caller sends them)."""
        out, self._outbox = self._outbox, []
        return out

    @property
    def readable(self) -> bool:
        """Whether ``read`` would return something (data, EOF or an error)."""
        return bool(self._ready) or self.eof or self.error is not None

    @property
    def unsent(self) -> int:
        """Bytes written but not yet segmented."""
        return len(self._pending) - self._pend_pos

    def _take_pending(self, size: int) -> bytes:
        chunk = bytes(self._pending[self._pend_pos : self._pend_pos + size])
        self._pend_pos += len(chunk)
        if self._pend_pos >= 65536 and self._pend_pos * 2 >= len(self._pending):
            del self._pending[: self._pend_pos]
            self._pend_pos = 0
        return chunk

    @property
    def send_space(self) -> int:
        """Bytes ``write`` would accept now."""
        used = self.unsent + (self.snd_nxt - self.snd_una)
        return max(0, self.config.send_buffer - used)

    @property
    def all_acked(self) -> bool:
        """Every byte written has been acknowledged."""
        return not self.unsent and self.snd_una >= self.snd_nxt - (
            1 if self.fin_offset is not None else 0
        )

    @property
    def finished(self) -> bool:
        """Nothing more will happen: closed, or both sides' ends exchanged and acknowledged."""
        if self.state is ConnState.CLOSED:
            return True
        return (
            self.fin_offset is not None
            and (self.fin_acked or self.peer_fin is not None)
            and (self.eof or self.read_closed)
        )

    # ---------------------------------------------------------------- opening

    def connect(self, now: float) -> None:
        """Send our SYN (dialer side)."""
        self._syn_attempts = 1
        self._syn_at = now
        self._emit(self._syn(), now)

    def _syn(self) -> Packet:
        window = self._window_units()
        return Packet(
            flags=Flags.SYN,
            protocol=Protocol.STREAM,
            src=self.local,
            dst=self.remote,
            src_port=self.local_port,
            dst_port=self.remote_port,
            seq=self.isn,
            window=window,
        )

    def accept_syn(self, syn: Packet, now: float) -> None:
        """Answer a peer's SYN (listener side); we count as established at once."""
        self.peer_isn = syn.seq
        self._set_peer_window(syn.window)
        self.state = ConnState.ESTABLISHED
        self.last_received = now
        self._send_synack(now)

    def _send_synack(self, now: float) -> None:
        self._emit(
            Packet(
                flags=Flags.SYN | Flags.ACK,
                protocol=Protocol.STREAM,
                src=self.local,
                dst=self.remote,
                src_port=self.local_port,
                dst_port=self.remote_port,
                seq=self.isn,
                ack=self._peer_wire(0),
                window=self._window_units(),
            ),
            now,
        )

    def on_syn_again(self, syn: Packet, now: float) -> None:
        """The peer retransmitted its SYN: our SYN-ACK was lost; send it again."""
        if syn.seq == self.peer_isn and self.state is ConnState.ESTABLISHED:
            self._send_synack(now)

    # ---------------------------------------------------------------- inbound

    def on_packet(self, packet: Packet, now: float) -> None:
        """Process one stream packet of this connection."""
        self._on_packet(packet, now)
        self._maybe_finish(now)

    def _on_packet(self, packet: Packet, now: float) -> None:
        if self.state is ConnState.CLOSED:
            # Time-wait: answer a retransmitted FIN so the peer can finish; data to a
            # stream we closed gets a reset so the writer learns at once.
            if packet.has(Flags.FIN) and not packet.has(Flags.ACK) and self.peer_fin is not None:
                self._ack_fin(now)
            elif packet.payload and not is_sack_payload(packet.payload) and self.error is None:
                self._emit(
                    Packet(
                        flags=Flags.RST,
                        protocol=Protocol.STREAM,
                        src=self.local,
                        dst=self.remote,
                        src_port=self.local_port,
                        dst_port=self.remote_port,
                    ),
                    now,
                )
            return
        self.last_received = now
        self.keepalives_unanswered = 0
        flags = int(packet.flags)
        if flags & _RST:
            if self.state is ConnState.SYN_SENT:
                self._fail(StreamRefusedError(f"{self.remote}:{self.remote_port} refused"), now)
            elif not self.finished:
                self._fail(StreamResetError("the peer reset the stream"), now)
            else:
                self.state = ConnState.CLOSED
            return
        if self.state is ConnState.SYN_SENT:
            if flags & _SYN and flags & _ACK:
                if packet.ack != self._wire(0):
                    return  # not an answer to our SYN
                self.peer_isn = packet.seq
                self._set_peer_window(packet.window)
                self.state = ConnState.ESTABLISHED
                self._emit(self._packet(Flags.ACK, seq=self._wire(self.snd_nxt)), now)
                self.flush(now)
            return
        if flags & _SYN:
            if flags & _ACK and packet.seq == self.peer_isn:
                # A retransmitted SYN-ACK: our ACK was lost.
                self._emit(self._packet(Flags.ACK, seq=self._wire(self.snd_nxt)), now)
            return
        if flags & _FIN:
            self._on_fin(packet, now)
            return
        if not flags & _ACK:
            return
        sack = None
        payload = packet.payload
        if is_sack_payload(payload):
            try:
                sack = decode_sack(payload)
            except ValueError:
                return
            payload = b""
        self._on_ack(packet, sack, bool(payload), now)
        if payload:
            self._on_data(packet.seq, payload, now)
        elif self._last_adv_window == 0 and self._window_units() > 0:
            # The peer probes our zero window with pure ACKs: tell it we opened.
            self.send_ack(now)
        self.flush(now)

    def _maybe_finish(self, now: float) -> None:
        if self.state is ConnState.ESTABLISHED and self.finished:
            self.state = ConnState.CLOSED
            self.closed_at = now

    def _set_peer_window(self, units: int) -> None:
        self.peer_window = units * WINDOW_UNIT

    def _on_ack(
        self, packet: Packet, sack: tuple[SackBlock, ...] | None, has_data: bool, now: float
    ) -> None:
        ack_off = self._unwrap_ack(packet.ack)
        if ack_off > self.snd_nxt or ack_off < self.snd_una - 0x40000000:
            return  # acknowledges what we never sent: ignore
        in_flight = self.snd_nxt > self.snd_una
        advanced = ack_off > self.snd_una
        keepalive_shape = not advanced and not has_data and not in_flight and sack is None
        if not (keepalive_shape and packet.window == 0):
            self._set_peer_window(packet.window)
            if packet.window > 0:
                self._zwp_at = None
                self._zwp_interval = self.config.zero_window_probe
        if advanced:
            self._ack_advance(ack_off, now)
        elif in_flight and not has_data and sack is None and packet.ack == self._wire(self.snd_una):
            self._dupacks += 1
            if self._dupacks == 3:
                self._fast_retransmit(now)
        if sack:
            self.stats["sacks_received"] += len(sack)
            self._on_sack(sack, now)

    def _ack_advance(self, ack_off: int, now: float) -> None:
        acked_bytes = 0
        sample: float | None = None
        done: list[int] = []
        # Segments are inserted in offset order and never re-inserted.
        for offset, seg in self._inflight.items():
            if offset + len(seg.data) > ack_off:
                break
            done.append(offset)
            acked_bytes += len(seg.data)
            if seg.attempts == 1:
                sample = now - seg.sent_at
        for offset in done:
            del self._inflight[offset]
        if self.fin_offset is not None and ack_off > self.fin_offset:
            self.fin_acked = True
        self.snd_una = ack_off
        self._dupacks = 0
        if sample is not None:
            self._rtt_sample(sample)
        elif self.srtt is not None:
            # Forward progress ends a timeout back-off (as Linux does), sample or not.
            self.rto = min(
                self.config.max_rto,
                max(self.config.min_rto, self.srtt + max(0.01, 4 * self.rttvar)),
            )
        if self._recovery_point is not None:
            if ack_off >= self._recovery_point:
                self._recovery_point = None
                self.cwnd = max(self.ssthresh, 2 * self.config.mss)
            else:
                # Partial ACK (NewReno): the next hole is lost too.
                first = self._first_unsacked()
                if first is not None:
                    self._mark_lost(first)
        elif acked_bytes:
            mss = self.config.mss
            if self.cwnd < self.ssthresh:
                self.cwnd += acked_bytes
            else:
                self.cwnd += max(1, mss * mss // max(self.cwnd, 1))
            self.cwnd = min(self.cwnd, self.config.max_cwnd)

    def _rtt_sample(self, rtt: float) -> None:
        rtt = max(rtt, 1e-6)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(
            self.config.max_rto, max(self.config.min_rto, self.srtt + max(0.01, 4 * self.rttvar))
        )

    def _first_unsacked(self) -> int | None:
        for offset, seg in self._inflight.items():
            if not seg.sacked:
                return offset
        return None

    def _mark_lost(self, offset: int) -> None:
        seg = self._inflight.get(offset)
        if seg is not None and not seg.lost and not seg.sacked and seg.epoch != self._epoch:
            seg.lost = True
            seg.epoch = self._epoch
            self._retx_queue.append(offset)

    def _enter_recovery(self) -> None:
        flight = self.snd_nxt - self.snd_una
        self.ssthresh = max(flight // 2, 2 * self.config.mss)
        self.cwnd = self.ssthresh
        self._recovery_point = self.snd_nxt
        self._epoch += 1

    def _fast_retransmit(self, now: float) -> None:
        first = self._first_unsacked()
        if first is None:
            return
        if self._recovery_point is None:
            self._enter_recovery()
        self.stats["fast_retransmits"] += 1
        self._mark_lost(first)

    def _on_sack(self, blocks: tuple[SackBlock, ...], now: float) -> None:
        highest = -1
        for block in blocks:
            left = self._unwrap_ack(block.left)
            right = self._unwrap_ack(block.right)
            if not self.snd_una <= left < right <= self.snd_nxt:
                continue
            for offset, seg in self._inflight.items():
                if left <= offset and offset + len(seg.data) <= right:
                    seg.sacked = True
            highest = max(highest, right)
        if highest < 0:
            return
        self._highest_sacked = max(self._highest_sacked, highest)
        holes: list[int] = []
        for offset, seg in self._inflight.items():
            if offset >= highest:
                break
            if not seg.sacked and not seg.lost and seg.epoch != self._epoch:
                holes.append(offset)
        if not holes:
            return
        if self._recovery_point is None:
            self._enter_recovery()
            self.stats["fast_retransmits"] += 1
        for offset in holes:
            self._mark_lost(offset)

    def _on_data(self, seq: int, payload: bytes, now: float) -> None:
        offset = self._unwrap_seq(seq)
        end = offset + len(payload)
        if end <= self.rcv_nxt:
            self.send_ack(now)  # a duplicate: the peer missed our ACK
            return
        if offset < self.rcv_nxt:
            payload = payload[self.rcv_nxt - offset :]
            offset = self.rcv_nxt
        if self.peer_fin is not None and end > self.peer_fin:
            return  # beyond the peer's own end
        limit = self.rcv_nxt + self.config.recv_buffer - len(self._ready)
        if end > limit:
            self.send_ack(now)  # outside our window: drop, re-advertise
            return
        if offset > self.rcv_nxt:
            if offset not in self._ooo and len(self._ooo) < self.config.max_ooo_segments:
                self._ooo[offset] = payload
                self._ooo_bytes += len(payload)
                self._last_ooo = offset
            self.send_ack(now)
            return
        self._deliver(payload)
        while self._ooo:
            nxt = self._ooo.pop(self.rcv_nxt, None)
            if nxt is None:
                # Drop what the delivered data now covers.
                stale = [o for o in self._ooo if o < self.rcv_nxt]
                if not stale:
                    break
                for o in stale:
                    data = self._ooo.pop(o)
                    self._ooo_bytes -= len(data)
                    if o + len(data) > self.rcv_nxt:
                        self._ooo[self.rcv_nxt] = data[self.rcv_nxt - o :]
                        self._ooo_bytes += len(self._ooo[self.rcv_nxt])
                continue
            self._ooo_bytes -= len(nxt)
            self._deliver(nxt)
        self._check_fin_reached(now)
        if self._ooo or self._ack_pending >= 2 or self.eof:
            self.send_ack(now)
        elif self._ack_due is None:
            self._ack_due = now + self.config.delayed_ack

    def _deliver(self, data: bytes) -> None:
        self.rcv_nxt += len(data)
        if not self.read_closed:
            self._ready += data
        self._ack_pending += 1

    def _sack_blocks(self) -> list[SackBlock]:
        if not self._ooo:
            return []
        ranges: list[list[int]] = []
        for offset in sorted(self._ooo):
            end = offset + len(self._ooo[offset])
            if ranges and offset <= ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([offset, end])
        # The block holding the latest arrival first (RFC 2018), then the rest in order.
        if self._last_ooo is not None:
            ranges.sort(key=lambda r: 0 if r[0] <= self._last_ooo <= r[1] else 1)  # type: ignore[operator]
        return [SackBlock(self._peer_wire(a), self._peer_wire(b)) for a, b in ranges[:4]]

    def send_ack(self, now: float) -> None:
        """Send a pure ACK now (with SACK blocks when data is missing)."""
        blocks = self._sack_blocks()
        if blocks:
            self.stats["sacks_sent"] += len(blocks)
        self._emit(
            self._packet(Flags.ACK, seq=self._wire(self.snd_nxt), payload=encode_sack(blocks)), now
        )
        self._ack_pending = 0
        self._ack_due = None

    def _on_fin(self, packet: Packet, now: float) -> None:
        if packet.flags & Flags.ACK:
            # An answer to our FIN (the daemon always answers FIN with FIN|ACK).
            ack_off = self._unwrap_ack(packet.ack)
            if self.fin_offset is not None and ack_off == self.fin_offset + 1:
                self.snd_una = max(self.snd_una, ack_off)
                self.fin_acked = True
                self._inflight.clear()
        fin_off = self._unwrap_seq(packet.seq)
        if self.peer_fin is None:
            if fin_off < self.rcv_nxt:
                fin_off = self.rcv_nxt  # a FIN behind what we have: end here
            self.peer_fin = fin_off
        self._check_fin_reached(now)
        if self.eof and not packet.flags & Flags.ACK:
            self._ack_fin(now)
        elif not self.eof and self._fin_hole_since is None:
            self._fin_hole_since = now
            self.send_ack(now)  # SACK the holes so the peer retransmits them
        self.flush(now)

    def _check_fin_reached(self, now: float) -> None:
        if self.peer_fin is not None and not self.eof and self.rcv_nxt >= self.peer_fin:
            self.eof = True
            self._fin_hole_since = None
            # The FIN consumes a sequence number: acknowledge it.
            self._ack_due = now

    def _ack_fin(self, now: float) -> None:
        flags = Flags.ACK | (Flags.FIN if self.fin_offset is not None else Flags.NONE)
        seq = self.fin_offset if self.fin_offset is not None else self.snd_nxt
        self._emit(self._packet(flags, seq=self._wire(seq)), now)
        self._ack_pending = 0
        self._ack_due = None

    # ---------------------------------------------------------------- local API

    def write(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Accept up to ``send_space`` bytes; returns how many. Call ``flush`` after.

        Raises:
            StreamClosedError: written after ``close``/``write_eof``.
            StreamError: the connection failed earlier.
        """
        if self.error is not None:
            raise self.error
        if self.write_closed:
            raise StreamClosedError("write after the stream was closed for writing")
        take = min(len(data), self.send_space)
        if take:
            self._pending += bytes(memoryview(data)[:take])
        return take

    def read(self, max_bytes: int, now: float) -> bytes:
        """Take up to ``max_bytes`` in-order bytes (``b""`` at EOF).

        Raises:
            StreamError: the connection failed (reset, truncated...).
        """
        if self._ready:
            taken = min(max_bytes, len(self._ready))
            data = bytes(self._ready[:taken])
            del self._ready[:taken]
            after = self._window_units()
            last = self._last_adv_window
            if self.state is ConnState.ESTABLISHED and (
                last == 0
                or (
                    after - last >= max(2, (self.config.recv_buffer // ADVERTISE_UNIT) // 4)
                    # The window grew (the read freed at least one advertised unit).
                    and after > self._window_units_with(taken)
                )
            ):
                self.send_ack(now)  # window update
            return data
        if self.error is not None:
            raise self.error
        return b""

    def close_write(self, now: float) -> None:
        """No more writes; our FIN follows once every written byte is acknowledged."""
        if not self.write_closed:
            self.write_closed = True
            self.flush(now)

    def close(self, now: float) -> None:
        """Close both directions: FIN after our data is acknowledged; inbound data is
        acknowledged and discarded from now on."""
        self.read_closed = True
        self._ready.clear()
        if self.linger_deadline is None:
            self.linger_deadline = now + self.config.close_linger
        self.close_write(now)

    def abort(self, now: float, error: StreamError | None = None) -> None:
        """Reset the connection at once (RST) and fail local waiters."""
        if self.state is not ConnState.CLOSED:
            self._emit(
                Packet(
                    flags=Flags.RST,
                    protocol=Protocol.STREAM,
                    src=self.local,
                    dst=self.remote,
                    src_port=self.local_port,
                    dst_port=self.remote_port,
                    seq=self._wire(self.snd_nxt),
                ),
                now,
            )
        self._fail(error or StreamResetError("the stream was aborted"), now)

    def _fail(self, error: StreamError, now: float) -> None:
        if self.error is None:
            self.error = error
        self.lost_bytes += self.unsent + sum(len(s.data) for s in self._inflight.values())
        self.state = ConnState.CLOSED
        self.closed_at = now
        self._pending.clear()
        self._pend_pos = 0
        self._inflight.clear()
        self._retx_queue.clear()

    # ---------------------------------------------------------------- sending

    def _pace_ok(self, now: float) -> bool:
        if self.srtt is None:
            return True
        rate = 2.0 * max(self.cwnd, self.config.mss) / self.config.mss / max(self.srtt, 1e-4)
        burst = max(4.0, float(self.config.initial_cwnd_segments))
        self._pace_tokens = min(burst, self._pace_tokens + (now - self._pace_at) * rate)
        self._pace_at = now
        return self._pace_tokens >= 1.0 - 1e-9

    def _pace_take(self) -> None:
        if self.srtt is not None:
            self._pace_tokens -= 1.0

    def _pace_deadline(self, now: float) -> float | None:
        if self.srtt is None or self._pace_tokens >= 1.0 - 1e-9:
            return None
        rate = 2.0 * max(self.cwnd, self.config.mss) / self.config.mss / max(self.srtt, 1e-4)
        # From the last refill, not from ``now``: a deadline that moved with the
        # clock would never come due.
        return self._pace_at + (1.0 - self._pace_tokens) / rate + 1e-6

    def flush(self, now: float) -> None:
        """Send whatever the windows and pacing allow: retransmissions first, then new data,
        then our FIN once everything is acknowledged."""
        if self.state is not ConnState.ESTABLISHED:
            return
        while self._retx_queue and self._pace_ok(now):
            offset = self._retx_queue.pop(0)
            seg = self._inflight.get(offset)
            if seg is None or seg.sacked:
                continue
            seg.lost = False
            seg.attempts += 1
            seg.sent_at = now
            self.stats["retransmits"] += 1
            self._pace_take()
            self._send_segment(seg, now)
        mss = self.config.mss
        while (unsent := len(self._pending) - self._pend_pos) > 0:
            window = min(self.cwnd, self.peer_window)
            flight = self.snd_nxt - self.snd_una
            size = mss if unsent > mss else unsent
            if self.peer_window == 0:
                if flight == 0 and self._zwp_at is None:
                    self._zwp_at = now + self._zwp_interval
                break
            if flight + size > window and flight > 0:
                break
            if self.srtt is not None and not self._pace_ok(now):
                break
            pos = self._pend_pos
            if self._pending.startswith(b"SACK", pos) and is_sack_payload(
                bytes(self._pending[pos : pos + 5])
            ):
                size = 1  # the daemon would read this segment as SACK blocks
            chunk = self._take_pending(size)
            seg = _Segment(self.snd_nxt, chunk, now, now)
            self._inflight[self.snd_nxt] = seg
            self.snd_nxt += len(chunk)
            self._pace_take()
            self._send_segment(seg, now)
        if (
            self.write_closed
            and self.fin_offset is None
            and not self.unsent
            and self.snd_una == self.snd_nxt
        ):
            self.fin_offset = self.snd_nxt
            self.snd_nxt += 1
            self._fin_sent_at = now
            self._fin_attempts = 1
            self._send_fin(now)

    def _send_segment(self, seg: _Segment, now: float) -> None:
        self._emit(self._packet(Flags.ACK, seq=self._wire(seg.offset), payload=seg.data), now)
        self._ack_pending = 0
        self._ack_due = None

    def _send_fin(self, now: float) -> None:
        assert self.fin_offset is not None
        if self.peer_fin is not None and self.eof:
            # Both ends: FIN|ACK carries our FIN and acknowledges theirs.
            self._emit(self._packet(Flags.FIN | Flags.ACK, seq=self._wire(self.fin_offset)), now)
        else:
            self._emit(
                Packet(
                    flags=Flags.FIN,
                    protocol=Protocol.STREAM,
                    src=self.local,
                    dst=self.remote,
                    src_port=self.local_port,
                    dst_port=self.remote_port,
                    seq=self._wire(self.fin_offset),
                    window=self._window_units(),
                ),
                now,
            )

    # ---------------------------------------------------------------- timers

    def next_deadline(self, now: float) -> float | None:
        """When ``poll`` must run next (``None``: only on new input)."""
        if self.state is ConnState.CLOSED:
            if self.closed_at is not None:
                return self.closed_at + self.config.time_wait
            return None
        if self.state is ConnState.SYN_SENT:
            return self._syn_at + min(2.0, self.config.syn_rto * (2 ** (self._syn_attempts - 1)))
        # Runs after every packet: plain comparisons, no list.
        last = self.last_sent if self.last_sent > self.last_received else self.last_received
        due = last + self.config.keepalive_interval
        if self._ack_due is not None and self._ack_due < due:
            due = self._ack_due
        if self._inflight:
            oldest = self._oldest_unsacked()
            if oldest is not None and oldest.sent_at + self.rto < due:
                due = oldest.sent_at + self.rto
        if self.fin_offset is not None and not self.fin_acked and self.peer_fin is None:
            due = min(due, self._fin_sent_at + self.rto)
        if self._zwp_at is not None:
            due = min(due, self._zwp_at)
        if self._retx_queue or (self.peer_window > 0 and self.unsent):
            pace = self._pace_deadline(now)
            if pace is not None:
                due = min(due, pace)
        if self._fin_hole_since is not None:
            due = min(due, self._fin_hole_since + self.config.fin_hole_timeout)
        if self.linger_deadline is not None:
            due = min(due, self.linger_deadline)
        return due

    def _keepalive(self, now: float) -> bool:
        # Returns whether the stream was reset. Data in flight has its own timer (the
        # RTO gives up after max_retransmits); after a FIN the daemon answers nothing,
        # so only a plain ACK goes out then.
        if self.fin_offset is not None or self.peer_fin is not None or self.snd_nxt != self.snd_una:
            self.send_ack(now)
            return False
        limit = self.config.keepalive_probes
        if limit and self.keepalives_unanswered >= limit:
            silent = now - self.last_received
            self.abort(
                now,
                StreamResetError(
                    f"the peer answered none of {limit} keepalives (silent for {silent:.0f} s)"
                ),
            )
            return True
        self.keepalives_unanswered += 1
        self.stats["keepalives"] += 1
        # One byte the peer already has: it is discarded as a duplicate and answered
        # with an ACK. Before any data, that is the SYN's sequence number.
        self._emit(self._packet(Flags.ACK, seq=self._wire(self.snd_nxt - 1), payload=b"\x00"), now)
        self._ack_pending = 0
        self._ack_due = None
        return False

    def _oldest_unsacked(self) -> _Segment | None:
        # The lowest unacknowledged segment carries the retransmission timer.
        for seg in self._inflight.values():
            if not seg.sacked:
                return seg
        return None

    def poll(self, now: float) -> None:
        """Run the timers that are due."""
        if self.state is ConnState.CLOSED:
            return
        if self.state is ConnState.SYN_SENT:
            delay = min(2.0, self.config.syn_rto * (2 ** (self._syn_attempts - 1)))
            if now >= self._syn_at + delay:
                if self._syn_attempts > self.config.syn_retries:
                    self._fail(
                        DialTimeoutError(f"no answer from {self.remote}:{self.remote_port}"), now
                    )
                    return
                self._syn_attempts += 1
                self._syn_at = now
                self._emit(self._syn(), now)
            return
        if self._ack_due is not None and now >= self._ack_due:
            self.send_ack(now)
        oldest = self._oldest_unsacked()
        if oldest is not None and now >= oldest.sent_at + self.rto:
            if oldest.attempts > self.config.max_retransmits:
                self.abort(now, StreamResetError("the peer stopped acknowledging data"))
                return
            # Timeout: one segment, back off, restart from a small window.
            self.ssthresh = max((self.snd_nxt - self.snd_una) // 2, 2 * self.config.mss)
            self.cwnd = self.config.mss * 2
            self._recovery_point = self.snd_nxt
            self._epoch += 1
            self.rto = min(self.config.max_rto, self.rto * 2)
            if oldest.offset in self._retx_queue:
                self._retx_queue.remove(oldest.offset)
            self._retx_queue.insert(0, oldest.offset)
            oldest.lost = True
            oldest.epoch = self._epoch
            oldest.sent_at = now  # restart its timer even if pacing delays the resend
            # Every other hole the peer's SACKs revealed is lost as well.
            for offset in self._inflight:
                if offset >= self._highest_sacked:
                    break
                if offset != oldest.offset:
                    self._mark_lost(offset)
        if (
            self.fin_offset is not None
            and not self.fin_acked
            and self.peer_fin is None
            and now >= self._fin_sent_at + self.rto
        ):
            if self._fin_attempts > self.config.max_retransmits:
                self._fail(StreamResetError("the peer never acknowledged our FIN"), now)
                return
            self._fin_attempts += 1
            self._fin_sent_at = now
            self.rto = min(self.config.max_rto, self.rto * 2)
            self._send_fin(now)
        if self._zwp_at is not None and now >= self._zwp_at:
            self._zwp_at = None
            self._zwp_interval = min(30.0, self._zwp_interval * 2)
            if self.unsent and self.snd_nxt == self.snd_una:
                chunk = self._take_pending(1)
                seg = _Segment(self.snd_nxt, chunk, now, now)
                self._inflight[self.snd_nxt] = seg
                self.snd_nxt += 1
                self._send_segment(seg, now)
        if (
            self._fin_hole_since is not None
            and now >= self._fin_hole_since + self.config.fin_hole_timeout
        ):
            missing = (self.peer_fin or 0) - self.rcv_nxt - self._ooo_bytes
            self._fin_hole_since = None
            self.abort(
                now, StreamTruncatedError(f"the peer's stream ended with {missing} bytes missing")
            )
            return
        if self.linger_deadline is not None and now >= self.linger_deadline and not self.finished:
            unacked = self.unsent + max(
                0, self.snd_nxt - self.snd_una - (1 if self.fin_offset is not None else 0)
            )
            if unacked:
                self.abort(
                    now,
                    StreamTruncatedError(f"close gave up with {unacked} bytes unacknowledged"),
                )
            else:
                self.state = ConnState.CLOSED
                self.closed_at = now
            return
        self.flush(now)
        if (
            self.state is ConnState.ESTABLISHED
            and now >= max(self.last_sent, self.last_received) + self.config.keepalive_interval
            and self._keepalive(now)
        ):
            return  # the peer answered none of our keepalives: reset
        if self.finished and self.closed_at is None:
            self.state = ConnState.CLOSED
            self.closed_at = now


# ==================================================================== asyncio driver


class _DialBucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class PilotStream:
    """One reliable byte stream over the Pilot network.

    ``read`` returns ``b""`` once the peer ended its side; ``write`` waits while the
    send buffer is full. Not safe for several concurrent readers (or writers).
    """

    def __init__(self, layer: StreamLayer, conn: Connection) -> None:
        self._layer = layer
        self._conn = conn
        # Tasks waiting for a change (a reader, a writer, a closer): one future each.
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False

    @property
    def local_port(self) -> int:
        """Our port."""
        return self._conn.local_port

    @property
    def remote_address(self) -> Address:
        """The peer's Pilot address."""
        return self._conn.remote

    @property
    def remote_port(self) -> int:
        """The peer's port."""
        return self._conn.remote_port

    @property
    def connection(self) -> Connection:
        """The state machine underneath (for statistics and tests)."""
        return self._conn

    def _notify(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait(self) -> None:
        # Woken by the next _notify (callers re-check their condition after).
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter.cancelled() or not waiter.done():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return 1..``max_bytes`` bytes, or ``b""`` at the peer's end.

        Raises:
            StreamClosedError: the stream was closed locally (also wakes a pending read).
            StreamTruncatedError: the peer's end arrived with data missing.
            StreamResetError: the connection broke.

        Cancelling a pending read loses nothing.
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        while True:
            if self._closed:
                raise StreamClosedError("read on a closed stream")
            conn = self._conn
            if conn.readable:
                data = conn.read(max_bytes, self._layer.now())
                if conn.has_output:
                    # Reading changes nothing on the send side: only a window update
                    # (already queued) needs sending.
                    self._layer.kick(conn)
                return data
            await self._wait()

    async def readexactly(self, size: int) -> bytes:
        """Read exactly ``size`` bytes.

        Raises:
            StreamTruncatedError: the stream ended first (also any ``read`` error).
        """
        parts: list[bytes] = []
        got = 0
        while got < size:
            data = await self.read(min(65536, size - got))
            if not data:
                raise StreamTruncatedError(f"stream ended after {got} of {size} bytes")
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue all of ``data`` for sending, waiting while the send buffer is full.

        Raises:
            StreamClosedError: closed locally or written after ``write_eof``.
            StreamResetError, StreamTruncatedError: the connection failed.

        Cancelling a write may leave a prefix of ``data`` queued.
        """
        view = memoryview(data).cast("B")
        while True:
            if self._closed:
                raise StreamClosedError("write on a closed stream")
            conn = self._conn
            taken = conn.write(view, self._layer.now())
            if taken:
                self._layer.kick(conn)
                view = view[taken:]
            if not view:
                return
            await self._wait()

    def write_room(self) -> int:
        """How many bytes :meth:`try_write` would take right now (0: none).

        Never waits and changes nothing. 0 once the stream is closed, half-closed
        or failed.
        """
        conn = self._conn
        if self._closed or conn.write_closed or conn.error is not None:
            return 0
        return conn.send_space

    def try_write(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue all of ``data`` for sending now, without waiting, or nothing at all.

        Succeeds (True) exactly when ``len(data) <= write_room()``: the bytes are
        queued in order after every earlier write and the segments the windows
        allow leave before this returns. Otherwise returns False and nothing was
        queued (use :meth:`write`). Never suspends, so it cannot be cancelled
        half-way; safe to repeat. Not to be mixed with a :meth:`write` still
        waiting on the same stream.
        """
        view = memoryview(data).cast("B")
        size = len(view)
        if size > self.write_room():
            return False
        if size:
            conn = self._conn
            conn.write(view, self._layer.now())
            self._layer.kick(conn)
        return True

    async def drain(self) -> None:
        """Wait until every byte written has been acknowledged by the peer.

        Raises:
            StreamError: the connection failed first.
        """
        while True:
            conn = self._conn
            if conn.error is not None:
                raise conn.error
            if conn.all_acked:
                return
            await self._wait()

    async def write_eof(self) -> None:
        """Half-close: the peer reads ``b""`` after our data; we may still read.

        Safe to repeat.
        """
        conn = self._conn
        if conn.error is not None:
            raise conn.error
        conn.close_write(self._layer.now())
        self._layer.kick(conn)

    async def aclose(self) -> None:
        """Close both directions, waiting (up to ``close_linger``) until the peer has
        acknowledged every byte we wrote. Idempotent; wakes a pending ``read``.

        Raises:
            StreamTruncatedError: the peer did not acknowledge everything in time
                (the stream was reset; the peer's reader sees an error too).

        Cancellation resets the stream at once and re-raises.
        """
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        self._notify()  # wake a pending read: it raises StreamClosedError
        conn.close(self._layer.now())
        self._layer.kick(conn)
        try:
            while not conn.finished and conn.error is None:
                if conn.peer_fin is not None and conn.all_acked and conn.fin_offset is not None:
                    break  # the peer has ended too: its FIN|ACK need not be awaited
                await self._wait()
        except asyncio.CancelledError:
            conn.abort(self._layer.now())
            self._layer.kick(conn)
            raise
        if conn.lost_bytes:
            raise StreamTruncatedError(
                f"{conn.lost_bytes} bytes written were never acknowledged ({conn.error})"
            )

    def abort(self) -> None:
        """Reset the stream at once (RST); pending data is discarded."""
        self._closed = True
        self._conn.abort(self._layer.now())
        self._layer.kick(self._conn)
        self._notify()


class PilotListener:
    """Inbound streams on one port."""

    def __init__(self, layer: StreamLayer, port: int, backlog: int) -> None:
        self._layer = layer
        self.port = port
        self._queue: asyncio.Queue[PilotStream] = asyncio.Queue(backlog)
        self._closed = False
        self._wakeup = asyncio.Event()

    @property
    def full(self) -> bool:
        """Whether the backlog is full (new SYNs are refused)."""
        return self._queue.full()

    def _offer(self, stream: PilotStream) -> bool:
        if self._closed:
            return False
        try:
            self._queue.put_nowait(stream)
        except asyncio.QueueFull:
            return False
        return True

    async def accept(self) -> PilotStream:
        """Wait for the next inbound stream.

        Raises:
            StreamClosedError: the listener is (or gets) closed.
        """
        while True:
            if not self._queue.empty():
                return self._queue.get_nowait()
            if self._closed:
                raise StreamClosedError(f"listener on port {self.port} is closed")
            self._wakeup.clear()
            getter = asyncio.ensure_future(self._queue.get())
            waker = asyncio.ensure_future(self._wakeup.wait())
            try:
                done, _ = await asyncio.wait({getter, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
                if not getter.done():
                    getter.cancel()
            if getter in done and not getter.cancelled():
                return getter.result()

    async def aclose(self) -> None:
        """Stop accepting; pending streams are reset. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._layer._unlisten(self.port)  # pyright: ignore[reportPrivateUsage]
        self._wakeup.set()
        while not self._queue.empty():
            self._queue.get_nowait().abort()


class StreamLayer:
    """All streams of one node.

    Args:
        send: called with every packet to send (the node encrypts and transmits it).
        local_address: this node's Pilot address.
        config: limits and timers.
        clock: monotonic seconds (tests may pass a fake).

    The node calls :meth:`on_packet` for every stream packet addressed to it. With
    ``echo`` (the default) the layer serves the echo service on port 7 itself.
    """

    def __init__(
        self,
        send: Callable[[Packet], None],
        local_address: Address,
        *,
        config: StreamConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        echo: bool = True,
    ) -> None:
        self._send = send
        self.local_address = local_address
        self.config = config or StreamConfig()
        self.now = clock
        self._conns: dict[tuple[int, Address, int], Connection] = {}
        self._streams: dict[tuple[int, Address, int], PilotStream] = {}
        self._listeners: dict[int, PilotListener] = {}
        self._dial_buckets: dict[int, _DialBucket] = {}
        self._next_port = EPHEMERAL_MIN + int.from_bytes(os.urandom(2), "big") % 4096
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None
        self._started = False
        self._closed = False
        self._rst_budget = 50.0
        self._rst_at = clock()
        self.stats = {"rst_sent": 0, "refused_syn": 0, "dropped": 0}
        self._echo_listener = self.listen(ECHO_PORT) if echo else None
        self._echo_tasks: set[asyncio.Task[None]] = set()
        self._batch: dict[Connection, None] | None = None

    # ------------------------------------------------------------- plumbing

    def _ensure_timer(self) -> None:
        if not self._started and not self._closed:
            self._started = True
            loop = asyncio.get_running_loop()
            if self._echo_listener is not None:
                task = loop.create_task(self._echo_accept(self._echo_listener), name="pilot-echo")
                self._echo_tasks.add(task)

    async def _echo_accept(self, listener: PilotListener) -> None:
        # The built-in echo service: at most ``accept_backlog`` streams at once.
        while True:
            try:
                stream = await listener.accept()
            except StreamClosedError:
                return
            if len(self._echo_tasks) > self.config.accept_backlog:
                stream.abort()
                continue
            task = asyncio.get_running_loop().create_task(self._echo_one(stream))
            self._echo_tasks.add(task)
            task.add_done_callback(self._echo_tasks.discard)

    @staticmethod
    async def _echo_one(stream: PilotStream) -> None:
        try:
            while data := await stream.read(65536):
                await stream.write(data)
            await stream.aclose()
        except StreamError:
            stream.abort()

    def begin_batch(self) -> None:
        """Defer sending until :meth:`end_batch`: the node is handing over several packets
        read at once, and each connection's output (and timer) is settled once for all."""
        if self._batch is None:
            self._batch = {}

    def end_batch(self) -> None:
        """Send what the packets since :meth:`begin_batch` produced. Safe to repeat."""
        batch, self._batch = self._batch, None
        if batch:
            for conn in batch:
                self._after(conn)

    def kick(self, conn: Connection) -> None:
        """Flush a connection's packets after a local operation and re-arm the timer."""
        conn.flush(self.now())
        self._after(conn)

    def _after(self, conn: Connection) -> None:
        for packet in conn.take_outbox():
            try:
                self._send(packet)
            except Exception:  # the node's send failing must not break the state machine
                _log.debug("send failed", exc_info=True)
        stream = self._streams.get(conn.key)
        if stream is not None:
            stream._notify()  # pyright: ignore[reportPrivateUsage]
        due = conn.next_deadline(self.now())
        if due is not None:
            self._arm(due)

    def _arm(self, due: float) -> None:
        # One loop timer for every connection, moved only when a deadline comes earlier.
        if self._closed or (self._timer_due is not None and self._timer_due <= due):
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, due - self.now())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
        self._timer_due = due

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = None
        if self._closed:
            return
        now = self.now()
        earliest: float | None = None
        for conn in list(self._conns.values()):
            due = conn.next_deadline(now)
            if due is not None and due <= now:
                conn.poll(now)
                self._after(conn)
                if (
                    conn.state is ConnState.CLOSED
                    and conn.closed_at is not None
                    and now >= conn.closed_at + self.config.time_wait
                ):
                    self._forget(conn)
                    continue
                due = conn.next_deadline(now)
                if due is not None and due <= now:
                    due = now + 0.001  # never spin on a deadline that polling did not move
            if due is not None and (earliest is None or due < earliest):
                earliest = due
        if earliest is not None:
            self._arm(earliest)

    def _forget(self, conn: Connection) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        stream = self._streams.pop(conn.key, None)
        if stream is not None:
            stream._notify()  # pyright: ignore[reportPrivateUsage]

    def _rst_allowed(self) -> bool:
        now = self.now()
        self._rst_budget = min(50.0, self._rst_budget + (now - self._rst_at) * 50.0)
        self._rst_at = now
        if self._rst_budget >= 1.0:
            self._rst_budget -= 1.0
            return True
        return False

    def _reply_rst(self, packet: Packet) -> None:
        if not self._rst_allowed():
            return
        self.stats["rst_sent"] += 1
        with contextlib.suppress(Exception):
            self._send(
                Packet(
                    flags=Flags.RST,
                    protocol=Protocol.STREAM,
                    src=packet.dst,
                    dst=packet.src,
                    src_port=packet.dst_port,
                    dst_port=packet.src_port,
                )
            )

    # ------------------------------------------------------------- inbound

    def on_packet(self, packet: Packet) -> None:
        """Handle one decrypted stream packet addressed to this node."""
        if self._closed or packet.protocol is not Protocol.STREAM:
            return
        self._ensure_timer()
        key = (packet.dst_port, packet.src, packet.src_port)
        conn = self._conns.get(key)
        now = self.now()
        flags = int(packet.flags)
        if flags & _SYN and not flags & _ACK:
            if conn is not None:
                conn.on_syn_again(packet, now)
                self._after(conn)
                return
            listener = self._listeners.get(packet.dst_port)
            if listener is None or listener.full or len(self._conns) >= self.config.max_connections:
                self.stats["refused_syn"] += 1
                self._reply_rst(packet)
                return
            conn = Connection(
                local=packet.dst,
                local_port=packet.dst_port,
                remote=packet.src,
                remote_port=packet.src_port,
                isn=int.from_bytes(os.urandom(4), "big"),
                now=now,
                config=self.config,
            )
            conn.accept_syn(packet, now)
            stream = PilotStream(self, conn)
            self._conns[key] = conn
            self._streams[key] = stream
            listener._offer(stream)  # pyright: ignore[reportPrivateUsage]
            self._after(conn)
            return
        if conn is None:
            self.stats["dropped"] += 1
            if not flags & (_RST | _FIN | _SYN):
                self._reply_rst(packet)
            return
        conn.on_packet(packet, now)
        if self._batch is not None:
            self._batch[conn] = None
        else:
            self._after(conn)

    # ------------------------------------------------------------- outbound

    def _alloc_port(self, remote: Address, remote_port: int) -> int:
        for _ in range(65536 - EPHEMERAL_MIN):
            port = self._next_port
            self._next_port = EPHEMERAL_MIN if port >= 65535 else port + 1
            if port in self._listeners:
                continue
            if (port, remote, remote_port) not in self._conns:
                return port
        raise StreamError("no free ephemeral port")

    async def _pace_dial(self, node: int) -> None:
        cfg = self.config
        while True:
            now = self.now()
            bucket = self._dial_buckets.get(node)
            if bucket is None:
                if len(self._dial_buckets) > 4096:
                    self._dial_buckets.clear()
                bucket = self._dial_buckets[node] = _DialBucket(float(cfg.dial_burst), now)
            bucket.tokens = min(
                float(cfg.dial_burst), bucket.tokens + (now - bucket.at) * cfg.dial_rate
            )
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - bucket.tokens) / cfg.dial_rate)

    async def connect(self, remote: Address, port: int) -> PilotStream:
        """Open a stream to ``remote``:``port`` (dials are paced per destination node).

        Raises:
            StreamRefusedError: nothing listens there (the peer answered RST).
            DialTimeoutError: no answer after ``syn_retries`` SYNs.
            StreamClosedError: the layer is closed.

        Cancellation abandons the dial (the half-open connection is reset).
        """
        if self._closed:
            raise StreamClosedError("the stream layer is closed")
        self._ensure_timer()
        await self._pace_dial(remote.node)
        local = Address(remote.network, self.local_address.node)
        local_port = self._alloc_port(remote, port)
        conn = Connection(
            local=local,
            local_port=local_port,
            remote=remote,
            remote_port=port,
            isn=int.from_bytes(os.urandom(4), "big"),
            now=self.now(),
            config=self.config,
        )
        stream = PilotStream(self, conn)
        self._conns[conn.key] = conn
        self._streams[conn.key] = stream
        conn.connect(self.now())
        self._after(conn)
        try:
            while conn.state is ConnState.SYN_SENT:
                await stream._wait()  # pyright: ignore[reportPrivateUsage]
        except asyncio.CancelledError:
            conn.abort(self.now())
            self._after(conn)
            raise
        if conn.error is not None:
            self._forget(conn)
            raise conn.error
        return stream

    def listen(self, port: int, *, backlog: int | None = None) -> PilotListener:
        """Accept inbound streams on ``port``.

        Raises:
            StreamError: the port already has a listener.
        """
        if self._closed:
            raise StreamClosedError("the stream layer is closed")
        if port in self._listeners:
            raise StreamError(f"port {port} already has a listener")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is outside 0..65535")
        listener = PilotListener(self, port, backlog or self.config.accept_backlog)
        self._listeners[port] = listener
        return listener

    def set_local_address(self, address: Address) -> None:
        """Follow a new address of this node (the registry handed it a new node id).

        Streams bound to the old address cannot continue: the peer addresses the old
        node id, which is no longer ours. They are reset, and their readers and writers
        get :class:`StreamResetError` naming both addresses. Listeners stay (they are
        bound to ports, not addresses); new dials and inbound streams use ``address``.
        Safe to repeat; the same address again changes nothing.
        """
        old = self.local_address
        if address == old:
            return
        self.local_address = address
        now = self.now()
        for conn in list(self._conns.values()):
            if conn.local.node == address.node:
                continue
            if conn.state is ConnState.CLOSED:
                self._forget(conn)
                continue
            conn.abort(
                now,
                StreamResetError(
                    f"this node's address changed from {old} to {address}; "
                    "the stream was bound to the old one"
                ),
            )
            self._after(conn)
            self._forget(conn)

    def _unlisten(self, port: int) -> None:
        self._listeners.pop(port, None)

    @property
    def connections(self) -> list[Connection]:
        """Live connections (for statistics and tests)."""
        return list(self._conns.values())

    async def aclose(self) -> None:
        """Reset every stream, close every listener and stop the timer. Idempotent."""
        if self._closed:
            return
        for listener in list(self._listeners.values()):
            await listener.aclose()
        now = self.now()
        for conn in list(self._conns.values()):
            if conn.state is not ConnState.CLOSED:
                conn.abort(now, StreamClosedError("the node closed"))
                self._after(conn)
        self._closed = True
        for stream in self._streams.values():
            stream._notify()  # pyright: ignore[reportPrivateUsage]
        self._conns.clear()
        self._streams.clear()
        await cancel_and_wait(list(self._echo_tasks), "echo")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_due = None
