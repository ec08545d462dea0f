"""Tiny seeded checkpoints for tests, written with the safetensors library (not fapm's writer).

``write_checkpoint(dir, tensors, shard_bytes=...)`` lays tensors out as Hugging Face does:
``model.safetensors`` when one shard, else ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``. ``make_pair`` builds a base/finetuned pair with awkward shapes,
ties and zeros in base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
    config: dict[str, object] | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard_bytes is not None and groups[-1] and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        save_file(groups[0], str(path / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, group in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, str(path / fname), metadata=meta)
            weight_map.update(dict.fromkeys(group, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory or file, loaded with the safetensors library."""
    if path.is_file():
        return load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (inputs must be unchanged by any run)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# Shapes that exercise edge cases: numel 1 and 10, primes, 1-D, scalars, empty.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (37, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.q_proj.bias": (16,),
    "model.layers.0.mlp.up_proj.weight": (13, 7),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.mlp.down_proj.weight": (7, 13),
    "model.layers.1.odd": (10,),
    "model.layers.1.one": (1,),
    "model.layers.1.scalar": (),
    "model.norm.weight": (16,),
    "lm_head.weight": (37, 16),
}

# Hand labels for SHAPES: (layer, module type).
LABELS: dict[str, tuple[int | None, str]] = {
    "model.embed_tokens.weight": (None, "embeddings"),
    "model.layers.0.self_attn.q_proj.weight": (0, "q"),
    "model.layers.0.self_attn.q_proj.bias": (0, "q"),
    "model.layers.0.mlp.up_proj.weight": (0, "mlp"),
    "model.layers.0.input_layernorm.weight": (0, "norms"),
    "model.layers.1.mlp.down_proj.weight": (1, "mlp"),
    "model.layers.1.odd": (1, "other"),
    "model.layers.1.one": (1, "other"),
    "model.layers.1.scalar": (1, "other"),
    "model.norm.weight": (None, "norms"),
    "lm_head.weight": (None, "lm_head"),
}


def make_pair(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base/finetuned pair with small updates, exact zeros in base, and tied scores."""
    gen = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        b = torch.randn(shape, generator=gen) * 0.02
        tau = torch.randn(shape, generator=gen) * 1e-3
        flat_b, flat_tau = b.reshape(-1), tau.reshape(-1)
        if flat_b.numel() > 4:
            flat_b[::5] = 0.0  # zeros in base: score -inf for fapm and ratio
            flat_tau[1::7] = 0.0  # no update at all
            if i % 2:  # equal magnitudes and equal bases: ties for every method
                flat_tau[2::3] = 5e-4
                flat_b[2::3] = 0.01
        base[name] = b.to(dtype)
        ft[name] = (b + tau).to(dtype)
    base["model.position_ids"] = torch.arange(12, dtype=torch.int64)
    ft["model.position_ids"] = torch.arange(12, dtype=torch.int64)
    return base, ft


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        gb = g.reshape(-1).contiguous().view(torch.uint8)
        wb = w.reshape(-1).contiguous().view(torch.uint8)
        assert torch.equal(gb, wb), f"{name} differs"
