"""Process-wide state a command leaves behind, for the next test and for library callers.

A CLI run in-process (CliRunner, a notebook, a service calling ``app``) must leave the
process as it found it. Each leak known today has a test marked ``xfail(strict=True)``: it
passes while the leak is there and turns into an XPASS failure once the restructure fixes it,
which says to remove the marker. ``raises=AssertionError``: only the leak's own assertion
counts as the expected failure; a command that fails to run, or a helper that can no longer
find what it inspects, is a real failure.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.checkpoints import load_checkpoint, make_pair, write_checkpoint
from tests.reference import reference_prune

runner = CliRunner()
leak = pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="state leak: fixed by the restructure"
)


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    """What these tests (and the leaks they show) change, put back for the tests after them."""
    threads = torch.get_num_threads()
    level = logging.getLogger("huggingface_hub").level
    verbosity = os.environ.get("HF_HUB_VERBOSITY")
    yield
    torch.set_num_threads(threads)
    logging.getLogger("huggingface_hub").setLevel(level)
    if verbosity is None:
        os.environ.pop("HF_HUB_VERBOSITY", None)
    else:
        os.environ["HF_HUB_VERBOSITY"] = verbosity


class CommandFailed(Exception):
    """Not an AssertionError: a command that does not run is no expected failure."""


def run_ok(*args: str) -> None:
    from fapm_cli.cli.app import app

    r = runner.invoke(app, list(args))
    if r.exit_code != 0:
        raise CommandFailed(f"exit {r.exit_code}: {r.output}")


@pytest.mark.parametrize("threads", [["--threads", "1"], []], ids=["threads-1", "default"])
@leak
def test_torch_thread_count_is_restored_after_a_run(
    tmp_path: Path, pair_dirs: tuple[Path, Path], threads: list[str]
) -> None:
    b, f = pair_dirs
    before = torch.get_num_threads()
    mine = (os.cpu_count() or 1) + 2  # neither 1 nor the default (all cores but one)
    torch.set_num_threads(mine)
    try:
        run_ok("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), "-q", *threads)
        assert torch.get_num_threads() == mine
    finally:
        torch.set_num_threads(before)


@leak
def test_quiet_restores_the_hub_logger_level(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    logger = logging.getLogger("huggingface_hub")
    before = logger.level
    logger.setLevel(logging.INFO)  # the caller's choice
    try:
        run_ok("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), "--quiet")
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(before)


@leak
def test_quiet_restores_hf_hub_verbosity(
    tmp_path: Path, pair_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, f = pair_dirs
    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)  # and put back after the test
    run_ok("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), "--quiet")
    assert os.environ.get("HF_HUB_VERBOSITY") is None


def test_quiet_state_does_not_change_the_output(
    tmp_path: Path, pair_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever --quiet leaves behind, a later run still prints its summary."""
    from fapm_cli.cli.app import app

    b, f = pair_dirs
    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)
    run_ok("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "q"), "--quiet")
    r = runner.invoke(app, ["prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0 and "task vector kept" in r.stdout


# -- the shared score-key buffer after a NaN ------------------------------------------------


def _nan_pair(tmp_path: Path) -> tuple[Path, Path]:
    base, ft = make_pair(seed=41)
    ft["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    return write_checkpoint(tmp_path / "nb", base), write_checkpoint(tmp_path / "nf", ft)


def _refused(tmp_path: Path) -> None:
    from fapm_cli.cli.app import app

    nb, nf = _nan_pair(tmp_path)
    r = runner.invoke(app, ["prune", "-b", str(nb), "-f", str(nf), "-o", str(tmp_path / "x")])
    if r.exit_code != 3 or "contains NaN or Inf" not in r.stderr:
        raise CommandFailed(f"expected exit 3 for NaN, got {r.exit_code}: {r.output}")


def _key_buffers() -> list[object]:
    """The scoring's shared key array(s) (``_KEYS``), wherever the restructure puts them.

    The only internals this file touches: whether the buffer is taken is not visible
    from outside (a taken buffer only makes every later ranking allocate a fresh array)."""
    found = [
        m._KEYS
        for name, m in list(sys.modules.items())
        if name.startswith("fapm_cli") and hasattr(m, "_KEYS")
    ]
    if not found:
        raise LookupError("no fapm_cli module has _KEYS any more: update _key_buffers")
    return found


def test_a_prune_after_a_nan_refusal_is_still_correct(
    tmp_path: Path, kernels: str, pair_dirs: tuple[Path, Path]
) -> None:
    _refused(tmp_path)
    base, ft = make_pair(seed=1)  # what pair_dirs holds
    b, f = pair_dirs
    run_ok("prune", "-b", str(b), "-f", str(f), "-s", "0.8", "-o", str(tmp_path / "o"), "-q")
    want = reference_prune(base, ft, Fraction(8, 10))
    got = load_checkpoint(tmp_path / "o")
    assert set(got) == set(want)
    for name, w in want.items():
        g, w = got[name].reshape(-1), w.reshape(-1)
        assert g.dtype == w.dtype and torch.equal(g.view(torch.uint8), w.view(torch.uint8)), name


@leak
def test_the_key_buffer_is_given_back_when_scoring_refuses_a_nan(
    tmp_path: Path, kernels: str, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    run_ok("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "warm"), "-q")
    buffers = _key_buffers()
    for buf in buffers:
        buf.clear()  # type: ignore[attr-defined]  # start free, whatever earlier tests did
    _refused(tmp_path)
    assert not any(buf._busy for buf in buffers)  # type: ignore[attr-defined]
