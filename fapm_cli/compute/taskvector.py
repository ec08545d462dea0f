"""Task vectors on disk: the dense and the compact format, as pure tensor functions.

A task vector (TV) checkpoint is what ``base + TV`` turns back into a model (see docs/formats.md
for the full specification). Two formats, declared by the ``fapm.format`` metadata key:

dense (``fapm diff``, ``fapm prune --save task-vector``)
    Same tensor names and shapes as the model; each float tensor holds ``delta = model - base``
    in a *delta dtype* at least float32, chosen per tensor so that ``reconstruct`` gives the
    model back bit for bit. A tensor no float delta can reproduce exactly (negative zeros, a
    fine-tuned value 2^16 times smaller than its base value, ...) is stored as the model's own
    values instead and listed in ``fapm.values``, as are non-float tensors.

compact (``fapm prune --save task-vector --layout compact``)
    For a pruned task vector: per tensor ``<name>::values`` (the model's values at the kept
    positions, in the model's dtype, flat order), the positions as ``<name>::mask`` (a packed
    bitmask) or ``<name>::idx`` (delta-coded indices), whichever is smaller, and
    ``<name>::shape``. Storing the model's values rather than deltas makes the format exact by
    construction and about a sixth of a dense bf16 tensor at sparsity 0.9 (2 bytes per kept
    entry + 1 bit per entry); the price is that a compact TV is tied to the base it was made
    from. Tensors stored whole (non-float ones) keep their plain name.

Why the delta dtype is checked rather than assumed: ``fl32(f) - fl32(b)`` is exact for bf16
inputs whose exponents differ by less than ~16, but not in general (f = 2^-100, b = 1 loses f
entirely), and no float format holds every difference of two bf16 values (that needs ~260
bits). ``-0.0`` cannot be told apart from ``+0.0`` by any difference. So the writer verifies
``reconstruct(b, delta) == f`` bit for bit and widens float32 -> float64 -> values as needed.

Nothing here reads or writes files; ``compute.encode`` (writing) and ``io.taskvector_io`` (reading)
wire these functions to the writer and the reader.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from fapm_cli.compute import native
from fapm_cli.io.header import DTYPES, DType, PlannedTensor
from fapm_cli.plan import MODEL_DTYPE_KEY, MODEL_DTYPES_KEY, VALUES_KEY

SEP = "::"
VALUES = "values"
MASK = "mask"
IDX = "idx"
SHAPE = "shape"
SUFFIXES = (VALUES, MASK, IDX, SHAPE)


def torch_dtype(d: DType) -> torch.dtype:
    return getattr(torch, d.torch_name)  # type: ignore[no-any-return]


# -- dense: deltas and their exact inverse ------------------------------------------------------


def delta_dtypes(*inputs: DType) -> list[DType]:
    """Candidate delta dtypes, narrowest first: float32 then float64, never narrower than an
    input (float64 inputs get float64 only)."""
    widest = max(d.itemsize for d in inputs)
    return [d for d in (DTYPES["F32"], DTYPES["F64"]) if d.itemsize >= widest]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when anything is float64, else float32 (the tool's precision policy)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def reconstruct(base: torch.Tensor, delta: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """``base + delta`` in the model's dtype, the inverse that every writer verifies against.

    Where delta is zero the result is base's bytes (so -0.0 in base survives an untouched
    entry); elsewhere ``fl_out(fl_c(base + delta))`` with c float32, or float64 if either is.
    """
    if (
        delta.dtype == torch.float32
        and base.dtype == out
        and out in (torch.bfloat16, torch.float32)
        and base.is_cpu
        and delta.is_cpu
        and base.is_contiguous()
        and delta.is_contiguous()
        and (kern := native.kernels()) is not None
    ):  # the same bits in one C pass instead of five torch operations
        result = torch.empty_like(base)
        if kern.apply_delta_f32(base, delta, result) >= 0:
            return result
    c = compute_dtype(base.dtype, delta.dtype)
    summed = (base.to(c) + delta.to(c)).to(out)
    return torch.where(delta == 0, base.to(out), summed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


# -- model dtypes in metadata -----------------------------------------------------------------


def model_dtype_metadata(dtypes: dict[str, DType]) -> dict[str, str]:
    """One key when every tensor shares a dtype (the usual case), the exceptions otherwise."""
    if not dtypes:
        return {}
    counts: dict[str, int] = {}
    for d in dtypes.values():
        counts[d.name] = counts.get(d.name, 0) + 1
    common = max(counts, key=lambda k: counts[k])
    meta = {MODEL_DTYPE_KEY: common}
    other = {n: d.name for n, d in dtypes.items() if d.name != common}
    if other:
        meta[MODEL_DTYPES_KEY] = json.dumps(other, separators=(",", ":"))
    return meta


def model_dtypes_from_metadata(meta: dict[str, str]) -> tuple[DType | None, dict[str, DType]]:
    """(the common model dtype, per-tensor exceptions); ValueError when malformed."""
    common = meta.get(MODEL_DTYPE_KEY)
    default = DTYPES[common] if common is not None else None
    if common is not None and default is None:
        raise ValueError(f"{MODEL_DTYPE_KEY} {common!r} is not a dtype")
    raw = json.loads(meta.get(MODEL_DTYPES_KEY, "{}"))
    if not isinstance(raw, dict) or not all(v in DTYPES for v in raw.values()):
        raise ValueError(f"{MODEL_DTYPES_KEY} is not an object of tensor name -> dtype")
    return default, {str(k): DTYPES[v] for k, v in raw.items()}


def values_from_metadata(meta: dict[str, str]) -> set[str]:
    raw = json.loads(meta.get(VALUES_KEY, "[]"))
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError(f"{VALUES_KEY} is not a list of tensor names")
    return set(raw)


# -- compact: positions ------------------------------------------------------------------------


def idx_dtype(numel: int) -> DType:
    """Narrowest signed integer that holds every gap (at most numel, see ``encode_gaps``)."""
    if numel < 1 << 15:
        return DTYPES["I16"]
    if numel < 1 << 31:
        return DTYPES["I32"]
    return DTYPES["I64"]


@dataclass(frozen=True)
class CompactLayout:
    """The stored tensors of one pruned tensor, known before any data (k is fixed by sparsity)."""

    name: str
    shape: tuple[int, ...]
    kept: int
    value_dtype: DType
    positions: str  # MASK or IDX

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def planned(self) -> list[PlannedTensor]:
        n = self.numel
        pos = (
            PlannedTensor(f"{self.name}{SEP}{MASK}", DTYPES["U8"], ((n + 7) // 8,))
            if self.positions == MASK
            else PlannedTensor(f"{self.name}{SEP}{IDX}", idx_dtype(n), (self.kept,))
        )
        return [
            PlannedTensor(f"{self.name}{SEP}{VALUES}", self.value_dtype, (self.kept,)),
            pos,
            PlannedTensor(f"{self.name}{SEP}{SHAPE}", DTYPES["I64"], (len(self.shape),)),
        ]


def compact_layout(
    name: str, shape: tuple[int, ...], kept: int, value_dtype: DType
) -> CompactLayout:
    """Bitmask (ceil(n/8) bytes) or indices (k x width), whichever is smaller; mask on a tie."""
    n = 1
    for d in shape:
        n *= d
    mask_bytes = (n + 7) // 8
    idx_bytes = kept * idx_dtype(n).itemsize
    return CompactLayout(name, shape, kept, value_dtype, IDX if idx_bytes < mask_bytes else MASK)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a flat bool mask into bytes, element 8i+j in bit j (LSB first) of byte i.

    The last byte is zero-padded. Chunks packed separately concatenate correctly as long as
    every chunk but the last has a multiple of 8 elements.
    """
    n = mask.numel()
    kern = native.kernels()
    if kern is not None and mask.is_cpu and mask.dtype == torch.bool and mask.is_contiguous():
        out = torch.empty((n + 7) // 8, dtype=torch.uint8)
        kern.pack_bits(mask, out)  # the same bytes, one pass instead of four torch ops
        return out
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = mask.reshape(-1)
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    kern = native.kernels()
    if (
        kern is not None
        and packed.is_cpu
        and packed.is_contiguous()
        and packed.dtype == torch.uint8
        and packed.numel() * 8 >= numel
    ):
        out = torch.empty(numel, dtype=torch.bool)
        kern.unpack_bits(packed, out)
        return out
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS) != 0  # (bytes, 8)
    return bits.reshape(-1)[:numel].clone()


def encode_gaps(positions: torch.Tensor, previous: int, dtype: torch.dtype) -> torch.Tensor:
    """Delta-code increasing flat positions: each minus the one before (``previous`` for the
    first; -1 at the start of a tensor, so every gap is at least 1)."""
    if positions.numel() == 0:
        return torch.empty(0, dtype=dtype)
    prev = torch.cat([torch.tensor([previous], dtype=torch.int64), positions[:-1]])
    return (positions - prev).to(dtype)


def decode_gaps(gaps: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat positions from gaps; ValueError unless strictly increasing and inside [0, numel)."""
    pos = gaps.to(torch.int64).cumsum(0) - 1
    if gaps.numel() and (bool((gaps <= 0).any()) or int(pos[-1]) >= numel):
        raise ValueError("indices are not increasing or fall outside the tensor")
    return pos


def positions_mask(layout_kind: str, raw: torch.Tensor, numel: int, kept: int) -> torch.Tensor:
    """The flat bool keep mask of a compact tensor; ValueError when inconsistent."""
    if layout_kind == MASK:
        if raw.numel() != (numel + 7) // 8:
            raise ValueError(f"mask has {raw.numel()} bytes, expected {(numel + 7) // 8}")
        mask = unpack_mask(raw, numel)
        if numel % 8 and int(raw[-1]) >> (numel % 8):
            raise ValueError("mask has bits set past the end of the tensor")
    else:
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[decode_gaps(raw, numel)] = True
    if int(mask.sum()) != kept:
        raise ValueError(f"positions mark {int(mask.sum())} entries but there are {kept} values")
    return mask


def apply_sparse(
    base: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, out: torch.dtype
) -> torch.Tensor:
    """The model tensor: the stored values at kept positions, base (cast to out) elsewhere;
    both copied bit for bit when the dtypes already match."""
    result = base.reshape(-1).to(out).clone()
    result[mask] = values.to(out)
    return result.reshape(base.shape)
