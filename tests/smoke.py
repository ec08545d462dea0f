"""Running an experiment script's smoke preset, for the tests that check its outputs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def run_smoke(module: str, out: Path) -> Path:
    """``python -m MODULE --preset smoke`` into ``out`` (published beside it, every pruned
    checkpoint kept; no plots without matplotlib); ``out``, once it has succeeded."""
    publish = out.parent / "published"
    cmd = [sys.executable, "-m", module, "--preset", "smoke",
           "--out", str(out), "--publish", str(publish), "--keep-checkpoints"]  # fmt: skip
    if not HAVE_MPL:
        cmd.append("--no-plots")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
