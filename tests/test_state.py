"""Process-wide state a command leaves behind, for the next test and for library callers.

A CLI run in-process (CliRunner, a notebook, a service calling ``app``) must leave the
process as it found it. Each of these failed before the one-engine restructure (torch's thread
count, the Hub logger and ``HF_HUB_VERBOSITY`` were left changed, and a NaN refusal left the
process-wide key buffer taken); a command that fails to run raises ``CommandFailed``.
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


def test_the_key_buffer_is_given_back_when_scoring_refuses_a_nan(kernels: str) -> None:
    """The run's key buffer (in its Workspace) serves the next tensor after a NaN refusal."""
    from fapm_cli.compute import scoring
    from fapm_cli.errors import InputError

    gen = torch.Generator().manual_seed(5)
    b = torch.randn(5000, generator=gen) * 0.02
    f = b + torch.randn(5000, generator=gen) * 1e-3
    f[4321] = float("nan")
    ws = scoring.Workspace()

    def refuse(start: int, stop: int) -> None:
        raise InputError("NaN", hint="")

    with pytest.raises(InputError):
        scoring.rank_tensor(scoring.Method.FAPM, b, f, 500, 1.0, refuse, ws)
    assert not ws.keys._busy
    first = ws.keys.take(5000, torch.int32)  # the run's array, free again
    assert ws.keys._busy and ws.keys.take(10, torch.int32).data_ptr() != first.data_ptr()


def test_no_module_keeps_a_key_buffer_or_a_device() -> None:
    """Scoring state lives in a run's Workspace, never in a module (two runs in one process,
    or a library caller after a CLI run, share nothing)."""
    import fapm_cli.compute.scoring as scoring

    state = [
        (name, key)
        for name, m in list(sys.modules.items())
        if name.startswith("fapm_cli")
        for key, value in vars(m).items()
        if isinstance(value, scoring.KeyBuffer | torch.device)
    ]
    assert state == []
