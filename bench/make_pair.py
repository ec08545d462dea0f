"""Generate a Llama-shaped bf16 base/finetuned pair for benchmarks, shard by shard.

Nothing here uses fapm: headers are written by hand and every tensor is generated in chunks from
generators seeded by (seed, tensor name, chunk), so memory stays at one chunk whatever the model
size, and the same pair comes out on any machine. The two sides are sharded differently (base in
name order with ~1/3-size shards, finetuned in layer order with ~1/2-size shards), as real
checkpoints saved by different tools are.

    python bench/make_pair.py DIR --size small|large [--seed 0]

writes DIR/base and DIR/finetuned (each with config.json and an index), and DIR/STAMP so that a
second call with the same arguments does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 1 << 24  # elements generated at a time (64 MB of float32)
BASE_STD = 0.02  # typical std of Llama projection weights
TAU_STD = 5e-4  # a full fine-tune's update: a few bf16 ulps of a 0.02 weight (many round to 0)


@dataclass(frozen=True)
class Shape:
    """A Llama config (``experts`` > 0: a Mixtral-style MoE), enough to lay out every tensor."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    experts: int = 0  # per layer; each has its own gate/up/down of ``intermediate`` rows

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the layer order transformers uses."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
            ]
            if self.experts:
                out.append((p + "block_sparse_moe.gate.weight", (self.experts, h)))
                for e in range(self.experts):
                    q = f"{p}block_sparse_moe.experts.{e}."
                    out += [
                        (q + "w1.weight", (self.intermediate, h)),
                        (q + "w2.weight", (h, self.intermediate)),
                        (q + "w3.weight", (self.intermediate, h)),
                    ]
            else:
                out += [
                    (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                    (p + "mlp.up_proj.weight", (self.intermediate, h)),
                    (p + "mlp.down_proj.weight", (h, self.intermediate)),
                ]
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def config(self) -> dict[str, object]:
        if self.experts:
            return {
                **self._llama(),
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "num_local_experts": self.experts,
                "num_experts_per_tok": 2,
            }
        return self._llama()

    def _llama(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


SIZES = {
    # 176M parameters; largest tensor 24.6M elements (embed_tokens, lm_head).
    "small": Shape(vocab=32000, hidden=768, intermediate=2048, layers=18, heads=12, kv_heads=12),
    # 1.24B parameters (the Llama-3.2-1B layout, untied); largest tensor 131M elements.
    "large": Shape(vocab=64128, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8),
    # 0.6B parameters with small tensors, ~1.2 GB per side: for runs under a 1 GB memory limit.
    "cgroup": Shape(vocab=32000, hidden=1024, intermediate=4096, layers=36, heads=16, kv_heads=8),
    # A small Mixtral-shaped MoE: 24 layers x 64 experts, 4,705 tensors of 24.6K-65K elements
    # (most of them experts); 126M parameters. The fixed cost per tensor shows here.
    "moe": Shape(
        vocab=32000, hidden=256, intermediate=96, layers=24, heads=4, kv_heads=4, experts=64
    ),
}


@dataclass(frozen=True)
class Grid:
    """``count`` tensors of one shape and nothing else: the fixed cost per tensor, bare."""

    count: int
    shape: tuple[int, int]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        width = len(str(self.count - 1))
        return [(f"experts.{i:0{width}d}.weight", self.shape) for i in range(self.count)]

    def config(self) -> dict[str, object]:
        return {"model_type": "grid", "torch_dtype": "bfloat16"}


# 10,000 tensors of 64 x 64 (41M parameters): issue #15's small-tensor pair; and one tensor of
# the same 40,960,000 entries, whose difference in time is the fixed cost of 9,999 tensors.
GRIDS = {"grid10k": Grid(10_000, (64, 64)), "grid1": Grid(1, (6400, 6400))}


def _gen(seed: int, name: str, side: str, chunk: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{side}\0{chunk}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def tensor_chunks(seed: int, name: str, numel: int, finetuned: bool):  # type: ignore[no-untyped-def]
    """bf16 chunks of one tensor; finetuned = base + tau, both rounded to bf16 at the end."""
    norm = name.endswith("norm.weight")
    for i, c in enumerate(range(0, numel, CHUNK)):
        n = min(CHUNK, numel - c)
        w = torch.randn(n, generator=_gen(seed, name, "base", i)).mul_(BASE_STD)
        if norm:
            w.add_(1.0)
        if finetuned:
            w.add_(torch.randn(n, generator=_gen(seed, name, "tau", i)).mul_(TAU_STD))
        yield w.to(torch.bfloat16)


def write_side(
    out: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    shard_bytes: int,
    seed: int,
    finetuned: bool,
    config: dict[str, object],
) -> None:
    out.mkdir(parents=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in group:
            nbytes = 2 * _numel(shape)
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in group:
                for chunk in tensor_chunks(seed, name, _numel(shape), finetuned):
                    f.write(chunk.view(torch.uint8).numpy().tobytes())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_pair(root: Path, size: str, seed: int = 0) -> dict[str, object]:
    """Write the pair under ``root`` unless the same one is already there; returns its facts."""
    shape: Shape | Grid = SIZES[size] if size in SIZES else GRIDS[size]
    tensors = shape.tensors()
    params = sum(_numel(s) for _, s in tensors)
    facts = {
        "size": size,
        "seed": seed,
        "shape": shape.__dict__,
        "parameters": params,
        "bytes_per_side": 2 * params,
        "largest_tensor_numel": max(_numel(s) for _, s in tensors),
        "generator": 1,
    }
    stamp = root / "STAMP.json"
    if stamp.exists() and json.loads(stamp.read_text()) == facts:
        return facts
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    side_bytes = 2 * params
    # Different shard sizes and tensor orders on each side: pairing must go by name.
    write_side(root / "base", sorted(tensors), side_bytes // 3 + 1, seed, False, shape.config())
    write_side(root / "finetuned", tensors, side_bytes // 2 + 1, seed, True, shape.config())
    stamp.write_text(json.dumps(facts))
    os.sync()
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dir", type=Path)
    ap.add_argument("--size", choices=sorted([*SIZES, *GRIDS]), default="small")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    facts = make_pair(args.dir, args.size, args.seed)
    json.dump(facts, sys.stdout)
    print()


if __name__ == "__main__":
    main()
