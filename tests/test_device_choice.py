"""How `--device` is resolved, on any machine: CUDA is made "available" or not by patching torch.

test_device.py compares CPU and GPU bytes; on a machine without CUDA its `auto` test runs the
CPU path twice. Here `auto` is seen choosing cuda when torch reports a device, and `--device
cuda` without one is a usage error (exit 2) whichever way torch lacks it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from fapm_cli.cli.options import DeviceChoice, use_device
from tests.checkpoints import tree_hash

runner = CliRunner()


def test_auto_resolves_to_cuda_when_torch_has_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    try:
        assert use_device(DeviceChoice.auto) == "cuda"
        assert use_device(DeviceChoice.cuda) == "cuda"
        assert use_device(DeviceChoice.cpu) == "cpu"  # cpu is never upgraded
    finally:
        use_device(DeviceChoice.cpu)  # the scoring device is process-wide: put it back


@pytest.mark.parametrize("built_with", [None, "12.4"])
def test_auto_resolves_to_cpu_without_a_device(
    monkeypatch: pytest.MonkeyPatch, built_with: str | None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", built_with)
    try:
        assert use_device(DeviceChoice.auto) == "cpu"
    finally:
        use_device(DeviceChoice.cpu)


@pytest.mark.parametrize(
    ("built_with", "why"),
    [(None, "is built without CUDA"), ("12.4", "torch sees no CUDA device")],
)
def test_device_cuda_without_a_device_exits_2(
    tmp_path: Path,
    pair_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    built_with: str | None,
    why: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", built_with)
    b, f = pair_dirs
    try:
        for cmd in (
            ["prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o")],
            ["score", "-b", str(b), "-f", str(f)],
            ["merge", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o")],
        ):
            r = runner.invoke(app, [*cmd, "--device", "cuda"])
            assert r.exit_code == 2, r.output
            assert r.stdout == ""
            assert r.stderr.startswith("error: --device cuda: ") and why in r.stderr
            assert "hint: use --device cpu (or auto)" in r.stderr
    finally:
        use_device(DeviceChoice.cpu)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]  # nothing written


def test_device_auto_without_a_device_runs_on_the_cpu(
    tmp_path: Path, pair_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also on a machine with a GPU: with none visible, auto writes the cpu bytes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    b, f = pair_dirs
    try:
        for device in ("cpu", "auto"):
            r = runner.invoke(app, ["prune", "-b", str(b), "-f", str(f), "-q", "--device", device,
                                    "-o", str(tmp_path / device)])  # fmt: skip
            assert r.exit_code == 0, r.output
    finally:
        use_device(DeviceChoice.cpu)
    assert tree_hash(tmp_path / "auto") == tree_hash(tmp_path / "cpu")
