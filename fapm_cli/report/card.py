"""The model card (``README.md``) of a model fapm writes, ready for ``hf upload``.

Hugging Face reads the YAML front matter (``base_model``, ``base_model_relation``, ``tags``,
``library_name``) to link the model to its base and list it; the body says what was done, with
the inputs as Hub ids at their commit or by name (never a local path), and a command that
repeats it. The fine-tune's own card describes another model, so it is never copied.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from fapm_cli import __version__
from fapm_cli.plan import Method, PruneOptions

CARD_NAME = "README.md"
PAPER = "https://arxiv.org/abs/2509.08255"


@dataclass(frozen=True)
class CardInput:
    role: str  # "finetuned", "task vector", ...
    source: str  # a Hub id at its commit (org/name@sha) or a local checkpoint's name
    weight: float | None = None


def _hub_id(source: str) -> str | None:
    """``org/name`` of a Hub source recorded as ``org/name@commit``; None for a local one."""
    repo = source.split("@", 1)[0]
    return repo if repo.count("/") == 1 and "@" in source else None


def model_card(
    command: str,
    base: str,
    inputs: Sequence[CardInput],
    opts: PruneOptions | None,
    kept_fraction: float | None,
    args: Sequence[str],
) -> str:
    """The card of a pruned (``prune``) or merged (``merge``) model."""
    bases = [b for b in (_hub_id(base),) if b]
    meta = {
        "library_name": "transformers",
        "tags": ["fapm", "pruned-task-vector", command],
        **({"base_model": bases[0], "base_model_relation": "merge"} if bases else {}),
    }
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items())
    how = "merged" if command == "merge" else "pruned"
    lines = [
        f"---\n{front}\n---",
        "",
        f"# A {how} fine-tune, made with fapm",
        "",
        f"This model is `{base}` plus the part of each fine-tune's task vector (its update "
        f"over base) that [FAPM]({PAPER}) keeps: the entries ranked by "
        "`|tau| - lam * mean|base| * |tau| / |base|` per tensor, which keeps the task and drops "
        "the updates that cause catastrophic forgetting. Written by fapm "
        f"{__version__}.",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{base}` |",
    ]
    for i in inputs:
        weight = f" (weight {i.weight:g})" if i.weight is not None else ""
        lines.append(f"| {i.role} | `{i.source}`{weight} |")
    if opts is not None:
        method = opts.method.value + (f", lam {opts.lam:g}" if opts.method is Method.FAPM else "")
        if opts.method is Method.RANDOM:
            method += f", seed {opts.seed}"
        lines += [
            f"| method | {method} |",
            f"| sparsity | {float(opts.sparsity):g} (keeps {float(1 - opts.sparsity):.0%} of "
            "each tensor's task vector) |",
        ]
    if kept_fraction is not None:
        lines.append(f"| task-vector entries kept | {kept_fraction:.2%} |")
    lines += ["", "Made with:", "", "```sh", shlex.join(["fapm", command, *args]), "```", ""]
    return "\n".join(lines)
