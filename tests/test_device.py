"""`--device`: the same masks and bytes on a GPU as on the CPU; a clean error without one.

Tests marked ``gpu`` need CUDA and skip without it; the rest run everywhere."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli import plan
from fapm_cli.cli.app import app
from fapm_cli.compute import prune as compute_prune
from fapm_cli.compute import scoring
from fapm_cli.errors import InputError
from fapm_cli.plan import Method
from tests.checkpoints import make_pair, tree_hash, write_checkpoint
from tests.reference import reference_mask

runner = CliRunner()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args), env={"NO_COLOR": "1"})
    return r.exit_code, r.stdout, r.stderr


def _tied_pair(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Few distinct values (bf16-sized updates), zeros in base, untouched entries: many ties."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=gen) * 0.02
    b[::97] = 0.0
    f = b + torch.randn(n, generator=gen) * 5e-4
    f[3::13] = b[3::13]
    return b.to(dtype), f.to(dtype)


def _mask(
    b: torch.Tensor, f: torch.Tensor, opts: plan.PruneOptions, device: str = "cpu"
) -> torch.Tensor:
    ws = scoring.Workspace(torch.device(device))
    return torch.cat([m for _, _, m in compute_prune.iter_keep_masks("t", b, f, opts, ws)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    for cmd in (
        ["prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o")],
        ["score", "-b", str(b), "-f", str(f)],
        ["merge", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o")],
    ):
        code, out, err = run(*cmd, "--device", "cuda")
        assert code == 2, err
        assert out == ""
        assert err.startswith("error: --device cuda: ")
        assert "hint: use --device cpu (or auto)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]


def test_device_auto_and_cpu_write_the_same_bytes(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    outs = {}
    for device in ("cpu", "auto"):
        out = tmp_path / device
        code, _, err = run("prune", "-b", str(b), "-f", str(f), "-o", str(out), "-q",
                           "--device", device)  # fmt: skip
        assert code == 0, err
        outs[device] = tree_hash(out)
    assert outs["cpu"] == outs["auto"]


@pytest.mark.parametrize("method", ["fapm", "magnitude", "ratio"])
def test_device_sized_chunks_give_the_reference_mask(method: str) -> None:
    # A GPU scores in chunks of DEVICE_CHUNK; here the CPU does the same with a chunk that is
    # neither FUSED_CHUNK nor a divisor of n: the keys are element-wise, the mask unchanged.
    n = 2 * scoring.FUSED_CHUNK + 999
    b, f = _tied_pair(n, torch.bfloat16)
    k = plan.keep_count(n, Fraction(9, 10))
    ranked = scoring.rank_tensor(
        Method(method), b, f, k, 1.0, lambda s, e: None, scoring.Workspace(torch.device("cpu")),
        chunk=scoring.FUSED_CHUNK * 3 // 2 + 1,
    )  # fmt: skip
    masks, seen = [], 0
    for c in range(0, n, scoring.CHUNK):
        m, seen = scoring.keep_mask_chunk(
            ranked.keys[c : c + scoring.CHUNK], ranked.threshold, seen
        )
        masks.append(m)
    ranked.release()
    assert torch.equal(torch.cat(masks), reference_mask(b, f, Fraction(9, 10), method))


# -- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["fapm", "magnitude", "ratio"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("sparsity", ["0.9", "0.5", "0.999"])
def test_cuda_masks_equal_reference(method: str, dtype: torch.dtype, sparsity: str) -> None:
    n = scoring.DEVICE_CHUNK + 4 * scoring.CHUNK + 12345  # two device chunks, a partial one
    b, f = _tied_pair(n, dtype, seed=1)
    opts = plan.PruneOptions(method=Method(method), sparsity=Fraction(sparsity), lam=0.7)
    on_gpu = _mask(b, f, opts, "cuda")
    assert on_gpu.device.type == "cpu"
    expected = reference_mask(b, f, Fraction(sparsity), method, lam=0.7)
    assert torch.equal(on_gpu, expected)
    assert torch.equal(on_gpu, _mask(b, f, opts))


@pytest.mark.gpu
@needs_cuda
def test_cuda_keys_equal_cpu_keys_bit_for_bit() -> None:
    # Stronger than equal masks: every score (as its order-preserving key) is the CPU's, which
    # rules out a fused multiply-add or a reciprocal division anywhere in the GPU path.
    b, f = _tied_pair(3 * scoring.FUSED_CHUNK + 5, torch.bfloat16, seed=2)
    n = b.numel()
    for method in (Method.FAPM, Method.RATIO, Method.MAGNITUDE):
        got = scoring.rank_tensor(method, b, f, n // 10, 0.37, lambda s, e: None,
                                  scoring.Workspace(torch.device("cuda")))  # fmt: skip
        want = scoring.rank_tensor(method, b, f, n // 10, 0.37, lambda s, e: None,
                                   scoring.Workspace(torch.device("cpu")))  # fmt: skip
        assert torch.equal(got.keys.cpu(), want.keys)
        assert got.threshold == want.threshold
        want.release()


@pytest.mark.gpu
@needs_cuda
def test_cuda_nan_is_refused_like_on_cpu() -> None:
    b, f = _tied_pair(scoring.FUSED_CHUNK + 3, torch.float32, seed=3)
    f[scoring.FUSED_CHUNK + 1] = float("nan")
    with pytest.raises(InputError, match="contains NaN or Inf"):
        _mask(b, f, plan.PruneOptions(), "cuda")


@pytest.mark.gpu
@needs_cuda
def test_cuda_commands_write_the_cpu_bytes(tmp_path: Path) -> None:
    base, ft = make_pair(seed=4, dtype=torch.bfloat16)
    b = write_checkpoint(tmp_path / "base", base, shard_bytes=1500)
    f = write_checkpoint(tmp_path / "ft", ft)
    for device in ("cpu", "cuda"):
        for method in ("fapm", "magnitude", "ratio"):
            out = tmp_path / f"p-{method}-{device}"
            code, _, err = run("prune", "-b", str(b), "-f", str(f), "-m", method, "-q",
                               "-o", str(out), "--device", device)  # fmt: skip
            assert code == 0, err
        code, _, err = run("merge", "-b", str(b), "-f", str(f), "-s", "0.8", "-q",
                           "-o", str(tmp_path / f"m-{device}"), "--device", device)  # fmt: skip
        assert code == 0, err
        code, out, err = run("score", "-b", str(b), "-f", str(f), "--json", "--device", device)
        assert code == 0, err
        (tmp_path / f"score-{device}.json").write_text(out)
    for method in ("fapm", "magnitude", "ratio"):
        assert tree_hash(tmp_path / f"p-{method}-cuda") == tree_hash(tmp_path / f"p-{method}-cpu")
    assert tree_hash(tmp_path / "m-cuda") == tree_hash(tmp_path / "m-cpu")
    cpu = json.loads((tmp_path / "score-cpu.json").read_text())
    gpu = json.loads((tmp_path / "score-cuda.json").read_text())

    def masks(doc: dict[str, list[dict[str, object]]]) -> list[tuple[object, ...]]:
        return [(t["name"], t["kept"], t["mask_jaccard"]) for t in doc["tensors"]]

    assert masks(gpu) == masks(cpu) and len(masks(cpu)) > 5
