"""Smoke version of `make experiment` (experiments/forgetting.py): tiny sizes, one seed.

The whole pipeline runs once per module (pre-train, fine-tune, `fapm prune` through the real CLI
for every method and sparsity, evaluation, CSV, plots); the tests then check its outputs against
independent computations: the checkpoints as safetensors' own load_file reads them, the addition
answers as Python computes them, and greedy decoding as transformers' generate does it.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from experiments import forgetting as exp
from tests.smoke import HAVE_MPL, run_smoke

SMOKE = exp.PRESETS["smoke"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_smoke("experiments.forgetting", tmp_path_factory.mktemp("experiment") / "out")


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for f in path.glob("*.safetensors"):
        found.update(load_file(str(f)))
    return found


def output_dir(out: Path, method: str, sparsity: float, seed: int = 0) -> Path:
    ft = out / f"ft{SMOKE.finetune_seeds[0]}"
    return ft / (f"{method}-s{sparsity}" + (f"-r{seed}" if method == "random" else ""))


def test_csv_has_every_method_and_sparsity_once(run: Path) -> None:
    got = sorted((r["method"], float(r["sparsity"]), r["random_seed"]) for r in rows(run))
    want = [("base", 1.0, ""), ("finetuned", 0.0, "")]
    for m in ("fapm", "magnitude", "ratio"):
        want += [(m, s, "") for s in SMOKE.sparsities]
    want += [("random", s, str(r)) for s in SMOKE.sparsities for r in SMOKE.random_seeds]
    assert got == sorted(want)


def test_metrics_follow_their_definitions(run: Path) -> None:
    rs = rows(run)
    base = next(r for r in rs if r["method"] == "base")
    ft = next(r for r in rs if r["method"] == "finetuned")
    for r in rs:
        acc, b_acc = float(r["general_acc"]), float(base["general_acc"])
        loss, b_loss = float(r["general_loss"]), float(base["general_loss"])
        assert float(r["forgetting_acc_pct"]) == pytest.approx(
            100 * (b_acc - acc) / b_acc, abs=1e-3
        )
        assert float(r["forgetting_loss_pct"]) == pytest.approx(
            100 * (loss - b_loss) / b_loss, abs=1e-3
        )
        assert 0.0 <= float(r["task_acc"]) <= 1.0
        if float(ft["task_acc"]) > 0:
            want = 100 * float(r["task_acc"]) / float(ft["task_acc"])
            assert float(r["retention_pct"]) == pytest.approx(want, abs=1e-3)
    assert float(base["forgetting_acc_pct"]) == 0.0


def test_outputs_are_base_plus_part_of_the_task_vector(run: Path) -> None:
    base = tensors(run / "base")
    ft = tensors(run / f"ft{SMOKE.finetune_seeds[0]}" / "finetuned")
    assert base.keys() == ft.keys()
    for method in ("fapm", "magnitude", "ratio"):
        for s in SMOKE.sparsities:
            out = tensors(output_dir(run, method, s))
            assert out.keys() == base.keys()
            for name, b in base.items():
                o, f = out[name], ft[name]
                # Every entry is the base value or the fine-tuned one: only the update is pruned.
                assert bool(((o == b) | (o == f)).all()), (method, s, name)
                changed = int((o != b).sum())
                assert changed <= math.floor(b.numel() * (1 - s) + 1e-9), (method, s, name)


def test_sparser_outputs_are_closer_to_base(run: Path) -> None:
    base = tensors(run / "base")
    for method in exp.METHODS:
        changed, dist = {}, {}
        for s in SMOKE.sparsities:
            out = tensors(output_dir(run, method, s))
            changed[s] = sum(int((out[n] != b).sum()) for n, b in base.items())
            dist[s] = sum(
                float(((out[n].double() - b.double()) ** 2).sum()) for n, b in base.items()
            )
        lo, hi = min(SMOKE.sparsities), max(SMOKE.sparsities)
        assert changed[hi] < changed[lo], method
        if method != "random":
            # Not for random: DARE rescales the kept 1% by 100, so it moves *further* in L2.
            assert dist[hi] < dist[lo], method


def test_changed_fraction_column_matches_the_files(run: Path) -> None:
    base = tensors(run / "base")
    total = sum(t.numel() for t in base.values())
    for r in rows(run):
        if r["method"] in ("base", "finetuned"):
            continue
        seed = int(r["random_seed"] or 0)
        out = tensors(output_dir(run, r["method"], float(r["sparsity"]), seed))
        changed = sum(int((out[n] != b).sum()) for n, b in base.items())
        assert float(r["changed_frac"]) == pytest.approx(changed / total, rel=1e-5)


def test_task_rows_cover_the_table_and_answer_positions_are_the_sums() -> None:
    ev = exp.eval_set(exp.PRESETS["full"])
    pos = exp.answer_positions(ev.task.shape[1])
    seen = set()
    for row in ev.task:
        text = bytes(row.tolist()).decode()
        problems = re.findall(r"(\d)\+(\d)=(\d\d)\n", text)
        assert len(problems) == (len(text) - 1) // exp.LINE
        sums = "".join(f"{int(a) + int(b):02d}" for a, b, _ in problems)
        assert sums == bytes(row[pos].tolist()).decode()
        seen.update((int(a), int(b)) for a, b, _ in problems)
    assert seen == {(a, b) for a in range(10) for b in range(10)}


def test_general_held_out_text_is_not_in_training_text() -> None:
    train, held = exp.general_split()
    lines = [ln for ln in held.decode().splitlines() if len(ln) > 60]
    assert lines
    assert sum(ln in train.decode() for ln in lines) / len(lines) < 0.1


def test_task_accuracy_is_greedy_decoding(run: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(run / f"ft{SMOKE.finetune_seeds[0]}" / "finetuned")
    model.eval()
    ev = exp.eval_set(SMOKE)
    rows_ = ev.task[:2]
    with torch.no_grad():
        pred = exp.answer_logits(model, rows_).argmax(-1)  # (rows, problems, digits)
    for r, row in enumerate(rows_):
        for j in range(pred.shape[1]):
            prompt = row[: 1 + exp.LINE * j + exp.ANSWER[0]]
            with torch.no_grad():
                gen = model.generate(
                    prompt[None], max_new_tokens=len(exp.ANSWER), do_sample=False, pad_token_id=0
                )[0, len(prompt) :]
            truth = row[len(prompt) : len(prompt) + len(exp.ANSWER)]
            # First digit: the same prefix, so the same argmax. All digits: exact iff exact.
            assert int(gen[0]) == int(pred[r, j, 0])
            assert bool((gen == truth).all()) == bool((pred[r, j] == truth).all())


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is in the 'plot' extra")
def test_plots_and_published_files(run: Path) -> None:
    published = run.parent / "published"
    for name in ("tradeoff.png", "vs_sparsity.png"):
        assert (published / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (published / "results.csv").read_bytes() == (run / "results.csv").read_bytes()
