"""The binary frame the server forwards to a room's bot (frames from a meeting-bot service, see
signaling/ingest.py), one per WebSocket BINARY message on the bot's /ws socket:

    b"CMF1" | id length (1 byte, 1..64) | participant id (ASCII, the protocol's id pattern)
            | capture time (8 bytes, big-endian IEEE-754 double, epoch seconds) | image bytes (PNG or JPEG)

The image stays encoded until the bot's inference thread decodes it (bot/analyzer.py).
"""
from __future__ import annotations

import math
import re
import struct

MAGIC = b"CMF1"
ID_RE = re.compile(rb"^[A-Za-z0-9_-]{1,64}\Z")
_TIME = struct.Struct(">d")


def pack(participant_id: str, t: float, image: bytes) -> bytes:
    pid = participant_id.encode("ascii")
    if not ID_RE.match(pid):
        raise ValueError(f"participant id {participant_id!r} does not match the protocol's id pattern")
    return b"".join((MAGIC, bytes((len(pid),)), pid, _TIME.pack(t), image))


def unpack(data: bytes) -> tuple[str, float, bytes]:
    """(participant id, capture time, image bytes); ValueError for anything else."""
    if len(data) < 6 or data[:4] != MAGIC:
        raise ValueError("not a classmood frame (bad magic)")
    n = data[4]
    end = 5 + n + _TIME.size
    if len(data) <= end or not ID_RE.match(data[5:5 + n]):
        raise ValueError("malformed classmood frame header")
    (t,) = _TIME.unpack(data[5 + n:end])
    if not math.isfinite(t):
        raise ValueError("frame time is not a finite number")
    return data[5:5 + n].decode("ascii"), t, bytes(data[end:])
