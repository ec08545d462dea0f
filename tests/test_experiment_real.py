"""Smoke version of `make experiment-real` (experiments/real_model.py), without the GGUF.

`--preset smoke` runs the whole pipeline once per module on a tiny random Llama laid out like
SmolLM2 (tied embeddings, ChatML chat template, a BPE tokenizer trained on the spot): base,
full fine-tunes of both tasks, `fapm prune` through the real CLI for every variant, evaluation,
CSV, plots. The tests check its outputs against independent computations: the checkpoints as
safetensors' own load_file reads them, the task items as their definitions say, teacher-forced
scores against a plain forward pass without the KV-cache shortcut, and exact match against
transformers' generate.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from experiments import real_model as exp
from experiments.prune_cli import load_dir
from tests.smoke import HAVE_MPL, run_smoke

SMOKE = exp.PRESETS["smoke"]
REQUIRED = ("model", "task", "method", "lam", "sparsity", "seed", "random_seed", "task_acc",
            "text_loss", "instr_loss", "instr_agree", "forgetting_text_pct",
            "forgetting_instr_pct", "retention_pct", "kept_fraction")  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_smoke("experiments.real_model", tmp_path_factory.mktemp("experiment-real") / "out")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tiny") / "base"
    exp.save_base("tiny", base)
    return base


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def pruned_dir(out: Path, r: dict[str, str]) -> Path:
    v = exp.Variant(r["method"], float(r["lam"]) if r["lam"] else None, int(r["random_seed"] or 0))
    return out / f"pruned-{r['task']}-{r['seed']}-{v.name}-s{float(r['sparsity'])}"


def test_csv_has_every_run_once_with_the_required_columns(run: Path) -> None:
    rs = rows(run)
    assert set(REQUIRED) <= set(rs[0])
    got = sorted((r["task"], r["seed"], r["method"], r["lam"], r["random_seed"],
                  float(r["sparsity"])) for r in rs)  # fmt: skip
    want = []
    for task in exp.TASKS:
        for seed in SMOKE.finetune_seeds:
            want += [
                (task, str(seed), "base", "", "", 1.0),
                (task, str(seed), "finetuned", "", "", 0.0),
            ]
            for v in SMOKE.variants():
                lam = "" if v.lam is None else f"{v.lam:g}"
                rseed = str(v.seed) if v.method == "random" else ""
                want += [(task, str(seed), v.method, lam, rseed, s) for s in SMOKE.sparsities]
    assert got == sorted(want)
    assert {r["model"] for r in rs} == {"tiny"}


def test_metrics_follow_their_definitions(run: Path) -> None:
    rs = rows(run)
    for task in exp.TASKS:
        mine = [r for r in rs if r["task"] == task]
        base = next(r for r in mine if r["method"] == "base")
        ft = next(r for r in mine if r["method"] == "finetuned")
        # The base reproduces its own greedy answers, teacher-forced: agreement 1, no forgetting.
        assert float(base["instr_agree"]) == 1.0
        assert float(base["instr_exact"]) == 1.0
        for key in ("forgetting_text_pct", "forgetting_instr_pct", "forgetting_instr_loss_pct"):
            assert float(base[key]) == 0.0
        for r in mine:
            # The CSV holds 6 significant digits: compare to that precision (relative, absolute).
            b_text, text = float(base["text_loss"]), float(r["text_loss"])
            assert float(r["forgetting_text_pct"]) == pytest.approx(
                100 * (text - b_text) / b_text, rel=1e-4, abs=1e-3
            )
            agree = float(r["instr_agree"])
            assert float(r["forgetting_instr_pct"]) == pytest.approx(
                100 * (1 - agree), rel=1e-4, abs=1e-3
            )
            assert 0.0 <= float(r["task_acc"]) <= 1.0
            if float(ft["task_acc"]) > 0:
                want = 100 * float(r["task_acc"]) / float(ft["task_acc"])
                assert float(r["retention_pct"]) == pytest.approx(want, rel=1e-4, abs=1e-3)
            else:
                assert math.isnan(float(r["retention_pct"]))


def test_pruned_models_are_fapm_outputs_of_base_and_finetune(run: Path) -> None:
    base = load_dir(run / "base")
    for r in rows(run):
        if r["method"] in ("base", "finetuned"):
            continue
        ft = load_dir(run / f"ft-{r['task']}-{r['seed']}")
        out = load_dir(pruned_dir(run, r))
        assert out.keys() == base.keys() == ft.keys()  # tied: no lm_head anywhere
        s = float(r["sparsity"])
        changed = 0
        for name, b in base.items():
            o, f = out[name], ft[name]
            if r["method"] != "random":  # DARE rescales the kept updates by 1 / (1 - s)
                assert bool(((o == b) | (o == f)).all()), (r, name)
            n = int((o != b).sum())
            assert n <= math.floor(b.numel() * (1 - s) + 1e-9) or r["method"] == "random"
            changed += n
        total = sum(t.numel() for t in base.values())
        # Kept entries whose update is exactly 0 do not change: at most the reported fraction.
        assert changed / total <= float(r["kept_fraction"]) * (1 + 1e-5)


def test_task_accuracy_is_greedy_decoding(run: Path) -> None:
    tok = AutoTokenizer.from_pretrained(run / "base")
    eot = exp.end_of_turn(tok)
    for task in exp.TASKS:
        model = LlamaForCausalLM.from_pretrained(run / f"ft-{task}-{SMOKE.finetune_seeds[0]}")
        model.eval()
        items = [exp.encode(tok, qa) for qa in exp.make_task(task).test]
        forced = exp.score_items(model, items, batch=5).exact  # batches of uneven lengths
        for it, f in zip(items, forced, strict=True):
            gen = exp.greedy(model, it.prompt, len(it.answer), eot)
            assert (tuple(gen) == it.answer) == f
    meta = json.loads((run / "meta.json").read_text())
    check = meta["greedy_check"]
    assert check["items"] == len(exp.TASKS) * SMOKE.greedy_checks
    assert check["agree"] == check["items"]


def test_cached_prefix_scores_equal_a_plain_forward_pass(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    model = LlamaForCausalLM.from_pretrained(tiny)
    model.eval()
    items = [exp.encode(tok, qa) for qa in exp.make_task("codes").test[:7]]
    got = exp.score_items(model, items, batch=3)
    nll, exact = [], []
    with torch.no_grad():
        for it in items:
            full = torch.tensor([list(it.prompt + it.answer)])
            logits = model(input_ids=full).logits[0, len(it.prompt) - 1 : -1]
            target = torch.tensor(it.answer)
            nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
            exact.append(bool((logits.argmax(-1) == target).all()))
    assert got.exact == exact
    assert got.loss == pytest.approx(float(torch.cat(nll).mean()), rel=1e-5)
    assert len(exp.shared_prefix(items)) > 0


def test_tasks_test_what_they_claim() -> None:
    facts = exp.make_task("facts")
    trained = set(facts.train)
    assert len(facts.test) == exp.N_FACTS
    for qa in facts.test:
        # Closed-book: every tested fact was trained on, under the other wordings only.
        person = qa.question.removeprefix("Which town is ").removesuffix(" living in?")
        assert {exp.QA(q.format(p=person), qa.answer) for q in exp.FACT_TRAIN} <= trained
        assert qa.question not in {t.question for t in trained}
    assert len({qa.answer for qa in facts.test}) == exp.N_FACTS  # one town per person
    codes = exp.make_task("codes")
    word = {qa.question.rsplit(" ", 1)[-1] for qa in codes.train}
    held = [qa.question.rsplit(" ", 1)[-1] for qa in codes.test]
    assert not word & set(held)  # tested on words never trained on
    for qa in (*codes.train, *codes.test):
        assert qa.question.rsplit(" ", 1)[-1] in exp.GROUPS[qa.answer]
    assert len(held) == len(exp.GROUPS) * exp.CODE_TEST_PER_GROUP


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is in the 'plot' extra")
def test_plots_and_published_files(run: Path) -> None:
    published = run.parent / "published"
    for name in ("tradeoff.png", "vs_sparsity.png"):
        assert (published / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (published / "results.csv").read_bytes() == (run / "results.csv").read_bytes()


def test_summarize_rebuilds_the_same_summary(run: Path, tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_bytes((run / "results.csv").read_bytes())
    exp.main(["--out", str(tmp_path), "--summarize", "--no-plots"])
    assert (tmp_path / "summary.md").read_text() == (run / "summary.md").read_text()


def test_retention_at_half_forgetting_is_interpolated_along_the_curve() -> None:
    def point(curve: str, s: float, forgetting: float, retention: float) -> dict[str, object]:
        return {"task": "t", "curve": curve, "sparsity": s,
                "forgetting_instr_pct": forgetting, "retention_pct": retention}  # fmt: skip

    agg = [point("finetuned", 0.0, 40.0, 100.0), point("base", 1.0, 0.0, 0.0),
           point("m", 0.5, 30.0, 90.0), point("m", 0.9, 10.0, 10.0),
           point("r", 0.5, 30.0, 80.0), point("r", 0.9, 25.0, 70.0)]  # fmt: skip
    table = exp.at_half_forgetting(agg)  # type: ignore[arg-type]
    # m crosses 20 % halfway between s = 0.5 (30 %, 90) and 0.9 (10 %, 10): retention 50.
    assert "| t | m | 40.0 | 20.0 | 50.0 (between s = 0.5 and 0.9) |" in table
    assert "| t | r | 40.0 | 20.0 | not reached |" in table
