"""The C kernels (fapm_cli/compute/_kernels.c) against the torch path, and the reader's buffer ring.

The torch path is itself checked against the naive reference elsewhere (test_engine,
test_perf_paths run on both paths); here each kernel is compared with the torch operations it
replaces, bit for bit, including the inputs where float arithmetic is delicate."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fapm_cli import plan
from fapm_cli.compute import native, scoring
from fapm_cli.compute import prune as compute_prune
from fapm_cli.io import reader
from fapm_cli.io.reader import BufferPool
from fapm_cli.plan import Method
from fapm_cli.verbs import prune as verbs_prune
from tests.checkpoints import load_checkpoint, write_checkpoint
from tests.reference import reference_mask

KERNELS = native.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the C kernels are not built")


def test_kernels_are_built_where_a_compiler_is() -> None:
    """A silent fallback would lose the speed unnoticed: with a C compiler, they must load."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert native.kernels() is not None, native.status()


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "0")
    assert native.kernels() is None
    assert "off" in native.status()


def _torch_keys(method: Method, b: torch.Tensor, f: torch.Tensor, coef: float) -> torch.Tensor:
    keys = torch.empty(b.numel(), dtype=torch.int32)
    scratch = scoring.Scratch(b.numel(), torch.float32)
    scoring.score_keys_into(method, b, f, torch.tensor(coef), keys, scratch)
    return keys


def _delicate(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros, negative zeros, subnormals, huge values (tau overflows to inf), equal values."""
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(11)
    b = torch.randn(5000, generator=gen) * 0.02
    f = b + torch.randn(5000, generator=gen) * 1e-3
    special = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, 1.0, -1.0]
    b[: len(special)] = torch.tensor(special)
    f[: len(special)] = torch.tensor(special[::-1])
    f[100:200] = b[100:200]  # tau == 0
    b[200:300] = 0.0
    return b.to(dtype), f.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", list(Method)[:3])
@pytest.mark.parametrize("coef", [0.0133125, 0.0, 3.5])
def test_score_keys_equal_torch(dtype: torch.dtype, method: Method, coef: float) -> None:
    assert KERNELS is not None
    b, f = _delicate(dtype)
    coef = float(torch.tensor(coef, dtype=torch.float32))
    keys = torch.empty(b.numel(), dtype=torch.int32)
    hist = torch.zeros(4 * 65536, dtype=torch.int32)
    sq = KERNELS.score_keys(method.value, b, f, coef, keys, hist)
    want = _torch_keys(method, b, f, coef)
    assert torch.equal(keys, want)
    counts = hist.view(4, 65536).sum(0)
    assert torch.equal(counts, torch.bincount((want >> 16) + 32768, minlength=65536).int())
    tau = f.float() - b.float()
    assert sq == pytest.approx(float(torch.sum(tau * tau, dtype=torch.float64)), rel=1e-12)


@needs_kernels
def test_mixed_dtypes_take_the_generic_loads() -> None:
    assert KERNELS is not None
    b, f = _delicate(torch.float32)
    b16, f16 = b.to(torch.bfloat16), f.to(torch.float16)
    keys = torch.empty(b.numel(), dtype=torch.int32)
    KERNELS.score_keys("fapm", b16, f16, 0.25, keys, None)
    assert torch.equal(keys, _torch_keys(Method.FAPM, b16, f16, 0.25))


@needs_kernels
def test_every_float16_value_converts_exactly() -> None:
    """All 63,488 finite half values (subnormals included) as base against a fixed finetuned:
    tau = 1 - base depends on the sign, |base| on the magnitude."""
    assert KERNELS is not None
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    b = every[torch.isfinite(every)].contiguous()
    f = torch.ones_like(b)
    for method in (Method.FAPM, Method.MAGNITUDE, Method.RATIO):
        keys = torch.empty(b.numel(), dtype=torch.int32)
        KERNELS.score_keys(method.value, b, f, 0.5, keys, None)
        assert torch.equal(keys, _torch_keys(method, b, f, 0.5)), method
    assert KERNELS.sum_abs(b) == float(b.double().abs().sum())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_select_write_equals_mask_and_where(dtype: torch.dtype) -> None:
    assert KERNELS is not None
    b, f = _delicate(dtype)
    keys = _torch_keys(Method.FAPM, b, f, 0.01)
    hist0 = torch.bincount((keys >> 16) + 32768, minlength=65536)
    for k in (1, 37, 2500, 4999):
        t = scoring.select_from_top_histogram(keys, hist0, k)
        mask, _ = scoring.keep_mask_chunk(keys, t, 0)
        want = torch.where(mask, f, b)
        out = torch.empty_like(f)
        sq, kept, ties = KERNELS.select_write(keys, t.key, t.ties, b, f, out)
        assert kept == k == int(mask.sum())
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
        tau = (f.float() - b.float())[mask]
        assert sq == pytest.approx(float(torch.sum(tau * tau, dtype=torch.float64)), rel=1e-12)
        assert ties <= t.ties
        inplace = f.clone()
        KERNELS.select_write(keys, t.key, t.ties, b, inplace, inplace)
        assert torch.equal(inplace.view(torch.uint8), want.view(torch.uint8))


@needs_kernels
def test_bucket_hist_and_count_eq() -> None:
    assert KERNELS is not None
    keys = torch.tensor([-(1 << 31), -5, 0, 3, 3, 65535, 65536, (1 << 31) - 1], dtype=torch.int32)
    hist = torch.zeros(65536, dtype=torch.int64)
    KERNELS.bucket_hist(keys, 0, hist)
    assert hist[0] == 1 and hist[3] == 2 and hist[65535] == 1 and int(hist.sum()) == 4
    hist.zero_()
    KERNELS.bucket_hist(keys, -(1 << 31), hist)
    assert int(hist.sum()) == 1
    assert KERNELS.count_eq(keys, 3) == 2
    assert KERNELS.count_eq(keys, 7) == 0


def _sorted_threshold(keys: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(k-th largest key, keys above it, keys equal to it), from a full sort."""
    ordered = sorted(keys.tolist(), reverse=True)
    t = ordered[k - 1]
    return t, sum(x > t for x in ordered), sum(x == t for x in ordered)


@needs_kernels
def test_select_small_against_a_sort() -> None:
    """The 8-bit radix select of small tensors: every digit decides somewhere (keys that
    differ only in their lowest byte, only in their highest, the int32 extremes, ties)."""
    assert KERNELS is not None
    rng = random.Random(3)
    cases = [
        [rng.randrange(-(1 << 31), 1 << 31) for _ in range(300)],
        [0x12345600 + rng.randrange(4) for _ in range(300)],  # ties, low byte only
        [rng.randrange(4) << 24 for _ in range(300)],  # high byte only
        [-(1 << 31)] * 5 + [(1 << 31) - 1] * 5 + [0, -1, 1],
        [7] * 64,
        [5],
    ]
    for values in cases:
        keys = torch.tensor(values, dtype=torch.int32)
        for k in sorted(
            {1, 2, len(values) // 3, len(values) - 1, len(values)} & set(range(1, len(values) + 1))
        ):
            assert KERNELS.select_small(keys, k) == _sorted_threshold(keys, k), (values[:5], k)


@needs_kernels
def test_select_many_against_a_sort() -> None:
    """Several ranks in one radix select (fapm score's sweep): each as a sort gives it, with
    ranks repeated, out of order, in one digit and in different ones."""
    assert KERNELS is not None
    rng = random.Random(4)
    cases = [
        [rng.randrange(-(1 << 31), 1 << 31) for _ in range(500)],
        [0x12345600 + rng.randrange(4) for _ in range(500)],
        [rng.randrange(4) << 24 | rng.randrange(3) for _ in range(500)],
        [-(1 << 31)] * 5 + [(1 << 31) - 1] * 5 + [0, -1, 1],
        [7] * 64,
        [5],
    ]
    for values in cases:
        keys = torch.tensor(values, dtype=torch.int32)
        n = len(values)
        ranks = [r for r in (n, 1, n // 2, n // 2, n // 3 + 1, n - 1, 2) if 1 <= r <= n]
        got = KERNELS.select_many(keys, ranks)
        assert got == [_sorted_threshold(keys, r) for r in ranks], values[:5]
    two = torch.tensor([1, 2], dtype=torch.int32)
    assert KERNELS.select_many(two, []) == []
    for bad in ([0], [3], [1] * (native.MAX_SWEEP + 1)):
        with pytest.raises(ValueError):
            KERNELS.select_many(two, bad)


@needs_kernels
def test_gather_takes_the_chosen_buckets_keys_in_order() -> None:
    """fapm score's gather against the keys ``score_keys`` gives, filtered in Python: every key
    of a chosen bucket, in order, for both methods; no bucket, one, two far apart (unchosen
    buckets between them, keys in them skipped), every bucket, the lowest and highest; chunks
    shorter than, equal to and past a run of 16 keys and a block."""
    assert KERNELS is not None
    torch.manual_seed(11)
    for n in (1, 15, 16, 17, 33, 1024, 1025, 4099):
        b = (torch.randn(n) * 0.02).bfloat16()
        f = (b.float() + torch.randn(n) * 1e-3).bfloat16()
        b[::7] = 0  # FAPM keys of -inf
        coef = 0.015
        keys = {m: torch.empty(n, dtype=torch.int32) for m in ("fapm", "magnitude")}
        for m, k in keys.items():
            KERNELS.score_keys(m, b, f, coef, k, None)
        buckets = {m: ((k >> 16) + 32768).long() for m, k in keys.items()}
        for pick in ("none", "one", "ends", "all", "extremes"):
            sel = torch.zeros(2, 1 << 16, dtype=torch.uint8)
            for row, m in enumerate(("fapm", "magnitude")):
                present = sorted(set(buckets[m].tolist()))
                chosen = {"none": [], "one": present[len(present) // 2 :][:1],
                          "ends": [present[0], present[-1]], "all": range(1 << 16),
                          "extremes": [0, (1 << 16) - 1]}[pick]  # fmt: skip
                sel[row, list(chosen)] = 1
            out_f = torch.full((n,), 7, dtype=torch.int32)
            out_m = torch.full((n,), 7, dtype=torch.int32)
            nf, nm = KERNELS.score_gather(b, f, coef, sel, out_f, out_m)
            for row, m, out, count in ((0, "fapm", out_f, nf), (1, "magnitude", out_m, nm)):
                want = keys[m][sel[row][buckets[m]].bool()]
                assert count == want.numel(), (n, pick, m)
                assert torch.equal(out[:count], want), (n, pick, m)


@needs_kernels
def test_bucket_select_against_a_sort() -> None:
    """fapm score's select among gathered keys: the rank-th largest inside a top-16-bit bucket,
    several buckets and ranks in one pass, each as a sort of that bucket's keys gives it (keys
    of other buckets mixed in and skipped, the int32 extremes, ties, repeated asks)."""
    assert KERNELS is not None
    rng = random.Random(5)
    values = (
        [0x12340000 + rng.randrange(1 << 16) for _ in range(400)]  # bucket 0x1234
        + [-0x00010000 + rng.randrange(8) for _ in range(300)]  # bucket -1: ties
        + [-(1 << 31)] * 3
        + [(1 << 31) - 1] * 4  # the lowest and the highest bucket
        + [rng.randrange(-(1 << 31), 1 << 31) for _ in range(300)]  # anywhere
    )
    rng.shuffle(values)
    keys = torch.tensor(values, dtype=torch.int32)

    def in_bucket(bucket: int) -> list[int]:
        return [v for v in values if (v >> 16) + 32768 == bucket]

    asks = []
    for bucket in (0x1234 + 32768, -1 + 32768, 0, 65535):
        size = len(in_bucket(bucket))
        asks += [(bucket, r) for r in sorted({1, 2, size // 2, size - 1, size}) if r >= 1]
    asks.append(asks[0])
    got = KERNELS.bucket_select(keys, asks)
    for (bucket, rank), found in zip(asks, got, strict=True):
        assert found == _sorted_threshold(torch.tensor(in_bucket(bucket)), rank), (bucket, rank)
    assert KERNELS.bucket_select(keys, []) == []
    for bad in ([(0x1234 + 32768, 0)], [(0, 4)], [(65536, 1)], [(-1, 1)]):
        with pytest.raises(ValueError):
            KERNELS.bucket_select(keys, bad)


@needs_kernels
@pytest.mark.parametrize("n", [4096, 70_000])
def test_score_final_pass_the_same_with_or_without_avx512(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fapm score's final pass has an AVX-512 form (mask registers; used where the CPU has
    it), a portable vector form (several sparsities at once) and the one-sparsity loop: every
    figure the same, bit for bit, at one and at six sparsities, with thresholds that keep only
    part of their ties and a tail of entries past the last 8 (on a CPU without AVX-512 both
    runs take the portable forms)."""
    assert KERNELS is not None
    from fapm_cli.compute import score as compute_score

    monkeypatch.setattr(scoring, "FUSED_CHUNK", 1000)  # the 70,000: many chunks, 3-pass path
    gen = torch.Generator().manual_seed(n)
    b = (torch.randn(n + 5, generator=gen) * 0.02).to(torch.bfloat16)
    f = (b.float() + torch.randn(n + 5, generator=gen) * 5e-4).to(torch.bfloat16)
    b[n // 5 : n // 2], f[n // 5 : n // 2] = 0.01, 0.0105  # a plateau of equal scores
    ws = scoring.Workspace()
    sweeps = [[Fraction(9, 10)], [Fraction(x, 100) for x in (0, 50, 70, 80, 90, 99)]]
    got = {}
    try:
        for wide in (True, False):
            KERNELS.use_avx512(wide)
            got[wide] = [compute_score.score_sweep("t", b, f, s, 0.7, None, ws) for s in sweeps]
    finally:
        KERNELS.use_avx512(True)
    assert got[True] == got[False]
    assert got[True][1][4] == got[True][0][0]  # 0.9 in the sweep: what 0.9 alone gives


@needs_kernels
def test_count_eq_spans_against_python() -> None:
    assert KERNELS is not None
    rng = random.Random(6)
    values = [rng.randrange(-3, 4) for _ in range(1000)] + [-(1 << 31), (1 << 31) - 1]
    keys = torch.tensor(values, dtype=torch.int32)
    spans = [(0, 10), (10, 0), (500, 502), (3, 1)]
    ts = [0, 3, -(1 << 31), (1 << 31) - 1, 9]
    want = [[values[a : a + n].count(t) for t in ts] for a, n in spans]
    assert KERNELS.count_eq_spans(keys, spans, ts).tolist() == want
    with pytest.raises(ValueError):
        KERNELS.count_eq_spans(keys, [(1000, 3)], ts)


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 4096, scoring.SMALL_TENSOR])
def test_small_score_equals_the_chunked_score(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """fapm score's one-call path for small tensors against the histogram path on the same
    tensor: every figure at every sparsity of a sweep, bit for bit (one chunk either way, so
    the float64 sums are added in the same order), with ties straddling thresholds, zeros in
    base, and float32 inputs."""
    from fapm_cli.compute import score as compute_score

    gen = torch.Generator().manual_seed(n)
    b = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    f = (b.float() + torch.randn(n, generator=gen) * 5e-4).to(torch.bfloat16)
    if n > 8:
        b[n // 4 : n // 2], f[n // 4 : n // 2] = 0.01, 0.0105
        b[:3] = 0.0
    sweep = [Fraction(x) for x in ("0", "1/3", "1/2", "9/10", "99/100", "1")]
    ws = scoring.Workspace()
    for pair in ((b, f), (b.float(), f.float())):
        small = compute_score.score_sweep("t", *pair, sweep, 0.5, None, ws)
        monkeypatch.setattr(scoring, "SMALL_TENSOR", 0)
        chunked = compute_score.score_sweep("t", *pair, sweep, 0.5, None, ws)
        monkeypatch.undo()
        assert small == chunked
        assert [s.kept for s in small] == [plan.keep_count(n, s) for s in sweep]


@needs_kernels
@pytest.mark.parametrize("method", [Method.FAPM, Method.MAGNITUDE, Method.RATIO])
@pytest.mark.parametrize("n", [1, 2, 3, 4096, scoring.SMALL_TENSOR])
def test_small_tensor_path_equals_the_histogram_path(method: Method, n: int) -> None:
    """rank_tensor below SMALL_TENSOR (keys in one call, radix select) against the same
    tensor forced through the chunked histogram path: same keys, same threshold, same
    sum(tau^2) bits; for every k, including keep-all, keep-none and a plateau of ties."""
    gen = torch.Generator().manual_seed(n)
    b = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    f = (b.float() + torch.randn(n, generator=gen) * 5e-4).to(torch.bfloat16)
    if n > 8:
        b[n // 4 : n // 2] = 0.01  # equal scores across the threshold
        f[n // 4 : n // 2] = 0.0105
        b[:3] = 0.0  # -inf scores (fapm, ratio)
    for k in sorted({0, 1, n // 10, n // 3, n // 2, n - 1, n}):
        small = scoring.rank_tensor(method, b, f, k, 0.5, _never)
        chunked = scoring.rank_tensor(method, b, f, k, 0.5, _never, chunk=max(1, n // 3))
        assert torch.equal(small.keys, chunked.keys)
        assert small.threshold == chunked.threshold, (k, small.threshold, chunked.threshold)
        assert small.sq_total == chunked.sq_total
        masks = [torch.cat([m for _, _, m in scoring.keep_masks(r)]) for r in (small, chunked)]
        assert torch.equal(masks[0], masks[1]) and int(masks[0].sum()) == k
        want = reference_mask(b, f, Fraction(n - k, n), method.value, lam=0.5)
        assert torch.equal(masks[0], want.reshape(-1))


def _never(start: int, stop: int) -> None:
    raise AssertionError("finite inputs")


@needs_kernels
@pytest.mark.parametrize("method", ["fapm", "magnitude", "ratio"])
@pytest.mark.parametrize("sparsity", ["0", "0.5", "0.9", "1"])
def test_small_prune_in_one_call_equals_the_general_path(
    tmp_path: Path, method: str, sparsity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``native.prune_small`` (a small tensor in one kernel call) against the same run
    through rank_tensor and select_write: the same files and figures, with ties across the
    threshold, zeros in base, float32 and float16 tensors, and a tau^2 that overflows although
    every input is finite (the kernel stops, the inputs are checked, the run goes on)."""
    gen = torch.Generator().manual_seed(9)
    base, ft = {}, {}
    for i, (n, dtype) in enumerate([(4096, torch.bfloat16), (77, torch.float32),
                                    (300, torch.float16), (1, torch.bfloat16)]):  # fmt: skip
        b = (torch.randn(n, generator=gen) * 0.02).to(dtype)
        f = (b.float() + torch.randn(n, generator=gen) * 5e-4).to(dtype)
        if n > 100:
            b[n // 4 : n // 2], f[n // 4 : n // 2] = 0.01, 0.0105
            b[:3] = 0.0
        base[f"t{i}"], ft[f"t{i}"] = b, f
    base["big"] = torch.tensor([1e30, -2e30, 3.0, 4.0], dtype=torch.float32)
    ft["big"] = torch.tensor([-1e30, 2e30, 3.5, 4.0], dtype=torch.float32)
    bd = write_checkpoint(tmp_path / "b", base)
    fd = write_checkpoint(tmp_path / "f", ft)
    opts = plan.PruneOptions(method=Method(method), sparsity=Fraction(sparsity), lam=0.7)
    one = verbs_prune.prune(str(bd), str(fd), str(tmp_path / "one"), opts)
    monkeypatch.setattr(scoring, "SMALL_TENSOR", 0)
    general = verbs_prune.prune(str(bd), str(fd), str(tmp_path / "general"), opts)
    for shard in sorted((tmp_path / "general").iterdir()):
        assert (tmp_path / "one" / shard.name).read_bytes() == shard.read_bytes(), shard
    assert [r.to_json() for r in one.tensors] == [r.to_json() for r in general.tensors]
    got = load_checkpoint(tmp_path / "one")
    for name in base:
        b, f = base[name], ft[name]
        want = torch.where(reference_mask(b, f, Fraction(sparsity), method, lam=0.7), f, b)
        assert torch.equal(got[name], want), name


@needs_kernels
def test_small_prune_refuses_nan_by_name(tmp_path: Path) -> None:
    from fapm_cli.errors import InputError

    b = torch.zeros(64, dtype=torch.bfloat16) + 0.5
    f = b.clone()
    f[7] = float("nan")
    bd = write_checkpoint(tmp_path / "b", {"w": b})
    fd = write_checkpoint(tmp_path / "f", {"w": f})
    with pytest.raises(InputError, match=r"'w'.*finetuned contains NaN"):
        verbs_prune.prune(str(bd), str(fd), str(tmp_path / "o"), plan.PruneOptions())


@needs_kernels
@pytest.mark.parametrize("sparsity", ["0", "0.5", "0.9", "0.999", "1"])
def test_engine_output_is_the_same_on_both_paths(
    tmp_path: Path, sparsity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole runs, many output chunks and ties across chunk borders: same files, byte for
    byte, with and without the kernels (the ring buffer in use on both)."""
    monkeypatch.setattr(compute_prune, "NATIVE_OUT_CHUNK", 1000)
    monkeypatch.setattr(scoring, "FUSED_CHUNK", 1500)
    gen = torch.Generator().manual_seed(5)
    base, ft = {}, {}
    for i, n in enumerate([10_007, 4096, 3, 25_000]):
        b = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
        f = (b.float() + torch.randn(n, generator=gen) * 5e-4).to(torch.bfloat16)
        if i == 3:  # a plateau of equal scores straddling many chunks
            b[5000:20000] = 0.01
            f[5000:20000] = 0.0105
        base[f"t{i}"], ft[f"t{i}"] = b, f
    bd = write_checkpoint(tmp_path / "b", base, shard_bytes=30_000)
    fd = write_checkpoint(tmp_path / "f", ft, shard_bytes=20_000)
    opts = plan.PruneOptions(sparsity=Fraction(sparsity))
    verbs_prune.prune(str(bd), str(fd), str(tmp_path / "native"), opts)
    monkeypatch.setenv(native.ENV, "0")
    verbs_prune.prune(str(bd), str(fd), str(tmp_path / "torch"), opts)
    for shard in sorted((tmp_path / "torch").iterdir()):
        assert (tmp_path / "native" / shard.name).read_bytes() == shard.read_bytes(), shard
    got = load_checkpoint(tmp_path / "native")  # and both are the reference's output
    for name in base:
        b, f = base[name], ft[name]
        want = torch.where(reference_mask(b, f, Fraction(sparsity), "fapm"), f, b)
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name


# -- the reader's buffer ring ---------------------------------------------------------------


def test_ring_reuses_memory_in_fifo_order() -> None:
    pool = BufferPool(1000, wait=0)
    a = pool.take(400)
    b = pool.take(400)
    assert b.data_ptr() - a.data_ptr() == 448  # 64-byte aligned
    c = pool.take(400)  # no room before b is handed back, none at the end: fresh
    assert pool.fresh == 1
    pool.give(a)
    d = pool.take(300)  # wraps to the start, where a was
    assert d.data_ptr() == a.data_ptr() and pool.fresh == 1
    pool.give(c)  # fresh: ignored
    pool.give(b)
    pool.give(d)
    e = pool.take(1000)  # everything handed back: the whole arena again
    assert e.data_ptr() == a.data_ptr() and pool.fresh == 1
    assert pool.take(1).numel() == 1 and pool.fresh == 2  # arena full


def test_ring_tail_waits_for_the_oldest() -> None:
    """Handing back a later buffer first frees nothing until the older ones are back."""
    pool = BufferPool(1024, wait=0)
    a, b = pool.take(512), pool.take(448)
    pool.give(b)
    assert pool.take(512).numel() == 512 and pool.fresh == 1
    pool.give(a)
    assert pool.take(960).data_ptr() == a.data_ptr() and pool.fresh == 1


def test_ring_full_after_wrapping_is_not_empty() -> None:
    """After a wrap that ends exactly at the oldest region, head == tail means full: the next
    region must not be placed over the oldest one (it would overwrite a tensor in use)."""
    pool = BufferPool(1024, wait=0)
    a, b = pool.take(512), pool.take(512)
    pool.give(a)
    c = pool.take(512)  # wraps into a's place, ending where b starts
    assert c.data_ptr() == a.data_ptr() and pool.fresh == 0
    d = pool.take(64)
    assert pool.fresh == 1  # no room anywhere: fresh, not on top of b
    assert not (b.data_ptr() <= d.data_ptr() < b.data_ptr() + 512)
    pool.give(b)
    e = pool.take(512)  # b's place is free now
    assert e.data_ptr() == b.data_ptr() and pool.fresh == 1


def test_ring_regions_never_overlap_under_random_use() -> None:
    """Random sizes, handed back in order with a random lag: live regions never overlap."""
    rng = random.Random(7)
    pool = BufferPool(10_000, wait=0)
    live: list[torch.Tensor] = []
    for _ in range(5000):
        if live and (rng.random() < 0.45 or len(live) > 6):
            pool.give(live.pop(0))
        t = pool.take(rng.choice([64, 128, 640, 1000, 2048, 3000, 4096, rng.randrange(1, 5000)]))
        spans = sorted((x.data_ptr(), x.data_ptr() + x.numel()) for x in [*live, t])
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
        live.append(t)
    assert pool.fresh < 5000  # the arena did serve most requests


def test_ring_larger_than_arena_is_fresh() -> None:
    pool = BufferPool(100)
    big = pool.take(101)
    assert big.numel() == 101 and pool.fresh == 1 and pool.waited == 0
    pool.give(big)  # not from the arena: nothing to do
    assert pool.take(100).numel() == 100 and pool.fresh == 1


def _once_waiting(pool: BufferPool, action: Callable[[], object]) -> threading.Thread:
    """Run ``action`` on another thread once a ``take`` waits for room. ``take`` counts
    ``waited`` under the pool's lock and releases it only by waiting, so ``action`` (which
    needs that lock) runs after the wait began, however slow the machine: no sleep to tune."""

    def run() -> None:
        deadline = time.monotonic() + 25  # below take's own 30 s limit: a hang is a failure
        while pool.waited < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        action()

    helper = threading.Thread(target=run, daemon=True)
    helper.start()
    return helper


def test_ring_waits_for_room_instead_of_growing() -> None:
    """A request that does not fit yet waits until earlier ones come back (here from another
    thread, as the writer hands them back), then gets arena memory: no new allocation."""
    pool = BufferPool(1024)
    a = pool.take(1000)
    helper = _once_waiting(pool, lambda: pool.give(a))
    b = pool.take(800)
    helper.join()
    assert b.data_ptr() == a.data_ptr()
    assert (pool.waited, pool.fresh) == (1, 0)


def test_ring_close_releases_a_waiting_thread() -> None:
    pool = BufferPool(1024)
    pool.take(1000)
    helper = _once_waiting(pool, pool.close)
    assert pool.take(800).numel() == 800  # fresh, after close
    helper.join()
    assert (pool.waited, pool.fresh) == (1, 1)


def test_no_scoring_thread_outlives_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring threads are shut down by each call that starts them. A pool kept for the
    process would depend on the interpreter's exit hook, which a SIGTERM landing inside
    ThreadPoolExecutor.submit can leave with a thread it never wakes: the process then hangs
    at exit (seen once in test_faults' SIGTERM case)."""
    monkeypatch.setattr(scoring, "score_workers", lambda: 2)
    monkeypatch.setattr(compute_prune, "NATIVE_OUT_CHUNK", 1000)
    gen = torch.Generator().manual_seed(9)
    b = (torch.randn(20_000, generator=gen) * 0.02).to(torch.bfloat16)
    f = (b.float() + torch.randn(20_000, generator=gen) * 5e-4).to(torch.bfloat16)
    bd = write_checkpoint(tmp_path / "b", {"w": b})
    fd = write_checkpoint(tmp_path / "f", {"w": f})
    before = set(threading.enumerate())  # other tests' leftovers are not this run's
    verbs_prune.prune(str(bd), str(fd), str(tmp_path / "o"), plan.PruneOptions())
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == []


def _ahead_fits(held: list[int], read: list[int], j: int, a: int, limit: int, window: int) -> bool:
    """Items j+1 .. j+a read ahead beside item j: the next one as ever (beside j's peak in
    the limit), more within the window."""
    ahead = sum(read[j + 1 : j + a + 1])
    one = a == 1 and held[j] + ahead <= limit
    return held[j] + ahead <= max(limit, window) and (ahead <= window or one)


def test_read_ahead_counts_against_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """How far the reader may run ahead of item j: the next item when it fits beside item j's
    own peak in the limit, more only within READ_AHEAD bytes (and never past MAX_AHEAD), for
    random sizes, limits and windows."""
    rng = random.Random(4)
    for _ in range(500):
        n = rng.randint(1, 12)
        held = [rng.randint(1, 50) for _ in range(n)]
        read = [rng.randint(0, h) for h in held]
        limit = rng.randint(max(held), 120)
        window = rng.choice([0, 10, 40])
        monkeypatch.setattr(reader, "READ_AHEAD", window)
        got = reader.ahead_counts(held, read, limit)
        for j in range(n):
            a = 0
            while j + a + 1 < n and _ahead_fits(held, read, j, a + 1, limit, window):
                a += 1
            assert got[j] == min(a, reader.MAX_AHEAD), (held, read, limit, window, j)
    # many tiny items: capped by count, not only by bytes
    monkeypatch.setattr(reader, "READ_AHEAD", 10**9)
    assert max(reader.ahead_counts([1] * 2000, [1] * 2000, 10**9)) == reader.MAX_AHEAD


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delicate", [False, True], ids=["plain", "delicate"])
def test_diff_is_the_same_on_both_paths(
    tmp_path: Path, dtype: torch.dtype, delicate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fapm diff's C delta (subtract, check, count in one pass) against the torch path: the
    same files; with negative zeros and overflowing values the check fails in C too, and the
    torch path re-plans exactly as before (whole values where no delta is exact)."""
    from fapm_cli.compute.taskvector import reconstruct
    from fapm_cli.verbs import diff as verbs_diff

    monkeypatch.setattr(scoring, "CHUNK", 1000)  # many chunks per tensor
    gen = torch.Generator().manual_seed(2)
    if delicate:
        b, f = _delicate(dtype)
    else:
        b = (torch.randn(5000, generator=gen) * 0.02).to(dtype)
        f = (b.float() + torch.randn(5000, generator=gen) * 5e-4).to(dtype)
    base, ft = {"w": b, "v": b[:77].clone()}, {"w": f, "v": f[:77].clone()}
    bd = write_checkpoint(tmp_path / "b", base)
    fd = write_checkpoint(tmp_path / "f", ft)
    verbs_diff.diff(str(bd), str(fd), str(tmp_path / "native"))
    monkeypatch.setenv(native.ENV, "0")
    verbs_diff.diff(str(bd), str(fd), str(tmp_path / "torch"))
    for shard in sorted((tmp_path / "torch").iterdir()):
        assert (tmp_path / "native" / shard.name).read_bytes() == shard.read_bytes(), shard
    got = load_checkpoint(tmp_path / "native")
    with safe_open(str(next((tmp_path / "native").glob("*.safetensors"))), "pt") as fh:
        values = json.loads(fh.metadata().get(plan.VALUES_KEY, "[]"))  # stored whole
    assert bool(values) == delicate  # -0.0, overflow: no exact delta, values instead
    for name in base:  # and the task vector gives finetuned back
        d = got[name]
        back = d if name in values else reconstruct(base[name], d, dtype)
        assert torch.equal(back.view(torch.uint8), ft[name].view(torch.uint8)), name


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reconstruct_is_the_same_on_both_paths(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """taskvector.reconstruct in C (merge and the chain apply task vectors with it) against
    its torch expression, on deltas that round, overflow to inf, give NaN, are -0.0 or zero."""
    from fapm_cli.compute.taskvector import reconstruct

    b, f = _delicate(dtype)
    gen = torch.Generator().manual_seed(9)
    delta = f.float() - b.float()
    delta[300:400] = torch.randn(100, generator=gen) * 1e-3  # rounding at every position
    delta[400:410] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 3e38,
                                   -3e38, 1e-45, -1e-45, 0.0, 2.0**-130])  # fmt: skip
    got = reconstruct(b, delta, dtype)
    monkeypatch.setenv(native.ENV, "0")
    want = reconstruct(b, delta, dtype)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@needs_kernels
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4097])
def test_mask_packing_is_the_same_on_both_paths(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """pack_mask / unpack_mask in C (merge keeps every fine-tune's mask packed; compact task
    vectors store them): the torch path's bytes, and each path reads the other's back."""
    from fapm_cli.compute import taskvector as tv

    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = tv.pack_mask(mask)
    native_back = tv.unpack_mask(packed, n)
    monkeypatch.setenv(native.ENV, "0")
    assert torch.equal(tv.pack_mask(mask), packed)
    assert torch.equal(tv.unpack_mask(packed, n), mask) and torch.equal(native_back, mask)
    assert packed.numel() == (n + 7) // 8 and (n % 8 == 0 or int(packed[-1]) >> (n % 8) == 0)
