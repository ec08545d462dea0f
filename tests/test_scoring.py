"""The metrics and the selection, against METHOD.md's worked example and a full sort."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from fapm_cli import plan
from fapm_cli.compute import scoring
from fapm_cli.compute.prune import iter_keep_masks
from fapm_cli.plan import Method, PruneOptions

# ../shared/METHOD.md, "Worked example (float32)"
W_PRE = torch.tensor([[0.020, -0.001, 0.015, 0.030], [0.005, -0.025, 0.0005, 0.010]])
TAU = torch.tensor([[1e-4, 2e-4, -3e-4, 5e-5], [-4e-4, 1e-4, 3e-4, -2e-4]])
W_FT = W_PRE + TAU
S_EXPECTED = torch.tensor(
    [[3.34375e-5, -2.4625e-3, 3.375e-5, 2.78125e-5], [-6.65e-4, 4.675e-5, -7.6875e-3, -6.625e-5]]
)


def kept(method: Method, sparsity: str, base=W_PRE, ft=W_FT) -> set[int]:
    opts = PruneOptions(method=method, sparsity=Fraction(sparsity))
    masks = [m for _, _, m in iter_keep_masks("t", base, ft, opts)]
    return set(torch.cat(masks).nonzero().flatten().tolist())


def test_worked_example_mean_abs() -> None:
    assert scoring.mean_abs(W_PRE, torch.float32) == pytest.approx(0.0133125, rel=1e-6)


def test_worked_example_scores() -> None:
    coef = torch.tensor(1.0) * torch.tensor(scoring.mean_abs(W_PRE, torch.float32))
    s = scoring.score_chunk(Method.FAPM, W_PRE.reshape(-1), W_FT.reshape(-1), coef)
    # W_FT = W_PRE + TAU rounds in float32, so |tau| is exact only to ~1e-7 relative of W.
    torch.testing.assert_close(s, S_EXPECTED.reshape(-1), rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize(
    ("method", "sparsity", "expected"),
    [
        (Method.FAPM, "0.75", {2, 5}),
        (Method.MAGNITUDE, "0.75", {2, 4}),
        (Method.FAPM, "0.5", {0, 2, 3, 5}),
    ],
)
def test_worked_example_selection(method: Method, sparsity: str, expected: set[int]) -> None:
    assert kept(method, sparsity) == expected


def test_keep_count_is_exact() -> None:
    assert plan.keep_count(10, Fraction("0.9")) == 1  # float math gives 0.9999... -> 0
    # The trap avoided: in floats 10 * (1 - 0.9) < 1. A float sparsity is parsed exactly too.
    assert plan.keep_count(10, plan.parse_sparsity(0.9)) == 1
    assert plan.keep_count(7, Fraction("0.5")) == 3
    assert plan.keep_count(1, Fraction("0.9")) == 0
    assert plan.keep_count(5, Fraction(0)) == 5
    assert plan.keep_count(5, Fraction(1)) == 0


@pytest.mark.parametrize("text", ["-0.1", "1.5", "abc", "nan"])
def test_parse_sparsity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        plan.parse_sparsity(text)


def test_zero_base_scores_minus_inf() -> None:
    b = torch.tensor([0.0, 0.0, 1.0])
    f = torch.tensor([1.0, 0.0, 1.5])
    coef = torch.tensor(0.5)
    for method in (Method.FAPM, Method.RATIO):
        s = scoring.score_chunk(method, b, f, coef)
        assert s[0] == float("-inf") and s[1] == float("-inf") and torch.isfinite(s[2])


def test_radix_select_matches_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunk boundaries, heavy ties, +-inf, float32 and float64 keys."""
    monkeypatch.setattr(scoring, "CHUNK", 7)
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 80)
        dtype = rng.choice([torch.float32, torch.float64])
        s = torch.randn(n, dtype=dtype)
        if rng.random() < 0.5:
            s = s.round()
        if rng.random() < 0.3:
            s[torch.rand(n) < 0.3] = float("-inf")
        if rng.random() < 0.2:
            s[torch.rand(n) < 0.3] = float("inf")
        if rng.random() < 0.2:
            s[torch.rand(n) < 0.3] = -0.0
        s = s + 0.0
        k = rng.randint(0, n)
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(s, descending=True, stable=True).indices[:k]] = True
        keys = scoring.to_keys(s.clone())
        t = scoring.select_threshold(keys, k)
        got, seen = [], 0
        for c in range(0, n, 7):
            m, seen = scoring.keep_mask_chunk(keys[c : c + 7], t, seen)
            got.append(m)
        assert torch.equal(torch.cat(got), want)


def test_random_is_reproducible_and_near_rate() -> None:
    a = scoring.random_mask_block(3, "w", 0, 100_000, 0.1)
    b = scoring.random_mask_block(3, "w", 0, 100_000, 0.1)
    c = scoring.random_mask_block(4, "w", 0, 100_000, 0.1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert abs(a.float().mean().item() - 0.1) < 0.005
