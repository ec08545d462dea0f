"""Result files of the experiments: CSV with stable number formatting, and the versions run.

Shared by forgetting.py and real_model.py so that both write results the same way.
"""

from __future__ import annotations

import csv
import platform
from pathlib import Path
from typing import Any

import torch


def fmt(v: Any) -> Any:
    # Six significant digits: enough to compare, and stable text for reruns on the same machine.
    return f"{v:.6g}" if isinstance(v, float) else v


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: fmt(v) for k, v in r.items()} for r in rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def versions(**extra: str) -> dict[str, str]:
    """Versions of what produced a result (python, torch, transformers, safetensors, fapm)."""
    import safetensors
    import transformers

    from fapm_cli import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "fapm": __version__,
        "machine": platform.machine(),
        **extra,
    }
