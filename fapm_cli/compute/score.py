"""The per-tensor operation of ``fapm score``: where a fine-tune moved, and what pruning keeps.

Per tensor pair (float tensors in both checkpoints, paired as ``prune`` pairs them):

- ``mean_abs_tau``, ``mean_abs_base``: mean |tau| and mean |base| over all entries;
- ``mean_rel_change``: mean of |tau| / |base| over the entries where base != 0 (those where
  base == 0 are excluded and counted in ``base_zero``; the ratio is undefined there);
- ``positive_score_fraction``: share of entries whose FAPM score S is > 0, i.e. whose absolute
  update outweighs the forgetting penalty (S = -inf where base == 0, so those never count);
- at the given sparsity, the share of ||tau||^2 kept by the fapm mask and by the magnitude mask,
  and the Jaccard overlap of the two masks. The masks come from ``prune.iter_keep_masks``, so
  they are exactly the ones ``prune`` would apply.

Sums are accumulated in float64; element-wise math is in the compute dtype (float32, float64 for
float64 inputs), as in ``prune``.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch

from fapm_cli.compute import scoring
from fapm_cli.compute.prune import iter_keep_masks
from fapm_cli.compute.scoring import Workspace
from fapm_cli.plan import Method, PruneOptions
from fapm_cli.records import Sums


def score_tensor(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsity: Fraction,
    lam: float,
    write: Callable[[torch.Tensor], None] | None = None,
    ws: Workspace | None = None,
) -> Sums:
    """The figures of one tensor pair; ``write`` receives its FAPM scores (float32, in chunks)."""
    ws = ws or Workspace()
    b = base.reshape(-1)
    f = finetuned.reshape(-1)
    n = b.numel()
    cdt = scoring.compute_dtype(b.dtype, f.dtype)
    f64 = torch.float64
    # The same coefficient the engine uses, so "S > 0" agrees with the scores prune ranks.
    coef = torch.tensor(lam, dtype=cdt) * torch.tensor(
        scoring.mean_abs(b, cdt, ws.workers), dtype=cdt
    )
    fapm_opts = PruneOptions(method=Method.FAPM, sparsity=sparsity, lam=lam)
    magnitude_opts = PruneOptions(method=Method.MAGNITUDE, sparsity=sparsity, lam=lam)

    acc = dict.fromkeys(("abs_tau", "abs_base", "rel", "sq", "sq_fapm", "sq_magnitude"), 0.0)
    nonzero = positive = kept = overlap = 0
    fapm_mask = torch.empty(n, dtype=torch.bool)  # (n,) the only full-size extra besides keys
    for start, stop, mask in iter_keep_masks(name, base, finetuned, fapm_opts, ws):
        bc, fc = b[start:stop].to(cdt), f[start:stop].to(cdt)
        tau = fc - bc
        a, ab = tau.abs(), bc.abs()
        nz = bc != 0
        acc["abs_tau"] += float(a.sum(dtype=f64))
        acc["abs_base"] += float(ab.sum(dtype=f64))
        # where() instead of boolean indexing: masked_select costs ~4.5 ns per entry here,
        # arithmetic 0.1-0.3 ns; |tau| / 0 (inf or nan) is replaced by 0 before the sum.
        acc["rel"] += float(torch.where(nz, a / ab, 0.0).sum(dtype=f64))
        nonzero += int(nz.sum())
        s = scoring.score_chunk(Method.FAPM, bc, fc, coef)
        positive += int((s > 0).sum())
        if write is not None:
            write(s.to(torch.float32))
        tau2 = tau * tau
        acc["sq"] += float(tau2.sum(dtype=f64))
        acc["sq_fapm"] += float(torch.where(mask, tau2, 0.0).sum(dtype=f64))
        kept += int(mask.sum())
        fapm_mask[start:stop] = mask
    for start, stop, mask in iter_keep_masks(name, base, finetuned, magnitude_opts, ws):
        tau = f[start:stop].to(cdt) - b[start:stop].to(cdt)
        acc["sq_magnitude"] += float(torch.where(mask, tau * tau, 0.0).sum(dtype=f64))
        overlap += int((mask & fapm_mask[start:stop]).sum())
    return Sums(
        numel=n,
        base_nonzero=nonzero,
        positive=positive,
        kept=kept,
        overlap=overlap,
        **acc,
    )
