"""The metrics and the exact top-k selection, as pure tensor functions.

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

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

import torch

# Elements per chunk for element-wise work: large enough that per-call overhead is negligible,
# small enough that temporaries stay in cache. Changing it changes no result (reductions that
# could depend on it are done in float64 per chunk and summed in a fixed order).
CHUNK = 1 << 20
# DARE draws its Bernoulli mask in blocks of this many elements, each from a generator seeded
# by (seed, tensor name, block index): the mask depends on nothing but those.
RANDOM_BLOCK = 1 << 20


class Method(StrEnum):
    FAPM = "fapm"
    MAGNITUDE = "magnitude"
    RATIO = "ratio"
    RANDOM = "random"


def keep_count(numel: int, sparsity: Fraction) -> int:
    """``floor(numel * (1 - s))`` computed exactly (numel 10, s 0.9 -> 1, not 0)."""
    return int(numel * (1 - sparsity)) if sparsity < 1 else 0


def parse_sparsity(text: str | float) -> Fraction:
    """Sparsity as an exact fraction of its decimal spelling ("0.9" -> 9/10)."""
    try:
        value = Fraction(str(text))
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"sparsity {text!r} is not a number") from err
    if not 0 <= value <= 1:
        raise ValueError(f"sparsity {text} is outside [0, 1]")
    return value


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def mean_abs(base: torch.Tensor, dtype: torch.dtype) -> float:
    """``m = mean(|W_pre|)``: summed per chunk in float64, rounded once to the compute dtype."""
    flat = base.reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    total = 0.0
    for c in range(0, n, CHUNK):
        total += float(flat[c : c + CHUNK].to(torch.float64).abs().sum())
    return float(torch.tensor(total / n, dtype=dtype))


def score_chunk(
    method: Method, base: torch.Tensor, finetuned: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Scores of one chunk (1-D, compute dtype). ``coef`` is ``lam * m`` as a 0-d tensor.

    fapm:      S = |tau| - coef * (|tau| / |base|)
    magnitude: S = |tau|
    ratio:     S = -(|tau| / |base|)
    Where base == 0 the relative term is undefined: fapm and ratio score -inf (selected last).
    """
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


def select_threshold(keys: torch.Tensor, k: int) -> Threshold:
    """Find the k-th largest key by radix select on 16-bit digits, most significant first."""
    n = keys.numel()
    if k >= n:
        return Threshold(0, 0, keep_all=True)
    if k <= 0:
        return Threshold(0, 0, keep_none=True)
    width = keys.element_size() * 8
    sign_bit = -(1 << (width - 1))
    flat = keys.reshape(-1)
    prefix = 0  # the digits fixed so far: the top 16 * level bits of the unsigned key
    above = 0  # keys known to be strictly greater than every key in the current bucket
    for level in range(width // 16):
        shift = width - 16 * (level + 1)
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for c in range(0, n, CHUNK):
            # XOR with the sign bit turns signed order into unsigned order of the bit pattern.
            u = flat[c : c + CHUNK] ^ sign_bit
            if level:  # only keys in the bucket chosen so far
                u = u[((u >> (shift + 16)) & ((1 << (16 * level)) - 1)) == prefix]
            hist += torch.bincount(((u >> shift) & 0xFFFF).reshape(-1), minlength=1 << 16)
        # Walk buckets from the top until the k-th largest key falls inside one.
        from_top = hist.flip(0).cumsum(0)
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
    mask = keys > t.key
    if ties_seen < t.ties:
        eq = keys == t.key
        rank = eq.cumsum(0) + ties_seen  # 1-based rank among ties, counting earlier chunks
        mask |= eq & (rank <= t.ties)
        ties_seen = min(int(rank[-1]), t.ties) if rank.numel() else ties_seen
    return mask, ties_seen


def random_mask_block(seed: int, name: str, block: int, size: int, keep: float) -> torch.Tensor:
    """DARE's Bernoulli(keep) mask for one block, reproducible from (seed, name, block)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{block}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.rand(size, generator=gen) < keep
