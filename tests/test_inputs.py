"""Inputs that mean something else than they seem: refused, or warned about, never silent.

Each case used to end in exit 0 with a plausible output: a model read as a task vector gave
base + model, the same checkpoint given twice pruned nothing, a name prefix was refused with a
hint whose flags then pruned nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import make_pair, tree_hash, write_checkpoint

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("command", ["prune", "merge"])
def test_a_model_given_as_a_task_vector_is_refused(
    tmp_path: Path, pair_dirs: tuple[Path, Path], command: str
) -> None:
    b, f = pair_dirs
    before = tree_hash(tmp_path)
    code, out, err = run(command, "-b", str(b), "-t", str(f), "-o", str(tmp_path / "o"))
    assert code == 3 and out == ""
    assert f"error: {f}: has no fapm task-vector metadata" in err
    assert "hint: pass a fine-tuned model as --finetuned" in err
    assert tree_hash(tmp_path) == before  # nothing written


def test_fapm_scores_given_as_a_task_vector_are_refused(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    scores = tmp_path / "scores"
    assert run("score", "-b", str(b), "-f", str(f), "--save-scores", str(scores), "-q")[0] == 0
    code, _, err = run("prune", "-b", str(b), "-t", str(scores), "-o", str(tmp_path / "o"))
    assert code == 3 and "is a 'scores' checkpoint written by fapm, not a task vector" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["prune", "diff", "merge"])
def test_base_given_twice_is_said(
    tmp_path: Path, pair_dirs: tuple[Path, Path], command: str
) -> None:
    b, _ = pair_dirs
    code, _, err = run(command, "-b", str(b), "-f", str(b), "-o", str(tmp_path / "o"))
    assert code == 0
    assert err.startswith("warning: ")
    assert "change nothing" in err or "was the same checkpoint given twice?" in err


def test_a_real_fine_tune_gets_no_such_warning(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    for command in ("prune", "diff", "merge"):
        code, _, err = run(command, "-b", str(b), "-f", str(f), "-o", str(tmp_path / command))
        assert code == 0 and err == "", (command, err)


def test_a_run_that_prunes_nothing_is_said(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "--keep-base", "*",
                       "-o", str(tmp_path / "o"))  # fmt: skip
    assert code == 0 and "warning: no tensor is pruned" in err


def test_a_dtype_mix_between_base_and_finetuned_is_said(tmp_path: Path) -> None:
    base, ft = make_pair(seed=5)  # float32
    ft16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ft.items()}
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft16)
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"))
    assert code == 0
    assert "another dtype in base than in finetuned" in err and "F32 vs BF16" in err


@pytest.mark.parametrize("side", ["finetuned", "base"])
def test_names_that_differ_by_a_prefix_are_named(tmp_path: Path, side: str) -> None:
    base, ft = make_pair(seed=6)
    if side == "finetuned":
        ft = {f"transformer.{k}": v for k, v in ft.items()}
    else:
        base = {f"transformer.{k}": v for k, v in base.items()}
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"))
    assert code == 4
    assert f"error: tensor names differ by a prefix: {side}'s names are the other's with " in err
    assert "'transformer.' in front" in err
    assert not (tmp_path / "o").exists()


def test_inspect_tells_a_model_a_task_vector_and_an_adapter_apart(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    import json

    b, f = pair_dirs
    tv = tmp_path / "tv"
    assert run("diff", "-b", str(b), "-f", str(f), "-o", str(tv), "-q")[0] == 0
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    lora = {"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}
    write_checkpoint(adapter, lora)
    (adapter / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    kinds = {}
    for name, path in (("model", f), ("tv", tv), ("adapter", adapter)):
        code, out, err = run("inspect", str(path), "--json")
        assert code == 0, err
        kinds[name] = json.loads(out)["kind"]
    assert kinds == {"model": "model", "tv": "task-vector", "adapter": "adapter"}


def test_a_closed_pipe_ends_quietly(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    """``fapm inspect BIG --tensors | head -1``: not an internal error, no traceback."""
    import subprocess
    import sys

    _, f = pair_dirs
    script = (
        f"{sys.executable} -m fapm_cli inspect {f} --tensors | head -c 1 >/dev/null; "
        "echo ${PIPESTATUS[0]} >&2"
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    *printed, code = r.stderr.strip().splitlines()
    assert code in ("0", "141"), r.stderr  # 0 when fapm finished before head closed the pipe
    assert not [line for line in printed if "error" in line or "Traceback" in line], printed
