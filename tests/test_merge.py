"""`fapm merge`: weighted sums against an independent computation, fine-tunes pruned on the fly,
refusals before any tensor is read, and the JSON object."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import load_checkpoint, make_pair, write_checkpoint
from tests.reference import reference_mask

runner = CliRunner()


@pytest.fixture
def three(tmp_path: Path) -> tuple[Path, Path, Path, dict, dict, dict]:
    """A float32 base and two fine-tunes of it (different updates), sharded differently."""
    base, ft1 = make_pair(seed=12)
    _, ft2 = make_pair(seed=13)
    gen = torch.Generator().manual_seed(14)
    for name, b in base.items():  # ft2: base + another update
        if b.is_floating_point():
            ft2[name] = b + torch.randn(b.shape, generator=gen) * 1e-3
    return (
        write_checkpoint(tmp_path / "b", base, shard_bytes=1500),
        write_checkpoint(tmp_path / "f1", ft1),
        write_checkpoint(tmp_path / "f2", ft2, shard_bytes=4000),
        base, ft1, ft2,
    )  # fmt: skip


def invoke(*args: str) -> object:
    return runner.invoke(app, list(args))


def test_weighted_task_vectors(tmp_path: Path, three: tuple) -> None:
    b, f1, f2, base, ft1, ft2 = three
    for f, tv in ((f1, "tv1"), (f2, "tv2")):
        assert (
            invoke("diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / tv), "-q").exit_code
            == 0
        )
    r = invoke("merge", "-b", str(b), "-t", str(tmp_path / "tv1"), "-t", str(tmp_path / "tv2"),
               "-w", "0.7", "-w", "-0.25", "-o", str(tmp_path / "m"), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    out = load_checkpoint(tmp_path / "m")
    for name, bv in base.items():
        if not bv.is_floating_point():
            assert torch.equal(out[name], ft1[name])
            continue
        t1, t2 = ft1[name] - bv, ft2[name] - bv
        want = torch.where((t1 != 0) | (t2 != 0), bv + 0.7 * t1 - 0.25 * t2, bv)
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-9)
    doc = json.loads(r.stdout)
    assert doc["command"] == "merge" and doc["pruning"] is None
    assert [(i["kind"], i["weight"], i["format"]) for i in doc["inputs"]] == [
        ("task-vector", 0.7, "dense"), ("task-vector", -0.25, "dense"),
    ]  # fmt: skip
    assert doc["totals"]["parameters"] == sum(t.numel() for t in base.values())
    assert doc["totals"]["changed"] == sum(t["changed"] for t in doc["tensors"])


def test_two_finetunes_pruned_on_the_fly(tmp_path: Path, three: tuple) -> None:
    b, f1, f2, base, ft1, ft2 = three
    r = invoke("merge", "-b", str(b), "-f", str(f1), "-f", str(f2), "-s", "0.8",
               "-o", str(tmp_path / "m"), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    out = load_checkpoint(tmp_path / "m")
    s = Fraction(8, 10)
    for name, bv in base.items():
        if not bv.is_floating_point():
            continue
        m1 = reference_mask(bv, ft1[name], s, "fapm")
        m2 = reference_mask(bv, ft2[name], s, "fapm")
        acc = (ft1[name] - bv) * m1 + (ft2[name] - bv) * m2
        want = torch.where(m1 | m2, bv + acc, bv)
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-9)
    doc = json.loads(r.stdout)
    assert doc["pruning"] == {"method": "fapm", "sparsity": 0.8, "lam": 1.0, "seed": 0}


def test_compact_and_dense_mix(tmp_path: Path, three: tuple) -> None:
    b, f1, f2, base, ft1, ft2 = three
    args = ["-b", str(b), "-s", "0.5", "--save", "task-vector", "-q"]
    assert (
        invoke(
            "prune", *args, "-f", str(f1), "--layout", "compact", "-o", str(tmp_path / "c")
        ).exit_code
        == 0
    )
    assert invoke("prune", *args, "-f", str(f2), "-o", str(tmp_path / "d")).exit_code == 0
    r = invoke("merge", "-b", str(b), "-t", str(tmp_path / "c"), "-t", str(tmp_path / "d"),
               "-w", "0.5", "-o", str(tmp_path / "m"), "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    out = load_checkpoint(tmp_path / "m")
    s = Fraction(1, 2)
    for name, bv in base.items():
        if bv.is_floating_point():
            m1 = reference_mask(bv, ft1[name], s, "fapm")
            m2 = reference_mask(bv, ft2[name], s, "fapm")
            t2 = (ft2[name] - bv) * m2
            want = torch.where(m1 | (t2 != 0), bv + 0.5 * (ft1[name] - bv) * m1 + 0.5 * t2, bv)
            torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("shape", 4, "shape"),
        ("missing", 4, "missing from task vector"),
        ("model", 3, "not a task vector"),
        ("weights", 2, "--weight values for 1 inputs"),
        ("sparsity", 2, "--sparsity applies to --finetuned"),
        ("none", 2, "at least one"),
    ],
)
def test_refusals_before_any_work(
    tmp_path: Path, three: tuple, case: str, code: int, needle: str
) -> None:
    b, f1, *_ = three
    tv = tmp_path / "tv"
    assert invoke("diff", "-b", str(b), "-f", str(f1), "-o", str(tv), "-q").exit_code == 0
    args = ["-t", str(tv)]
    if case in ("shape", "missing"):
        tensors = load_checkpoint(tv)
        if case == "shape":
            tensors["lm_head.weight"] = torch.zeros(38, 16)
        else:
            del tensors["model.norm.weight"]
        write_checkpoint(tmp_path / "bad", tensors, metadata={"fapm.kind": "task-vector"})
        args = ["-t", str(tmp_path / "bad")]
    if case == "model":
        assert (
            invoke("prune", "-b", str(b), "-f", str(f1), "-o", str(tmp_path / "p"), "-q").exit_code
            == 0
        )
        args = ["-t", str(tmp_path / "p")]
    if case == "weights":
        args += ["-w", "1", "-w", "2"]
    if case == "sparsity":
        args += ["-s", "0.5"]
    if case == "none":
        args = []
    r = invoke("merge", "-b", str(b), *args, "-o", str(tmp_path / "m"))
    assert r.exit_code == code, r.output
    assert needle in r.stderr and r.stdout == ""
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.fapm-tmp-*"))


def test_human_output(tmp_path: Path, three: tuple) -> None:
    b, f1, *_ = three
    r = invoke("merge", "-b", str(b), "-f", str(f1), "-o", str(tmp_path / "m"))
    assert r.exit_code == 0
    assert "differ from base" in r.stdout and r.stderr == ""
