"""The naive FAPM prune a user might write instead of fapm: the bench's yardstick for small tensors.

    python bench/naive_prune.py BASE_DIR FINETUNED_DIR OUT_FILE [--sparsity 0.9]

Loads every shard of both sides whole (``safetensors.torch.load_file``), scores each tensor
pair with the FAPM metric in float32, keeps the top ``floor(numel * (1 - s))`` by ``torch.topk``
and writes ``base + mask * tau`` with one ``save_file``. No streaming, no exactness guarantees
(topk's order among ties is unspecified), no checks: only the work every prune has to do.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [p.name for p in sorted(path.glob("*.safetensors"))]
    )
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_file(path / shard))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("base", type=Path)
    ap.add_argument("finetuned", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    base = load_dir(args.base)
    finetuned = load_dir(args.finetuned)
    result: dict[str, torch.Tensor] = {}
    for name, f in finetuned.items():
        b = base[name]
        bf, ff = b.float().reshape(-1), f.float().reshape(-1)
        a = (ff - bf).abs()
        s = a - bf.abs().mean() * (a / bf.abs())
        s[bf == 0] = -math.inf
        k = math.floor(s.numel() * (1 - args.sparsity))
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[torch.topk(s, k).indices] = True
        result[name] = torch.where(keep.view(f.shape), f, b)
    save_file(result, str(args.out))


if __name__ == "__main__":
    main()
