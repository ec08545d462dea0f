"""Build a small Llama-shaped base/finetuned pair for `make demo`.

The base is a tiny byte-level Llama trained briefly on English text (the Python documentation
topics that ship with Python); the finetuned model continues with full fine-tuning on a
synthetic arithmetic task (addition), and finetuned-2 on another (multiplication), both from
the same base, so that the README's merge of two fine-tunes runs too. All are saved with
save_pretrained, sharded differently, so that fapm has to pair tensors by name across shards.
Seeded; no download.

usage: python examples/make_pair.py OUT_DIR [--steps-base N] [--steps-finetune N]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from pydoc_data.topics import topics

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

SEQ = 64


def general_text() -> bytes:
    return "\n".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")


def task_text(n: int, seed: int, op: str = "+") -> bytes:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        lines.append(f"{a}{op}{b}={a + b if op == '+' else a * b}")
    return ("\n".join(lines) + "\n").encode()


def batches(data: bytes, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(list(data), dtype=torch.long)
    while True:
        starts = torch.randint(0, len(t) - SEQ - 1, (batch,), generator=gen)
        yield torch.stack([t[s : s + SEQ] for s in starts.tolist()])


def train(model: LlamaForCausalLM, data: bytes, steps: int, lr: float, seed: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _, x in zip(range(steps), batches(data, 16, seed), strict=False):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps-base", type=int, default=150)
    parser.add_argument("--steps-finetune", type=int, default=60)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()  # keep the demo output readable
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LlamaForCausalLM(config())
    loss = train(model, general_text(), args.steps_base, 3e-3, seed=1)
    print(f"base: {sum(p.numel() for p in model.parameters()):,} parameters, train loss {loss:.3f}")
    model.save_pretrained(args.out / "base", max_shard_size="200KB")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = train(model, task_text(5000, seed=2), args.steps_finetune, 1e-3, seed=3)
    print(f"finetuned on addition: train loss {loss:.3f}")
    model.save_pretrained(args.out / "finetuned", max_shard_size="500KB")
    model.load_state_dict(base_state)
    loss = train(model, task_text(5000, seed=4, op="*"), args.steps_finetune, 1e-3, seed=5)
    print(f"finetuned-2 on multiplication: train loss {loss:.3f}")
    model.save_pretrained(args.out / "finetuned-2", max_shard_size="500KB")


if __name__ == "__main__":
    main()
