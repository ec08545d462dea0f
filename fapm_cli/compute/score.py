"""The per-tensor operation of ``fapm score``: where a fine-tune moved, and what pruning keeps.

Per tensor pair (float tensors in both checkpoints, paired as ``prune`` pairs them):

- ``mean_abs_tau``, ``mean_abs_base``: mean |tau| and mean |base| over all entries;
- ``mean_rel_change``: mean of |tau| / |base| over the entries where base != 0 (those where
  base == 0 are excluded and counted in ``base_zero``; the ratio is undefined there);
- ``positive_score_fraction``: share of entries whose FAPM score S is > 0, i.e. whose absolute
  update outweighs the forgetting penalty (S = -inf where base == 0, so those never count);
- at each given sparsity, the share of ||tau||^2 kept by the fapm mask and by the magnitude
  mask, and the Jaccard overlap of the two masks: exactly the masks ``prune`` would apply (the
  same keys, thresholds and tie rule).

Sums are accumulated in float64; element-wise math is in the compute dtype (float32, float64 for
float64 inputs), as in ``prune``.

With the C kernels, a large tensor takes three passes over its inputs whatever the number of
sparsities (a sweep, ``--sparsity 0.5,0.7,0.9``): the first computes every sparsity-free figure
and both methods' top-16-bit histograms, the second gathers the keys in the buckets the
thresholds fall in (a few per cent of the keys; every threshold is then selected among those
in memory, and each chunk's ties counted there), the third both masks' figures for every
sparsity at once. No full key array is kept: each pass recomputes the keys from the inputs,
which costs what reading them back would. A tensor of one chunk or less keeps its keys and
takes one kernel call (``_score_small``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

from fapm_cli.compute import native, scoring
from fapm_cli.compute.prune import check_finite, iter_keep_masks
from fapm_cli.compute.scoring import Threshold, Workspace
from fapm_cli.plan import Method, PruneOptions, keep_count
from fapm_cli.records import Sums


def score_tensor(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsity: Fraction,
    lam: float,
    write: Callable[[torch.Tensor], None] | None = None,
    ws: Workspace | None = None,
) -> Sums:
    """The figures of one tensor pair; ``write`` receives its FAPM scores (float32, in chunks)."""
    return score_sweep(name, base, finetuned, [sparsity], lam, write, ws)[0]


def score_sweep(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsities: Sequence[Fraction],
    lam: float,
    write: Callable[[torch.Tensor], None] | None = None,
    ws: Workspace | None = None,
) -> list[Sums]:
    """The figures of one tensor pair at each sparsity (the sparsity-free ones shared);
    ``write`` receives its FAPM scores (float32, in chunks, once)."""
    ws = ws or Workspace()
    b = base.reshape(-1)
    f = finetuned.reshape(-1)
    cdt = scoring.compute_dtype(b.dtype, f.dtype)
    kern = scoring.native_kernels(b, f, cdt) if ws.on_cpu and b.numel() else None
    if kern is None or len(sparsities) > native.MAX_SWEEP:
        return [
            _score_torch(name, base, finetuned, s, lam, write if i == 0 else None, ws)
            for i, s in enumerate(sparsities)
        ]
    return _score_native(kern, name, b, f, sparsities, lam, write, ws)


ALL_TIES = (1 << 63) - 1  # "every key equal to the threshold is kept" in score_final


def _rule(t: Threshold, n: int) -> tuple[int, int, bool]:
    """(key, ties left, in order): score_final's form of a threshold; ``in order``: the ties
    must be taken in flat order (the chunks cannot run independently)."""
    if t.keep_all:
        return -(1 << 31), ALL_TIES, False
    if t.keep_none:
        return (1 << 31) - 1, 0, False
    return t.key, t.ties, t.ties > 0


def _score_native(
    kern: native.Kernels,
    name: str,
    b: torch.Tensor,
    f: torch.Tensor,
    sparsities: Sequence[Fraction],
    lam: float,
    write: Callable[[torch.Tensor], None] | None,
    ws: Workspace,
) -> list[Sums]:
    """``score_sweep`` with the C kernels (CPU, float32 scores); see the module docstring."""
    n = b.numel()
    ks = [keep_count(n, s) for s in sparsities]
    if n <= scoring.SMALL_TENSOR:
        return _score_small(kern, name, b, f, ks, lam, write)
    # The coefficient prune ranks with (scoring.rank_tensor), so "S > 0" and both masks agree.
    m = scoring.mean_abs(b, torch.float32, ws.workers)
    coef = scoring.f32(scoring.f32(lam) * m)
    step = scoring.FUSED_CHUNK
    starts = range(0, n, step)
    stats = torch.zeros(len(starts), 4, dtype=torch.float64)  # per chunk: summed in order
    counts = torch.zeros(2, dtype=torch.int64)

    def nonfinite(c: int) -> None:
        check_finite(b[c : c + step], name, "base")
        check_finite(f[c : c + step], name, "finetuned")

    # Pass 1: the sparsity-free figures, and what selects each threshold.
    hists = _pass1(kern, b, f, coef, stats, counts, starts, write, nonfinite, ws)
    thresholds, gathered = _select(kern, b, f, coef, hists, ks, starts, ws)
    # sum |tau|, sum |base|, sum |tau|/|base|, sum tau^2: chunk sums added in a fixed order
    totals = [float(x) for x in stats.sum(0)] if len(starts) > 1 else stats[0].tolist()
    rules = [[_rule(t, n) for t in thresholds[j]] for j in range(2)]
    keys_t = torch.tensor([[r[0] for r in rules[j]] for j in range(2)], dtype=torch.int32)
    ties = torch.tensor([[r[1] for r in rules[j]] for j in range(2)], dtype=torch.int64)
    in_order = any(r[2] for j in range(2) for r in rules[j])

    # Pass 3: both masks at every sparsity, chunks in parallel. Where a threshold keeps only
    # some of its ties (the first in flat order), each chunk's share is counted first.
    sums = torch.zeros(len(starts), 2, len(ks), dtype=torch.float64)
    quotas = ties.expand(len(starts), 2, len(ks)).clone()  # ties left per chunk
    if in_order and len(starts) > 1:
        # Every key equal to a threshold is among the gathered keys: count each chunk's there.
        assert gathered is not None
        eq = torch.zeros(len(starts), 2, len(ks), dtype=torch.int64)
        for j in range(2):
            keys_j, spans = gathered[j]
            which = [s_idx for s_idx, rule in enumerate(rules[j]) if rule[2]]
            if which:
                counted = kern.count_eq_spans(keys_j, spans, [rules[j][x][0] for x in which])
                eq[:, j, which] = counted
        before = eq.cumsum(0) - eq  # ties in the chunks before each
        partial = (ties != 0) & (ties != ALL_TIES)
        share = (ties - before).clamp_(min=0).minimum(eq)
        # A chunk that keeps all of its ties (or none) takes the vectorised rule; only the
        # chunk where a quota runs out counts them one by one.
        share = torch.where(share == eq, ALL_TIES, share)
        quotas = torch.where(partial, share, quotas)

    def final(p: int, workers: int) -> torch.Tensor:
        mine = torch.zeros(3, len(ks), dtype=torch.int64)
        for i in range(p, len(starts), workers):
            sl = slice(starts[i], starts[i] + step)
            kern.score_final(b[sl], f[sl], coef, keys_t, quotas[i], sums[i], mine)
        return mine

    kept = scoring.on_parts(final, ws.workers, len(starts))
    sq_kept = (sums.sum(0) if len(starts) > 1 else sums[0]).tolist()
    found = kept.tolist()
    stat = [int(counts[0]), int(counts[1])]
    return _per_sparsity(name, n, ks, totals, stat, sq_kept[0], sq_kept[1], *found)


def _per_sparsity(
    name: str,
    n: int,
    ks: Sequence[int],
    totals: Sequence[float],
    counts: Sequence[int],
    sq_f: Sequence[float],
    sq_m: Sequence[float],
    kept_f: Sequence[int],
    kept_m: Sequence[int],
    overlap: Sequence[int],
) -> list[Sums]:
    """Each sparsity's Sums: the sparsity-free ``totals`` (sum |tau|, |base|, |tau|/|base|,
    tau^2) and ``counts`` (base != 0, score > 0) with that sparsity's masks' figures; both
    masks must have kept exactly k."""
    out = []
    # Positional, in Sums' field order (keywords cost 0.7 us more a call: a sweep of six
    # sparsities on 10,000 tensors makes 60,000).
    n_tau, n_base, n_rel, n_sq = totals
    nonzero, positive = counts
    for j, k in enumerate(ks):
        if kept_f[j] != k or kept_m[j] != k:
            raise AssertionError(f"{name}: masks keep {[kept_f[j], kept_m[j]]}, expected {k}")
        out.append(
            Sums(n, n_tau, n_base, n_rel, nonzero, positive, n_sq, sq_f[j], sq_m[j], k, overlap[j])
        )
    return out


def _score_small(
    kern: native.Kernels,
    name: str,
    b: torch.Tensor,
    f: torch.Tensor,
    ks: Sequence[int],
    lam: float,
    write: Callable[[torch.Tensor], None] | None,
) -> list[Sums]:
    """``_score_native`` for a tensor of one chunk at most, in one kernel call
    (``native.score_small``): the mean and coefficient rounded as for a large tensor, the keys
    kept in a scratch array, and every threshold from one shared radix select per method
    instead of a histogram per tensor. The same figures, bit for bit, as the three passes
    (tested)."""
    n, m = b.numel(), len(ks)
    scores = torch.empty(n, dtype=torch.float32) if write is not None else None
    sums, counts = kern.score_small(b, f, lam, ks, scores)
    if not math.isfinite(sums[3]):
        check_finite(b, name, "base")
        check_finite(f, name, "finetuned")
    if scores is not None and write is not None:
        write(scores)
    masks = [counts[2 + i * m : 2 + (i + 1) * m] for i in range(3)]
    return _per_sparsity(name, n, ks, sums[:4], counts[:2], sums[4 : 4 + m], sums[4 + m :], *masks)


def _pass1(
    kern: native.Kernels,
    b: torch.Tensor,
    f: torch.Tensor,
    coef: float,
    stats: torch.Tensor,
    counts: torch.Tensor,
    starts: range,
    write: Callable[[torch.Tensor], None] | None,
    nonfinite: Callable[[int], None],
    ws: Workspace,
) -> torch.Tensor:
    """The first pass of a large tensor: ``stats`` per chunk, ``counts``, and the (2, 65536)
    top-16-bit histograms of the FAPM and magnitude keys. Scores are written in order (one
    thread); otherwise the chunks run on the scoring threads."""
    step = starts.step

    def part(p: int, workers: int) -> torch.Tensor:
        hists = torch.zeros(2, 4 * (1 << 16), dtype=torch.int32)  # uint32 counters
        both = torch.zeros(2 * (1 << 16) + 2, dtype=torch.int64)  # the histograms, counts
        total, mine = both[:-2].view(2, 1 << 16), both[-2:]
        pending = 0
        for i in range(p, len(starts), workers):
            c = starts[i]
            sl = slice(c, c + step)
            # a fresh buffer per chunk: the writer may still hold the one before
            out = (
                None
                if write is None
                else torch.empty(min(step, b.numel() - c), dtype=torch.float32)
            )
            sq = kern.score_pass(
                b[sl], f[sl], coef, stats[i], mine, hists=(hists[0], hists[1]), scores=out
            )
            if not math.isfinite(sq):
                nonfinite(c)
            if out is not None and write is not None:
                write(out)
            pending += step
            if pending >= 1 << 31 or i + workers >= len(starts):  # before a counter wraps
                kern.hist_flush(hists[0], total[0])
                kern.hist_flush(hists[1], total[1])
                pending = 0
        return both

    both = scoring.on_parts(part, 1 if write is not None else ws.workers, len(starts))
    counts += both[-2:]
    return both[:-2].reshape(2, 1 << 16)


def _select(
    kern: native.Kernels,
    b: torch.Tensor,
    f: torch.Tensor,
    coef: float,
    hists: torch.Tensor,
    ks: Sequence[int],
    starts: range,
    ws: Workspace,
) -> tuple[list[list[Threshold]], list[tuple[torch.Tensor, list[tuple[int, int]]]] | None]:
    """Every sparsity's exact threshold for both methods: the top buckets from ``hists``, then
    one pass gathering the keys in those buckets (``_gather``) and one pass over those in
    memory for every threshold (``native.bucket_select``: a low-16-bit histogram per bucket).
    Also returns, per method, the gathered keys and each chunk's span of them (None when no
    threshold needed them)."""
    n = b.numel()
    inner = [k for k in ks if 0 < k < n]
    found: list[list[tuple[int, int] | None]] = []
    for j in range(2):
        walk = iter(scoring.top_buckets(hists[j], inner))
        found.append([next(walk) if 0 < k < n else None for k in ks])
    slots = [sorted({x[0] for x in found[j] if x is not None}) for j in range(2)]
    if not any(slots):
        return [[_edge(k, n) for k in ks] for _ in "fm"], None
    sel = torch.zeros(2, 1 << 16, dtype=torch.uint8)
    for j in range(2):
        sel[j, slots[j]] = 1
    totals = [int(hists[j, slots[j]].sum()) if slots[j] else 0 for j in range(2)]
    gathered = _gather(kern, b, f, coef, totals, sel, starts, ws)
    out: list[list[Threshold]] = []
    for j in range(2):
        # The k-th largest key is the (k - above)-th largest of its bucket's keys.
        asks = [(at[0], k - at[1]) for k, at in zip(ks, found[j], strict=True) if at is not None]
        picks = iter(kern.bucket_select(gathered[j][0], asks))
        thresholds = []
        for k, at in zip(ks, found[j], strict=True):
            if at is None:
                thresholds.append(_edge(k, n))
                continue
            key, above_here, equal = next(picks)
            thresholds.append(scoring.settled(key, k - at[1] - above_here, equal))
        out.append(thresholds)
    return out, gathered


def _edge(k: int, n: int) -> Threshold:
    edge = scoring.edge_threshold(k, n)
    assert edge is not None, (k, n)  # a k with no bucket keeps all or none
    return edge


def _gather(
    kern: native.Kernels,
    b: torch.Tensor,
    f: torch.Tensor,
    coef: float,
    totals: list[int],
    sel: torch.Tensor,
    starts: range,
    ws: Workspace,
) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """The keys of both methods in the buckets ``sel`` marks (``native.score_gather``), one
    pass on the scoring threads: per method, one array of exactly ``totals`` keys (what the
    histograms count there), and each chunk's (start, size) in it (chunks land in any order;
    inside a chunk the keys keep their flat order)."""
    step = starts.step
    dest = [torch.empty(max(1, t), dtype=torch.int32) for t in totals]
    spans: list[list[tuple[int, int]]] = [[(0, 0)] * len(starts) for _ in range(2)]
    cursor = [0, 0]
    lock = threading.Lock()

    def part(p: int, workers: int) -> torch.Tensor:
        scratch = torch.empty(2, min(step, b.numel()), dtype=torch.int32)
        for i in range(p, len(starts), workers):
            sl = slice(starts[i], starts[i] + step)
            sizes = kern.score_gather(b[sl], f[sl], coef, sel, scratch[0], scratch[1])
            with lock:
                at = list(cursor)
                cursor[0] += sizes[0]
                cursor[1] += sizes[1]
            for j in range(2):
                dest[j][at[j] : at[j] + sizes[j]].copy_(scratch[j, : sizes[j]])
                spans[j][i] = (at[j], sizes[j])
        return torch.zeros(1, dtype=torch.int64)

    scoring.on_parts(part, ws.workers, len(starts))
    if cursor != totals:  # the histogram and the gather see the same keys
        raise AssertionError(f"gathered {cursor} keys, the histograms count {totals}")
    return [(dest[j][: totals[j]], spans[j]) for j in range(2)]


def _score_torch(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsity: Fraction,
    lam: float,
    write: Callable[[torch.Tensor], None] | None,
    ws: Workspace,
) -> Sums:
    """``score_sweep`` for one sparsity with torch operations (no C kernels, float64 inputs,
    --device cuda): the masks of ``prune.iter_keep_masks`` and the sums chunk by chunk."""
    b = base.reshape(-1)
    f = finetuned.reshape(-1)
    n = b.numel()
    cdt = scoring.compute_dtype(b.dtype, f.dtype)
    f64 = torch.float64
    # The same coefficient the engine uses, so "S > 0" agrees with the scores prune ranks.
    coef = torch.tensor(lam, dtype=cdt) * torch.tensor(
        scoring.mean_abs(b, cdt, ws.workers), dtype=cdt
    )
    fapm_opts = PruneOptions(method=Method.FAPM, sparsity=sparsity, lam=lam)
    magnitude_opts = PruneOptions(method=Method.MAGNITUDE, sparsity=sparsity, lam=lam)

    acc = dict.fromkeys(("abs_tau", "abs_base", "rel", "sq", "sq_fapm", "sq_magnitude"), 0.0)
    nonzero = positive = kept = overlap = 0
    fapm_mask = torch.empty(n, dtype=torch.bool)  # (n,) the only full-size extra besides keys
    for start, stop, mask in iter_keep_masks(name, base, finetuned, fapm_opts, ws):
        bc, fc = b[start:stop].to(cdt), f[start:stop].to(cdt)
        tau = fc - bc
        a, ab = tau.abs(), bc.abs()
        nz = bc != 0
        acc["abs_tau"] += float(a.sum(dtype=f64))
        acc["abs_base"] += float(ab.sum(dtype=f64))
        # where() instead of boolean indexing: masked_select costs ~4.5 ns per entry here,
        # arithmetic 0.1-0.3 ns; |tau| / 0 (inf or nan) is replaced by 0 before the sum.
        acc["rel"] += float(torch.where(nz, a / ab, 0.0).sum(dtype=f64))
        nonzero += int(nz.sum())
        s = scoring.score_chunk(Method.FAPM, bc, fc, coef)
        positive += int((s > 0).sum())
        if write is not None:
            write(s.to(torch.float32))
        tau2 = tau * tau
        acc["sq"] += float(tau2.sum(dtype=f64))
        acc["sq_fapm"] += float(torch.where(mask, tau2, 0.0).sum(dtype=f64))
        kept += int(mask.sum())
        fapm_mask[start:stop] = mask
    for start, stop, mask in iter_keep_masks(name, base, finetuned, magnitude_opts, ws):
        tau = f[start:stop].to(cdt) - b[start:stop].to(cdt)
        acc["sq_magnitude"] += float(torch.where(mask, tau * tau, 0.0).sum(dtype=f64))
        overlap += int((mask & fapm_mask[start:stop]).sum())
    return Sums(
        numel=n,
        base_nonzero=nonzero,
        positive=positive,
        kept=kept,
        overlap=overlap,
        **acc,
    )
