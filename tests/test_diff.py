"""`fapm diff`: the task vector's values, its metadata, exactness and its fallbacks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import load_checkpoint, make_pair, write_checkpoint

runner = CliRunner()


def metadata(path: Path) -> dict[str, str]:
    shard = sorted(path.glob("*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as f:
        return f.metadata()


def test_deltas_are_finetuned_minus_base_in_float32(tmp_path: Path) -> None:
    base, ft = make_pair(seed=4, dtype=torch.bfloat16)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=1000)
    f = write_checkpoint(tmp_path / "f", ft)
    r = runner.invoke(
        app, ["diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"), "--json"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    tv = load_checkpoint(tmp_path / "tv")
    assert set(tv) == set(ft)
    for name, fv in ft.items():
        assert tv[name].shape == fv.shape
        if fv.is_floating_point():  # bf16 differences are exact in float32 for these values
            assert tv[name].dtype == torch.float32
            torch.testing.assert_close(tv[name], fv.float() - base[name].float(), rtol=0, atol=0)
        else:
            assert torch.equal(tv[name], fv)  # integer tensors: finetuned's value as is
    meta = metadata(tmp_path / "tv")
    assert meta["fapm.kind"] == "task-vector" and meta["fapm.format"] == "dense"
    assert meta["fapm.model_dtype"] == "BF16" and meta["fapm.exact"] == "true"
    assert json.loads(meta["fapm.model_dtypes"]) == {"model.position_ids": "I64"}
    assert json.loads(meta["fapm.values"]) == ["model.position_ids"]
    assert doc["command"] == "diff" and doc["exact"] is True and doc["passes"] == 1
    assert doc["totals"]["tensors"] == len(ft)
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["model.position_ids"]["repr"] == "values"
    assert by_name["lm_head.weight"] == {
        "name": "lm_head.weight", "shape": [37, 16], "repr": "delta", "dtype": "F32",
        "model_dtype": "BF16", "numel": 37 * 16,
        "kept": int(((ft["lm_head.weight"].float() - base["lm_head.weight"].float()) != 0).sum()),
        "positions": None, "bytes": 37 * 16 * 4,
    }  # fmt: skip


def test_fallbacks_widen_then_store_values(tmp_path: Path) -> None:
    """float32 loses 2^-30 - 1 (f = 2^-30, b = 1), float64 keeps it; -0.0 needs values."""
    base = {
        "normal": torch.tensor([0.5, 0.25, -1.0]),
        "wide": torch.tensor([1.0, 0.5]),
        "negzero": torch.tensor([0.5, 1.0]),
    }
    ft = {
        "normal": torch.tensor([0.5 + 2**-10, 0.25, -1.5]),
        "wide": torch.tensor([2.0**-30, 0.5]),
        "negzero": torch.tensor([-0.0, 1.0]),
    }
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    r = runner.invoke(
        app, ["diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"), "--json"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["passes"] == 3  # the first pass met "wide", a checking pass, the final pass
    tv = load_checkpoint(tmp_path / "tv")
    assert tv["normal"].dtype == torch.float32
    assert tv["wide"].dtype == torch.float64
    assert tv["wide"][0].item() == 2.0**-30 - 1.0  # exact in float64
    assert tv["negzero"].dtype == torch.float32 and str(tv["negzero"][0].item()) == "-0.0"
    assert json.loads(metadata(tmp_path / "tv")["fapm.values"]) == ["negzero"]
    merged = tmp_path / "m"
    assert (
        runner.invoke(
            app, ["merge", "-b", str(b), "-t", str(tmp_path / "tv"), "-o", str(merged)]
        ).exit_code
        == 0
    )
    out = load_checkpoint(merged)
    for name, want in ft.items():
        assert torch.equal(out[name].view(torch.int32), want.view(torch.int32)), name


def test_dtype_is_lossy_and_says_so(tmp_path: Path) -> None:
    base, ft = make_pair(seed=5)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    r = runner.invoke(
        app, ["diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"), "--dtype", "bf16"]
    )
    assert r.exit_code == 0
    assert "warning: --dtype bf16" in r.stderr and "may differ" in r.stderr
    assert "warning" not in r.stdout
    tv = load_checkpoint(tmp_path / "tv")
    w = "model.layers.0.mlp.up_proj.weight"
    assert tv[w].dtype == torch.bfloat16
    assert torch.equal(tv[w], (ft[w] - base[w]).to(torch.bfloat16))
    assert metadata(tmp_path / "tv")["fapm.exact"] == "false"


@pytest.mark.parametrize(
    ("change", "code", "needle"),
    [
        ("shape", 4, "shape"),
        ("missing", 4, "only in base"),
        ("dtype", 2, "unknown output dtype"),
    ],
)
def test_errors(tmp_path: Path, change: str, code: int, needle: str) -> None:
    base, ft = make_pair(seed=6)
    if change == "shape":  # not a vocabulary tensor, where more rows would be added tokens
        ft["model.layers.0.mlp.up_proj.weight"] = torch.zeros(14, 7)
    if change == "missing":
        del ft["model.norm.weight"]
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    extra = ["--dtype", "int8"] if change == "dtype" else []
    r = runner.invoke(app, ["diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"), *extra])
    assert r.exit_code == code
    assert needle in r.stderr and r.stdout == ""
    assert not (tmp_path / "tv").exists()


def test_human_output(tmp_path: Path) -> None:
    base, ft = make_pair(seed=7)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    r = runner.invoke(app, ["diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv")])
    assert r.exit_code == 0
    assert "bit for bit" in r.stdout and r.stderr == ""
