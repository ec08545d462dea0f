"""What a checkpoint holds, whether two pair up, and whether a copy is intact.

``inspect`` and ``compare`` read headers only (never tensor data) and never import torch, so they
take milliseconds on any size of model. ``verify`` reads every byte of every shard once, in
blocks, and checks them against the per-shard byte counts and sha256 digests that fapm's writer
records in the index (``metadata.shards``).

Everything here returns plain frozen records; ``report`` renders them as tables or JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from fapm_cli.errors import InputError, UsageError
from fapm_cli.io.adapter import ADAPTER_CONFIG
from fapm_cli.io.quantized import block_size, method_of, open_block_fp8, quantization_config
from fapm_cli.io.reader import Checkpoint
from fapm_cli.pairing import Difference, differences
from fapm_cli.plan import (
    FORMAT_KEY,
    KIND_KEY,
    KNOWN_KINDS,
    MODEL_KIND,
    PROVENANCE_PREFIX,
    TASK_VECTOR_KIND,
    tied_heads,
)

ADAPTER_KIND = "adapter"  # a PEFT adapter (no fapm metadata): fapm prune takes it as --finetuned
_READ_BLOCK = 8 << 20  # verify reads shards in blocks of this size: memory stays flat


@dataclass(frozen=True)
class ShardSummary:
    name: str
    tensors: int
    file_bytes: int
    header_bytes: int


@dataclass(frozen=True)
class DtypeSummary:
    dtype: str
    tensors: int
    parameters: int
    bytes: int


@dataclass(frozen=True)
class ConfigSummary:
    architecture: str | None
    model_type: str | None
    hidden_size: int | None
    layers: int | None
    vocab_size: int | None
    torch_dtype: str | None
    quantization: str | None = None  # quantization_config's quant_method
    block_size: tuple[int, int] | None = None  # its weight_block_size (block FP8)


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: str
    parameters: int
    bytes: int


@dataclass(frozen=True)
class Inspection:
    source: str
    kind: str  # fapm.kind, "model" when absent
    format: str | None  # fapm.format for task vectors ("dense" when absent); None for others
    written_by_fapm: bool
    index: str | None
    shards: list[ShardSummary]
    tensor_count: int
    parameters: int
    tensor_bytes: int
    file_bytes: int
    dtypes: list[DtypeSummary]
    config: ConfigSummary | None
    metadata: dict[str, str]  # __metadata__ of the first shard
    provenance: dict[str, str]  # its fapm.* keys
    index_metadata: dict[str, object]
    tensors: list[TensorRow] | None  # only when asked for
    warnings: list[str] = field(default_factory=list)


def inspect(checkpoint: Checkpoint, tensors: bool = False, match: str | None = None) -> Inspection:
    """Summarise ``checkpoint`` from its headers, index and config.json."""
    warnings: list[str] = []
    shards = [
        ShardSummary(name, len(h.tensors), h.file_size, h.header_bytes)
        for name, h in sorted(checkpoint.shards.items())  # by file name
    ]
    by_dtype: dict[str, list[int]] = {}
    for ref in checkpoint.tensors.values():
        row = by_dtype.setdefault(ref.info.dtype.name, [0, 0, 0])
        row[0] += 1
        row[1] += ref.info.numel
        row[2] += ref.info.nbytes
    dtypes = [DtypeSummary(d, *v) for d, v in sorted(by_dtype.items(), key=lambda kv: -kv[1][2])]
    meta = checkpoint.metadata
    for shard, header in checkpoint.shards.items():
        if _provenance(header.metadata) != _provenance(meta):
            warnings.append(f"shard {shard} carries different fapm.* metadata than the first shard")
            break
    kind = meta.get(KIND_KEY, MODEL_KIND)
    if KIND_KEY not in meta and ADAPTER_CONFIG in checkpoint.extra_files:
        kind = ADAPTER_KIND  # a PEFT adapter: fapm prune takes it as --finetuned
    fmt = meta.get(FORMAT_KEY, "dense") if kind == TASK_VECTOR_KIND else meta.get(FORMAT_KEY)
    rows = None
    if tensors or match is not None:
        pattern = compile_match(match)
        rows = [
            TensorRow(
                name,
                ref.info.shape,
                ref.info.dtype.name,
                ref.shard,
                ref.info.numel,
                ref.info.nbytes,
            )
            for name, ref in checkpoint.tensors.items()
            if pattern is None or pattern.search(name)
        ]
    return Inspection(
        source=checkpoint.display,
        kind=kind,
        format=fmt,
        written_by_fapm="fapm.version" in meta,
        index=checkpoint.index_name,
        shards=shards,
        tensor_count=len(checkpoint.tensors),
        parameters=sum(r.info.numel for r in checkpoint.tensors.values()),
        tensor_bytes=checkpoint.total_bytes,
        file_bytes=sum(s.file_bytes for s in shards),
        dtypes=dtypes,
        config=read_config(checkpoint, warnings),
        metadata=meta,
        provenance=_provenance(meta),
        index_metadata={k: v for k, v in checkpoint.index_metadata.items() if k != "shards"},
        tensors=rows,
        warnings=warnings,
    )


def compile_match(text: str | None) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as err:
        raise UsageError(
            f"--match {text!r} is not a valid regular expression ({err})",
            hint="use Python regex syntax, e.g. 'layers\\.0\\..*q_proj'",
        ) from err


def _provenance(meta: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k.startswith(PROVENANCE_PREFIX)}


def _int(obj: dict[str, object], *keys: str) -> int | None:
    for k in keys:
        v = obj.get(k)
        if type(v) is int:
            return v
    return None


def read_config(checkpoint: Checkpoint, warnings: list[str]) -> ConfigSummary | None:
    """The few config.json fields people look for; None when there is no config.json.

    A malformed config is a warning, not an error: fapm never needs it to read the weights.
    Multimodal configs keep the language model's sizes under ``text_config``.
    """
    if "config.json" not in checkpoint.extra_files:
        return None
    try:
        obj = json.loads(checkpoint.source.read_text("config.json", limit=10_000_000))
    except (InputError, ValueError) as err:
        warnings.append(f"config.json ignored: {err}")
        return None
    if not isinstance(obj, dict):
        warnings.append("config.json ignored: not a JSON object")
        return None
    text = obj.get("text_config")
    inner: dict[str, object] = text if isinstance(text, dict) else {}
    archs = obj.get("architectures")
    arch = ", ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else None

    def pick(*keys: str) -> int | None:
        value = _int(obj, *keys)
        return value if value is not None else _int(inner, *keys)

    dtype = obj.get("torch_dtype", obj.get("dtype"))
    model_type = obj.get("model_type")
    quant = obj.get("quantization_config")
    return ConfigSummary(
        architecture=arch or None,
        model_type=model_type if isinstance(model_type, str) else None,
        hidden_size=pick("hidden_size", "n_embd", "d_model"),
        layers=pick("num_hidden_layers", "n_layer", "num_layers"),
        vocab_size=pick("vocab_size"),
        torch_dtype=dtype if isinstance(dtype, str) else None,
        quantization=method_of(quant) if isinstance(quant, dict) else None,
        block_size=block_size(quant) if isinstance(quant, dict) else None,
    )


# -- compare ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    a_kind: str
    b_kind: str
    common: int
    only_a: list[str]
    only_b: list[str]
    differences: list[Difference]

    @property
    def compatible(self) -> bool:
        """True when ``prune`` (with default options) would accept A as base and B as
        finetuned: same tensor names, same shapes, no integer-vs-float pair."""
        return (
            not self.only_a
            and not self.only_b
            and not any(d.incompatible for d in self.differences)
        )


def compare(a: Checkpoint, b: Checkpoint) -> Comparison:
    """Pair ``a`` (base) and ``b`` (finetuned) by tensor name, by the rules ``prune`` applies
    (``pairing``, and ``plan.tied_heads`` for a head tied on one side only): a block-FP8 side
    as the dequantized weights prune reads (no scale tensors)."""
    a, b = _as_read(a), _as_read(b)
    tied_a, untied = tied_heads(a, b)
    diffs: list[Difference] = []
    common = 0
    for name, rb in b.tensors.items():
        ra = a.tensors.get(name) or tied_a.get(name)
        if ra is not None:
            common += 1
            diffs.extend(differences(name, ra.info, rb.info))
    return Comparison(
        a=a.display,
        b=b.display,
        a_kind=a.metadata.get(KIND_KEY, MODEL_KIND),
        b_kind=b.metadata.get(KIND_KEY, MODEL_KIND),
        common=common,
        only_a=[n for n in a.tensors if n not in b.tensors and n not in untied],
        only_b=[n for n in b.tensors if n not in a.tensors and n not in tied_a],
        differences=diffs,
    )


def _as_read(c: Checkpoint) -> Checkpoint:
    """``c`` as the commands read it: a block-FP8 checkpoint's dequantized view (its scales
    unchecked here: prune reports a mismatch itself)."""
    block = block_size(quantization_config(c))
    if block is None:
        return c
    try:
        return open_block_fp8(c, block).view()
    except InputError:
        return c


# -- verify -----------------------------------------------------------------------------------


class ShardStatus(StrEnum):
    OK = "ok"  # bytes and sha256 match the index
    UNRECORDED = "unrecorded"  # read fine; the index records no digest to compare against
    CORRUPTED = "corrupted"  # bytes or sha256 differ from the index


@dataclass(frozen=True)
class ShardCheck:
    name: str
    bytes: int
    sha256: str
    expected_bytes: int | None
    expected_sha256: str | None
    status: ShardStatus


@dataclass(frozen=True)
class Verification:
    source: str
    shards: list[ShardCheck]
    problems: list[str]  # each names a shard or the index; non-empty means the copy is bad
    warnings: list[str]
    recorded: bool  # the index carries fapm's per-shard digests

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    checkpoint: Checkpoint, progress: Callable[[int], None] = lambda n: None
) -> Verification:
    """Re-read every byte of every shard and check it against what the index records.

    The header rules and the index-versus-shards rules were already enforced when the
    checkpoint was opened (a violation is an ``InputError`` there); here the data itself is
    read, so an unreadable sector, a file changed since it was opened, or a flipped byte in
    tensor data is found too.
    """
    problems: list[str] = []
    warnings: list[str] = []
    where = checkpoint.display
    raw = checkpoint.index_metadata.get("shards")
    recorded: dict[str, object] = raw if isinstance(raw, dict) else {}
    if raw is not None and not isinstance(raw, dict):
        problems.append(f"{where}/{checkpoint.index_name}: metadata.shards is not an object")
    for name in recorded:
        if name not in checkpoint.shards:
            problems.append(f"{where}: index records shard {name!r}, which the index does not use")

    checks: list[ShardCheck] = []
    for name, header in sorted(checkpoint.shards.items()):
        size, digest = _hash_file(checkpoint, name, progress)
        if size != header.file_size:
            problems.append(
                f"{where}/{name}: {size} bytes now, {header.file_size} when its header was read"
            )
        entry = recorded.get(name)
        exp_bytes = exp_sha = None
        if isinstance(entry, dict):
            exp_bytes = entry.get("bytes") if type(entry.get("bytes")) is int else None
            exp_sha = entry.get("sha256") if isinstance(entry.get("sha256"), str) else None
        if recorded and (exp_bytes is None or exp_sha is None):
            problems.append(f"{where}: index records no bytes/sha256 for shard {name}")
        status = ShardStatus.UNRECORDED
        if exp_bytes is not None and exp_sha is not None:
            status = ShardStatus.OK
            if size != exp_bytes:
                status = ShardStatus.CORRUPTED
                problems.append(f"{where}/{name}: {size} bytes, the index records {exp_bytes}")
            elif digest != exp_sha:
                status = ShardStatus.CORRUPTED
                problems.append(f"{where}/{name}: sha256 differs from the one the index records")
        checks.append(ShardCheck(name, size, digest, exp_bytes, exp_sha, status))

    total = checkpoint.index_metadata.get("total_size")
    if type(total) is int and total != checkpoint.total_bytes:
        text = (
            f"{where}/{checkpoint.index_name}: total_size {total} but the tensors hold "
            f"{checkpoint.total_bytes} bytes"
        )
        # Some published checkpoints have a stale total_size; fapm's own outputs never do.
        (problems if recorded else warnings).append(text)
    first = _provenance(checkpoint.metadata)
    for name, header in checkpoint.shards.items():
        if _provenance(header.metadata) != first:
            problems.append(f"{where}/{name}: fapm.* metadata differs from the first shard's")
    kind = first.get(KIND_KEY)
    if kind is not None and kind not in KNOWN_KINDS:
        warnings.append(f"{where}: unknown fapm.kind {kind!r} (this fapm knows {KNOWN_KINDS})")
    return Verification(where, checks, problems, warnings, recorded=bool(recorded))


def _hash_file(
    checkpoint: Checkpoint, name: str, progress: Callable[[int], None]
) -> tuple[int, str]:
    path = checkpoint.source.local_path(name)
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                got = os.readv(fd, [view])
                if got == 0:
                    break
                digest.update(view[:got])
                size += got
                progress(got)
        finally:
            os.close(fd)
            checkpoint.source.release(name)  # a Hub shard need not stay cached
    except OSError as err:
        raise InputError(
            f"{checkpoint.display}/{name}: cannot read ({err.strerror})",
            hint="the shard is unreadable or was removed; fetch it again",
        ) from err
    return size, digest.hexdigest()


def shard_bytes(checkpoint: Checkpoint) -> int:
    """Total size of the shard files, for a progress bar over ``verify``."""
    return sum(h.file_size for h in checkpoint.shards.values())


def names_preview(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
