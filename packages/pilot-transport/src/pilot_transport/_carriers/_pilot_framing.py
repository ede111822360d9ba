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

Byte ``0x53`` (``S``) is an escape. After it comes exactly one code:

=================  ===========================================================
``S 0x00``         a literal ``S`` data byte
``S 0x01``         end of data from this side (half-close); control may follow
``S 0x02 n``       flow-control credit: the receiver may take ``n`` KiB more
                   (``1 <= n <= 64``, so ``n`` is never ``S`` itself)
=================  ===========================================================

Any other code is a protocol error. Since ``S`` is always followed by 0x00,
0x01 or 0x02, the bytes ``SACK`` never occur at any offset of an encoded
stream, whatever the segmentation. The cost is one byte per ``S`` in the data
(1/256 of random or encrypted data).

Each side starts with :data:`INITIAL_CREDIT` bytes of credit for sending; a
receiver with a larger window grants the difference at once, and grants
consumed bytes back as its reader takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CREDIT_UNIT",
    "EOF_MARKER",
    "INITIAL_CREDIT",
    "MAX_CREDIT_PER_CONTROL",
    "FramingDecoder",
    "FramingError",
    "credit_controls",
    "encode_data",
]

ESC = 0x53
_ESC_BYTE = b"S"
_LITERAL = b"S\x00"
EOF_MARKER = b"S\x01"
_CREDIT = 0x02
CREDIT_UNIT = 1024
"""Credit is granted in KiB."""
MAX_CREDIT_PER_CONTROL = 64
"""Largest ``n`` in one ``S 0x02 n`` control (keeps ``n`` below ``S``)."""
INITIAL_CREDIT = 64 * CREDIT_UNIT
"""Bytes a sender may send before the first grant; every receiver window is at least this."""


class FramingError(ValueError):
    """The remote side broke the stream encoding."""


def encode_data(data: bytes | bytearray | memoryview) -> bytes:
    """Escape data bytes for the wire."""
    return bytes(data).replace(_ESC_BYTE, _LITERAL)


def credit_controls(kib: int) -> bytes:
    """Controls granting ``kib`` KiB of credit (split into <= 64 KiB pieces)."""
    out = bytearray()
    while kib > 0:
        n = min(kib, MAX_CREDIT_PER_CONTROL)
        out += bytes((ESC, _CREDIT, n))
        kib -= n
    return bytes(out)


@dataclass(slots=True)
class Decoded:
    """What one chunk of wire bytes carried."""

    data: bytes
    credit: int  # bytes
    eof: bool


class FramingDecoder:
    """Stateful decoder: wire chunks (split anywhere) in, data/credit/EOF out."""

    __slots__ = ("_pending", "eof")

    def __init__(self) -> None:
        self._pending = b""
        self.eof = False

    def feed(self, chunk: bytes) -> Decoded:
        """Decode one chunk.

        Raises:
            FramingError: an unknown escape code, a bad credit, or data after EOF.
        """
        if self._pending:
            chunk = self._pending + chunk
            self._pending = b""
        n_esc = chunk.count(_ESC_BYTE)
        if n_esc == 0 or (n_esc == chunk.count(_LITERAL) and chunk[-1] != ESC):
            data = chunk.replace(_LITERAL, _ESC_BYTE) if n_esc else chunk
            if data and self.eof:
                raise FramingError("data after end of stream")
            return Decoded(data, 0, False)
        out = bytearray()
        credit = 0
        eof = self.eof
        pos = 0
        end = len(chunk)
        while True:
            i = chunk.find(_ESC_BYTE, pos)
            piece = chunk[pos:] if i < 0 else chunk[pos:i]
            if piece:
                if eof:
                    raise FramingError("data after end of stream")
                out += piece
            if i < 0:
                break
            if i + 1 >= end:
                self._pending = chunk[i:]
                break
            code = chunk[i + 1]
            if code == 0:
                if eof:
                    raise FramingError("data after end of stream")
                out.append(ESC)
                pos = i + 2
            elif code == 1:
                if eof:
                    raise FramingError("end of stream marked twice")
                eof = True
                pos = i + 2
            elif code == _CREDIT:
                if i + 2 >= end:
                    self._pending = chunk[i:]
                    break
                n = chunk[i + 2]
                if not 1 <= n <= MAX_CREDIT_PER_CONTROL:
                    raise FramingError(f"bad credit grant {n}")
                credit += n * CREDIT_UNIT
                pos = i + 3
            else:
                raise FramingError(f"unknown escape code 0x{code:02X}")
        newly_eof = eof and not self.eof
        self.eof = eof
        return Decoded(bytes(out), credit, newly_eof)
