"""The safetensors header: parse and validate it, and plan one for writing.

A safetensors file is ``u64 little-endian N`` + ``N bytes of JSON`` + a data buffer. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
buffer) plus an optional ``"__metadata__"`` of str -> str.

Why our own parser rather than ``safetensors.safe_open``: the same code must judge headers read
from a local file and headers fetched from the Hub with a ranged request; it must bound what it
allocates *before* trusting any size in the file (hostile inputs); and every rule it enforces has
to produce a message naming the file and tensor, which safetensors' error strings do not let us do
without matching on their text. Tensor *data* is read by ``reader``; this module never imports
torch, so ``fapm inspect`` and ``fapm --help`` stay fast.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fapm_cli.errors import InputError

# A header larger than this is refused before it is read (the safetensors library uses the same
# bound). Real headers are a few hundred kB even for 400B-parameter models.
MAX_HEADER_BYTES = 100_000_000
ALIGNMENT = 8  # headers are padded with spaces so that the data buffer starts 8-byte aligned


@dataclass(frozen=True)
class DType:
    name: str  # safetensors spelling, e.g. "BF16"
    itemsize: int
    is_float: bool
    torch_name: str  # attribute of the torch module


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, True, "float64"),
        DType("F32", 4, True, "float32"),
        DType("F16", 2, True, "float16"),
        DType("BF16", 2, True, "bfloat16"),
        DType("F8_E4M3", 1, True, "float8_e4m3fn"),
        DType("F8_E5M2", 1, True, "float8_e5m2"),
        DType("I64", 8, False, "int64"),
        DType("I32", 4, False, "int32"),
        DType("I16", 2, False, "int16"),
        DType("I8", 1, False, "int8"),
        DType("U64", 8, False, "uint64"),
        DType("U32", 4, False, "uint32"),
        DType("U16", 2, False, "uint16"),
        DType("U8", 1, False, "uint8"),
        DType("BOOL", 1, False, "bool"),
    )
}

# Accepted spellings for --dtype: the safetensors names and the usual torch names.
DTYPE_ALIASES: dict[str, str] = {
    "float64": "F64", "fp64": "F64", "double": "F64",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "fp8_e4m3": "F8_E4M3", "e4m3": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "fp8_e5m2": "F8_E5M2", "e5m2": "F8_E5M2",
}  # fmt: skip


def parse_dtype(text: str) -> DType:
    key = DTYPE_ALIASES.get(text.lower(), text.upper())
    if key not in DTYPES or not DTYPES[key].is_float:
        choices = "float32, float16, bfloat16, float64, float8_e4m3fn, float8_e5m2"
        raise ValueError(f"unknown output dtype {text!r} (choose one of {choices})")
    return DTYPES[key]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a header; ``start`` is the absolute byte offset in its file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in data-offset order
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0  # length of the JSON, as stored
    file_size: int = 0


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_header_length(prefix: bytes, where: str, file_size: int) -> int:
    """Decode and bound the 8-byte length prefix before anything is allocated from it."""
    if len(prefix) < 8:
        raise InputError(
            f"{where}: file is {len(prefix)} bytes, too short to be safetensors",
            hint="the file is truncated or not a safetensors file; download it again",
        )
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise InputError(
            f"{where}: header claims {n} bytes (limit {MAX_HEADER_BYTES})",
            hint="the file is corrupted or not a safetensors file",
        )
    if 8 + n > file_size:
        raise InputError(
            f"{where}: header claims {n} bytes but the file has only {file_size}",
            hint="the file is truncated; download it again",
        )
    return n


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def parse_header(raw: bytes, where: str, file_size: int) -> Header:
    """Validate a header's JSON ``raw`` against a file of ``file_size`` bytes.

    Enforces every rule of the format: JSON object, known dtypes, non-negative integer shapes,
    offsets matching shape x dtype, a data buffer covered exactly once (no overlap, no hole, no
    trailing bytes).
    """
    header_len = len(raw)
    data_len = file_size - 8 - header_len

    def bad(what: str, hint: str | None = None) -> InputError:
        return InputError(
            f"{where}: {what}",
            hint=hint or "the file is corrupted or was not written by a safetensors writer",
        )

    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as err:
        raise bad(f"header is not valid JSON ({err})") from err
    except RecursionError as err:  # e.g. "[[[[..." a hundred thousand deep
        raise bad("header JSON is nested too deeply") from err
    if not isinstance(obj, dict):
        raise bad("header is not a JSON object")

    metadata: dict[str, str] = {}
    raw_meta = obj.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
        ):
            raise bad("__metadata__ must map strings to strings")
        metadata = raw_meta

    # Written for speed as well as rules (a checkpoint of 10,000 tensors has 10,000 entries
    # per side, parsed before anything else runs): no generator or temporary set per entry,
    # and the size computed once.
    entries: list[TensorInfo] = []
    start0 = 8 + header_len
    for name, entry in obj.items():
        if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
            raise bad(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype_name = entry["dtype"]
        dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise InputError(
                f"{where}: tensor {name!r} has unsupported dtype {entry['dtype']!r}",
                hint=f"fapm reads {', '.join(DTYPES)}",
            )
        shape = entry["shape"]
        if type(shape) is not list:
            raise bad(f"tensor {name!r}: shape must be a list of non-negative integers")
        size = bound = dtype.itemsize
        for d in shape:
            if type(d) is not int or d < 0:  # bool is an int subclass: refused by type()
                raise bad(f"tensor {name!r}: shape must be a list of non-negative integers")
            size *= d
            bound *= d or 1
        if bound >= 2**63:
            # torch refuses (with an overflow error) any shape whose sizes overflow int64,
            # even when a zero dimension makes it empty.
            raise bad(f"tensor {name!r}: shape {shape} is too large")
        offsets = entry["data_offsets"]
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
        ):
            raise bad(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise bad(
                f"tensor {name!r}: data_offsets [{begin}, {end}] outside the data buffer "
                f"of {data_len} bytes",
                # The usual cause: an interrupted download that cut the file short.
                "the file is truncated or corrupted; download it again" if end > data_len else None,
            )
        if size != end - begin:
            raise bad(
                f"tensor {name!r}: {end - begin} bytes do not match shape {list(shape)} "
                f"of {dtype.name}"
            )
        entries.append(TensorInfo(name, dtype, tuple(shape), start0 + begin, end - begin))

    entries.sort(key=lambda t: (t.start, t.nbytes))
    cursor = 8 + header_len
    for info in entries:
        if info.start != cursor:
            kind = "overlaps the previous tensor" if info.start < cursor else "leaves a gap"
            raise bad(f"tensor {info.name!r} {kind} in the data buffer")
        cursor += info.nbytes
    if cursor != file_size:
        raise bad(f"{file_size - cursor} trailing bytes after the last tensor")
    return Header(
        {t.name: t for t in entries}, metadata, header_bytes=header_len, file_size=file_size
    )


def read_header(path: str, display: str | None = None) -> Header:
    """Read and validate the header of the local file ``path``."""
    where = display or path
    try:
        # O_NONBLOCK: opening a FIFO named *.safetensors must not hang; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            what = "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"
            raise InputError(
                f"{where}: {what}, expected a .safetensors file",
                hint="point to a .safetensors file or a checkpoint directory",
            )
        with os.fdopen(fd, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            n = read_header_length(f.read(8), where, size)
            raw = f.read(n)
    except OSError as err:
        raise InputError(
            f"{where}: cannot read ({err.strerror or err})", hint="check the path and permissions"
        ) from err
    if len(raw) != n:
        raise InputError(f"{where}: file shrank while reading", hint="is it being written to?")
    return parse_header(raw, where, size)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def build_header(tensors: Iterable[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The complete prefix (length + JSON + padding) of a file holding ``tensors`` in order."""
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        obj[t.name] = {
            "dtype": t.dtype.name,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    return struct.pack("<Q", len(text)) + text
