"""The writer's files, read back by the safetensors library and checked byte by byte."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fapm_cli.io.header import DTYPES, PlannedTensor, read_header
from fapm_cli.io.writer import CheckpointWriter, parse_size, plan_shards, shard_names

TENSORS = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "c": torch.tensor([True, False, True]),
    "d": torch.zeros(0, 4, dtype=torch.float16),
    "e": torch.tensor(3.25, dtype=torch.float64),
}


def planned(t: torch.Tensor, name: str) -> PlannedTensor:
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.bool: "BOOL",
             torch.float16: "F16", torch.float64: "F64"}  # fmt: skip
    return PlannedTensor(name, DTYPES[names[t.dtype]], tuple(t.shape))


def write(out: Path, max_shard: int) -> CheckpointWriter:
    w = CheckpointWriter(
        out, [planned(t, n) for n, t in TENSORS.items()], max_shard_size=max_shard,
        metadata={"format": "pt", "fapm.kind": "model"},
    )  # fmt: skip
    for name, t in TENSORS.items():
        w.begin(name)
        flat = t.reshape(-1)
        for c in range(0, max(flat.numel(), 1), 2):  # several chunks per tensor
            if flat.numel():
                w.write(flat[c : c + 2])
    w.finish()
    return w


@pytest.mark.parametrize("max_shard", [10, 10**9])
def test_roundtrip_with_safetensors(tmp_path: Path, max_shard: int) -> None:
    out = tmp_path / "out"
    write(out, max_shard)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in TENSORS.values()
    )
    got = {}
    for fname in files:
        path = out / fname
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert (8 + n) % 8 == 0  # data buffer aligned
        assert index["metadata"]["shards"][fname] == {
            "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
        }  # fmt: skip
        assert oct(os.stat(path).st_mode & 0o777) == "0o644"
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"format": "pt", "fapm.kind": "model"}
            got.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        read_header(str(path))  # our own validator accepts our own files too
    assert set(got) == set(TENSORS)
    for name, t in TENSORS.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_shard_planning() -> None:
    ts = [PlannedTensor(str(i), DTYPES["F32"], (n,)) for i, n in enumerate([10, 10, 30, 5])]
    groups = plan_shards(ts, 100)  # 40 + 40 > 100? no: 80; then 120 > 100 -> new shard
    assert [[t.name for t in g] for g in groups] == [["0", "1"], ["2"], ["3"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3)[1] == "model-00002-of-00003.safetensors"


@pytest.mark.parametrize(
    ("text", "value"),
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 5 * 10**8), ("1000", 1000)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    w = CheckpointWriter(
        tmp_path / "out", [planned(TENSORS["a"], "a")], max_shard_size=100, metadata={}
    )
    w.begin("a")
    w.write(TENSORS["a"].reshape(-1)[:2])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_overwrite_swap_restores_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    # An earlier fapm output: the only kind --overwrite replaces (see test_failures).
    save_file({"a": TENSORS["a"]}, str(out / "model.safetensors"), metadata={"fapm.version": "0"})
    w = CheckpointWriter(
        out, [planned(TENSORS["a"], "a")], max_shard_size=100, metadata={}, overwrite=True
    )
    w.write_tensor("a", TENSORS["a"])

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)  # the old output was already moved aside
    with pytest.raises(KeyboardInterrupt):
        w.finish()
    monkeypatch.undo()
    w.abort()
    assert (out / "old.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
