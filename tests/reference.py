"""An independent, in-memory reference of the method: whole tensors, a full stable argsort.

Deliberately naive (the engine streams, chunks and radix-selects): compare the two on the same
inputs. Follows ../shared/METHOD.md: scores in float32 (float64 for float64 inputs),
S = |tau| - (lam * m) * (|tau| / |base|), -inf where base == 0, exactly floor(n * (1 - s)) kept,
ties to the lowest flat index, kept entries copied from finetuned.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def reference_scores(
    base: torch.Tensor, ft: torch.Tensor, method: str, lam: float = 1.0
) -> torch.Tensor:
    cdt = torch.float64 if torch.float64 in (base.dtype, ft.dtype) else torch.float32
    b, f = base.to(cdt).reshape(-1), ft.to(cdt).reshape(-1)
    a = (f - b).abs()
    if method == "magnitude":
        return a
    m = (b.to(torch.float64).abs().sum() / max(b.numel(), 1)).to(cdt)
    rel = a / b.abs()
    s = a - (torch.tensor(lam, dtype=cdt) * m) * rel if method == "fapm" else -rel
    return torch.where(b == 0, torch.tensor(float("-inf"), dtype=cdt), s)


def reference_mask(
    base: torch.Tensor, ft: torch.Tensor, sparsity: Fraction, method: str, lam: float = 1.0
) -> torch.Tensor:
    n = base.numel()
    k = int(n * (1 - sparsity))
    order = torch.sort(
        reference_scores(base, ft, method, lam), descending=True, stable=True
    ).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(base.shape)


def reference_prune(
    base: dict[str, torch.Tensor],
    ft: dict[str, torch.Tensor],
    sparsity: Fraction,
    method: str = "fapm",
    lam: float = 1.0,
) -> dict[str, torch.Tensor]:
    out = {}
    for name, b in base.items():
        f = ft[name]
        if not f.is_floating_point():
            out[name] = f.clone()
            continue
        out[name] = torch.where(reference_mask(b, f, sparsity, method, lam), f, b)
    return out
