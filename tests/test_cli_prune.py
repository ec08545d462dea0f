"""`fapm prune` from the command line: exit codes, stdout/stderr, JSON, safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import load_checkpoint, make_pair, tree_hash, write_checkpoint

FAPM = [sys.executable, "-m", "fapm_cli"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([*FAPM, *args], capture_output=True, text=True, env=env, timeout=120)


def test_json_output_is_the_documented_object(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), "-s", "0.9", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # not a terminal: no progress bar, no chatter
    doc = json.loads(r.stdout)
    assert doc["command"] == "prune" and doc["method"] == "fapm" and doc["sparsity"] == 0.9
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["model.layers.1.odd"]["kept"] == 1  # floor(10 * 0.1)
    assert by_name["model.layers.1.one"]["kept"] == 0
    assert by_name["model.position_ids"]["action"] == "copy"
    out = load_checkpoint(tmp_path / "o")
    assert set(by_name) == set(out)
    total = sum(t["numel"] for t in doc["tensors"] if t["action"] == "prune")
    assert doc["totals"]["pruned_parameters"] == total
    assert doc["totals"]["kept"] == sum(t["kept"] for t in doc["tensors"] if t["action"] == "prune")
    assert all(0.0 <= t["sq_norm_kept_fraction"] <= 1.0 for t in doc["tensors"])
    shards = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors"))
    assert sorted(s["name"] for s in doc["shards"]) == shards


def test_human_summary_on_stdout(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"))
    assert r.returncode == 0
    assert "task vector kept" in r.stdout and "error" not in r.stdout
    assert r.stderr == ""
    q = cli("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "q"), "--quiet")
    assert (q.returncode, q.stdout, q.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["-s", "1.5"], 2, "sparsity"),
        (["-s", "x"], 2, "sparsity"),
        (["--lam", "-1"], 2, "lam"),
        (["--max-shard-size", "huge"], 2, "size"),
        (["--dtype", "int8"], 2, "dtype"),
        (["-m", "nope"], 2, "method"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, pair_dirs: tuple[Path, Path], args: list[str], code: int, needle: str
) -> None:
    b, f = pair_dirs
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), *args)
    assert r.returncode == code
    assert needle in r.stderr.lower()
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_input_exit_3(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    _, f = pair_dirs
    r = cli("prune", "-b", str(tmp_path / "nope"), "-f", str(f), "-o", str(tmp_path / "o"))
    assert r.returncode == 3
    assert r.stderr.startswith(f"error: {tmp_path / 'nope'}: no such file or directory\nhint: ")
    assert r.stdout == ""


def test_mismatch_exit_4(tmp_path: Path) -> None:
    base, ft = make_pair()
    del ft["model.norm.weight"]  # (a missing lm_head would be a tied one)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"))
    assert r.returncode == 4
    assert "model.norm.weight" in r.stderr and "--on-base-only keep" in r.stderr
    assert not (tmp_path / "o").exists()


def test_output_exists_exit_5_then_overwrite(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(out))
    assert r.returncode == 5 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what fapm wrote: a folder holding the user's file is refused.
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(out), "--overwrite", "-q")
    assert r.returncode == 5
    assert "--overwrite replaces only an earlier fapm output" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert (
        cli("prune", "-b", str(b), "-f", str(f), "-o", str(out), "-s", "0.5", "-q").returncode == 0
    )
    first = (out / "model.safetensors.index.json").read_text()
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(out), "--overwrite", "-q")
    assert r.returncode == 0  # an earlier fapm output is replaced
    assert (out / "model.safetensors.index.json").read_text() != first


def test_output_inside_input_exit_5(pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    before = tree_hash(b)
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(b / "pruned"))
    assert r.returncode == 5 and "overlaps input" in r.stderr
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(b), "--overwrite")
    assert r.returncode == 5
    assert tree_hash(b) == before


def test_nan_exit_3_names_tensor(tmp_path: Path) -> None:
    base, ft = make_pair()
    base["model.norm.weight"][0] = float("inf")
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    r = cli("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"))
    assert r.returncode == 3
    assert "'model.norm.weight' in base contains NaN or Inf" in r.stderr


def test_debug_shows_traceback(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    _, f = pair_dirs
    r = cli("--debug", "prune", "-b", str(tmp_path / "x"), "-f", str(f), "-o", str(tmp_path / "o"))
    assert r.returncode == 3 and "Traceback" in r.stderr


def test_version_and_runner(pair_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from fapm_cli import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"fapm {__version__}"
    b, f = pair_dirs
    r = CliRunner().invoke(
        app, ["prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), "-q"]
    )
    assert r.exit_code == 0, r.output


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from fapm_cli.cli.app import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "for cmd in ('prune',):\n"
        "    try:\n        app([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, 'huggingface_hub' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False False"


def test_help_keeps_bracketed_text() -> None:
    r = CliRunner().invoke(app, ["prune", "--help"])
    assert "org/name[@revision]" in r.stdout
