"""Byte-level access to safetensors files, for building broken ones in tests.

Deliberately independent of ``fapm_cli.header``: a file is split into its header object and its
data buffer with ``struct`` and ``json`` only, edited, and written back (optionally with a raw,
non-JSON header or a lying length prefix).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

TMP_MARK = ".fapm-tmp-"  # the writer's temporary sibling directories contain this


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header object and the data buffer of a valid safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def encode(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A file from a header (object or raw bytes) and data; ``length`` overrides the prefix."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if not isinstance(header, bytes):
        raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def write_raw(
    path: Path, header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None
) -> None:
    path.write_bytes(encode(header, data, length))


def stray_temps(root: Path) -> list[Path]:
    """Temporary output directories (or old outputs being replaced) left anywhere under root."""
    return [p for p in root.rglob("*") if TMP_MARK in p.name or ".fapm-old-" in p.name]
