"""The metrics and the exact top-k selection: tensor functions, and the ``Workspace`` (device,
threads, key buffer) a run passes to them.

Precision policy: scores are computed in float32 (float64 when either input is float64) and the
output keeps the storage dtype; kept entries are *copied* from finetuned, never recomputed as
``base + tau``, so they are bit-identical to finetuned.

Selection never sorts: an argsort of a 525M-element embedding costs minutes and 4 GB of indices.
Scores are mapped to integer keys whose order is the float order, and the k-th largest key is
found by a radix select over 16-bit digits (one ``bincount`` pass per digit, in chunks, so the
extra memory is a few chunk-sized buffers). Exactly ``k`` entries are kept: all with a key above
the threshold, then, among those equal to it, the lowest flat indices first.

FAPM: Huang, Cheng, Wang, "Mitigating Catastrophic Forgetting in Large Language Models with
Forgetting-aware Pruning", EMNLP 2025, https://arxiv.org/abs/2509.08255
DARE (``random``): Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from fapm_cli.compute import native
from fapm_cli.errors import signals_deferred
from fapm_cli.plan import Method

_T = TypeVar("_T")

# Elements per chunk for element-wise work: large enough that per-call overhead is negligible,
# small enough that temporaries stay in cache. Changing it changes no result (reductions that
# could depend on it are done in float64 per chunk and summed in a fixed order).
CHUNK = 1 << 20
# DARE draws its Bernoulli mask in blocks of this many elements, each from a generator seeded
# by (seed, tensor name, block index): the mask depends on nothing but those.
RANDOM_BLOCK = 1 << 20


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


# torch refuses arithmetic that mixes float8 with another dtype ("Promotion for Float8 Types
# is not supported") and implements few float8 kernels at all: float8 inputs are widened
# explicitly (and exactly) to float32 wherever they meet arithmetic.
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a float8 tensor its exact float32 copy."""
    return t.to(torch.float32) if t.dtype in FLOAT8 else t


def mean_abs(base: torch.Tensor, dtype: torch.dtype, workers: int = 1) -> float:
    """``m = mean(|W_pre|)``: summed per chunk in float64, rounded once to the compute dtype
    (the same value for any number of ``workers``)."""
    flat = base.reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    kern = native_kernels(flat, flat, dtype)
    if kern is not None:
        # Chunks summed in parallel by the C kernel (8 float64 lanes each), then added in chunk
        # order: the same m whatever the number of threads.
        step = 1 << 20
        if n <= step:  # one chunk: no threads, no torch op (f32 rounds as torch.tensor does)
            return f32(kern.sum_abs(flat) / n)
        starts = range(0, n, step)
        parts = map_chunks(lambda c: kern.sum_abs(flat[c : c + step]), starts, workers)
        return float(torch.tensor(sum(parts) / n, dtype=dtype))
    # Widen each cache-sized chunk exactly into one reused buffer of the compute dtype and
    # accumulate in float64: 16x faster than converting every chunk to float64 first (0.06 s
    # instead of 0.9 s for 131M bf16 entries on one core), and the same m.
    step = 1 << 18
    buf = torch.empty(min(step, n), dtype=dtype, device=flat.device)
    total = 0.0
    for c in range(0, n, step):
        x = buf[: min(step, n - c)]
        total += float(torch.sum(x.copy_(flat[c : c + step]).abs_(), dtype=torch.float64))
    return float(torch.tensor(total / n, dtype=dtype))


def native_kernels(
    base: torch.Tensor, finetuned: torch.Tensor, cdt: torch.dtype
) -> native.Kernels | None:
    """The C kernels when they apply: CPU, contiguous float32/bfloat16/float16 inputs, float32
    scores (float64 inputs take the torch path)."""
    if cdt != torch.float32:
        return None
    for t in (base, finetuned):
        if not t.is_cpu or t.dtype not in native.DTYPES or not t.is_contiguous():
            return None
    return native.kernels()


def map_chunks(fn: Callable[[int], _T], starts: Sequence[int], workers: int) -> list[_T]:
    """``fn`` over chunk starts on ``workers`` threads; results in chunk order."""
    return list(imap_chunks(fn, starts, workers))


def imap_chunks(fn: Callable[[int], _T], starts: Sequence[int], workers: int) -> Iterator[_T]:
    """``fn`` over chunk starts on ``workers`` threads, yielded in chunk order as they finish.

    At most ``2 * workers`` calls run ahead of the consumer. The threads live for this call
    only and are shut down on the way out, also when the consumer stops early or a signal
    interrupts it: a long-lived pool would rely on the interpreter's exit hook, and a signal
    landing inside ``ThreadPoolExecutor.submit`` (after a thread starts, before it is
    registered) leaves that hook a thread it never wakes, so the process never exits."""
    workers = min(workers, len(starts))
    if workers <= 1:
        yield from (fn(c) for c in starts)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="fapm-score") as pool:
        ahead: collections.deque[Future[_T]] = collections.deque()
        try:
            for c in starts:
                with signals_deferred():  # a submit may start a thread
                    ahead.append(pool.submit(fn, c))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            # Queued calls are dropped; running ones finish first (the buffers they write
            # into must outlive them).
            pool.shutdown(wait=True, cancel_futures=True)


def score_chunk(
    method: Method, base: torch.Tensor, finetuned: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Scores of one chunk (1-D, compute dtype). ``coef`` is ``lam * m`` as a 0-d tensor.

    fapm:      S = |tau| - coef * (|tau| / |base|)
    magnitude: S = |tau|
    ratio:     S = -(|tau| / |base|)
    Where base == 0 the relative term is undefined: fapm and ratio score -inf (selected last).
    """
    base, finetuned = widened(base), widened(finetuned)
    a = (finetuned - base).abs_()  # |tau|
    if method is Method.MAGNITUDE:
        return a
    rel = a / base.abs()  # |tau| / |base|; inf or nan where base == 0, masked below
    s = a.sub_(rel.mul_(coef)) if method is Method.FAPM else rel.neg_()
    s.masked_fill_(base == 0, float("-inf"))
    return s.add_(0.0)  # -0.0 -> +0.0, so equal scores have equal keys


def to_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map float scores in place to signed integers with the same order (-0.0 excluded)."""
    bits = scores.view(torch.int64 if scores.dtype == torch.float64 else torch.int32)
    sign_fill = (1 << (bits.element_size() * 8 - 1)) - 1
    # Negative floats order backwards in their bit pattern: flip their magnitude bits.
    return bits.bitwise_xor_((bits >> (bits.element_size() * 8 - 1)) & sign_fill)


@dataclass(frozen=True)
class Threshold:
    """Keep every key > ``key``, plus the first ``ties`` keys equal to it (in flat order)."""

    key: int
    ties: int
    keep_all: bool = False  # k == numel: nothing to select
    keep_none: bool = False  # k == 0

    def int32_rule(self, n: int) -> tuple[int, int]:
        """``(key, ties)`` such that "keep every key > key, then the first ``ties`` equal to it"
        is this selection of ``n`` int32 keys, keep-all and keep-none included."""
        if self.keep_all:  # every key is >= the smallest int32: keep all "ties" with it
            return -(1 << 31), n
        if self.keep_none:  # no key is > the largest int32, and no tie is kept
            return (1 << 31) - 1, 0
        return self.key, self.ties


def edge_threshold(k: int, n: int) -> Threshold | None:
    """Keep-all (``k >= n``) or keep-none (``k <= 0``), which need no selection; else None."""
    if k >= n:
        return Threshold(0, 0, keep_all=True)
    if k <= 0:
        return Threshold(0, 0, keep_none=True)
    return None


def settled(key: int, ties: int, equal: int) -> Threshold:
    """The threshold at the k-th largest ``key``, keeping ``ties`` of the ``equal`` keys equal to
    it. When it keeps all of them, "keys > key - 1" is the whole mask and the per-chunk tie
    ranking (a cumsum) is skipped: every selection path returns this same form."""
    if key > -(1 << 31) and equal == ties:
        return Threshold(key - 1, 0)
    return Threshold(key, ties)


def on_parts(fn: Callable[[int, int], torch.Tensor], workers: int, chunks: int) -> torch.Tensor:
    """``fn(part, workers)`` for each part on its own scoring thread (part ``p`` takes chunks
    ``p, p + workers, ...``), the integer counts they return summed (in any order: the same)."""
    workers = max(1, min(workers, chunks))
    if workers == 1:
        return fn(0, 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="fapm-score") as pool:
        with signals_deferred():  # each submit starts a thread
            parts = [pool.submit(fn, p, workers) for p in range(workers)]
        return torch.stack([p.result() for p in parts]).sum(0)


def select_threshold(keys: torch.Tensor, k: int) -> Threshold:
    """Find the k-th largest key by radix select on 16-bit digits, most significant first."""
    n = keys.numel()
    if (edge := edge_threshold(k, n)) is not None:
        return edge
    width = keys.element_size() * 8
    sign_bit = -(1 << (width - 1))
    flat = keys.reshape(-1)
    prefix = 0  # the digits fixed so far: the top 16 * level bits of the unsigned key
    above = 0  # keys known to be strictly greater than every key in the current bucket
    for level in range(width // 16):
        shift = width - 16 * (level + 1)
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=keys.device)
        for c in range(0, n, CHUNK):
            # XOR with the sign bit turns signed order into unsigned order of the bit pattern.
            u = flat[c : c + CHUNK] ^ sign_bit
            if level:  # only keys in the bucket chosen so far
                u = u[((u >> (shift + 16)) & ((1 << (16 * level)) - 1)) == prefix]
            hist += torch.bincount(((u >> shift) & 0xFFFF).reshape(-1), minlength=1 << 16)
        # Walk buckets from the top until the k-th largest key falls inside one.
        from_top = hist.cpu().flip(0).cumsum(0)
        idx = int(torch.searchsorted(from_top, torch.tensor(k - above)))
        above += int(from_top[idx - 1]) if idx > 0 else 0
        prefix = (prefix << 16) | ((1 << 16) - 1 - idx)
    key = prefix - (1 << (width - 1))  # back to the signed key
    return Threshold(key, k - above)


def keep_mask_chunk(keys: torch.Tensor, t: Threshold, ties_seen: int) -> tuple[torch.Tensor, int]:
    """The keep mask of one chunk in flat order; returns it and the updated tie count."""
    if t.keep_all:
        return torch.ones_like(keys, dtype=torch.bool), ties_seen
    if t.keep_none:
        return torch.zeros_like(keys, dtype=torch.bool), ties_seen
    if ties_seen >= t.ties:
        return keys > t.key, ties_seen
    eq = keys == t.key
    here = int(torch.count_nonzero(eq))
    if ties_seen + here <= t.ties:  # every tie in this chunk is kept: no ranking needed
        return keys >= t.key, ties_seen + here
    mask = keys > t.key
    rank = eq.cumsum(0) + ties_seen  # 1-based rank among ties, counting earlier chunks
    mask |= eq & (rank <= t.ties)
    return mask, t.ties


def keep_masks(ranked: Ranked) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, keep_mask)`` for consecutive chunks of the flat tensor, in flat order:
    every key above the threshold, and the first ``ties`` keys equal to it."""
    keys, threshold = ranked.keys, ranked.threshold
    ties_seen = 0
    for c in range(0, keys.numel(), CHUNK):
        mask, ties_seen = keep_mask_chunk(keys[c : c + CHUNK], threshold, ties_seen)
        if mask.device.type != "cpu":  # --device cuda: the output is built on the CPU
            mask = mask.cpu()
        yield c, c + mask.numel(), mask


def tie_quotas(
    ranked: Ranked, chunk: int, count_eq: Callable[[torch.Tensor, int], int], workers: int
) -> tuple[int, list[int]]:
    """The same selection as ``keep_masks`` for chunks of ``chunk`` keys that run
    independently: the key to compare with, and per chunk how many keys equal to it it keeps
    (counted first, only when the tie quota runs out inside the tensor); see
    ``Threshold.int32_rule``."""
    n = ranked.keys.numel()
    key, ties = ranked.threshold.int32_rule(n)
    starts = range(0, n, chunk)
    quota = [0] * len(starts)
    if ties:
        eq = map_chunks(lambda c: count_eq(ranked.keys[c : c + chunk], key), starts, workers)
        before = 0
        for i, count in enumerate(eq):
            quota[i] = max(0, min(count, ties - before))
            before += count
    return key, quota


def random_mask_block(
    seed: int, name: str, block: int, size: int, keep: float, stream: int = 0
) -> torch.Tensor:
    """DARE's Bernoulli(keep) mask for one block, reproducible from (seed, name, block).

    ``stream`` tells apart the fine-tunes of one merge, whose masks DARE draws independently:
    the first (0, as in ``prune``) keeps prune's mask, fine-tune ``i`` adds ``i`` to the key."""
    key = f"{seed}\0{name}\0{block}" + (f"\0{stream}" if stream else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.rand(size, generator=gen) < keep


# -- the fused fast path ----------------------------------------------------------------------
#
# ``rank_tensor`` does in one pass over cache-sized chunks what ``score_chunk`` + ``to_keys`` + a
# NaN/Inf check + the squared-norm statistic + the first radix level did in five full-size
# passes: every temporary is a reusable chunk-sized scratch buffer, the keys are written straight
# into the key array, and the top-16-bit histogram is counted while the chunk is still in cache.
# The second radix level counts only the threshold bucket with clamp + bincount, never a
# boolean compaction (masked_select is ~10x slower per element than arithmetic here).

# Elements per chunk of the fused pass: its float32 scratch (a few chunk-sized buffers) stays in
# a core's L2 cache. Changing it changes no key, mask or byte, only float64 statistic rounding.
FUSED_CHUNK = 1 << 18
# On a GPU a chunk is a few kernel launches: larger chunks, same keys (element-wise work).
DEVICE_CHUNK = 1 << 24
_DIGITS = 1 << 16


def score_workers() -> int:
    """Threads for the scoring pass: the cores torch's own pool leaves idle.

    torch's intra-op threads gain little on cache-sized chunks (2 threads: 0.39 s instead of
    0.57 s for 131M entries on this project's 2-core machine) while independent chunks in
    Python threads scale (0.32 s); with torch given every core, this returns 1."""
    cores = os.cpu_count() or 1
    return max(1, min(4, cores // max(1, torch.get_num_threads())))


class Scratch:
    """Reusable buffers for ``score_keys_into``, sized for one chunk."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | None = None) -> None:
        self.a = torch.empty(size, dtype=dtype, device=device)
        self.b = torch.empty(size, dtype=dtype, device=device)
        self.zero = torch.empty(size, dtype=torch.bool, device=device)
        kdt = torch.int64 if dtype == torch.float64 else torch.int32
        self.k = torch.empty(size, dtype=kdt, device=device)


def score_keys_into(
    method: Method,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    scratch: Scratch,
) -> float:
    """Scores of one chunk as order-preserving integer keys, written into ``out``.

    ``base``/``finetuned`` are 1-D chunks in their storage dtype; ``out`` is the matching slice
    of the int32 (int64) key array. The same float operations as ``score_chunk`` in the same
    order, so the keys equal ``to_keys(score_chunk(...))`` bit for bit. Returns ``sum(tau^2)``
    in float64, which is not finite exactly when an input (or tau^2) is not: the caller's
    NaN/Inf check, for free.
    """
    n = base.numel()
    cdt = scratch.a.dtype
    a, bb, zero, tmp = scratch.a[:n], scratch.b[:n], scratch.zero[:n], scratch.k[:n]
    s = out.view(cdt)
    bb.copy_(base)  # exact widening to the compute dtype
    # tau; finetuned is widened exactly inside the op (float8 explicitly: torch refuses it)
    torch.sub(widened(finetuned), bb, out=a)
    a.abs_()  # |tau|
    sq = float(torch.sum(torch.mul(a, a, out=s), dtype=torch.float64))  # s: free until below
    if method is Method.MAGNITUDE:
        s.copy_(a)
    else:
        torch.eq(bb, 0, out=zero)
        rel = torch.div(a, bb.abs_(), out=bb)  # |tau| / |base|; inf or nan where base == 0
        if method is Method.FAPM:
            torch.sub(a, rel.mul_(coef), out=s)
        else:
            torch.neg(rel, out=s).add_(0.0)  # -0.0 -> +0.0, so equal scores have equal keys
        s.masked_fill_(zero, float("-inf"))
    # to_keys in place, with the sign mask built in scratch rather than in fresh temporaries.
    width = out.element_size() * 8
    torch.bitwise_right_shift(out, width - 1, out=tmp)
    out.bitwise_xor_(tmp.bitwise_and_((1 << (width - 1)) - 1))
    return sq


def _bucket_walk(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin (from the bottom) holding the k-th largest count, and how many lie above it."""
    from_top = hist.cpu().flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k)))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return hist.numel() - 1 - idx, above


def select_from_top_histogram(
    keys: torch.Tensor, hist0: torch.Tensor, k: int, workers: int = 1
) -> Threshold:
    """Exact threshold of int32 ``keys`` given the histogram of their top 16 bits (offset by
    2^15 so that bins are in signed order). Same result as ``select_threshold``.

    Only the threshold bucket is counted in the second pass: keys are clamped to one below /
    one above it, so a single bincount sees every key, and nothing is compacted."""
    n = keys.numel()
    if (edge := edge_threshold(k, n)) is not None:
        return edge
    bucket, above = _bucket_walk(hist0, k)
    low = bucket_low(bucket)
    lo_b = max(low - 1, -(1 << 31))
    hi_b = min(low + _DIGITS, (1 << 31) - 1)
    plain = keys.device.type == "cpu" and keys.dtype == torch.int32 and keys.is_contiguous()
    kern = native.kernels() if plain else None
    if kern is not None:
        # One pass in C per chunk, on the scoring threads, each into its own histogram.
        def count(c: int) -> torch.Tensor:
            part = torch.zeros(_DIGITS, dtype=torch.int64)
            kern.bucket_hist(keys[c : c + CHUNK], low, part)
            return part

        inside = torch.stack(map_chunks(count, range(0, n, CHUNK), workers)).sum(0)
    else:
        hist1 = torch.zeros(hi_b - lo_b + 1, dtype=torch.int64, device=keys.device)
        for c in range(0, n, CHUNK):
            clamped = keys[c : c + CHUNK].clamp(lo_b, hi_b).sub_(lo_b)
            hist1 += torch.bincount(clamped, minlength=hist1.numel())
        inside = hist1[low - lo_b : low - lo_b + _DIGITS]
    return threshold_in_bucket(bucket, above, inside, k)


def top_bucket(hist0: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin of a radix histogram (65,536 top-16-bit buckets, or 256 bins of a digit)
    holding the k-th largest key (0 < k <= its total), and how many keys lie above it."""
    return _bucket_walk(hist0, k)


def top_buckets(hist0: torch.Tensor, ks: Sequence[int]) -> list[tuple[int, int]]:
    """``top_bucket`` for each k, with one walk of the histogram (a sweep's thresholds)."""
    if not ks:
        return []
    from_top = hist0.cpu().flip(0).cumsum(0)
    idx = torch.searchsorted(from_top, torch.tensor(list(ks))).tolist()
    last = hist0.numel() - 1
    return [(last - i, int(from_top[i - 1]) if i > 0 else 0) for i in idx]


def bucket_low(bucket: int) -> int:
    """The smallest int32 key in top-16-bit bucket ``bucket`` (bins are in signed order)."""
    return (bucket - (_DIGITS >> 1)) << 16


def threshold_in_bucket(bucket: int, above: int, inside: torch.Tensor, k: int) -> Threshold:
    """The exact threshold, given the bucket of the k-th largest key, the keys above that
    bucket and the histogram of the low 16 bits of the keys inside it."""
    digit, above_in = _bucket_walk(inside, k - above)
    return settled(bucket_low(bucket) + digit, k - above - above_in, int(inside[digit]))


def small_threshold(kern: native.Kernels, keys: torch.Tensor, k: int) -> Threshold:
    """The exact threshold of a few int32 keys (``native.select_small``); the same as the
    histogram path's, including its form when every tie is kept."""
    edge = edge_threshold(k, keys.numel())
    if edge is not None:
        return edge
    key, above, eq = kern.select_small(keys, k)
    return settled(key, k - above, eq)


class KeyBuffer:
    """One reusable key array for the whole run (a ``Workspace``'s).

    A fresh ``torch.empty`` per tensor costs a page fault per 4 kB on first touch (seconds
    over a 1B-parameter model) and hands the memory back to the OS after each tensor. The
    buffer only grows to the largest tensor, which the peak memory has to hold anyway. A
    second ranking in flight at the same time (interleaved generators) gets its own array."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf: torch.Tensor | None = None
        self._busy = False

    def take(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            if self._busy:
                return torch.empty(n, dtype=dtype)
            nbytes = n * (8 if dtype == torch.int64 else 4)
            if self._buf is None or self._buf.numel() < nbytes:
                self._buf = None  # free the old one before allocating the larger
                self._buf = torch.empty(nbytes, dtype=torch.uint8)
            self._busy = True
            return self._buf[:nbytes].view(dtype)

    def give_back(self, keys: torch.Tensor) -> None:
        with self._lock:
            if self._buf is not None and keys.data_ptr() == self._buf.data_ptr():
                self._busy = False

    def clear(self) -> None:
        with self._lock:
            self._buf = None
            self._busy = False


@dataclass
class Workspace:
    """What one run scores with: the device, the scoring threads and the reusable key array.

    A verb makes one for its run and passes it down to every tensor; nothing here is module
    state, so two runs in one process (or a library caller and the CLI) never share one."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = field(default_factory=lambda: score_workers())
    keys: KeyBuffer = field(default_factory=KeyBuffer, repr=False)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


@contextmanager
def workspace(device: str = "cpu", threads: int | None = None) -> Iterator[Workspace]:
    """A run's ``Workspace``; ``threads`` (None: torch's setting as it is) is torch's intra-op
    thread count for the run, restored when the run finishes (torch keeps it process-wide)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    yield Workspace(torch.device(device))
    # Restored after a run that finished, not while an error or a signal unwinds it: worker
    # threads may still be inside a torch op then, and resizing torch's thread pool under
    # them can abort the process ("terminate called without an active exception").
    torch.set_num_threads(before)


@dataclass
class Ranked:
    """One tensor scored and selected: keys, the exact threshold, and sum(tau^2).

    ``release()`` once done with the keys: the run's key buffer may serve the next tensor."""

    keys: torch.Tensor  # (n,) order-preserving integer keys of the scores
    threshold: Threshold
    sq_total: float  # sum of tau^2 over all entries
    owner: KeyBuffer | None = field(default=None, repr=False)

    def release(self) -> None:
        if self.owner is not None:
            self.owner.give_back(self.keys)


def rank_tensor(
    method: Method,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    k: int,
    lam: float,
    on_nonfinite: Callable[[int, int], None],
    ws: Workspace | None = None,
    *,
    chunk: int | None = None,
) -> Ranked:
    """Score every entry (one fused pass) and find the exact top-``k`` threshold.

    ``base``/``finetuned`` are flat, in storage dtype. ``on_nonfinite(start, stop)`` is called
    for a chunk whose ``sum(tau^2)`` is not finite: it must raise if an input there is NaN/Inf
    (otherwise tau^2 merely overflowed, and scoring goes on as the reference would).

    ``ws`` (default: a fresh CPU workspace): where scoring and selection run (the keys are
    then on that device), on how many threads, into which reusable key array. Every op is an
    exactly rounded float32 (float64) op or integer work, each its own kernel, so the keys and
    the threshold are the CPU's bit for bit; the mean ``m`` (a float64 reduction whose order
    a GPU would change) is computed on the CPU first. Only ``sq_total`` (a float64 sum, for the
    report) may differ in its last bits.
    """
    ws = ws or Workspace()
    device = ws.device
    n = base.numel()
    cdt = compute_dtype(base.dtype, finetuned.dtype)
    if n <= SMALL_TENSOR and chunk is None and device.type == "cpu":
        small = native_kernels(base, finetuned, cdt)
        if small is not None:
            return _rank_small(small, method, base, finetuned, k, lam, on_nonfinite, ws.keys)
    coef = torch.tensor(lam, dtype=cdt) * torch.tensor(
        mean_abs(base, cdt, ws.workers) if method is Method.FAPM else 0.0, dtype=cdt
    )
    kdt = torch.int64 if cdt == torch.float64 else torch.int32
    owner = None
    if device.type == "cpu":
        owner = ws.keys
        keys = owner.take(n, kdt)
        step = chunk or FUSED_CHUNK
    else:  # the inputs go over whole (the largest tensor sets the device memory too)
        base, finetuned = base.to(device), finetuned.to(device)
        coef = coef.to(device)
        keys = torch.empty(n, dtype=kdt, device=device)
        step = chunk or DEVICE_CHUNK
    fused_hist = cdt == torch.float32 and 0 < k < n
    starts = list(range(0, n, step))
    sq_parts = [0.0] * len(starts)
    kern = native_kernels(base, finetuned, cdt) if device.type == "cpu" else None

    def score_part(part: int, workers: int) -> torch.Tensor:
        """Chunks part, part + workers, ...: keys in place; returns their top-16-bit histogram."""
        hist = torch.zeros(_DIGITS, dtype=torch.int64, device=device)
        if kern is not None:
            return native_part(part, workers, hist)
        scratch = Scratch(min(step, max(n, 1)), cdt, device)
        for i in range(part, len(starts), workers):
            c = starts[i]
            stop = min(c + step, n)
            x = keys[c:stop]
            sq = score_keys_into(method, base[c:stop], finetuned[c:stop], coef, x, scratch)
            if not math.isfinite(sq):
                on_nonfinite(c, stop)
            sq_parts[i] = sq
            if fused_hist:
                top = torch.bitwise_right_shift(x, 16, out=scratch.k[: stop - c])
                hist += torch.bincount(top.add_(_DIGITS >> 1), minlength=_DIGITS)
        return hist

    def native_part(part: int, workers: int, hist: torch.Tensor) -> torch.Tensor:
        """score_part with the C kernel: 4 interleaved uint32 histograms, flushed into the
        int64 one before any counter could wrap."""
        assert kern is not None
        counts = torch.zeros(4 * _DIGITS, dtype=torch.int32) if fused_hist else None
        coef_f = float(coef)
        pending = 0
        for i in range(part, len(starts), workers):
            c = starts[i]
            stop = min(c + step, n)
            sq = kern.score_keys(method.value, base[c:stop], finetuned[c:stop], coef_f,
                                 keys[c:stop], counts)  # fmt: skip
            if not math.isfinite(sq):
                on_nonfinite(c, stop)
            sq_parts[i] = sq
            pending += stop - c
            if counts is not None and (pending >= 1 << 31 or i + workers >= len(starts)):
                kern.hist_flush(counts, hist)
                pending = 0
        return hist

    workers = ws.workers if device.type == "cpu" else 1
    try:
        # Chunks are independent: each worker writes its own slices of ``keys`` and counts its
        # own histogram (integers: the sum is order-free); torch and the kernels release the
        # GIL.
        hist0 = on_parts(score_part, workers, len(starts))
        if fused_hist:
            threshold = select_from_top_histogram(keys, hist0, k, ws.workers)
        else:
            threshold = select_threshold(keys, k)
    except BaseException:
        if owner is not None:  # NaN/Inf (or Ctrl-C): the buffer must serve the next tensor
            owner.give_back(keys)
        raise
    sq_total = math.fsum(sq_parts)  # in chunk order whatever the number of workers
    return Ranked(keys, threshold, sq_total, owner)


# Tensors up to this many entries are selected by ``native.select_small`` (an 8-bit radix select
# over compacted candidates, O(n) with no fixed cost) instead of the 16-bit histogram, whose
# fixed cost per tensor (65,536 bins built, flushed, walked) dominates small tensors; both give
# the same threshold (tested). Measured crossover in docs/benchmarks.md ("Small tensors").
SMALL_TENSOR = 1 << 16


def f32(x: float) -> float:
    """``x`` rounded to float32 (as ``torch.tensor(x, dtype=torch.float32)`` rounds it)."""
    try:
        return float(struct.unpack("f", struct.pack("f", x))[0])
    except OverflowError:  # packing refuses what rounds to infinity; torch gives inf
        return math.copysign(math.inf, x)


def _rank_small(
    kern: native.Kernels,
    method: Method,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    k: int,
    lam: float,
    on_nonfinite: Callable[[int, int], None],
    owner: KeyBuffer,
) -> Ranked:
    """``rank_tensor`` for a small CPU float32-scored tensor, in three kernel calls (mean,
    keys, select) and no torch op: the same keys and threshold as the general path.

    The coefficient is the same float32 arithmetic: ``m`` is the float64 mean rounded once
    (one chunk: its sum is the kernel's), ``lam`` rounded, and their product is exact in
    float64 (24-bit significands) before its one rounding to float32."""
    n = base.numel()
    m = f32(kern.sum_abs(base) / n) if method is Method.FAPM and n else 0.0
    coef = f32(f32(lam) * m)
    keys = owner.take(n, torch.int32)
    try:
        sq = kern.score_keys(method.value, base, finetuned, coef, keys, None)
        if not math.isfinite(sq):
            on_nonfinite(0, n)
        threshold = small_threshold(kern, keys, k)
    except BaseException:
        owner.give_back(keys)
        raise
    return Ranked(keys, threshold, sq, owner)
