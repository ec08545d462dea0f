"""The streaming loop: pair tensors by name, decide what happens to each, score, select, write.

Headers of both checkpoints are paired and checked first (``plan_prune``), so a mismatch is
refused before any tensor data is read. Then tensors are processed one at a time, in the order
they lie in the finetuned checkpoint's shards; each is read whole (memory is bounded by the
largest tensor), scored in chunks, and written to the output chunk by chunk.

The engine never prints: it returns plain records, and reports progress through a callback.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import torch

from fapm_cli import scoring
from fapm_cli.errors import InputError, MismatchError, OutputError, ResourceError, UsageError
from fapm_cli.header import DType, PlannedTensor
from fapm_cli.pairing import pair_error
from fapm_cli.parts import Part
from fapm_cli.reader import Checkpoint, TensorReader, TensorRef
from fapm_cli.scoring import CHUNK, Method


class OnFinetunedOnly(StrEnum):
    ERROR = "error"
    COPY = "copy"


class OnBaseOnly(StrEnum):
    ERROR = "error"
    KEEP = "keep"


class Action(StrEnum):
    PRUNE = "prune"  # scored and pruned
    BASE = "base"  # left at its base value (a --keep-base pattern, or only in base)
    FINETUNED = "finetuned"  # taken whole from finetuned (a --keep-finetuned pattern)
    COPY = "copy"  # not a float tensor, or only in finetuned: copied from finetuned


@dataclass(frozen=True)
class PruneOptions:
    method: Method = Method.FAPM
    sparsity: Fraction = Fraction(9, 10)
    lam: float = 1.0
    seed: int = 0
    keep_base: tuple[str, ...] = ()
    keep_finetuned: tuple[str, ...] = ()
    on_finetuned_only: OnFinetunedOnly = OnFinetunedOnly.ERROR
    on_base_only: OnBaseOnly = OnBaseOnly.ERROR
    dtype: DType | None = None  # output dtype of float tensors; None: finetuned's

    def __post_init__(self) -> None:
        # Checked here, not only in the CLI, so every command and library caller gets it.
        if not 0 <= self.sparsity <= 1:
            raise UsageError(
                f"sparsity {float(self.sparsity)} is outside [0, 1]",
                hint="sparsity is the fraction of each task vector removed: 0.9 keeps 10%",
            )
        if not math.isfinite(self.lam) or self.lam < 0:
            raise UsageError(
                f"--lam {self.lam} is not a finite number >= 0",
                hint="give a finite --lam >= 0 (default 1.0)",
            )


@dataclass(frozen=True)
class Item:
    """One output tensor and where its inputs come from."""

    name: str
    action: Action
    base: TensorRef | None
    finetuned: TensorRef | None
    out: PlannedTensor

    @property
    def read_bytes(self) -> int:
        return sum(r.info.nbytes for r in (self.base, self.finetuned) if r is not None)


@dataclass(frozen=True)
class TensorResult:
    name: str
    shape: tuple[int, ...]
    dtype: str
    action: Action
    numel: int
    kept: int  # entries of the task vector kept (numel for finetuned/copy, 0 for base)
    sq_norm_kept: float  # sum of tau^2 over kept entries
    sq_norm: float  # sum of tau^2 over all entries


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _first(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def plan_prune(base: Checkpoint, finetuned: Checkpoint, opts: PruneOptions) -> list[Item]:
    """Pair tensors by name and decide each one's action; refuse mismatches up front."""
    only_ft = [n for n in finetuned.tensors if n not in base.tensors]
    only_base = [n for n in base.tensors if n not in finetuned.tensors]
    if only_ft and opts.on_finetuned_only is OnFinetunedOnly.ERROR:
        raise MismatchError(
            f"{len(only_ft)} tensor(s) only in finetuned {finetuned.display}: {_first(only_ft)}",
            hint="check that both are the same architecture; --on-finetuned-only copy "
            "copies them as they are",
        )
    if only_base and opts.on_base_only is OnBaseOnly.ERROR:
        raise MismatchError(
            f"{len(only_base)} tensor(s) only in base {base.display}: {_first(only_base)}",
            hint="check that both are the same architecture; --on-base-only keep "
            "keeps their base values",
        )
    both = [p for p in opts.keep_base if p in opts.keep_finetuned]
    if both:
        raise UsageError(
            f"pattern {both[0]!r} given to both --keep-base and --keep-finetuned",
            hint="a tensor either keeps its base value or its whole task vector: pick one",
        )

    items: list[Item] = []
    for name, f in finetuned.tensors.items():
        b = base.tensors.get(name)
        if b is None:
            items.append(Item(name, Action.COPY, None, f, _planned(name, f, opts)))
            continue
        refused = pair_error(name, b.info, f.info)  # shared with `fapm inspect --compare`
        if refused is not None:
            raise refused
        if not f.info.dtype.is_float:
            action = Action.COPY
        elif _match(name, opts.keep_base) and _match(name, opts.keep_finetuned):
            raise UsageError(
                f"tensor {name!r} matches both --keep-base and --keep-finetuned",
                hint="make the patterns disjoint",
            )
        elif _match(name, opts.keep_base):
            action = Action.BASE
        elif _match(name, opts.keep_finetuned):
            action = Action.FINETUNED
        else:
            action = Action.PRUNE
        items.append(Item(name, action, b, f, _planned(name, f, opts)))
    for name in only_base:
        b = base.tensors[name]
        items.append(Item(name, Action.BASE, b, None, _planned(name, b, opts)))
    return items


def _planned(name: str, main: TensorRef, opts: PruneOptions) -> PlannedTensor:
    dtype = main.info.dtype
    if opts.dtype is not None and dtype.is_float:
        dtype = opts.dtype
    return PlannedTensor(name, dtype, main.info.shape)


def unmatched_patterns(items: Sequence[Item], opts: PruneOptions) -> list[str]:
    """Patterns that select no tensor: almost always a typo worth a warning."""
    names = [i.name for i in items]
    return [
        p
        for p in (*opts.keep_base, *opts.keep_finetuned)
        if not any(fnmatch.fnmatchcase(n, p) for n in names)
    ]


# -- per-tensor work --------------------------------------------------------------------------


def _check_finite(chunk: torch.Tensor, name: str, side: str) -> None:
    if not bool(torch.isfinite(chunk).all()):
        raise InputError(
            f"tensor {name!r} in {side} contains NaN or Inf",
            hint="the checkpoint is damaged or diverged in training; fapm cannot score it",
        )


def iter_keep_masks(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    opts: PruneOptions,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, keep_mask)`` for consecutive chunks of the flattened tensor.

    Exactly ``k = floor(numel * (1 - s))`` entries are kept for the ranked methods; ``random``
    keeps each with probability ``1 - s``. NaN/Inf in either input is an error.
    """
    yield from _keep_masks(name, base, finetuned, opts, None)


@dataclass
class _TauStats:
    """Statistics of tau that the ranked scoring pass computes on the way."""

    sq_total: float = 0.0


def _keep_masks(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    opts: PruneOptions,
    stats: _TauStats | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    b = base.reshape(-1)
    f = finetuned.reshape(-1)
    n = b.numel()

    if opts.method is Method.RANDOM:
        keep = float(1 - opts.sparsity)
        for block, c in enumerate(range(0, n, scoring.RANDOM_BLOCK)):
            stop = min(c + scoring.RANDOM_BLOCK, n)
            _check_finite(b[c:stop], name, "base")
            _check_finite(f[c:stop], name, "finetuned")
            yield c, stop, scoring.random_mask_block(opts.seed, name, block, stop - c, keep)
        return

    def nonfinite(start: int, stop: int) -> None:  # sum(tau^2) was not finite: find out why
        _check_finite(b[start:stop], name, "base")
        _check_finite(f[start:stop], name, "finetuned")

    # Pass 1 scores every entry into order-preserving integer keys (the only full-size
    # temporary) and selects the exact threshold; pass 2 yields masks in flat order.
    k = scoring.keep_count(n, opts.sparsity)
    ranked = scoring.rank_tensor(opts.method, b, f, k, opts.lam, nonfinite)
    if stats is not None:
        stats.sq_total = ranked.sq_total
    keys, threshold = ranked.keys, ranked.threshold
    ties_seen = 0
    try:
        for c in range(0, n, CHUNK):
            mask, ties_seen = scoring.keep_mask_chunk(keys[c : c + CHUNK], threshold, ties_seen)
            if mask.device.type != "cpu":  # --device cuda: the output is built on the CPU
                mask = mask.cpu()
            yield c, c + mask.numel(), mask
    finally:
        scoring.release(ranked)  # masks are fresh tensors: the keys may be reused now


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
        and scoring.current_device().type == "cpu"  # --device cuda: keys live on the GPU
        and scoring.native_kernels(b, f, cdt) is not None
    ):
        return _prune_native(item, b, f, opts, write, inplace)
    scale = 1.0
    if opts.method is Method.RANDOM and 0 < opts.sparsity < 1:
        scale = float(1 / (1 - opts.sparsity))  # DARE rescales what it keeps
    same = b.dtype == f.dtype == out_dtype
    ranked = opts.method is not Method.RANDOM
    stats = _TauStats()
    kept = scoring.keep_count(b.numel(), opts.sparsity) if ranked else 0
    sq_kept = 0.0
    sq_total = 0.0
    for start, stop, mask in _keep_masks(item.name, base, finetuned, opts, stats):
        bc, fc = b[start:stop], f[start:stop]
        if ranked and same:
            # The output is finetuned's bytes where kept and base's elsewhere, so out - base
            # is tau where kept and exactly 0 elsewhere: no mask arithmetic for the statistic.
            out = _bits(torch.where(mask, _bits(fc), _bits(bc))).view(out_dtype)
            kept_tau = torch.sub(out, bc.to(cdt))
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
    item: Item,
    b: torch.Tensor,
    f: torch.Tensor,
    opts: PruneOptions,
    write: Callable[[torch.Tensor], None],
    inplace: bool,
) -> TensorResult:
    """``prune_tensor`` with the C kernels: the same bytes, one pass per element for the output.

    Chunks are independent once each knows how many of the keys equal to the threshold it
    may keep (counted first, only when the tie quota runs out inside the tensor), so they run
    on the scoring threads and are written in order. In place, the output overwrites
    ``finetuned`` chunk by chunk: no allocation, no page faults."""
    kern = scoring.native_kernels(b, f, scoring.compute_dtype(b.dtype, f.dtype))
    assert kern is not None
    n = b.numel()
    k = scoring.keep_count(n, opts.sparsity)

    def nonfinite(start: int, stop: int) -> None:
        _check_finite(b[start:stop], item.name, "base")
        _check_finite(f[start:stop], item.name, "finetuned")

    ranked = scoring.rank_tensor(opts.method, b, f, k, opts.lam, nonfinite)
    try:
        t = ranked.threshold
        key, ties = t.key, t.ties
        if t.keep_all:  # every key is >= the smallest int32: keep all "ties" with it
            key, ties = -(1 << 31), n
        elif t.keep_none:  # no key is > the largest int32, and no tie is kept
            key, ties = (1 << 31) - 1, 0
        starts = range(0, n, NATIVE_OUT_CHUNK)
        quota = [0] * len(starts)
        if ties:
            eq = scoring.map_chunks(
                lambda c: kern.count_eq(ranked.keys[c : c + NATIVE_OUT_CHUNK], key), starts
            )
            before = 0
            for i, count in enumerate(eq):
                quota[i] = max(0, min(count, ties - before))
                before += count

        def chunk(i: int) -> tuple[torch.Tensor, float, int]:
            c = starts[i]
            sl = slice(c, c + NATIVE_OUT_CHUNK)
            out = f[sl] if inplace else torch.empty_like(f[sl])
            sq, kept, _ = kern.select_write(ranked.keys[sl], key, quota[i], b[sl], f[sl], out)
            return out, sq, kept

        sq_kept = 0.0
        kept = 0
        if inplace:  # chunks run ahead on the scoring threads; written in order
            results = scoring.imap_chunks(chunk, range(len(starts)))
        else:  # fresh chunks: one at a time, so memory stays one chunk
            results = (chunk(i) for i in range(len(starts)))
        for out, sq, count in results:
            sq_kept += sq
            kept += count
            write(out)
    finally:
        scoring.release(ranked)
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
    *,
    on_mask: Callable[[int, int, torch.Tensor], None] | None = None,
    inplace: bool = False,
) -> TensorResult:
    """One item's output tensor, chunk by chunk, exactly as ``run_prune`` writes it.

    ``inplace``: ``finetuned`` is a buffer of the caller's that the output may overwrite."""
    if item.action is Action.PRUNE:
        assert base is not None and finetuned is not None
        return prune_tensor(item, base, finetuned, opts, write, on_mask=on_mask, inplace=inplace)
    if item.action is Action.BASE:
        assert base is not None
        return _whole(item, base, finetuned, write)
    assert finetuned is not None
    return _whole(item, finetuned, base, write)


@dataclass
class Sink:
    """Where output tensors go: ``begin(name)`` then ``write(chunk)`` calls, in plan order.

    ``after(fn)``, when given, runs ``fn`` once the chunks written so far are consumed (a
    background writer may still hold them after ``write`` returns); without it, ``write``
    must be done with a chunk when it returns."""

    begin: Callable[[str], None]
    write: Callable[[torch.Tensor], None]
    after: Callable[[Callable[[], None]], None] | None = None


def run_prune(
    base: Checkpoint,
    finetuned: Checkpoint,
    items: Sequence[Item],
    opts: PruneOptions,
    sink: Sink,
    progress: Callable[[int], None] = lambda n: None,
    *,
    read_finetuned: Callable[[Item, torch.Tensor | None], torch.Tensor] | None = None,
    prefetch: bool = True,
) -> list[TensorResult]:
    """Stream every item through the pruning and into ``sink``; returns one record per tensor.

    ``read_finetuned(item, base_tensor)``, when given, supplies the finetuned tensor instead of
    reading it from ``finetuned`` (a task vector rebuilds it from base; see ``merging``).
    ``prefetch``: read the next item in a thread while this one is computed, when both
    checkpoints are local files and the memory the largest tensor needs anyway allows it.
    """
    from fapm_cli.reader import BufferPool, Prefetcher
    from fapm_cli.sources import LocalDir, LocalFile

    local = all(isinstance(c.source, LocalDir | LocalFile) for c in (base, finetuned))
    prefetch = prefetch and local and read_finetuned is None and len(items) > 1
    held = [_held_bytes(i) for i in items]
    pool = None
    if sink.after is not None and read_finetuned is None and items:
        # Inputs are read into reused buffers; a tensor's go back once the writer is done
        # with them (the output may be written from finetuned's buffer, see prune_tensor).
        pool = BufferPool(_inputs_at_peak(items, held, prefetch))
    base_reader = TensorReader(base)
    ft_reader = TensorReader(finetuned)
    last_use = _last_uses(items)
    results: list[TensorResult] = []

    def read(item: Item) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The item's base and finetuned tensors, and the pool region holding both."""
        nb = BufferPool.aligned(item.base.info.nbytes) if item.base is not None else 0
        nf = item.finetuned.info.nbytes if item.finetuned is not None else 0
        region = pool.take(nb + nf) if pool is not None and nb + nf else None
        try:
            b = f = None
            if item.base is not None:
                into = region[: item.base.info.nbytes] if region is not None else None
                b = base_reader.read(item.name, into)
            if item.finetuned is not None:
                if read_finetuned is not None:
                    f = read_finetuned(item, b)
                else:
                    f = ft_reader.read(item.name, region[nb:] if region is not None else None)
        except BaseException:
            if pool is not None:
                pool.give(region)
            raise
        return b, f, region

    ahead: Prefetcher | None = None
    if prefetch:
        jobs = [lambda item=item: read(item) for item in items]
        ahead = Prefetcher(jobs, held, [i.read_bytes for i in items], max(held))
    try:
        for pos, item in enumerate(items):
            if ahead is not None:
                b, f, region = ahead.get(pos)  # type: ignore[misc]
            else:
                b, f, region = read(item)
            sink.begin(item.name)
            # Tensors read here are this loop's own: the output may overwrite finetuned's.
            own = read_finetuned is None
            results.append(process_item(item, b, f, opts, sink.write, inplace=own))
            if pool is not None and sink.after is not None:
                sink.after(functools.partial(pool.give, region))
            del b, f, region
            for reader, side in ((base_reader, "base"), (ft_reader, "finetuned")):
                for shard in last_use.get((side, pos), ()):
                    reader.release_shard(shard)
            progress(item.read_bytes)
    finally:
        if pool is not None:
            pool.close()  # a read waiting for room must not outlive the run
        if ahead is not None:
            ahead.close()
        base_reader.close()
        ft_reader.close()
    return results


def _inputs_at_peak(items: Sequence[Item], held: Sequence[int], prefetch: bool) -> int:
    """The most input bytes in hand at once: one item's, plus the next one's where the
    prefetch rule (see ``reader.Prefetcher``) reads it ahead."""
    from fapm_cli.reader import BufferPool

    pad = BufferPool.ALIGN  # a region's finetuned part starts aligned, and so does the region
    limit = max(held)
    most = 0
    for j, item in enumerate(items):
        both = item.read_bytes + pad
        if prefetch and j + 1 < len(items) and held[j] + items[j + 1].read_bytes <= limit:
            both += items[j + 1].read_bytes + 2 * pad
        most = max(most, both)
    return most


def _held_bytes(item: Item) -> int:
    """Bytes held while ``item`` is processed, at the peak: its inputs, plus the score keys
    (one int32 or int64 per entry) of a pruned tensor."""
    held = item.read_bytes
    if item.action is Action.PRUNE and item.finetuned is not None:
        wide = item.finetuned.info.dtype.itemsize > 4 or (
            item.base is not None and item.base.info.dtype.itemsize > 4
        )
        held += item.finetuned.info.numel * (8 if wide else 4)
    return held


def _last_uses(items: Sequence[Item]) -> dict[tuple[str, int], list[str]]:
    """For each (side, item position), the shards read for the last time there."""
    last: dict[tuple[str, str], int] = {}
    for pos, item in enumerate(items):
        for side, ref in (("base", item.base), ("finetuned", item.finetuned)):
            if ref is not None:
                last[(side, ref.shard)] = pos
    out: dict[tuple[str, int], list[str]] = {}
    for (side, shard), pos in last.items():
        out.setdefault((side, pos), []).append(shard)
    return out


def order_for_disk(
    items: Sequence[Item], cost: Callable[[str, str], int], budget: int
) -> list[Item]:
    """Reorder items so that downloaded shards are deleted early and disk use fits ``budget``.

    ``cost(side, shard)`` is what reading that shard puts on disk (0 when local or cached).
    ``run_prune`` fetches a shard at its first read and releases it after its last use, so the
    order decides which shards are on disk together. Items are grouped by their (base shard,
    finetuned shard) pair, and groups are taken greedily: fewest new fetches first, then most
    shards completed; ties keep the plan's order, so aligned shardings keep it entirely.
    Refuses, before anything is fetched, a budget that this order cannot keep.
    """
    groups: dict[tuple[str | None, str | None], list[Item]] = {}
    for item in items:
        key = (
            item.base.shard if item.base else None,
            item.finetuned.shard if item.finetuned else None,
        )
        groups.setdefault(key, []).append(item)

    def costly(key: tuple[str | None, str | None]) -> list[tuple[str, str]]:
        pairs = zip(("base", "finetuned"), key, strict=True)
        return [(side, s) for side, s in pairs if s is not None and cost(side, s) > 0]

    users: dict[tuple[str, str], int] = {}
    for key in groups:
        for shard in costly(key):
            users[shard] = users.get(shard, 0) + 1
    held: set[tuple[str, str]] = set()
    pending = list(groups)
    ordered: list[Item] = []
    while pending:

        def rank(entry: tuple[int, tuple[str | None, str | None]]) -> tuple[int, int, int]:
            pos, key = entry
            shards = costly(key)
            new = sum(s not in held for s in shards)
            completed = sum(users[s] == 1 for s in shards)
            return new, -completed, pos

        pos, key = min(enumerate(pending), key=rank)
        pending.pop(pos)
        ordered.extend(groups[key])
        for shard in costly(key):
            users[shard] -= 1
            if users[shard]:
                held.add(shard)
            else:
                held.discard(shard)

    need = disk_needed(ordered, cost)
    if need > budget:
        raise ResourceError(
            f"--disk-budget {budget} bytes is too small: {need} bytes of shards must stay on "
            "disk while the next one is fetched",
            hint=f"raise --disk-budget to at least {need} bytes, or download the checkpoints first",
        )
    return ordered


def disk_needed(items: Sequence[Item], cost: Callable[[str, str], int]) -> int:
    """The smallest budget ``items`` fit in, processed in this order: the most bytes held at
    the moment a shard is fetched (peak use is that plus the fetched shard)."""
    last: dict[tuple[str, str], int] = {}
    for pos, item in enumerate(items):
        for side, ref in (("base", item.base), ("finetuned", item.finetuned)):
            if ref is not None:
                last[(side, ref.shard)] = pos
    held: dict[tuple[str, str], int] = {}
    need = 0
    for pos, item in enumerate(items):
        for side, ref in (("base", item.base), ("finetuned", item.finetuned)):  # read order
            if ref is None or (side, ref.shard) in held:
                continue
            nbytes = cost(side, ref.shard)
            if nbytes:
                need = max(need, sum(held.values()))
                held[(side, ref.shard)] = nbytes
        for shard in [s for s in held if last[s] == pos]:
            del held[shard]
    return need


def summarize(results: Sequence[TensorResult]) -> dict[str, float | int]:
    pruned = [r for r in results if r.action is Action.PRUNE]
    numel = sum(r.numel for r in pruned)
    kept = sum(r.kept for r in pruned)
    sq = sum(r.sq_norm for r in results)
    sq_kept = sum(r.sq_norm_kept for r in results)
    return {
        "tensors": len(results),
        "pruned_tensors": len(pruned),
        "parameters": sum(r.numel for r in results),
        "pruned_parameters": numel,
        "kept": kept,
        "kept_fraction": kept / numel if numel else 0.0,
        "sq_norm_kept_fraction": sq_kept / sq if sq > 0 else 1.0,
    }


# -- from sources to a finished output ---------------------------------------------------------


class FilesFrom(StrEnum):
    FINETUNED = "finetuned"
    BASE = "base"
    NONE = "none"


class Progress(Protocol):
    """Progress callbacks (report.BarProgress draws a bar on a terminal)."""

    def start(self, total_bytes: int, label: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def start(self, total_bytes: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class PruneReport:
    output: str
    base: str
    finetuned: str
    options: PruneOptions
    tensors: list[TensorResult]
    shards: dict[str, dict[str, object]]
    seconds: float
    warnings: list[str]


def provenance(kind: str, opts: PruneOptions, **sources: str) -> dict[str, str]:
    """The ``__metadata__`` every output shard carries (safetensors allows str -> str only)."""
    from fapm_cli import __version__

    meta = {
        "format": "pt",
        "fapm.version": __version__,
        "fapm.kind": kind,
        "fapm.method": opts.method.value,
        "fapm.sparsity": str(
            opts.sparsity if opts.sparsity.denominator != 1 else int(opts.sparsity)
        ),
        "fapm.sparsity_decimal": repr(float(opts.sparsity)),
    }
    if opts.method is Method.FAPM:
        meta["fapm.lam"] = repr(opts.lam)
    if opts.method is Method.RANDOM:
        meta["fapm.seed"] = str(opts.seed)
    if opts.keep_base:
        meta["fapm.keep_base"] = ",".join(opts.keep_base)
    if opts.keep_finetuned:
        meta["fapm.keep_finetuned"] = ",".join(opts.keep_finetuned)
    meta.update({f"fapm.{k}": v for k, v in sources.items()})
    return meta


def extra_files(checkpoint: Checkpoint) -> list[tuple[str, Callable[[], str]]]:
    """Non-weight files (config, tokenizer, ...) to copy, with a way to get each locally."""
    return [
        (name, lambda name=name: checkpoint.source.local_path(name))  # type: ignore[misc]
        for name in checkpoint.extra_files
    ]


def prune(
    base_source: str,
    finetuned_source: str,
    output: str,
    opts: PruneOptions,
    *,
    max_shard_size: int = 5 * 10**9,
    files_from: FilesFrom = FilesFrom.FINETUNED,
    overwrite: bool = False,
    progress: Progress | None = None,
    disk_budget: int | None = None,
    prefetch: bool = True,
    part: Part | None = None,
    finalize: bool = False,
) -> PruneReport:
    """Prune ``finetuned`` against ``base`` and write the merged checkpoint to ``output``.

    ``disk_budget`` bounds the bytes of downloaded Hub shards kept on disk (see hub_source).
    ``part`` writes only that part's shards, next to ``output`` (see ``parts``); ``finalize``
    then joins all parts into ``output``. The report of a part covers its own tensors.
    """
    from fapm_cli import parts
    from fapm_cli.reader import open_checkpoint
    from fapm_cli.sources import resolve_source
    from fapm_cli.writer import CheckpointWriter, check_output_path, plan_shards, shard_names

    started = time.monotonic()
    budget = None
    if disk_budget is not None:
        from fapm_cli.hub_source import DiskBudget

        budget = DiskBudget(disk_budget)
    show = bool(getattr(progress, "enabled", False))  # Hub download bars follow the main bar
    progress = progress or NoProgress()
    base = open_checkpoint(resolve_source(base_source, budget=budget, show_progress=show))
    finetuned = open_checkpoint(resolve_source(finetuned_source, budget=budget, show_progress=show))
    items = plan_prune(base, finetuned, opts)
    if budget is not None:
        items = order_for_disk(items, _fetch_costs(base, finetuned), budget.limit)
    warnings = [f"pattern {p!r} matches no tensor" for p in unmatched_patterns(items, opts)]
    out = Path(output)
    check_output_path(out, _local_paths(base, finetuned), overwrite)
    metadata = provenance(
        "model", opts, base=base.source.provenance(), finetuned=finetuned.source.provenance()
    )
    groups = plan_shards([i.out for i in items], max_shard_size)
    plan = list(zip(shard_names(len(groups)), groups, strict=True))
    copy_from = {FilesFrom.FINETUNED: finetuned, FilesFrom.BASE: base}.get(files_from)
    digest = parts.options_hash(
        opts, metadata, plan,
        {"max_shard_size": str(max_shard_size), "files_from": files_from.value, "save": "model"},
    )  # fmt: skip
    mine: list[str] | None = None
    target = out
    if part is not None:
        mine = part.shards([name for name, _ in plan])
        chosen = {t.name for name, group in plan if name in mine for t in group}
        items = [i for i in items if i.name in chosen]
        staging = parts.staging_dir(out)
        target = staging / part.dirname
        try:  # made here, not by the writer: a failed part must not remove its siblings' home
            staging.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(
                f"{staging}: cannot create the parts directory ({err.strerror})",
                hint="choose an output inside a writable directory",
            ) from err
    writer = CheckpointWriter(
        target,
        [t for _, group in plan for t in group],
        max_shard_size=max_shard_size,
        metadata=metadata,
        overwrite=overwrite,
        background=prefetch,  # chunks stay untouched until after_written (see run_prune)
        shards=mine,
    )
    try:
        if finalize:
            staging = parts.staging_dir(out)
            joined = parts.collect(staging, digest, [name for name, _ in plan], items)
            for name, _ in plan:
                writer.adopt(name, joined.shard_path[name], joined.shard_info[name])
            writer.finish(extra_files(copy_from) if copy_from else ())
            shutil.rmtree(staging, ignore_errors=True)
            results = joined.results
        else:
            progress.start(sum(i.read_bytes for i in items), "prune")
            sink = Sink(writer.begin, writer.write, writer.after_written)
            results = run_prune(
                base, finetuned, items, opts, sink, progress.advance, prefetch=prefetch
            )
            if part is not None:
                writer.finish_part(parts.MARKER, parts.marker(part, digest, results))
            else:
                writer.finish(extra_files(copy_from) if copy_from else ())
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
        if budget is not None:
            budget.close()  # removes shards still held, e.g. after an error
    return PruneReport(
        str(target),
        base.source.provenance(),
        finetuned.source.provenance(),
        opts,
        results,
        writer.shard_info,
        time.monotonic() - started,
        warnings,
    )


def _fetch_costs(base: Checkpoint, finetuned: Checkpoint) -> Callable[[str, str], int]:
    """Bytes each shard would add to the disk when read (0 unless a Hub download)."""
    from fapm_cli.hub_source import fetch_size

    costs = {
        (side, shard): fetch_size(c.source, shard, header)
        for side, c in (("base", base), ("finetuned", finetuned))
        for shard, header in c.shards.items()
    }
    return lambda side, shard: costs.get((side, shard), 0)


def _local_paths(*checkpoints: Checkpoint) -> list[Path]:
    paths = []
    for c in checkpoints:
        p = getattr(c.source, "path", None)
        if p is not None:
            paths.append(Path(p))
    return paths
