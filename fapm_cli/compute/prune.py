"""The per-tensor operations of ``prune``: ``base + mask * tau`` for one tensor, chunk by chunk.

Kept entries are finetuned's bytes and dropped entries base's bytes whenever the dtypes allow it
(math in float32, float64 for float64 inputs; storage in the output dtype). The selection itself
(scores, the exact threshold, the tie rule, the masks) is ``scoring``'s; this module turns a
selection into output bytes and the per-tensor record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from fapm_cli.compute import native, scoring
from fapm_cli.compute.scoring import CHUNK, Workspace
from fapm_cli.errors import InputError
from fapm_cli.plan import Action, Item, Method, PruneOptions, keep_count
from fapm_cli.records import TensorResult


def check_finite(chunk: torch.Tensor, name: str, side: str) -> None:
    if not bool(torch.isfinite(scoring.widened(chunk)).all()):
        raise InputError(
            f"tensor {name!r} in {side} contains NaN or Inf",
            hint="the checkpoint is damaged or diverged in training; fapm cannot score it",
        )


def dare_scale(opts: PruneOptions | None) -> float:
    """DARE (``random``) rescales what it keeps by 1 / (1 - s); the ranked methods keep tau."""
    if opts is None or opts.method is not Method.RANDOM or not 0 < opts.sparsity < 1:
        return 1.0
    return float(1 / (1 - opts.sparsity))


def iter_keep_masks(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    opts: PruneOptions,
    ws: Workspace | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, keep_mask)`` for consecutive chunks of the flattened tensor.

    Exactly ``k = floor(numel * (1 - s))`` entries are kept for the ranked methods; ``random``
    keeps each with probability ``1 - s``. NaN/Inf in either input is an error.
    """
    yield from _keep_masks(name, base, finetuned, opts, ws or Workspace(), None)


@dataclass
class _TauStats:
    """Statistics of tau that the ranked scoring pass computes on the way."""

    sq_total: float = 0.0


def _keep_masks(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    opts: PruneOptions,
    ws: Workspace,
    stats: _TauStats | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    b = base.reshape(-1)
    f = finetuned.reshape(-1)
    n = b.numel()

    if opts.method is Method.RANDOM:
        keep = float(1 - opts.sparsity)
        for block, c in enumerate(range(0, n, scoring.RANDOM_BLOCK)):
            stop = min(c + scoring.RANDOM_BLOCK, n)
            check_finite(b[c:stop], name, "base")
            check_finite(f[c:stop], name, "finetuned")
            yield c, stop, scoring.random_mask_block(opts.seed, name, block, stop - c, keep)
        return

    def nonfinite(start: int, stop: int) -> None:  # sum(tau^2) was not finite: find out why
        check_finite(b[start:stop], name, "base")
        check_finite(f[start:stop], name, "finetuned")

    # Pass 1 scores every entry into order-preserving integer keys (the only full-size
    # temporary) and selects the exact threshold; pass 2 yields masks in flat order.
    k = keep_count(n, opts.sparsity)
    ranked = scoring.rank_tensor(opts.method, b, f, k, opts.lam, nonfinite, ws)
    if stats is not None:
        stats.sq_total = ranked.sq_total
    try:
        yield from scoring.keep_masks(ranked)
    finally:
        ranked.release()  # masks are fresh tensors: the keys may be reused now


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of the same bytes, so that selecting entries copies them bit for bit."""
    return t.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def prune_tensor(
    item: Item,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    opts: PruneOptions,
    write: Callable[[torch.Tensor], None],
    ws: Workspace,
    *,
    on_mask: Callable[[int, int, torch.Tensor], None] | None = None,
    inplace: bool = False,
) -> TensorResult:
    """Write ``base + mask * tau`` for one tensor, chunk by chunk; kept entries are finetuned's
    bytes and dropped entries base's bytes whenever the dtypes allow it.

    ``on_mask(start, stop, mask)`` sees each chunk's keep mask just before its output chunk is
    written (task-vector outputs need both). ``inplace``: ``finetuned`` is the caller's own
    buffer, which the output may overwrite (and ``write`` then receives views of it)."""
    out_dtype = getattr(torch, item.out.dtype.torch_name)
    b = base.reshape(-1)
    f = finetuned.reshape(-1)
    cdt = scoring.compute_dtype(b.dtype, f.dtype)
    if (
        on_mask is None
        and opts.method is not Method.RANDOM
        and b.dtype == f.dtype == out_dtype
        and ws.on_cpu  # --device cuda: keys live on the GPU
        and (kern := scoring.native_kernels(b, f, cdt)) is not None
    ):
        return _prune_native(kern, item, b, f, opts, write, ws, inplace)
    scale = dare_scale(opts)
    same = b.dtype == f.dtype == out_dtype
    ranked = opts.method is not Method.RANDOM
    stats = _TauStats()
    kept = keep_count(b.numel(), opts.sparsity) if ranked else 0
    sq_kept = 0.0
    sq_total = 0.0
    for start, stop, mask in _keep_masks(item.name, base, finetuned, opts, ws, stats):
        bc, fc = b[start:stop], f[start:stop]
        if ranked and same:
            # The output is finetuned's bytes where kept and base's elsewhere, so out - base
            # is tau where kept and exactly 0 elsewhere: no mask arithmetic for the statistic.
            out = _bits(torch.where(mask, _bits(fc), _bits(bc))).view(out_dtype)
            kept_tau = torch.sub(scoring.widened(out), bc.to(cdt))
            sq_kept += float(torch.sum(kept_tau.mul_(kept_tau), dtype=torch.float64))
        else:
            tau = fc.to(cdt) - bc.to(cdt)
            tau2 = tau * tau
            if not ranked:
                sq_total += float(tau2.sum(dtype=torch.float64))
                kept += int(mask.sum())
            sq_kept += float(tau2.masked_fill_(~mask, 0).sum(dtype=torch.float64))
            if scale != 1.0:
                new = (bc.to(cdt) + tau.mul_(scale)).to(out_dtype)
                out = torch.where(mask, new, bc.to(out_dtype))
            elif same:
                out = _bits(torch.where(mask, _bits(fc), _bits(bc))).view(out_dtype)
            else:
                out = torch.where(mask, fc.to(out_dtype), bc.to(out_dtype))
        if on_mask is not None:
            on_mask(start, stop, mask)
        write(out)
    return TensorResult(
        item.name,
        item.out.shape,
        item.out.dtype.name,
        item.action,
        b.numel(),
        kept,
        sq_kept,
        stats.sq_total if ranked else sq_total,
    )


# Elements per output chunk of the C kernel path: one chunk per task on the scoring threads.
NATIVE_OUT_CHUNK = 1 << 20


def _prune_native(
    kern: native.Kernels,
    item: Item,
    b: torch.Tensor,
    f: torch.Tensor,
    opts: PruneOptions,
    write: Callable[[torch.Tensor], None],
    ws: Workspace,
    inplace: bool,
) -> TensorResult:
    """``prune_tensor`` with the C kernels: the same bytes, one pass per element for the output.

    Chunks are independent once each knows how many of the keys equal to the threshold it
    may keep (counted first, only when the tie quota runs out inside the tensor), so they run
    on the scoring threads and are written in order. In place, the output overwrites
    ``finetuned`` chunk by chunk: no allocation, no page faults."""
    n = b.numel()
    k = keep_count(n, opts.sparsity)

    def nonfinite(start: int, stop: int) -> None:
        check_finite(b[start:stop], item.name, "base")
        check_finite(f[start:stop], item.name, "finetuned")

    if n <= scoring.SMALL_TENSOR:
        # One kernel call: the steps below (rank_tensor's small path, one output chunk) with
        # no Python between them; most of a tiny tensor's time was those calls.
        out = f if inplace else torch.empty_like(f)
        done = kern.prune_small(opts.method.value, b, f, opts.lam, k, out, False)
        if done is None:  # sum(tau^2) is not finite: refuse NaN/Inf inputs, else go on
            nonfinite(0, n)
            done = kern.prune_small(opts.method.value, b, f, opts.lam, k, out, True)
            assert done is not None
        sq_total, sq_kept, kept = done
        if kept != k:
            raise AssertionError(f"{item.name}: kept {kept} entries, expected {k}")
        write(out)
        return TensorResult(
            item.name, item.out.shape, item.out.dtype.name, item.action, n, k, sq_kept, sq_total
        )
    ranked = scoring.rank_tensor(opts.method, b, f, k, opts.lam, nonfinite, ws)
    try:
        starts = range(0, n, NATIVE_OUT_CHUNK)

        def chunk(i: int, key: int, ties: int) -> tuple[torch.Tensor, float, int]:
            c = starts[i]
            sl = slice(c, c + NATIVE_OUT_CHUNK)
            out = f[sl] if inplace else torch.empty_like(f[sl])
            sq, kept, _ = kern.select_write(ranked.keys[sl], key, ties, b[sl], f[sl], out)
            return out, sq, kept

        results: Iterable[tuple[torch.Tensor, float, int]]
        if len(starts) == 1:  # one chunk keeps every tie: no quota, no thread, no slices
            out = f if inplace else torch.empty_like(f)
            key, ties = ranked.threshold.int32_rule(n)
            sq, count, _ = kern.select_write(ranked.keys, key, ties, b, f, out)
            results = [(out, sq, count)]
        else:
            key, quota = scoring.tie_quotas(ranked, NATIVE_OUT_CHUNK, kern.count_eq, ws.workers)
            if inplace:  # chunks run ahead on the scoring threads; written in order
                results = scoring.imap_chunks(
                    lambda i: chunk(i, key, quota[i]), range(len(starts)), ws.workers
                )
            else:  # fresh chunks: one at a time, so memory stays one chunk
                results = (chunk(i, key, quota[i]) for i in range(len(starts)))
        sq_kept = 0.0
        kept = 0
        for out, sq, count in results:
            sq_kept += sq
            kept += count
            write(out)
    finally:
        ranked.release()
    if kept != k:
        raise AssertionError(f"{item.name}: kept {kept} entries, expected {k}")
    return TensorResult(
        item.name, item.out.shape, item.out.dtype.name, item.action, n, k, sq_kept,
        ranked.sq_total,
    )  # fmt: skip


def _whole(
    item: Item,
    tensor: torch.Tensor,
    other: torch.Tensor | None,
    write: Callable[[torch.Tensor], None],
) -> TensorResult:
    """A tensor taken whole from one side (converted to the output dtype if asked)."""
    out_dtype = getattr(torch, item.out.dtype.torch_name)
    flat = tensor.reshape(-1)
    n = flat.numel()
    sq = 0.0
    if other is not None and item.action in (Action.BASE, Action.FINETUNED):
        o = other.reshape(-1)
        cdt = scoring.compute_dtype(flat.dtype, o.dtype)
        for c in range(0, n, CHUNK):
            d = flat[c : c + CHUNK].to(cdt) - o[c : c + CHUNK].to(cdt)
            sq += float((d * d).sum(dtype=torch.float64))
    for c in range(0, n, CHUNK):
        write(flat[c : c + CHUNK].to(out_dtype))
    kept = 0 if item.action is Action.BASE else n
    return TensorResult(
        item.name, item.out.shape, item.out.dtype.name, item.action, n, kept,
        sq if kept else 0.0, sq,
    )  # fmt: skip


def process_item(
    item: Item,
    base: torch.Tensor | None,
    finetuned: torch.Tensor | None,
    opts: PruneOptions,
    write: Callable[[torch.Tensor], None],
    ws: Workspace,
    *,
    on_mask: Callable[[int, int, torch.Tensor], None] | None = None,
    inplace: bool = False,
) -> TensorResult:
    """One item's output tensor, chunk by chunk, exactly as ``fapm prune`` writes it.

    ``inplace``: ``finetuned`` is a buffer of the caller's that the output may overwrite."""
    if item.action is Action.PRUNE:
        assert base is not None and finetuned is not None
        if item.resized:  # added tokens: base's rows pruned as one tensor, the rest whole
            n = base.numel()
            f = finetuned.reshape(-1)
            result = prune_tensor(
                item, base, f[:n], opts, write, ws, on_mask=on_mask, inplace=inplace
            )
            out_dtype = getattr(torch, item.out.dtype.torch_name)
            for c in range(n, f.numel(), CHUNK):
                chunk = f[c : c + CHUNK].to(out_dtype)
                if on_mask is not None:
                    on_mask(c, c + chunk.numel(), torch.ones(chunk.numel(), dtype=torch.bool))
                write(chunk)
            return result
        return prune_tensor(
            item, base, finetuned, opts, write, ws, on_mask=on_mask, inplace=inplace
        )
    if item.action is Action.BASE:
        assert base is not None
        return _whole(item, base, finetuned, write)
    assert finetuned is not None
    return _whole(item, finetuned, base, write)
