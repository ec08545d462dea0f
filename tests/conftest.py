from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_pair, write_checkpoint

# Tests run on any terminal; keep rich/tqdm output deterministic.
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("TERM", "dumb")


@pytest.fixture
def pair_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A float32 base/finetuned pair, sharded differently, with a config.json to copy."""
    base, ft = make_pair(seed=1)
    b = write_checkpoint(
        tmp_path / "base", base, shard_bytes=2000, config={"model_type": "x", "side": "base"}
    )
    f = write_checkpoint(
        tmp_path / "ft", ft, shard_bytes=3500, config={"model_type": "x", "side": "ft"}
    )
    return b, f


@pytest.fixture
def bf16_pair_dirs(tmp_path: Path) -> tuple[Path, Path]:
    base, ft = make_pair(seed=2, dtype=torch.bfloat16)
    return (
        write_checkpoint(tmp_path / "base16", base, shard_bytes=1500),
        write_checkpoint(tmp_path / "ft16", ft),
    )


@pytest.fixture(params=["native", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the C kernels and on the torch path (FAPM_NATIVE=0): same results."""
    from fapm_cli.compute import native

    if request.param == "torch":
        monkeypatch.setenv(native.ENV, "0")
    else:
        monkeypatch.delenv(native.ENV, raising=False)
        if native.kernels() is None:
            pytest.skip("the C kernels are not built (no C compiler at install time)")
    return str(request.param)
