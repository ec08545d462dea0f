"""Writing task vectors: how each tensor is stored (a dense delta, whole values, or compact
kept values + positions) and the per-tensor encoder that produces those tensors.

Exactness (docs/formats.md): a dense delta is written only after checking, tensor by tensor,
that ``taskvector.reconstruct(base, delta)`` gives the target bytes back. The output layout is
planned before any data is seen, so the first pass assumes the narrowest delta dtype; if a
tensor fails the check (``Unexact``), the writer abandons that pass, decides every tensor's
representation with a checking pass that writes nothing, and writes again. Real checkpoints take
the first pass only; adversarial values (negative zeros, 2^16 exponent gaps) cost two more.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fapm_cli.compute import native, scoring
from fapm_cli.compute import taskvector as tv
from fapm_cli.compute.prune import dare_scale, process_item
from fapm_cli.compute.scoring import CHUNK, Workspace
from fapm_cli.io.header import DType, PlannedTensor
from fapm_cli.plan import (
    COMPACT_VERSION,
    COMPACT_VERSION_KEY,
    DENSE_VERSION,
    DENSE_VERSION_KEY,
    EXACT_KEY,
    FORMAT_KEY,
    VALUES_KEY,
    Action,
    Format,
    Item,
    PruneOptions,
    Repr,
    keep_count,
)
from fapm_cli.records import TensorResult, TVTensor


class Unexact(Exception):
    """A delta dtype does not give a tensor back bit for bit (internal: triggers a re-plan)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class StoragePlan:
    item: Item
    repr: Repr
    dtype: DType  # delta dtype (DELTA), model dtype (VALUES), values dtype (SPARSE)
    layout: tv.CompactLayout | None = None

    def planned(self) -> list[PlannedTensor]:
        if self.layout is not None:
            return self.layout.planned()
        return [PlannedTensor(self.item.name, self.dtype, self.item.out.shape)]


def input_dtypes(item: Item) -> list[DType]:
    refs = (item.base, item.finetuned)
    return [item.out.dtype] + [r.info.dtype for r in refs if r is not None]


def _kept_count(item: Item, opts: PruneOptions | None) -> int:
    n = item.out.nbytes // item.out.dtype.itemsize
    if item.action is Action.BASE:
        return 0
    if item.action is Action.PRUNE and opts is not None:
        return keep_count(n, opts.sparsity)
    return n


def storage_plan(
    item: Item,
    fmt: Format,
    opts: PruneOptions | None,
    chosen: dict[str, DType | None],
    forced: DType | None,
) -> StoragePlan:
    if item.action is Action.COPY or item.resized:
        # A resized tensor has no delta of base's shape: it is stored as the model's values.
        return StoragePlan(item, Repr.VALUES, item.out.dtype)
    if fmt is Format.COMPACT:
        layout = tv.compact_layout(
            item.name, item.out.shape, _kept_count(item, opts), item.out.dtype
        )
        return StoragePlan(item, Repr.SPARSE, item.out.dtype, layout)
    if forced is not None:
        return StoragePlan(item, Repr.DELTA, forced)
    dtype = chosen.get(item.name, tv.delta_dtypes(*input_dtypes(item))[0])
    if dtype is None:
        return StoragePlan(item, Repr.VALUES, item.out.dtype)
    return StoragePlan(item, Repr.DELTA, dtype)


def tv_metadata(plans: Sequence[StoragePlan], fmt: Format, exact: bool) -> dict[str, str]:
    meta = {FORMAT_KEY: fmt.value}
    if fmt is Format.COMPACT:
        meta[COMPACT_VERSION_KEY] = COMPACT_VERSION
    else:
        meta[DENSE_VERSION_KEY] = DENSE_VERSION
        values = [p.item.name for p in plans if p.repr is Repr.VALUES]
        if values:
            meta[VALUES_KEY] = json.dumps(values, separators=(",", ":"))
    meta.update(tv.model_dtype_metadata({p.item.name: p.item.out.dtype for p in plans}))
    meta[EXACT_KEY] = "true" if exact else "false"
    return meta


@dataclass
class Encoder:
    """Turns one item's target chunks (the model values base + TV must give) into stored
    tensors; for dense deltas it checks that ``reconstruct`` gives each target back."""

    plan: StoragePlan
    base: torch.Tensor | None  # flat
    finetuned: torch.Tensor | None  # flat
    scale: float
    verify: bool
    begin: Callable[[str], None]
    write: Callable[[torch.Tensor], None]
    kept: int = 0
    _parts: list[torch.Tensor] = field(default_factory=list)
    _previous: int = -1

    def start(self) -> None:
        self.begin(self.plan.planned()[0].name)

    def chunk(self, start: int, stop: int, mask: torch.Tensor | None, target: torch.Tensor) -> None:
        """``mask`` None: every entry kept (BASE items pass an all-False mask)."""
        p = self.plan
        if p.repr is Repr.VALUES:
            self.kept += target.numel()
            self.write(target)
            return
        if p.repr is Repr.SPARSE:
            self._sparse(start, stop, mask, target)
            return
        if p.item.action is Action.BASE or self.finetuned is None:
            delta = torch.zeros(stop - start, dtype=tv.torch_dtype(p.dtype))
        else:
            assert self.base is not None
            bc, fc = self.base[start:stop], self.finetuned[start:stop]
            dd = tv.torch_dtype(p.dtype)
            if mask is None and self.scale == 1.0 and self._delta_native(bc, fc, dd, target):
                return
            if self.scale != 1.0:  # DARE's rescaled update, in prune_tensor's arithmetic
                cdt = scoring.compute_dtype(bc.dtype, fc.dtype)
                tau = (fc.to(cdt) - bc.to(cdt)).mul_(self.scale)
            else:  # in the delta dtype when wider: float64 is the fallback for lost bits
                cdt = scoring.compute_dtype(bc.dtype, fc.dtype, dd)
                tau = fc.to(cdt) - bc.to(cdt)
            delta = tau.to(dd)
            if mask is not None:
                delta.masked_fill_(~mask, 0)
        if self.verify:
            assert self.base is not None
            back = tv.reconstruct(self.base[start:stop], delta, target.dtype)
            if not tv.same_bits(back, target):
                raise Unexact(p.item.name)
        self.kept += int((delta != 0).sum())
        self.write(delta)

    def _delta_native(
        self, bc: torch.Tensor, fc: torch.Tensor, dd: torch.dtype, target: torch.Tensor
    ) -> bool:
        """A whole float32 delta chunk in one C pass (``fapm diff`` of bfloat16 or float32
        checkpoints: the subtraction, the exactness check and the count of torch's seven
        operations). False when the kernels do not apply or the check fails: then the torch
        path below writes the chunk or raises ``Unexact``, exactly as without kernels."""
        kern = native.kernels()
        if (
            kern is None
            or dd != torch.float32
            or not (bc.dtype == fc.dtype == target.dtype)
            or bc.dtype not in (torch.bfloat16, torch.float32)
            or not (bc.is_cpu and fc.is_cpu and bc.is_contiguous() and fc.is_contiguous())
            or target.data_ptr() != fc.data_ptr()  # the target is finetuned's own values
        ):
            return False
        delta = torch.empty(bc.numel(), dtype=torch.float32)
        exact, kept = kern.delta_f32(bc, fc, delta)
        if not exact and self.verify:
            return False
        self.kept += kept
        self.write(delta)
        return True

    def _sparse(
        self, start: int, stop: int, mask: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        layout = self.plan.layout
        assert layout is not None
        if mask is None:
            mask = torch.ones(stop - start, dtype=torch.bool)
        values = target[mask]
        self.kept += values.numel()
        if self.kept > layout.kept:
            raise AssertionError(f"{layout.name}: more kept entries than planned")
        self.write(values)
        if layout.positions == tv.MASK:
            self._parts.append(tv.pack_mask(mask))
        else:
            where = mask.nonzero().reshape(-1) + start
            dtype = tv.torch_dtype(tv.idx_dtype(layout.numel))
            self._parts.append(tv.encode_gaps(where, self._previous, dtype))
            if where.numel():
                self._previous = int(where[-1])

    def finish(self) -> None:
        layout = self.plan.layout
        if layout is None:
            return
        if self.kept != layout.kept:
            raise AssertionError(f"{layout.name}: kept {self.kept}, planned {layout.kept}")
        pos, shape = layout.planned()[1:]
        self.begin(pos.name)
        for part in self._parts:
            self.write(part)
        self.begin(shape.name)
        self.write(torch.tensor(layout.shape, dtype=torch.int64))

    def record(self) -> TVTensor:
        p = self.plan
        nbytes = sum(t.nbytes for t in p.planned())
        return TVTensor(
            p.item.name,
            p.item.out.shape,
            p.repr,
            p.dtype.name,
            p.item.out.dtype.name,
            p.item.out.nbytes // p.item.out.dtype.itemsize,
            self.kept,
            p.layout.positions if p.layout else None,
            nbytes,
        )


def encode_item(
    plan: StoragePlan,
    base: torch.Tensor | None,
    finetuned: torch.Tensor | None,
    opts: PruneOptions | None,
    verify: bool,
    begin: Callable[[str], None],
    write: Callable[[torch.Tensor], None],
    ws: Workspace,
) -> tuple[TensorResult | None, TVTensor]:
    """Write one item of a task vector. ``opts`` None: a diff (everything kept, no scoring)."""
    item = plan.item
    b = base.reshape(-1) if base is not None else None
    f = finetuned.reshape(-1) if finetuned is not None else None
    scale = dare_scale(opts) if item.action is Action.PRUNE else 1.0
    enc = Encoder(plan, b, f, scale, verify, begin, write)
    enc.start()
    result: TensorResult | None = None
    if opts is None:  # diff: the target is finetuned itself
        assert f is not None
        out = tv.torch_dtype(item.out.dtype)
        for c in range(0, f.numel(), CHUNK):
            enc.chunk(c, min(c + CHUNK, f.numel()), None, f[c : c + CHUNK].to(out))
    else:
        state: dict[str, object] = {"pos": 0, "mask": None}
        none_kept = item.action is Action.BASE

        def on_mask(start: int, stop: int, mask: torch.Tensor) -> None:
            state["mask"] = (start, mask)

        def on_target(chunk: torch.Tensor) -> None:
            start = int(state["pos"])  # type: ignore[call-overload]
            stop = start + chunk.numel()
            state["pos"] = stop
            pending = state["mask"]
            mask: torch.Tensor | None = None
            if pending is not None:
                assert isinstance(pending, tuple) and pending[0] == start
                mask = pending[1]
            elif none_kept:
                mask = torch.zeros(stop - start, dtype=torch.bool)
            enc.chunk(start, stop, mask, chunk.reshape(-1))

        result = process_item(item, base, finetuned, opts, on_target, ws, on_mask=on_mask)
    enc.finish()
    return result, enc.record()
