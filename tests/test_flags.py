"""One meaning per flag across commands, and the flags users reach for (issue #16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fapm_cli import __version__
from fapm_cli.cli.app import app
from tests.checkpoints import tree_hash

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_dash_capital_v_prints_the_version() -> None:
    assert run("-V") == (0, f"fapm {__version__}\n", "")


def test_debug_is_taken_after_the_subcommand_too(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fapm_cli", "inspect", str(tmp_path / "nope"), "--debug"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 3
    assert "Traceback" in r.stderr and r.stderr.rstrip().splitlines()[-2].startswith("error: ")


@pytest.mark.parametrize("command", ["prune", "score", "merge"])
def test_density_is_one_minus_sparsity(
    tmp_path: Path, pair_dirs: tuple[Path, Path], command: str
) -> None:
    b, f = pair_dirs
    out = [] if command == "score" else ["-o"]
    outs = []
    for i, flag in enumerate((["--sparsity", "0.75"], ["--density", "0.25"])):
        dest = tmp_path / f"{command}-{i}"
        args = [
            command,
            "-b",
            str(b),
            "-f",
            str(f),
            *flag,
            "--json",
            *out,
            *([str(dest)] if out else []),
        ]
        code, stdout, err = run(*args)
        assert code == 0, err
        outs.append(tree_hash(dest) if out else stdout.split('"seconds"')[0])
    assert outs[0] == outs[1]
    before = tree_hash(tmp_path)
    code, _, err = run(command, "-b", str(b), "-f", str(f), "-s", "0.5", "--density", "0.5",
                       *out, *([str(tmp_path / "x")] if out else []))  # fmt: skip
    assert code == 2 and "give one" in err
    assert tree_hash(tmp_path) == before


def test_dash_t_means_task_vector_only(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    _, f = pair_dirs
    code, _, err = run("inspect", str(f), "-t")
    assert code == 2 and "No such option" in err
    assert run("inspect", str(f), "--tensors")[0] == 0


def test_prune_layout_and_its_old_name(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    """``--format`` is score's output format only; prune's task-vector layout is ``--layout``
    (its old name still works, with a warning, so scripts keep running)."""
    b, f = pair_dirs
    args = ["prune", "-b", str(b), "-f", str(f), "--save", "task-vector", "-q"]
    new, old = tmp_path / "new", tmp_path / "old"
    assert run(*args, "--layout", "compact", "-o", str(new)) == (0, "", "")
    r = runner.invoke(app, [*args[:-1], "--format", "compact", "-o", str(old)])
    assert r.exit_code == 0 and "prune --format is now --layout" in r.stderr
    assert tree_hash(old) == tree_hash(new)
    code, _, err = run(*args, "--layout", "dense", "--format", "dense", "-o", str(tmp_path / "x"))
    assert code == 2 and "give --layout only" in err
