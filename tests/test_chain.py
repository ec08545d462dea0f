"""The chain identities of issue 3, bit for bit, through the CLI:

    merge(B, diff(B, F))                          = F
    merge(B, prune(B, F, --save task-vector))     = prune(B, F)      dense and compact
    prune(B, --task-vector diff(B, F))            = prune(B, F)
    merge(B, --finetuned F, weight 1)             = prune(B, F)

Every comparison loads both sides with the safetensors library and compares raw bytes, so
negative zeros and NaN payloads would count. Base, finetuned and outputs are sharded differently.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import (
    assert_same_bits,
    load_checkpoint,
    make_pair,
    tree_hash,
    write_checkpoint,
)

runner = CliRunner()


def fapm(*args: str) -> None:
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == 0, r.output


def adversarial(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """make_pair plus entries no single float delta reproduces: signed zeros, subnormals,
    exponent gaps that float32 loses and float64 keeps, and gaps no float keeps."""
    base, ft = make_pair(seed=3, dtype=dtype)
    tiny = torch.finfo(dtype).smallest_normal
    e = 14 if dtype == torch.float16 else 20
    lo = -24 if dtype == torch.float16 else -100
    rows = [  # (base, finetuned)
        (1.0, 2.0**lo), (2.0**e, 2.0**-e), (0.5, -0.0), (0.0, -0.0), (-0.0, 0.0), (-0.0, -0.0),
        (1.0, -1.0), (3.0, 3.0), (tiny / 4, tiny / 2), (-tiny / 2, tiny / 4), (1.0, tiny / 8),
    ]  # fmt: skip
    base["adv.weight"] = torch.tensor([r[0] for r in rows], dtype=torch.float64).to(dtype)
    ft["adv.weight"] = torch.tensor([r[1] for r in rows], dtype=torch.float64).to(dtype)
    return base, ft


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def chain_pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, dict]:
    base, ft = adversarial(request.param)
    b = write_checkpoint(tmp_path / "base", base, shard_bytes=1200)
    f = write_checkpoint(tmp_path / "ft", ft, shard_bytes=3000, config={"model_type": "x"})
    return b, f, ft


def test_merge_of_diff_is_finetuned(tmp_path: Path, chain_pair: tuple[Path, Path, dict]) -> None:
    b, f, ft = chain_pair
    before = tree_hash(b) | tree_hash(f)
    fapm("diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"), "--max-shard-size", "2kB")
    fapm("merge", "-b", str(b), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "m"))
    assert_same_bits(load_checkpoint(tmp_path / "m"), ft)
    assert tree_hash(b) | tree_hash(f) == before  # inputs untouched


@pytest.mark.parametrize("method", ["fapm", "magnitude"])
@pytest.mark.parametrize("fmt", ["dense", "compact"])
def test_merge_of_pruned_task_vector_is_prune(
    tmp_path: Path, chain_pair: tuple[Path, Path, dict], fmt: str, method: str
) -> None:
    b, f, _ = chain_pair
    common = ["-b", str(b), "-f", str(f), "-s", "0.7", "-m", method]
    fapm("prune", *common, "-o", str(tmp_path / "p"))
    fapm("prune", *common, "--save", "task-vector", "--format", fmt, "-o", str(tmp_path / "tv"))
    fapm("merge", "-b", str(b), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "m"))
    assert_same_bits(load_checkpoint(tmp_path / "m"), load_checkpoint(tmp_path / "p"))


def test_dare_task_vector_merges_back_to_prune(
    tmp_path: Path, chain_pair: tuple[Path, Path, dict]
) -> None:
    b, f, _ = chain_pair
    common = ["-b", str(b), "-f", str(f), "-s", "0.5", "-m", "random", "--seed", "7"]
    fapm("prune", *common, "-o", str(tmp_path / "p"))
    fapm("prune", *common, "--save", "task-vector", "-o", str(tmp_path / "tv"))
    fapm("merge", "-b", str(b), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "m"))
    assert_same_bits(load_checkpoint(tmp_path / "m"), load_checkpoint(tmp_path / "p"))


@pytest.mark.parametrize("sparsity", ["0.9", "0.5", "0"])
def test_prune_of_diff_is_prune(
    tmp_path: Path, chain_pair: tuple[Path, Path, dict], sparsity: str
) -> None:
    b, f, _ = chain_pair
    fapm("diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"))
    fapm("prune", "-b", str(b), "-f", str(f), "-s", sparsity, "-o", str(tmp_path / "p"))
    fapm(
        "prune", "-b", str(b), "-t", str(tmp_path / "tv"), "-s", sparsity, "-o", str(tmp_path / "q")
    )
    assert_same_bits(load_checkpoint(tmp_path / "q"), load_checkpoint(tmp_path / "p"))


def test_prune_of_compact_keeps_pruning(
    tmp_path: Path, chain_pair: tuple[Path, Path, dict]
) -> None:
    """A compact task vector is a valid --task-vector: pruning it at a lower sparsity keeps it."""
    b, f, _ = chain_pair
    common = ["-b", str(b), "-s", "0.8"]
    fapm("prune", *common, "-f", str(f), "--save", "task-vector", "--layout", "compact",
         "-o", str(tmp_path / "tv"))  # fmt: skip
    fapm("prune", *common, "-f", str(f), "-o", str(tmp_path / "p"))
    fapm("prune", "-b", str(b), "-t", str(tmp_path / "tv"), "-s", "0", "-o", str(tmp_path / "q"))
    assert_same_bits(load_checkpoint(tmp_path / "q"), load_checkpoint(tmp_path / "p"))


def test_single_finetune_merge_is_prune(
    tmp_path: Path, chain_pair: tuple[Path, Path, dict]
) -> None:
    b, f, _ = chain_pair
    fapm("prune", "-b", str(b), "-f", str(f), "-s", "0.9", "-o", str(tmp_path / "p"))
    fapm("merge", "-b", str(b), "-f", str(f), "-s", "0.9", "-w", "1", "-o", str(tmp_path / "m"))
    assert_same_bits(load_checkpoint(tmp_path / "m"), load_checkpoint(tmp_path / "p"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_dtypes_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = adversarial(dtype)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft, shard_bytes=2000)
    fapm("diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"))
    fapm("merge", "-b", str(b), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "m"))
    assert_same_bits(load_checkpoint(tmp_path / "m"), ft)
