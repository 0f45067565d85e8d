"""Encoded still images from the network (PNG, JPEG): what they claim to be, read from their header.

Checked before any decode, by the server (every frame from a meeting-bot service) and again by the bot:
a 20 MB PNG that inflates to 30000x30000 pixels must be refused from its 24-byte header, not after
decoding it; a truncated file is refused from its missing end marker (OpenCV would decode the part
that arrived and say nothing).
"""
from __future__ import annotations

import struct

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_END = b"IEND\xaeB`\x82"         # the IEND chunk's type and CRC: the last 8 bytes of every complete PNG
# Start-of-frame markers carry the size (C4 = Huffman tables, C8 = reserved, CC = arithmetic tables are not SOFs)
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class BadImage(ValueError):
    """Not a PNG/JPEG, truncated, or larger than allowed (the message says which)."""


def sniff(data: bytes) -> tuple[str, int, int]:
    """("png" | "jpeg", width, height) from the header; BadImage for anything else or a truncated file."""
    if data[:8] == PNG_MAGIC:
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise BadImage("truncated PNG header")
        width, height = struct.unpack(">II", data[16:24])
        if not data.rstrip(b"\x00").endswith(PNG_END):
            raise BadImage("truncated PNG (no IEND chunk at the end)")
        return "png", width, height
    if data[:3] == JPEG_MAGIC:
        width, height = _jpeg_size(data)
        # Some encoders pad after the end-of-image marker; nothing else may follow it.
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise BadImage("truncated JPEG (no end-of-image marker)")
        return "jpeg", width, height
    raise BadImage("not a PNG or JPEG image")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise BadImage("malformed JPEG (expected a marker)")
        marker = data[i + 1]
        if marker == 0xFF:            # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):   # markers without a length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if length < 2:
            raise BadImage("malformed JPEG segment length")
        if marker in JPEG_SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if marker == 0xDA:            # start of scan before any frame header
            break
        i += 2 + length
    raise BadImage("truncated or malformed JPEG (no frame header)")


def check(data: bytes, max_width: int, max_height: int) -> tuple[str, int, int]:
    """sniff() plus the size limit (either orientation: a portrait phone camera is fine)."""
    kind, width, height = sniff(data)
    if width < 1 or height < 1:
        raise BadImage(f"{kind} of {width}x{height} pixels")
    if max(width, height) > max(max_width, max_height) or min(width, height) > min(max_width, max_height):
        raise BadImage(f"{kind} of {width}x{height} pixels is larger than {max_width}x{max_height}")
    return kind, width, height
