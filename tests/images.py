"""Small valid images for tests, made in pure Python."""

import struct
import zlib


def tiny_png(width: int = 4, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + bytes([y * 40 % 256, 80, 200]) * width for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def tiny_jpeg() -> bytes:
    """Only the magic bytes matter to the gateway (it sniffs, never decodes)."""
    return b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF\x00" + bytes(64) + b"\xff\xd9"
