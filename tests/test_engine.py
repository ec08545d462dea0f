"""The streaming engine against the in-memory reference (tests/reference.py)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from fapm_cli import plan, records
from fapm_cli.compute import prune as compute_prune
from fapm_cli.compute import scoring
from fapm_cli.errors import InputError, MismatchError, UsageError
from fapm_cli.io.header import DTYPES
from fapm_cli.plan import Method, PruneOptions
from fapm_cli.verbs import prune as verbs_prune
from tests.checkpoints import load_checkpoint, make_pair, tree_hash, write_checkpoint
from tests.reference import reference_prune


def run(base: Path, ft: Path, out: Path, **kw: object) -> records.PruneReport:
    opts = PruneOptions(**kw)  # type: ignore[arg-type]
    return verbs_prune.prune(str(base), str(ft), str(out), opts, max_shard_size=3000)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", ["fapm", "magnitude", "ratio"])
@pytest.mark.parametrize("sparsity", ["0.9", "0.5", "0.75", "0.33"])
def test_stream_equals_reference(
    tmp_path: Path,
    dtype: torch.dtype,
    method: str,
    sparsity: str,
    monkeypatch: pytest.MonkeyPatch,
    kernels: str,
) -> None:
    # Many chunk boundaries inside small tensors, on both paths.
    monkeypatch.setattr(scoring, "CHUNK", 64)
    monkeypatch.setattr(scoring, "FUSED_CHUNK", 96)
    monkeypatch.setattr(compute_prune, "NATIVE_OUT_CHUNK", 80)
    base, ft = make_pair(seed=3, dtype=dtype)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=1200)
    f = write_checkpoint(tmp_path / "f", ft, shard_bytes=5000)
    run(b, f, tmp_path / "out", method=Method(method), sparsity=Fraction(sparsity))
    got = load_checkpoint(tmp_path / "out")
    want = reference_prune(base, ft, Fraction(sparsity), method)
    assert set(got) == set(want)
    for name in want:
        assert bits_equal(got[name], want[name]), name


def test_lam_changes_the_mask(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    base, ft = load_checkpoint(b), load_checkpoint(f)
    for lam in (0.0, 2.5):
        run(b, f, tmp_path / f"o{lam}", lam=lam, sparsity=Fraction(1, 2))
        got = load_checkpoint(tmp_path / f"o{lam}")
        want = reference_prune(base, ft, Fraction(1, 2), "fapm", lam)
        assert all(bits_equal(got[n], want[n]) for n in want)
    # lam = 0 is magnitude ranking except where base == 0 (fapm still scores those -inf).
    assert not bits_equal(
        load_checkpoint(tmp_path / "o0.0")["lm_head.weight"],
        load_checkpoint(tmp_path / "o2.5")["lm_head.weight"],
    )


def test_sparsity_zero_and_one(tmp_path: Path, bf16_pair_dirs: tuple[Path, Path]) -> None:
    b, f = bf16_pair_dirs
    for method in Method:
        run(b, f, tmp_path / f"s0{method}", sparsity=Fraction(0), method=method)
        run(b, f, tmp_path / f"s1{method}", sparsity=Fraction(1), method=method)
        s0, s1 = (
            load_checkpoint(tmp_path / f"s0{method}"),
            load_checkpoint(tmp_path / f"s1{method}"),
        )
        base, ft = load_checkpoint(b), load_checkpoint(f)
        for name in ft:
            assert bits_equal(s0[name], ft[name]), (method, name)
            want = base[name] if base[name].is_floating_point() else ft[name]
            assert bits_equal(s1[name], want), (method, name)


def test_exact_k_and_kept_bits(tmp_path: Path, bf16_pair_dirs: tuple[Path, Path]) -> None:
    b, f = bf16_pair_dirs
    report = run(b, f, tmp_path / "o", sparsity=Fraction(9, 10))
    base, ft, out = load_checkpoint(b), load_checkpoint(f), load_checkpoint(tmp_path / "o")
    for r in report.tensors:
        if r.action is not plan.Action.PRUNE:
            continue
        n = r.numel
        assert r.kept == n // 10, r.name  # floor(n * 0.1), exactly
        o, fb, bb = (x[r.name].reshape(-1).view(torch.int16) for x in (out, ft, base))
        from_ft = (o == fb) & (fb != bb)
        assert int(from_ft.sum()) <= r.kept
        assert bool(((o == fb) | (o == bb)).all()), r.name  # every entry is one side's bits


def test_random_is_dare_and_reproducible(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    run(b, f, tmp_path / "r1", method=Method.RANDOM, sparsity=Fraction(1, 2), seed=7)
    run(b, f, tmp_path / "r2", method=Method.RANDOM, sparsity=Fraction(1, 2), seed=7)
    run(b, f, tmp_path / "r3", method=Method.RANDOM, sparsity=Fraction(1, 2), seed=8)
    assert tree_hash(tmp_path / "r1") == tree_hash(tmp_path / "r2")
    assert tree_hash(tmp_path / "r1") != tree_hash(tmp_path / "r3")
    base, ft, out = load_checkpoint(b), load_checkpoint(f), load_checkpoint(tmp_path / "r1")
    w = "model.embed_tokens.weight"
    tau = ft[w] - base[w]
    delta = out[w] - base[w]
    kept = delta != 0
    # Kept entries are rescaled by 1 / (1 - s) = 2; dropped ones are base exactly.
    torch.testing.assert_close(delta[kept], 2 * tau[kept])
    assert 0.35 < kept.float().mean().item() < 0.65


def test_inputs_unchanged_and_files_copied(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    before = tree_hash(b), tree_hash(f)
    run(b, f, tmp_path / "o")
    assert (tree_hash(b), tree_hash(f)) == before
    assert (tmp_path / "o" / "config.json").read_text() == (f / "config.json").read_text()
    siblings = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert siblings == []  # no temporary directory left behind


def test_mismatch_refused_before_output(tmp_path: Path) -> None:
    base, ft = make_pair()
    ft["model.layers.1.odd"] = torch.zeros(11)  # (lm_head would be a resized vocabulary)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    with pytest.raises(MismatchError, match=r"model.layers.1.odd.*\[10\].*\[11\]"):
        run(b, f, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_only_in_one_side(tmp_path: Path) -> None:
    base, ft = make_pair()
    ft["extra.weight"] = torch.ones(3)
    del ft["model.norm.weight"]
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    with pytest.raises(MismatchError, match=r"only in finetuned.*extra\.weight"):
        run(b, f, tmp_path / "o")
    with pytest.raises(MismatchError, match=r"only in base.*model\.norm\.weight"):
        run(b, f, tmp_path / "o", on_finetuned_only=plan.OnFinetunedOnly.COPY)
    run(
        b, f, tmp_path / "o",
        on_finetuned_only=plan.OnFinetunedOnly.COPY, on_base_only=plan.OnBaseOnly.KEEP,
    )  # fmt: skip
    out = load_checkpoint(tmp_path / "o")
    assert torch.equal(out["extra.weight"], torch.ones(3))
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])


def test_patterns_and_dtype(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    bf16 = DTYPES["BF16"]
    report = run(
        b, f, tmp_path / "o", keep_base=("*embed*",), keep_finetuned=("*norm*",), dtype=bf16
    )
    base, ft, out = load_checkpoint(b), load_checkpoint(f), load_checkpoint(tmp_path / "o")
    assert torch.equal(
        out["model.embed_tokens.weight"], base["model.embed_tokens.weight"].bfloat16()
    )
    assert torch.equal(out["model.norm.weight"], ft["model.norm.weight"].bfloat16())
    assert out["model.position_ids"].dtype == torch.int64  # --dtype only applies to floats
    actions = {r.name: r.action for r in report.tensors}
    assert actions["model.layers.0.input_layernorm.weight"] is plan.Action.FINETUNED
    assert actions["model.position_ids"] is plan.Action.COPY
    with pytest.raises(UsageError):
        run(b, f, tmp_path / "o2", keep_base=("*norm*",), keep_finetuned=("model.norm*",))


def test_nan_in_weights_named(tmp_path: Path) -> None:
    base, ft = make_pair()
    ft["model.layers.1.odd"][3] = float("nan")
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    with pytest.raises(InputError, match=r"model\.layers\.1\.odd.*finetuned.*NaN"):
        run(b, f, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("lam", [float("inf"), float("nan"), -0.5])
def test_options_refuse_bad_lam_for_every_caller(lam: float) -> None:
    with pytest.raises(UsageError, match="lam"):
        PruneOptions(lam=lam)


def test_options_refuse_bad_sparsity() -> None:
    with pytest.raises(UsageError, match="sparsity"):
        PruneOptions(sparsity=Fraction(3, 2))
