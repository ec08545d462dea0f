"""The per-tensor operation of ``fapm merge``: ``base + sum_i w_i * tau_i``, one chunk at a time.

Each input contributes ``(tau, touched)`` for a chunk: a fine-tune its pruned update (the masks
``prune`` would apply), a task vector its stored update. The sum is taken in float32 (float64
if any input is float64), input by input in the order given, and rounded once to the output
dtype; entries no input touches keep base's bytes.

Memory is bounded like ``prune``'s, whatever the number of inputs: a fine-tune is read whole
only to be ranked (its keep mask is then kept packed, 1 bit per entry), and the sum is built
chunk by chunk from slices read back from the files, so the full-size buffers in hand are
base, one fine-tune and the score keys, never a float32 sum of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fapm_cli.compute import scoring
from fapm_cli.compute import taskvector as tv
from fapm_cli.compute.prune import check_finite, dare_scale, process_item
from fapm_cli.compute.scoring import CHUNK, RANDOM_BLOCK, Workspace
from fapm_cli.io.header import PlannedTensor
from fapm_cli.plan import Item, Method, PruneOptions, Repr, keep_count

# Reads entries ``start:stop`` of one stored tensor, flat, from its file.
ReadRange = Callable[[int, int], torch.Tensor]


@dataclass
class FineTuned:
    """A fine-tune as a merge input: pruned with ``opts``, its kept update is tau."""

    item: Item  # the prune plan of this tensor against base
    weight: float
    read: Callable[[], torch.Tensor]  # the whole finetuned tensor
    read_range: ReadRange
    opts: PruneOptions
    stream: int = 0  # which fine-tune of the merge: DARE draws each one's mask independently
    _packed: torch.Tensor | None = field(default=None, repr=False)

    def prepare(self, base: torch.Tensor, ws: Workspace) -> None:
        """Rank the tensor (whole, as prune does) and keep its keep mask, packed."""
        if self.opts.method is Method.RANDOM:
            return  # DARE's mask is drawn per block from (seed, name, block): nothing to keep
        b = base.reshape(-1)
        f = self.read().reshape(-1)
        name = self.item.name

        def nonfinite(start: int, stop: int) -> None:
            check_finite(b[start:stop], name, "base")
            check_finite(f[start:stop], name, "finetuned")

        k = keep_count(b.numel(), self.opts.sparsity)
        ranked = scoring.rank_tensor(self.opts.method, b, f, k, self.opts.lam, nonfinite, ws)
        try:
            packed = torch.empty((b.numel() + 7) // 8, dtype=torch.uint8)
            for start, stop, mask in scoring.keep_masks(ranked):
                packed[start // 8 : (stop + 7) // 8] = tv.pack_mask(mask)
        finally:
            ranked.release()
        self._packed = packed

    def chunk(
        self, start: int, stop: int, base: torch.Tensor, cdt: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.read_range(start, stop)
        if self.opts.method is Method.RANDOM:
            check_finite(base, self.item.name, "base")
            check_finite(f, self.item.name, "finetuned")
            keep = float(1 - self.opts.sparsity)
            mask = scoring.random_mask_block(
                self.opts.seed, self.item.name, start // RANDOM_BLOCK, stop - start, keep,
                self.stream,
            )  # fmt: skip
        else:
            assert self._packed is not None
            mask = tv.unpack_mask(self._packed[start // 8 : (stop + 7) // 8], stop - start)
        tau = f.to(cdt) - base.to(cdt)
        scale = dare_scale(self.opts)
        if scale != 1.0:
            tau.mul_(scale)
        return tau, mask


@dataclass
class TaskVectorInput:
    """A task vector as a merge input: its stored update is tau (``repr`` as stored)."""

    repr: Repr
    weight: float
    read_range: ReadRange  # the delta, the whole values, or (compact) the kept values
    mask: Callable[[], torch.Tensor] | None = None  # compact: the flat keep mask
    _mask: torch.Tensor | None = field(default=None, repr=False)
    _values: torch.Tensor | None = field(default=None, repr=False)
    _offset: int = 0  # compact: kept values before the next chunk

    def prepare(self, base: torch.Tensor, ws: Workspace) -> None:
        if self.repr is Repr.SPARSE:
            assert self.mask is not None
            self._mask = self.mask()
            self._values = self.read_range(0, int(self._mask.sum()))
            self._offset = 0

    def chunk(
        self, start: int, stop: int, base: torch.Tensor, cdt: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.repr is Repr.DELTA:
            d = self.read_range(start, stop)
            return d.to(cdt), d != 0
        if self.repr is Repr.VALUES:
            v = self.read_range(start, stop)
            return v.to(cdt) - base.to(cdt), torch.ones(stop - start, dtype=torch.bool)
        assert self._mask is not None and self._values is not None
        mask = self._mask[start:stop]
        count = int(mask.sum())
        values = self._values[self._offset : self._offset + count]
        self._offset += count
        tau = torch.zeros(stop - start, dtype=cdt)
        tau[mask] = values.to(cdt) - base[mask].to(cdt)
        return tau, mask


Contribution = FineTuned | TaskVectorInput


def merge_tensor(
    target: PlannedTensor,
    base: torch.Tensor | None,
    inputs: Sequence[Contribution],
    write: Callable[[torch.Tensor], None],
    ws: Workspace,
    *,
    exact: Callable[[Callable[[torch.Tensor], None]], None] | None = None,
    dtypes: Sequence[torch.dtype] = (),
) -> int:
    """Write one merged tensor; returns how many entries differ from base (bitwise).

    ``exact(keep)``, given when the first input is applied as it is (one input of weight 1,
    a non-float tensor, or one only in the inputs), writes that input's model bytes chunk by
    chunk through ``keep``. ``dtypes``: the stored dtypes of every input tensor, which decide
    the compute dtype of the sum."""
    out = tv.torch_dtype(target.dtype)
    if exact is not None:
        changed = 0
        done = 0

        def keep(chunk: torch.Tensor) -> None:
            nonlocal changed, done
            chunk = chunk.reshape(-1)
            write(chunk.contiguous())
            size = chunk.numel()
            here = base.reshape(-1)[done : done + size] if base is not None else None
            if here is not None and here.numel() < size:  # rows base lacks (added tokens)
                changed += size - here.numel()
                chunk = chunk[: here.numel()]
            changed += _changed(chunk, here, out)
            done += size

        exact(keep)
        return changed

    assert base is not None
    b = base.reshape(-1)
    cdt = tv.compute_dtype(b.dtype, *dtypes)
    for contribution in inputs:
        contribution.prepare(base, ws)
    changed = 0
    n = b.numel()
    # CHUNK is a multiple of the vector width, so every element takes the same (vectorized or
    # not) arithmetic as in a whole-tensor sum: the chunks give the same bytes.
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        bc = b[start:stop]
        acc = torch.zeros(stop - start, dtype=cdt)
        touched = torch.zeros(stop - start, dtype=torch.bool)
        for contribution in inputs:
            tau, where = contribution.chunk(start, stop, bc, cdt)
            acc.add_(tau.masked_fill_(~where, 0), alpha=contribution.weight)
            touched |= where
        result = torch.where(touched, (bc.to(cdt) + acc).to(out), bc.to(out))
        write(result)
        changed += _changed(result, bc, out)
    return changed


def exact_finetuned(
    item: Item,
    base: torch.Tensor | None,
    read: Callable[[], torch.Tensor],
    opts: PruneOptions,
    ws: Workspace,
) -> Callable[[Callable[[torch.Tensor], None]], None]:
    """``merge_tensor``'s exact path for a fine-tune: prune's own output bytes."""

    def run(keep: Callable[[torch.Tensor], None]) -> None:
        process_item(item, base, read(), opts, keep, ws)

    return run


def _changed(result: torch.Tensor, base: torch.Tensor | None, out: torch.dtype) -> int:
    r = result.reshape(-1)
    if base is None:
        return r.numel()
    b = base.reshape(-1).to(out)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[r.element_size()]
    return int((r.view(width) != b.view(width)).sum())
