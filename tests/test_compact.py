"""The compact task-vector format: layout rules, bytes read back with numpy and safetensors,
size at sparsity 0.9 on bf16, and refusals."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from fapm_cli.compute import taskvector
from tests.checkpoints import load_checkpoint, make_pair, write_checkpoint
from tests.reference import reference_mask

runner = CliRunner()


def test_pack_mask_matches_numpy_little_bit_order() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 64, 1001):
        mask = torch.rand(n, generator=gen) < 0.3
        want = np.packbits(mask.numpy(), bitorder="little")
        assert np.array_equal(taskvector.pack_mask(mask).numpy(), want)
        assert torch.equal(taskvector.unpack_mask(torch.from_numpy(want), n), mask)


def test_gaps_by_hand() -> None:
    pos = torch.tensor([0, 3, 4, 10])
    gaps = taskvector.encode_gaps(pos, -1, torch.int16)
    assert gaps.tolist() == [1, 3, 1, 6]
    assert taskvector.decode_gaps(gaps, 11).tolist() == [0, 3, 4, 10]
    # A chunk continues from the last position of the one before.
    assert taskvector.encode_gaps(torch.tensor([12, 15]), 10, torch.int16).tolist() == [2, 3]
    with pytest.raises(ValueError, match="outside"):
        taskvector.decode_gaps(gaps, 10)
    with pytest.raises(ValueError, match="increasing"):
        taskvector.decode_gaps(torch.tensor([1, 0, 2]), 10)


@pytest.mark.parametrize(
    ("shape", "kept", "positions", "idx_dtype"),
    [
        ((1000,), 100, "mask", None),  # mask 125 B < idx 200 B
        ((1000,), 50, "idx", "I16"),  # idx 100 B < mask 125 B
        ((1000,), 62, "idx", "I16"),  # 124 < 125
        ((1000,), 63, "mask", None),  # 126 > 125
        ((40000,), 100, "idx", "I32"),  # numel > 32767 needs int32 gaps
        ((0,), 0, "mask", None),  # a tie (0 = 0): mask
    ],
)
def test_layout_picks_the_smaller(shape, kept, positions, idx_dtype) -> None:
    from fapm_cli.io.header import DTYPES

    layout = taskvector.compact_layout("t", shape, kept, DTYPES["BF16"])
    assert layout.positions == positions
    planned = {p.name: p for p in layout.planned()}
    assert planned["t::values"].shape == (kept,) and planned["t::values"].dtype.name == "BF16"
    assert planned["t::shape"].shape == (len(shape),)
    if positions == "idx":
        assert planned["t::idx"].dtype.name == idx_dtype and planned["t::idx"].shape == (kept,)


def read_compact(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Every tensor of a compact task vector as numpy arrays, read with safetensors."""
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(k)
                tensors[k] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return meta, tensors


def test_compact_bytes_decode_to_the_reference_selection(tmp_path: Path) -> None:
    base, ft = make_pair(seed=8, dtype=torch.bfloat16)
    ft["sparse.weight"] = torch.randn(5000).to(torch.bfloat16)  # at s=0.99: indices win
    base["sparse.weight"] = torch.randn(5000).to(torch.bfloat16)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=1500)
    f = write_checkpoint(tmp_path / "f", ft)
    out = tmp_path / "tv"
    for s, target in (("0.9", out), ("0.99", tmp_path / "tv99")):
        r = runner.invoke(
            app,
            [
                "prune",
                "-b",
                str(b),
                "-f",
                str(f),
                "-s",
                s,
                "--save",
                "task-vector",
                "--format",
                "compact",
                "-o",
                str(target),
                "-q",
            ],
        )
        assert r.exit_code == 0, r.output
    for path, s in ((out, Fraction(9, 10)), (tmp_path / "tv99", Fraction(99, 100))):
        meta, t = read_compact(path)
        assert meta["fapm.format"] == "compact" and meta["fapm.compact_version"] == "1"
        assert meta["fapm.kind"] == "task-vector"
        for name, fv in ft.items():
            if not fv.is_floating_point():
                assert np.array_equal(t[name], fv.numpy())  # stored whole, plain name
                continue
            n = fv.numel()
            assert tuple(t[f"{name}::shape"].tolist()) == tuple(fv.shape)
            want = reference_mask(base[name], fv, s, "fapm").reshape(-1).numpy()
            if f"{name}::mask" in t:
                got = np.unpackbits(t[f"{name}::mask"], bitorder="little")[:n].astype(bool)
            else:
                got = np.zeros(n, dtype=bool)
                got[np.cumsum(t[f"{name}::idx"].astype(np.int64)) - 1] = True
            assert np.array_equal(got, want), name
            bits = fv.reshape(-1).view(torch.int16).numpy()
            assert np.array_equal(t[f"{name}::values"], bits[want]), name
    _, t99 = read_compact(tmp_path / "tv99")
    assert "sparse.weight::idx" in t99 and "sparse.weight::mask" not in t99


def test_size_is_about_a_sixth_of_dense_bf16(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(9)
    base = {
        f"w{i}": (torch.randn(256, 512, generator=gen) * 0.02).to(torch.bfloat16) for i in range(4)
    }
    ft = {
        k: (v.float() + torch.randn(v.shape, generator=gen) * 1e-3).to(torch.bfloat16)
        for k, v in base.items()
    }
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    r = runner.invoke(
        app,
        [
            "prune",
            "-b",
            str(b),
            "-f",
            str(f),
            "-s",
            "0.9",
            "--save",
            "task-vector",
            "--format",
            "compact",
            "-o",
            str(tmp_path / "tv"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    compact = sum(p.stat().st_size for p in (tmp_path / "tv").glob("*.safetensors"))
    dense = sum(p.stat().st_size for p in f.glob("*.safetensors"))
    # 0.1 x 2 bytes of values + 1/8 byte of mask per entry, over 2 bytes: 0.1625.
    assert 0.16 < compact / dense < 0.17


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["-m", "random", "--save", "task-vector", "--layout", "compact"], 2, "ranked method"),
        (["--layout", "compact"], 2, "--save task-vector"),
    ],
)
def test_refusals(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    base, ft = make_pair(seed=10)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    r = runner.invoke(app, ["prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == code and needle in r.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_version_and_damage_are_input_errors(tmp_path: Path) -> None:
    base, ft = make_pair(seed=11)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    good = tmp_path / "tv"
    r = runner.invoke(
        app,
        [
            "prune",
            "-b",
            str(b),
            "-f",
            str(f),
            "--save",
            "task-vector",
            "--format",
            "compact",
            "-o",
            str(good),
            "-q",
        ],
    )
    assert r.exit_code == 0
    tensors = load_checkpoint(good)
    meta = {"fapm.kind": "task-vector", "fapm.format": "compact", "fapm.compact_version": "2"}
    write_checkpoint(tmp_path / "v2", tensors, metadata=meta)
    meta["fapm.compact_version"] = "1"
    broken = dict(tensors)
    broken["lm_head.weight::values"] = broken["lm_head.weight::values"][:-1]  # one value short
    write_checkpoint(tmp_path / "broken", broken, metadata=meta)
    for tv, needle in (("v2", "version '2'"), ("broken", "lm_head.weight")):
        r = runner.invoke(
            app, ["merge", "-b", str(b), "-t", str(tmp_path / tv), "-o", str(tmp_path / f"m-{tv}")]
        )
        assert r.exit_code == 3, r.output
        assert needle in r.stderr
        assert not (tmp_path / f"m-{tv}").exists()
    for tv, version in (("v2", "2"), ("broken", "1")):  # metadata stayed str -> str on disk
        with safe_open(str(tmp_path / tv / "model.safetensors"), "pt") as fh:
            assert fh.metadata() == {"format": "pt", **meta, "fapm.compact_version": version}


def test_prune_json_describes_the_stored_task_vector(tmp_path: Path) -> None:
    base, ft = make_pair(seed=15)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    args = ["prune", "-b", str(b), "-f", str(f), "--save", "task-vector", "--layout", "compact"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "tv"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["command"], doc["save"], doc["format"], doc["task_vector"]) == (
        "prune",
        "task-vector",
        "compact",
        None,
    )
    stored = {t["name"]: t for t in doc["stored"]["tensors"]}
    up = stored["model.layers.0.mlp.up_proj.weight"]  # 91 entries, k = 9: mask 12 B < idx 18 B
    assert (up["repr"], up["kept"], up["positions"], up["dtype"]) == ("sparse", 9, "mask", "F32")
    assert up["bytes"] == 9 * 4 + 12 + 2 * 8
    assert stored["model.position_ids"]["repr"] == "values"
    on_disk = sum(t.numel() * t.element_size() for t in load_checkpoint(tmp_path / "tv").values())
    assert doc["stored"]["bytes"] == on_disk
    plain = runner.invoke(
        app, ["prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "m"), "--json"]
    )
    assert json.loads(plain.stdout)["stored"] is None
