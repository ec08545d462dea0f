"""Show what `fapm prune` did in `make demo`: losses of base, finetuned and pruned models.

"general" is held-out English text (what the base knows and fine-tuning makes it forget);
"task" is held-out arithmetic (what fine-tuning taught). Lower is better for both.

usage: python examples/show_result.py DEMO_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from make_pair import SEQ, general_text, task_text
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging


def loss_on(model: LlamaForCausalLM, data: bytes) -> float:
    t = torch.tensor(list(data[: SEQ * 64]), dtype=torch.long).reshape(64, SEQ)
    with torch.no_grad():
        return float(model(input_ids=t, labels=t).loss)


def main() -> None:
    hf_logging.disable_progress_bar()
    root = Path(sys.argv[1])
    general = general_text()[-SEQ * 64 :]  # the tail: not where training batches concentrate
    task = task_text(2000, seed=99)  # a seed the fine-tune never saw
    print(f"\n{'model':<12}{'general loss':>14}{'task loss':>12}")
    for name in ("base", "finetuned", "pruned"):
        model = LlamaForCausalLM.from_pretrained(root / name)
        print(f"{name:<12}{loss_on(model, general):>14.3f}{loss_on(model, task):>12.3f}")
    print("\npruned = base + the 10% of the task vector FAPM ranks highest, per tensor")


if __name__ == "__main__":
    main()
