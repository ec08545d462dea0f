"""The fast paths (fused scoring pass, histogram select, pipelined I/O, --threads) give the
same masks and bytes as the naive reference and as a plain sequential run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from fapm_cli import errors, plan
from fapm_cli.compute import prune as compute_prune
from fapm_cli.compute import scoring
from fapm_cli.plan import Method
from fapm_cli.verbs import prune as verbs_prune
from tests.checkpoints import load_checkpoint, write_checkpoint
from tests.reference import reference_mask, reference_prune

FAPM = str(Path(sys.executable).parent / "fapm")
ROOT = Path(__file__).resolve().parent.parent


def _bf16_pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Realistic bf16 weights and a small update: scores tie often (few distinct values)."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=gen) * 0.02
    b[::97] = 0.0  # zeros in base: -inf scores
    f = b + torch.randn(n, generator=gen) * 5e-4
    return b.to(torch.bfloat16), f.to(torch.bfloat16)


def _mask_from_engine(b: torch.Tensor, f: torch.Tensor, opts: plan.PruneOptions) -> torch.Tensor:
    parts = [m for _, _, m in compute_prune.iter_keep_masks("t", b, f, opts)]
    return torch.cat(parts)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("method", ["fapm", "magnitude", "ratio"])
@pytest.mark.parametrize("sparsity", ["0.9", "0.5", "0.999"])
def test_fused_masks_equal_reference_on_tied_bf16(
    method: str, sparsity: str, workers: int, monkeypatch: pytest.MonkeyPatch, kernels: str
) -> None:
    # The scoring pass split across worker threads must not change a key.
    monkeypatch.setattr(scoring, "score_workers", lambda: workers)
    # Several fused chunks, a partial last one, and many exact ties at the threshold.
    n = 3 * scoring.FUSED_CHUNK + 12345
    b, f = _bf16_pair(n)
    opts = plan.PruneOptions(method=Method(method), sparsity=Fraction(sparsity))
    mask = _mask_from_engine(b, f, opts)
    expected = reference_mask(b, f, Fraction(sparsity), method)
    assert int(mask.sum()) == int(expected.sum())
    assert torch.equal(mask, expected)


def test_fused_masks_equal_reference_float32_and_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        b = torch.randn(scoring.FUSED_CHUNK + 7, generator=gen, dtype=dtype) * 0.02
        f = b + torch.randn(b.numel(), generator=gen, dtype=dtype) * 1e-3
        f[5::11] = b[5::11]  # no update: many zero scores tie
        opts = plan.PruneOptions(sparsity=Fraction(3, 4))
        assert torch.equal(
            _mask_from_engine(b, f, opts), reference_mask(b, f, Fraction(3, 4), "fapm")
        )


def test_threshold_from_histogram_equals_radix_select() -> None:
    gen = torch.Generator().manual_seed(1)
    # Keys clustered in a few top-16-bit buckets, ties, and the extreme keys.
    keys = torch.randint(-5, 5, (200_000,), generator=gen, dtype=torch.int32) * 65536
    keys += torch.randint(0, 4, keys.shape, generator=gen, dtype=torch.int32)
    keys[:3] = torch.tensor([-(2**31), 2**31 - 1, 2**31 - 1], dtype=torch.int32)
    hist0 = torch.bincount((keys >> 16).long() + 32768, minlength=65536)
    for k in (1, 2, 3, 17, 99_999, 100_000, 199_999):
        fast = scoring.select_from_top_histogram(keys, hist0, k)
        exact = scoring.select_threshold(keys, k)
        ties_seen, fast_mask, exact_mask = 0, [], []
        for name, t, out in (("fast", fast, fast_mask), ("exact", exact, exact_mask)):
            ties_seen = 0
            for c in range(0, keys.numel(), 65536):
                m, ties_seen = scoring.keep_mask_chunk(keys[c : c + 65536], t, ties_seen)
                out.append(m)
            assert int(torch.cat(out).sum()) == k, name
        assert torch.equal(torch.cat(fast_mask), torch.cat(exact_mask)), k


def test_nan_is_refused_from_a_scoring_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "score_workers", lambda: 2)
    b, f = _bf16_pair(3 * scoring.FUSED_CHUNK)
    f[2 * scoring.FUSED_CHUNK + 5] = float("nan")  # in the third chunk: the first worker's
    opts = plan.PruneOptions(sparsity=Fraction(9, 10))
    with pytest.raises(errors.InputError, match="NaN"):
        _mask_from_engine(b, f, opts)


def test_nan_in_input_is_still_refused_by_the_fused_pass() -> None:
    from fapm_cli.errors import InputError

    b, f = _bf16_pair(scoring.FUSED_CHUNK + 5)
    f[scoring.FUSED_CHUNK + 2] = float("nan")
    with pytest.raises(InputError, match="finetuned contains NaN"):
        _mask_from_engine(b, f, plan.PruneOptions())
    b2, f2 = _bf16_pair(1000)
    b2[7] = float("inf")
    with pytest.raises(InputError, match="base contains NaN"):
        _mask_from_engine(b2, f2, plan.PruneOptions())


def test_overflowing_tau_squared_is_not_mistaken_for_inf() -> None:
    # tau^2 overflows float32 although every input is finite: scored like the reference.
    b = torch.tensor([1e30, -2e30, 3.0, 4.0], dtype=torch.float32)
    f = torch.tensor([-1e30, 2e30, 3.5, 4.0], dtype=torch.float32)
    opts = plan.PruneOptions(method=Method.MAGNITUDE, sparsity=Fraction(1, 2))
    assert torch.equal(
        _mask_from_engine(b, f, opts), reference_mask(b, f, Fraction(1, 2), "magnitude")
    )


def _pair_dirs(
    tmp_path: Path,
) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base, ft = {}, {}
    for i, n in enumerate((300_000, 1000, 77, 600_001, 5)):
        b, f = _bf16_pair(n, seed=i)
        base[f"layer.{i}.weight"], ft[f"layer.{i}.weight"] = b, f
    # Different shardings and orders on the two sides: pairing is by name.
    bdir = write_checkpoint(tmp_path / "base", dict(sorted(base.items())), shard_bytes=700_000)
    fdir = write_checkpoint(tmp_path / "ft", ft, shard_bytes=1_000_000)
    return bdir, fdir, base, ft


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAPM, *args], capture_output=True, text=True, cwd=ROOT)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_cli_output_equals_reference_and_threads_change_no_byte(tmp_path: Path) -> None:
    bdir, fdir, base, ft = _pair_dirs(tmp_path)
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}"
        r = _cli("prune", "-b", str(bdir), "-f", str(fdir), "-o", str(out), "-q",
                 "--threads", threads, "--max-shard-size", "800KB")  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_files(out))
    assert outs[0] == outs[1]
    got = load_checkpoint(tmp_path / "out1")
    expected = reference_prune(base, ft, Fraction(9, 10))
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name


@pytest.mark.parametrize("min_bytes", [0, None])
def test_pipelined_run_equals_sequential_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_bytes: int | None
) -> None:
    """The reader thread (forced on for these small tensors: min_bytes 0) gives the bytes of
    the sequential run; with the default rule, tensors this small are read without it."""
    from fapm_cli.io import reader

    started = []

    class Counted(reader.Prefetcher):
        def __init__(self, *args: object, **kwargs: object) -> None:
            started.append(1)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reader, "Prefetcher", Counted)
    if min_bytes is not None:
        monkeypatch.setattr(reader, "PREFETCH_MIN_BYTES", min_bytes)
    bdir, fdir, _, _ = _pair_dirs(tmp_path)
    results = {}
    for prefetch in (True, False):
        out = tmp_path / f"out-{prefetch}"
        report = verbs_prune.prune(str(bdir), str(fdir), str(out), plan.PruneOptions(),
                              max_shard_size=800_000, prefetch=prefetch)  # fmt: skip
        results[prefetch] = (_files(out), [(r.name, r.kept, r.sq_norm) for r in report.tensors])
    assert results[True] == results[False]
    assert len(started) == (1 if min_bytes == 0 else 0)


# -- a run under a memory limit smaller than one checkpoint ------------------------------------


def _memory_cgroup() -> tuple[Path, str] | None:
    """A writable memory cgroup root and its flavour ("v2" memory.max / "v1" limit_in_bytes)."""
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if (
        controllers.exists()
        and "memory" in controllers.read_text()
        and os.access(v2, os.W_OK)
        and "memory" in (v2 / "cgroup.subtree_control").read_text()
    ):
        return v2, "v2"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return v1, "v1"
    return None


@pytest.mark.slow
def test_prune_fits_in_a_1gb_memory_cgroup(tmp_path: Path) -> None:
    found = _memory_cgroup()
    if found is None:
        pytest.skip("no writable memory cgroup here (cgroup v2 memory.max or v1 memory controller)")
    root, flavour = found
    group = root / f"fapm-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as err:
        pytest.skip(f"cannot create a memory cgroup: {err}")
    limit = 1 << 30
    try:
        if flavour == "v2":
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0") if (
                group / "memory.swap.max"
            ).exists() else None
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        # A pair whose checkpoints are each larger than the limit (~1.26 GB per side).
        gen = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_pair.py"), str(tmp_path / "pair"),
             "--size", "cgroup"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        facts = json.loads(gen.stdout)
        assert facts["bytes_per_side"] > limit
        procs = "cgroup.procs"
        script = (
            f"echo $$ > {group / procs} && exec {FAPM} prune -b {tmp_path / 'pair' / 'base'} "
            f"-f {tmp_path / 'pair' / 'finetuned'} -o {tmp_path / 'out'} -q --json"
        )
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
        peak_file = "memory.peak" if flavour == "v2" else "memory.max_usage_in_bytes"
        peak = int((group / peak_file).read_text()) if (group / peak_file).exists() else None
        failcnt = group / "memory.failcnt"
        assert r.returncode == 0, f"rc {r.returncode} (killed by the limit?) {r.stderr[-500:]}"
        assert json.loads(r.stdout)["totals"]["kept_fraction"] == pytest.approx(0.1, abs=1e-3)
        if peak is None:
            pytest.skip(f"ran within the limit, but this kernel has no {peak_file} to check")
        assert 0 < peak <= limit
        if flavour == "v1" and failcnt.exists():
            print("memory.failcnt (reclaims at the limit):", failcnt.read_text().strip())
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()
