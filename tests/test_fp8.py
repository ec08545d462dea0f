"""FP8 checkpoints (METHOD.md, "FP8 weights" and "Other quantized checkpoints").

Plain float8 tensors are floats: scored in float32 on exactly widened inputs, written in their
own dtype, kept entries finetuned's bits. Block-quantized FP8 (``quant_method: fp8`` with
``weight_block_size``) is dequantized on read; other quantizations are refused (exit 3).
The references here are independent: a full stable argsort (tests/reference.py) on inputs
widened in the test, and a dequantizer written below.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import load_checkpoint, write_checkpoint
from tests.reference import reference_mask

runner = CliRunner()
F8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def fapm(*args: str, code: int = 0) -> str:
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == code, r.output
    return r.output


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def f8_pair(tmp_path: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(7)
    base = {
        "layer.weight": (torch.randn(9, 13, generator=g) * 0.5).to(dtype),
        "norm.weight": (torch.randn(11, generator=g)).to(dtype),
    }
    base["layer.weight"].view(-1)[:5] = 0  # zeros in base score -inf
    ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.2).to(dtype)
          for k, v in base.items()}  # fmt: skip
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "ft", ft)


def expected_prune(base: Path, ft: Path, sparsity: Fraction) -> dict[str, torch.Tensor]:
    b, f = load_checkpoint(base), load_checkpoint(ft)
    out = {}
    for name, bt in b.items():
        mask = reference_mask(bt.float(), f[name].float(), sparsity, "fapm")
        out[name] = torch.where(mask.reshape(-1), bits(f[name]), bits(bt))
    return out


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_prune_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    fapm("prune", "--base", str(base), "--finetuned", str(ft), "-o", str(tmp_path / "out"),
         "-s", "0.6")  # fmt: skip
    got = load_checkpoint(tmp_path / "out")
    want = expected_prune(base, ft, Fraction(3, 5))
    assert set(got) == set(want)
    for name, t in got.items():
        assert t.dtype == dtype, name
        assert torch.equal(bits(t), want[name]), name
    # something was actually pruned and something kept
    b, f = load_checkpoint(base), load_checkpoint(ft)
    w = got["layer.weight"]
    assert not torch.equal(bits(w), bits(f["layer.weight"]))
    assert not torch.equal(bits(w), bits(b["layer.weight"]))


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_diff_round_trip_and_prune_t(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    fapm("diff", "--base", str(base), "--finetuned", str(ft), "-o", str(tmp_path / "tv"))
    fapm("prune", "--base", str(base), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "s0"),
         "-s", "0")  # fmt: skip
    f = load_checkpoint(ft)
    for name, t in load_checkpoint(tmp_path / "s0").items():
        assert t.dtype == dtype and torch.equal(bits(t), bits(f[name])), name
    fapm("prune", "--base", str(base), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "p"),
         "-s", "0.6")  # fmt: skip
    want = expected_prune(base, ft, Fraction(3, 5))
    for name, t in load_checkpoint(tmp_path / "p").items():
        assert torch.equal(bits(t), want[name]), name


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_merge_equals_prune(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    fapm("merge", "--base", str(base), "--finetuned", str(ft), "-s", "0.6",
         "-o", str(tmp_path / "m"))  # fmt: skip
    want = expected_prune(base, ft, Fraction(3, 5))
    for name, t in load_checkpoint(tmp_path / "m").items():
        assert t.dtype == dtype and torch.equal(bits(t), want[name]), name


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_score(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    doc = json.loads(fapm("score", "--base", str(base), "--finetuned", str(ft), "--json"))
    row = next(t for t in doc["tensors"] if t["name"] == "layer.weight")
    b, f = load_checkpoint(base), load_checkpoint(ft)
    bw, fw = b["layer.weight"].float(), f["layer.weight"].float()
    assert row["dtype"] == {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]
    assert row["mean_abs_tau"] == pytest.approx(float((fw - bw).abs().mean()), rel=1e-6)
    assert row["mean_abs_base"] == pytest.approx(float(bw.abs().mean()), rel=1e-6)
    assert row["base_zero"] == int((bw == 0).sum()) >= 5
