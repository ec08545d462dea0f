"""Pruned checkpoints made the way a user makes them: the installed `fapm prune` in a subprocess.

Shared by the experiments (forgetting.py, real_model.py), so that every pruned model they
measure comes from the real CLI on real checkpoint directories, never from an in-process call.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def fapm_executable() -> list[str]:
    """The installed `fapm` console script of this interpreter's environment."""
    exe = Path(sys.executable).with_name("fapm")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("fapm")
    if found is None:
        raise SystemExit("fapm is not installed in this environment: run `make install` first")
    return [found]


def run_prune(
    base: Path,
    finetuned: Path,
    out: Path,
    method: str,
    sparsity: float,
    seed: int,
    threads: int,
    lam: float | None = None,
) -> dict[str, Any]:
    """`fapm prune ... --json`; returns its JSON report. `lam` None leaves the CLI default."""
    cmd = [
        *fapm_executable(),
        "prune",
        "--base", str(base),
        "--finetuned", str(finetuned),
        "--output", str(out),
        "--method", method,
        "--sparsity", repr(sparsity),
        "--seed", str(seed),
        "--threads", str(threads),
        "--overwrite",
        "--json",
    ]  # fmt: skip
    if lam is not None:
        cmd += ["--lam", repr(lam)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as safetensors' own load_file reads it."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def weight_distance(base: Path, other: Path) -> tuple[float, float]:
    """(fraction of entries that differ from base, L2 distance to base) over all tensors."""
    b, o = load_dir(base), load_dir(other)
    changed = total = 0
    sq = 0.0
    for name, t in b.items():
        d = o[name].double() - t.double()
        changed += int((d != 0).sum())
        total += d.numel()
        sq += float((d * d).sum())
    return changed / total, math.sqrt(sq)
