"""In-band stream encoding between two pilot:// carriers (sans-IO).

Why it exists
-------------

A Pilot stream through the daemon is a plain byte pipe with three gaps that
the :class:`~pilot_transport._carrier.CarrierStream` contract cannot live with:

1. **No half-close.** The daemon has only ``Close``, which ends both
   directions; ``write_eof`` needs "no more data from me, keep reading".
2. **No backpressure across the IPC socket.** The daemon pushes every segment
   as soon as it arrives and a client must never stop reading its socket (that
   wedges the daemon for every peer). Without end-to-end credit, a slow reader
   either buffers without bound or loses the stream.
3. **The SACK-prefix quirk.** A segment whose payload begins with ``SACK``
   followed by a byte 1-4 is swallowed by the receiving daemon as a SACK block
   and the stream stalls. Segment boundaries are chosen by the sending daemon
   (4096-byte segments, Nagle coalescing), so a sender cannot keep the
   pattern away from them; it can only keep the pattern out of the stream.

Encoding
--------

The three bytes ``SAC`` are an escape; exactly one code byte follows them:

=====================  =========================================================
``SAC 0x00``           the data bytes ``SAC``
``SAC 0x01``           end of data from this side (half-close); control may follow
``SAC 0x02 n``         flow-control credit: the receiver may take ``n`` KiB more
                       (``1 <= n <= 64``, so ``n`` is never ``S``)
``SAC 0x03``           no-op (see below)
``SAC 0x03 SAC 0x03``  end-of-stream acknowledgement: this side has received the
                       peer's end of data (two no-ops in a row never occur otherwise)
=====================  =========================================================

Any other code is a protocol error. ``SAC`` is always followed by a byte
0x00-0x03, never by ``K``, so ``SACK`` cannot occur at any offset of an encoded
stream, whatever the segmentation. On random or encrypted data the escape is
almost free: one C-speed search per chunk and an expected 1 extra byte per
16 MiB.

A decoder cannot tell whether a chunk ending in ``S`` or ``SA`` is data or the
start of an escape, so it holds those one or two bytes back until the next
bytes arrive. So that no byte is ever held back while the writer goes quiet,
an encoded chunk that would end in ``S`` or ``SA`` is closed with a no-op.
Each chunk is encoded on its own: a ``SAC`` split across two chunks is not an
escape on the wire, and the no-op keeps it from becoming one.

The acknowledgement exists because the daemon's Close drops whatever the peer
has not yet acknowledged: a side that is closing waits until the peer has
acknowledged its end of data (or has closed) before it tells the daemon to
close. Decoders that predate it see two no-ops and ignore them.

Each side starts with :data:`INITIAL_CREDIT` bytes of credit for sending; a
receiver with a larger window grants the difference at once, and grants
consumed bytes back as its reader takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CREDIT_UNIT",
    "EOF_ACK",
    "EOF_MARKER",
    "INITIAL_CREDIT",
    "MAX_CREDIT_PER_CONTROL",
    "NOOP",
    "Decoded",
    "FramingDecoder",
    "FramingError",
    "credit_controls",
    "encode_data",
]

ESC = b"SAC"
_LITERAL = b"SAC\x00"
EOF_MARKER = b"SAC\x01"
_CREDIT = 0x02
NOOP = b"SAC\x03"
EOF_ACK = NOOP + NOOP
"""Sent once on receiving the peer's end-of-data marker."""
CREDIT_UNIT = 1024
"""Credit is granted in KiB."""
MAX_CREDIT_PER_CONTROL = 64
"""Largest ``n`` in one ``SAC 0x02 n`` control (keeps ``n`` below ``S``)."""
INITIAL_CREDIT = 64 * CREDIT_UNIT
"""Bytes a sender may send before the first grant; every receiver window is at least this."""


class FramingError(ValueError):
    """The remote side broke the stream encoding."""


def encode_data(chunk: bytes) -> bytes:
    """Escape one chunk of data bytes for the wire (a no-op closes an ``S``/``SA`` end)."""
    out = chunk.replace(ESC, _LITERAL) if ESC in chunk else chunk
    if out.endswith((b"S", b"SA")):
        out += NOOP
    return out


def credit_controls(kib: int) -> bytes:
    """Controls granting ``kib`` KiB of credit (split into <= 64 KiB pieces)."""
    out = bytearray()
    while kib > 0:
        n = min(kib, MAX_CREDIT_PER_CONTROL)
        out += ESC + bytes((_CREDIT, n))
        kib -= n
    return bytes(out)


@dataclass(slots=True)
class Decoded:
    """What one chunk of wire bytes carried."""

    data: bytes
    credit: int  # bytes
    eof: bool  # the end-of-data marker was in this chunk
    eof_ack: bool = False  # the peer acknowledged our end-of-data marker


def _partial_escape(data: bytes) -> int:
    """How many trailing bytes could begin an escape (``S`` or ``SA``)."""
    if data.endswith(b"SA"):
        return 2
    if data.endswith(b"S"):
        return 1
    return 0


class FramingDecoder:
    """Stateful decoder: wire chunks (split anywhere) in, data/credit/EOF out."""

    __slots__ = ("_noops", "_pending", "eof", "eof_acked")

    def __init__(self) -> None:
        self._pending = b""
        self._noops = 0
        self.eof = False
        self.eof_acked = False

    def feed_plain(self, chunk: bytes) -> bool:
        """Take ``chunk`` as it is if it is nothing but data (the common case).

        Returns True when ``chunk`` holds no escape, nothing is held back from
        the previous chunk and it cannot end inside an escape: the chunk is then
        the data, unchanged, and the decoder's state is updated as :meth:`feed`
        would update it. Returns False, with nothing changed, otherwise: call
        :meth:`feed` instead.
        """
        if not chunk or self._pending or self.eof or ESC in chunk or chunk.endswith((b"S", b"SA")):
            return False
        self._noops = 0
        return True

    def feed(self, chunk: bytes) -> Decoded:
        """Decode one chunk.

        Raises:
            FramingError: an unknown escape code, a bad credit, or data after EOF.
        """
        if self._pending:
            chunk = self._pending + chunk
            self._pending = b""
        if ESC not in chunk:
            keep = _partial_escape(chunk)
            if keep:
                self._pending = chunk[-keep:]
                chunk = chunk[:-keep]
            if chunk:
                if self.eof:
                    raise FramingError("data after end of stream")
                self._noops = 0
            return Decoded(chunk, 0, False)
        out = bytearray()
        credit = 0
        eof = self.eof
        ack = False
        noops = self._noops
        pos = 0
        end = len(chunk)
        while True:
            i = chunk.find(ESC, pos)
            if i < 0:
                piece = chunk[pos:]
                keep = _partial_escape(piece)
                if keep:
                    self._pending = piece[-keep:]
                    piece = piece[:-keep]
            else:
                piece = chunk[pos:i]
            if piece:
                if eof:
                    raise FramingError("data after end of stream")
                out += piece
                noops = 0
            if i < 0:
                break
            if i + 3 >= end:
                self._pending = chunk[i:]
                break
            code = chunk[i + 3]
            if code == 3:
                noops += 1
                if noops == 2:
                    ack = True
                    noops = 0
                pos = i + 4
                continue
            noops = 0
            if code == 0:
                if eof:
                    raise FramingError("data after end of stream")
                out += ESC
                pos = i + 4
            elif code == 1:
                if eof:
                    raise FramingError("end of stream marked twice")
                eof = True
                pos = i + 4
            elif code == _CREDIT:
                if i + 4 >= end:
                    self._pending = chunk[i:]
                    break
                n = chunk[i + 4]
                if not 1 <= n <= MAX_CREDIT_PER_CONTROL:
                    raise FramingError(f"bad credit grant {n}")
                credit += n * CREDIT_UNIT
                pos = i + 5
            else:
                raise FramingError(f"unknown escape code 0x{code:02X}")
        newly_eof = eof and not self.eof
        self.eof = eof
        self._noops = noops
        newly_acked = ack and not self.eof_acked
        self.eof_acked = self.eof_acked or ack
        return Decoded(bytes(out), credit, newly_eof, newly_acked)
