"""The optional C kernels (``_kernels.c``), loaded with ctypes.

``kernels()`` returns them, or ``None`` where they were not built (no C compiler at install
time), are from another build (a stale ABI), or are switched off with ``FAPM_NATIVE=0``; then
fapm uses its torch path, which gives the same keys, thresholds and bytes (tested). ctypes
releases the GIL for each call, so the scoring threads run the kernels in parallel.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

ABI_VERSION = 14
ENV = "FAPM_NATIVE"  # "0": use the torch path (for comparisons and troubleshooting)

# The dtype codes of _kernels.c. Scores are float32 for these; float64 inputs use torch.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
METHODS = {"fapm": 0, "magnitude": 1, "ratio": 2}
MAX_SWEEP = 64  # sparsities one score pass can take (MAXS in _kernels.c)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


# Calls on at most this many elements keep the GIL (the library loaded a second time with
# ctypes.PyDLL): they take microseconds, and giving the GIL away for each (a CDLL call does)
# lets the reader and writer threads take it for up to the interpreter's switch interval. On
# 10,000 tensors of 64 x 64 that handoff was a third of fapm prune's time.
GIL_HELD = 1 << 16


@dataclass(frozen=True)
class Kernels:
    lib: ctypes.CDLL  # releases the GIL for each call: chunks run in parallel on threads
    held: ctypes.CDLL  # the same functions, keeping the GIL: small calls

    def _for(self, n: int) -> ctypes.CDLL:
        return self.held if n <= GIL_HELD else self.lib

    def sum_abs(self, t: torch.Tensor) -> float:
        """sum(|t|) in float64, in a fixed order (8 lanes)."""
        n = t.numel()
        return float(self._for(n).fapm_sum_abs(DTYPES[t.dtype], t.data_ptr(), n))

    def score_keys(
        self,
        method: str,
        base: torch.Tensor,
        finetuned: torch.Tensor,
        coef: float,
        keys: torch.Tensor,
        hist: torch.Tensor | None,
    ) -> float:
        """Keys of one chunk into ``keys``; ``hist`` (4 x 65536 uint32 as int32) is added to."""
        sq = self._for(base.numel()).fapm_score_keys(
            METHODS[method], DTYPES[base.dtype], DTYPES[finetuned.dtype],
            base.data_ptr(), finetuned.data_ptr(), base.numel(), coef, keys.data_ptr(),
            None if hist is None else hist.data_ptr(),
        )  # fmt: skip
        return float(sq)

    def bucket_hist(self, keys: torch.Tensor, low: int, hist: torch.Tensor) -> None:
        self.lib.fapm_bucket_hist(keys.data_ptr(), keys.numel(), low, hist.data_ptr())

    def select_small(self, keys: torch.Tensor, k: int) -> tuple[int, int, int]:
        """(key, above, eq) of the k-th largest of ``keys`` (0 < k < numel): its key, how many
        keys exceed it and how many equal it."""
        key, above, eq = ctypes.c_int32(), ctypes.c_int64(), ctypes.c_int64()
        rc = self._for(keys.numel()).fapm_select_small(
            keys.data_ptr(), keys.numel(), k, ctypes.byref(key), ctypes.byref(above),
            ctypes.byref(eq),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError(f"no memory to select among {keys.numel()} keys")
        return key.value, above.value, eq.value

    def hist_flush(self, counts: torch.Tensor, hist: torch.Tensor) -> None:
        """Add the 4 interleaved uint32 histograms ``counts`` into ``hist`` and zero them."""
        self.lib.fapm_hist_flush(counts.data_ptr(), hist.data_ptr())

    def score_pass(
        self,
        base: torch.Tensor,
        finetuned: torch.Tensor,
        coef: float,
        stats: torch.Tensor,
        counts: torch.Tensor,
        *,
        keys: tuple[torch.Tensor, torch.Tensor] | None = None,
        hists: tuple[torch.Tensor, torch.Tensor] | None = None,
        scores: torch.Tensor | None = None,
    ) -> float:
        """``fapm score``'s first pass over one chunk (see _kernels.c): adds to ``stats``
        (4 float64: sum |tau|, |base|, |tau|/|base|, tau^2) and ``counts`` (2 int64: base != 0,
        score > 0); optionally the FAPM and magnitude keys, their top-16-bit histograms (4 x
        65536 uint32 each) and the FAPM scores (float32). Returns the chunk's sum tau^2."""
        kf, km = (k.data_ptr() for k in keys) if keys is not None else (None, None)
        hf, hm = (h.data_ptr() for h in hists) if hists is not None else (None, None)
        return float(
            self._for(base.numel()).fapm_score_pass(
                DTYPES[base.dtype], DTYPES[finetuned.dtype], base.data_ptr(),
                finetuned.data_ptr(), base.numel(), coef, kf, km, hf, hm,
                None if scores is None else scores.data_ptr(), stats.data_ptr(),
                counts.data_ptr(),
            )
        )  # fmt: skip

    def score_final(
        self,
        base: torch.Tensor,
        finetuned: torch.Tensor,
        coef: float,
        rules: torch.Tensor,
        ties: torch.Tensor,
        sums: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Both masks of one chunk for m sparsities: ``rules`` (2, m) int32 keys (FAPM, then
        magnitude), ``ties`` (2, m) int64 ties left (INT64_MAX: all; updated), ``sums`` (2, m)
        float64 kept tau^2 and ``counts`` (3, m) int64 kept and overlap, added to."""
        m = rules.shape[1]
        rc = self._for(base.numel()).fapm_score_final(
            DTYPES[base.dtype], DTYPES[finetuned.dtype], base.data_ptr(), finetuned.data_ptr(),
            base.numel(), coef, m, rules[0].data_ptr(), ties[0].data_ptr(),
            rules[1].data_ptr(), ties[1].data_ptr(), sums[0].data_ptr(), sums[1].data_ptr(),
            counts[0].data_ptr(), counts[1].data_ptr(), counts[2].data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"{m} sparsities in one pass; at most {MAX_SWEEP}")

    def score_small(
        self,
        base: torch.Tensor,
        finetuned: torch.Tensor,
        lam: float,
        ks: Sequence[int],
        scores: torch.Tensor | None,
    ) -> tuple[list[float], list[int]]:
        """``fapm score`` of one small tensor at ``ks`` kept counts, in one call (the mean,
        keys and thresholds in C; scratch per thread); ``scores`` gets the FAPM scores
        (float32) if given. Returns the 4 sums of ``score_pass`` then the kept tau^2 of FAPM
        and magnitude per sparsity, and its 2 counts then per sparsity the FAPM, magnitude and
        overlap counts."""
        n, m = base.numel(), len(ks)
        out_f, out_i = (ctypes.c_double * (4 + 2 * m))(), (_I64 * (2 + 3 * m))()
        rc = self._for(n).fapm_score_small(
            DTYPES[base.dtype], DTYPES[finetuned.dtype], base.data_ptr(), finetuned.data_ptr(),
            n, lam, m, (_I64 * m)(*ks), None if scores is None else scores.data_ptr(), out_f,
            out_i,
        )  # fmt: skip
        if rc == -1:
            raise MemoryError(f"no memory to select among {n} keys")
        if rc != 0:
            raise ValueError(f"{m} sparsities in one pass; at most {MAX_SWEEP}")
        return list(out_f), list(out_i)

    def select_many(self, keys: torch.Tensor, ranks: list[int]) -> list[tuple[int, int, int]]:
        """(key, above, eq) of each rank (1 <= rank <= numel) among ``keys`` (int32): as
        ``select_small`` for each, the radix passes shared by ranks in the same digits. The
        select ``fapm_score_small`` calls inside C; bound here for the tests that check it."""
        n, m = keys.numel(), len(ranks)
        r = (_I64 * m)(*ranks)
        key, above, eq = (ctypes.c_int32 * m)(), (_I64 * m)(), (_I64 * m)()
        rc = self._for(n).fapm_select_many(keys.data_ptr(), n, m, r, key, above, eq)
        if rc == -1:
            raise MemoryError(f"no memory to select among {n} keys")
        if rc != 0:
            raise ValueError(f"{m} ranks in 1..{n} in one select; at most {MAX_SWEEP}")
        return list(zip(key, above, eq, strict=True))

    def use_avx512(self, on: bool) -> None:
        """Let score's final pass use its AVX-512 form where the CPU has it (the default), or
        keep to the portable one: the same figures either way (the tests compare them)."""
        self.lib.fapm_use_avx512(int(on))

    def bucket_select(
        self, keys: torch.Tensor, asks: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        """For each (bucket, rank) in ``asks``: (key, above, eq) of the rank-th largest (1-based)
        of the int32 ``keys`` in that top-16-bit bucket (a bin of ``score_pass``'s histograms),
        ``above`` and ``eq`` counting that bucket's keys; one pass over ``keys`` for all."""
        n, m = keys.numel(), len(asks)
        bucket = (ctypes.c_int32 * m)(*(a[0] for a in asks))
        rank = (_I64 * m)(*(a[1] for a in asks))
        key, above, eq = (ctypes.c_int32 * m)(), (_I64 * m)(), (_I64 * m)()
        rc = self._for(n).fapm_bucket_select(keys.data_ptr(), n, m, bucket, rank, key, above, eq)
        if rc == -1:
            raise MemoryError(f"no memory for the histograms of {m} buckets")
        if rc != 0:
            raise ValueError(f"{m} (bucket, rank) asks, not all within the {n} keys given")
        return list(zip(key, above, eq, strict=True))

    def count_eq_spans(
        self, keys: torch.Tensor, spans: Sequence[tuple[int, int]], ts: Sequence[int]
    ) -> torch.Tensor:
        """(len(spans), len(ts)) int64: how many keys of each (start, size) span of the int32
        ``keys`` equal each of ``ts``, in one call."""
        at = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
        if at.numel() and (at.min() < 0 or (at[:, 0] + at[:, 1]).max() > keys.numel()):
            raise ValueError(f"spans outside the {keys.numel()} keys given")
        out = torch.empty(len(spans), len(ts), dtype=torch.int64)
        self._for(keys.numel()).fapm_count_eq_spans(
            keys.data_ptr(), len(spans), at.data_ptr(), len(ts), (ctypes.c_int32 * len(ts))(*ts),
            out.data_ptr(),
        )  # fmt: skip
        return out

    def score_gather(
        self,
        base: torch.Tensor,
        finetuned: torch.Tensor,
        coef: float,
        sel: torch.Tensor,
        out_f: torch.Tensor,
        out_m: torch.Tensor,
    ) -> tuple[int, int]:
        """The FAPM and magnitude keys of one chunk in the buckets ``sel`` (2, 65536) uint8
        marks, appended into ``out_f``, ``out_m`` (int32, room for the chunk); their counts."""
        counts = (_I64 * 2)()
        self._for(base.numel()).fapm_score_gather(
            DTYPES[base.dtype], DTYPES[finetuned.dtype], base.data_ptr(), finetuned.data_ptr(),
            base.numel(), coef, sel[0].data_ptr(), sel[1].data_ptr(), out_f.data_ptr(),
            out_m.data_ptr(), counts,
        )  # fmt: skip
        return counts[0], counts[1]

    def delta_f32(
        self, base: torch.Tensor, finetuned: torch.Tensor, delta: torch.Tensor
    ) -> tuple[bool, int]:
        """``finetuned - base`` into the float32 ``delta`` (bfloat16 or float32 inputs of one
        dtype); (every entry reconstructs bit for bit, count of non-zero deltas). ``False``
        means: let the torch path decide."""
        kept = ctypes.c_int64()
        ok = self._for(base.numel()).fapm_delta_f32(
            DTYPES[base.dtype], base.data_ptr(), finetuned.data_ptr(), base.numel(),
            delta.data_ptr(), ctypes.byref(kept),
        )  # fmt: skip
        return bool(ok), kept.value

    def apply_delta_f32(self, base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> int:
        """``taskvector.reconstruct`` of a float32 ``delta`` into ``out`` (base's dtype,
        bfloat16 or float32); returns how many entries differ from base, bitwise, or -1 where
        a bfloat16 result would be NaN (left to torch)."""
        return int(
            self._for(base.numel()).fapm_apply_delta_f32(
                DTYPES[base.dtype], base.data_ptr(), delta.data_ptr(), base.numel(),
                out.data_ptr(),
            )
        )  # fmt: skip

    def pack_bits(self, mask: torch.Tensor, out: torch.Tensor) -> None:
        """The bool ``mask`` packed LSB first into the uint8 ``out`` ((numel + 7) // 8)."""
        self._for(mask.numel()).fapm_pack_bits(mask.data_ptr(), mask.numel(), out.data_ptr())

    def unpack_bits(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """The first ``out.numel()`` bits of ``packed`` into the bool ``out``."""
        self._for(out.numel()).fapm_unpack_bits(packed.data_ptr(), out.numel(), out.data_ptr())

    def count_eq(self, keys: torch.Tensor, t: int) -> int:
        n = keys.numel()
        return int(self._for(n).fapm_count_eq(keys.data_ptr(), n, t))

    def prune_small(
        self,
        method: str,
        base: torch.Tensor,
        finetuned: torch.Tensor,
        lam: float,
        k: int,
        out: torch.Tensor,
        force: bool,
    ) -> tuple[float, float, int] | None:
        """A small tensor pruned in one call (base, finetuned and ``out`` of one dtype; ``out``
        may be ``finetuned``): (sum tau^2, kept tau^2, kept). None: sum tau^2 is not finite
        and ``force`` is off; nothing was written (check the inputs, then force)."""
        res, kept = (ctypes.c_double * 2)(), _I64()
        n = base.numel()
        rc = self._for(n).fapm_prune_small(
            METHODS[method], DTYPES[base.dtype], base.data_ptr(), finetuned.data_ptr(), n, lam,
            k, out.data_ptr(), int(force), res, ctypes.byref(kept),
        )  # fmt: skip
        if rc == 1:
            return None
        if rc != 0:
            raise MemoryError(f"no memory to select among {n} keys")
        return res[0], res[1], kept.value

    def select_write(
        self,
        keys: torch.Tensor,
        t: int,
        ties_left: int,
        base: torch.Tensor,
        finetuned: torch.Tensor,
        out: torch.Tensor,
    ) -> tuple[float, int, int]:
        """Output chunk into ``out`` (may be ``finetuned``): (sum tau^2 kept, kept, ties used)."""
        kept, ties = ctypes.c_int64(), ctypes.c_int64()
        sq = self._for(keys.numel()).fapm_select_write(
            keys.data_ptr(), keys.numel(), t, ties_left, DTYPES[base.dtype],
            base.data_ptr(), finetuned.data_ptr(), out.data_ptr(),
            ctypes.byref(kept), ctypes.byref(ties),
        )  # fmt: skip
        return float(sq), kept.value, ties.value


def _bind(lib: ctypes.CDLL) -> None:
    lib.fapm_kernels_abi.argtypes = []
    lib.fapm_kernels_abi.restype = ctypes.c_int
    lib.fapm_sum_abs.argtypes = [ctypes.c_int, _P, _I64]
    lib.fapm_sum_abs.restype = ctypes.c_double
    lib.fapm_score_keys.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, _I64, ctypes.c_float, _P, _P,
    ]  # fmt: skip
    lib.fapm_score_keys.restype = ctypes.c_double
    lib.fapm_bucket_hist.argtypes = [_P, _I64, ctypes.c_int32, _P]
    lib.fapm_bucket_hist.restype = None
    lib.fapm_select_small.argtypes = [_P, _I64, _I64, _P, _P, _P]
    lib.fapm_select_small.restype = ctypes.c_int
    lib.fapm_hist_flush.argtypes = [_P, _P]
    lib.fapm_hist_flush.restype = None
    lib.fapm_score_pass.argtypes = [
        ctypes.c_int, ctypes.c_int, _P, _P, _I64, ctypes.c_float, _P, _P, _P, _P, _P, _P, _P,
    ]  # fmt: skip
    lib.fapm_score_pass.restype = ctypes.c_double
    lib.fapm_score_final.argtypes = [
        ctypes.c_int, ctypes.c_int, _P, _P, _I64, ctypes.c_float, ctypes.c_int,
        _P, _P, _P, _P, _P, _P, _P, _P, _P,
    ]  # fmt: skip
    lib.fapm_score_final.restype = ctypes.c_int
    lib.fapm_score_small.argtypes = [
        ctypes.c_int, ctypes.c_int, _P, _P, _I64, ctypes.c_double, ctypes.c_int, _P, _P, _P, _P,
    ]  # fmt: skip
    lib.fapm_score_small.restype = ctypes.c_int
    lib.fapm_select_many.argtypes = [_P, _I64, ctypes.c_int, _P, _P, _P, _P]
    lib.fapm_select_many.restype = ctypes.c_int
    lib.fapm_use_avx512.argtypes = [ctypes.c_int]
    lib.fapm_use_avx512.restype = None
    lib.fapm_bucket_select.argtypes = [_P, _I64, ctypes.c_int, _P, _P, _P, _P, _P]
    lib.fapm_bucket_select.restype = ctypes.c_int
    lib.fapm_count_eq_spans.argtypes = [_P, _I64, _P, ctypes.c_int, _P, _P]
    lib.fapm_count_eq_spans.restype = None
    lib.fapm_score_gather.argtypes = [
        ctypes.c_int, ctypes.c_int, _P, _P, _I64, ctypes.c_float, _P, _P, _P, _P, _P,
    ]  # fmt: skip
    lib.fapm_score_gather.restype = None
    lib.fapm_delta_f32.argtypes = [ctypes.c_int, _P, _P, _I64, _P, _P]
    lib.fapm_delta_f32.restype = ctypes.c_int
    lib.fapm_apply_delta_f32.argtypes = [ctypes.c_int, _P, _P, _I64, _P]
    lib.fapm_apply_delta_f32.restype = _I64
    lib.fapm_pack_bits.argtypes = [_P, _I64, _P]
    lib.fapm_pack_bits.restype = None
    lib.fapm_unpack_bits.argtypes = [_P, _I64, _P]
    lib.fapm_unpack_bits.restype = None
    lib.fapm_count_eq.argtypes = [_P, _I64, ctypes.c_int32]
    lib.fapm_count_eq.restype = ctypes.c_int64
    lib.fapm_prune_small.argtypes = [
        ctypes.c_int, ctypes.c_int, _P, _P, _I64, ctypes.c_double, _I64, _P, ctypes.c_int, _P,
        _P,
    ]  # fmt: skip
    lib.fapm_prune_small.restype = ctypes.c_int
    lib.fapm_select_write.argtypes = [
        _P, _I64, ctypes.c_int32, _I64, ctypes.c_int, _P, _P, _P, _P, _P,
    ]  # fmt: skip
    lib.fapm_select_write.restype = ctypes.c_double


@cache
def _load() -> Kernels | None:
    spec = importlib.util.find_spec("fapm_cli.compute._kernels")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
        held = ctypes.PyDLL(spec.origin)
        for one in (lib, held):
            _bind(one)
        if lib.fapm_kernels_abi() != ABI_VERSION:
            return None  # built from another version of _kernels.c: reinstall to rebuild
    except (OSError, AttributeError):
        return None
    return Kernels(lib, held)


def kernels() -> Kernels | None:
    """The C kernels, or None (not built, stale, or ``FAPM_NATIVE=0``)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    return _load()


def status() -> str:
    """One line saying which path runs (the benchmark and docs/getting-started.md use it)."""
    if os.environ.get(ENV, "1") == "0":
        return f"off ({ENV}=0)"
    return "on" if _load() is not None else "not built (torch path)"
