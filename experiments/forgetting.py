"""What does `fapm prune` do to catastrophic forgetting on a real (small) fine-tune?

Pipeline, all seeded, no download (see docs/evidence.md for the reading of the results):

1. pre-train a byte-level Llama (a transformers LlamaConfig) from scratch on the English text of
   the Python documentation topics (``pydoc_data.topics``), holding out every 8th paragraph;
2. fully fine-tune it on the one-digit addition table (``7+5=12``), once per fine-tune seed,
   until it answers it and its general held-out loss has clearly risen;
3. run the real ``fapm prune`` CLI (a subprocess, real checkpoint directories) with methods
   fapm, magnitude, ratio and random at sparsities 0.5 ... 0.99;
4. measure every output: general held-out loss and next-byte accuracy (forgetting, relative to
   the base) and exact-match addition accuracy (retention, relative to the fine-tuned model).

usage: python -m experiments.forgetting [--preset full|large|smoke] [--out DIR]
                                         [--publish DIR] [--keep-checkpoints] [--no-plots]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from experiments.prune_cli import run_prune, weight_distance
from experiments.records import read_csv, versions, write_csv

METHODS = ("fapm", "magnitude", "ratio", "random")
LINE = 7  # bytes per addition problem: "7+5=12\n"
ANSWER = (4, 5)  # offsets of the two answer digits inside a problem line
HELD_OUT_EVERY = 8  # every 8th distinct paragraph is general held-out text
TASK_EVAL_SEED = 1234  # order of the evaluation problems; fixed, independent of run seeds


@dataclass(frozen=True)
class Preset:
    """Sizes of one run. ``full`` is what docs/evidence.md reports; ``smoke`` is for tests."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    seq: int  # training window in bytes (= tokens)
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    finetune_seq: int  # shorter windows than pre-training: a problem needs only 10 bytes
    finetune_batch: int
    eval_windows: int  # general held-out windows of `seq` bytes
    eval_problems: int  # held-out addition problems
    log_points: int  # evaluations logged during each training phase
    sparsities: tuple[float, ...]
    finetune_seeds: tuple[int, ...]
    random_seeds: tuple[int, ...]  # seeds of `fapm prune --method random`
    pretrain_seed: int = 0
    threads: int = 2


FULL_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)

PRESETS: dict[str, Preset] = {
    # What docs/evidence.md reports: sized to finish in ~20-30 min on 2 busy CPU cores.
    "full": Preset(
        hidden=128, layers=4, intermediate=344, heads=4, kv_heads=2, seq=128, batch=16,
        pretrain_steps=200, pretrain_lr=2e-3, finetune_steps=300, finetune_lr=1e-3,
        finetune_seq=56, finetune_batch=16,
        eval_windows=64, eval_problems=600, log_points=5,
        sparsities=FULL_SPARSITIES, finetune_seeds=(1, 2), random_seeds=(0, 1, 2),
    ),
    # A 3M-parameter model: the same pipeline, about 4x the compute; not run for the docs.
    "large": Preset(
        hidden=256, layers=4, intermediate=688, heads=8, kv_heads=4, seq=128, batch=16,
        pretrain_steps=400, pretrain_lr=2e-3, finetune_steps=300, finetune_lr=1e-3,
        finetune_seq=56, finetune_batch=16,
        eval_windows=64, eval_problems=600, log_points=5,
        sparsities=FULL_SPARSITIES, finetune_seeds=(1, 2, 3), random_seeds=(0, 1, 2),
    ),
    "smoke": Preset(
        hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, seq=64, batch=4,
        pretrain_steps=6, pretrain_lr=3e-3, finetune_steps=4, finetune_lr=1e-3,
        finetune_seq=28, finetune_batch=4,
        eval_windows=4, eval_problems=24, log_points=1,
        sparsities=(0.5, 0.99), finetune_seeds=(1,), random_seeds=(0,),
    ),
}  # fmt: skip


# --------------------------------------------------------------------------- data


def general_split() -> tuple[bytes, bytes]:
    """(train, held-out) general text, split by paragraph: every 8th distinct paragraph is held out.

    The topics repeat whole paragraphs (about a fifth of the bytes), so a split by topic would
    test on text seen in training; duplicates are dropped first, keeping the first occurrence.
    """
    seen: set[str] = set()
    paras: list[str] = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = para.strip("\n")
            if para.strip() and para not in seen:
                seen.add(para)
                paras.append(para)
    train = [x for i, x in enumerate(paras) if i % HELD_OUT_EVERY != 3]
    held = [x for i, x in enumerate(paras) if i % HELD_OUT_EVERY == 3]
    return "\n\n".join(train).encode(), "\n\n".join(held).encode()


def problem(a: int, b: int) -> bytes:
    # Fixed width (zero-padded answer): every answer is exactly two bytes, so greedy decoding
    # is exactly "argmax right at each answer position given the right prefix".
    return f"{a}+{b}={a + b:02d}\n".encode()


def task_pairs() -> list[tuple[int, int]]:
    """The 100 facts of the one-digit addition table: fine-tuned on, tested in new contexts."""
    return [(a, b) for a in range(10) for b in range(10)]


def task_stream(pairs: Sequence[tuple[int, int]], n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(problem(*rng.choice(pairs)) for _ in range(n))


def windows(data: bytes, seq: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of random `seq`-byte windows, reproducible for a seed."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(list(data), dtype=torch.long)
    while True:
        starts = torch.randint(0, len(t) - seq, (batch,), generator=gen)
        yield torch.stack([t[s : s + seq] for s in starts.tolist()])  # (batch, seq)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalSet:
    general: torch.Tensor  # (windows, seq) held-out general text
    task: torch.Tensor  # (rows, 1 + LINE * per_row) held-out problems, each row "\n" + problems


def eval_set(p: Preset) -> EvalSet:
    _, held = general_split()
    need = p.eval_windows * p.seq
    if len(held) < need:
        raise SystemExit(f"held-out text has {len(held)} bytes, preset needs {need}")
    general = torch.tensor(list(held[:need]), dtype=torch.long).reshape(p.eval_windows, p.seq)
    pairs = task_pairs()
    random.Random(TASK_EVAL_SEED).shuffle(pairs)
    per_row = max(1, (p.seq - 1) // LINE)
    rows = math.ceil(p.eval_problems / per_row)
    probs = [problem(*pairs[i % len(pairs)]) for i in range(rows * per_row)]
    task = torch.tensor(
        [list(b"\n" + b"".join(probs[r * per_row : (r + 1) * per_row])) for r in range(rows)],
        dtype=torch.long,
    )
    return EvalSet(general, task)


@dataclass(frozen=True)
class Scores:
    general_loss: float  # mean next-byte cross-entropy on held-out general text (nats)
    general_acc: float  # fraction of held-out general bytes predicted exactly by argmax
    task_acc: float  # exact match of both answer digits, greedy decoding
    task_loss: float  # mean cross-entropy of the answer digits


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, ev: EvalSet, chunk: int = 16) -> Scores:
    model.eval()
    losses, hits = [], []
    for x in ev.general.split(chunk):
        logits = model(input_ids=x).logits[:, :-1]  # (b, seq-1, vocab)
        target = x[:, 1:]
        losses.append(
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        )
        hits.append(logits.argmax(-1) == target)
    general_loss = float(torch.cat(losses).mean())
    general_acc = float(torch.cat(hits).float().mean())
    correct, task_losses = [], []
    for x in ev.task.split(chunk):
        logits = answer_logits(model, x)  # (b, per_row, 2, vocab)
        target = x[:, answer_positions(x.shape[1])].reshape(logits.shape[:3])
        task_losses.append(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 2), target.flatten(), reduction="none"
            )
        )
        correct.append((logits.argmax(-1) == target).all(-1).flatten())
    return Scores(
        general_loss=general_loss,
        general_acc=general_acc,
        task_acc=float(torch.cat(correct).float().mean()),
        task_loss=float(torch.cat(task_losses).mean()),
    )


def answer_positions(row_len: int) -> torch.Tensor:
    """Indices, in a task row ("\n" + problems), of every answer digit, problem by problem."""
    per_row = (row_len - 1) // LINE
    return torch.tensor([1 + LINE * j + o for j in range(per_row) for o in ANSWER])


def answer_logits(model: LlamaForCausalLM, rows: torch.Tensor) -> torch.Tensor:
    """Logits predicting each answer digit given the true prefix: (rows, problems, 2, vocab).

    With fixed-width answers, greedy decoding answers a problem exactly iff the argmax is right
    at each of its digits given the right digits before it, so one teacher-forced forward
    pass gives the greedy exact-match accuracy of every problem in the row.
    """
    pos = answer_positions(rows.shape[1])
    logits = model(input_ids=rows).logits[:, pos - 1]  # the logit at i - 1 predicts byte i
    return logits.reshape(len(rows), -1, len(ANSWER), logits.shape[-1])


# --------------------------------------------------------------------------- training


def model_config(p: Preset) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        max_position_embeddings=max(p.seq, LINE * ((p.seq - 1) // LINE) + 1),
        tie_word_embeddings=False,  # separate embed/lm_head tensors, as in the paper's models
    )


def train(
    model: LlamaForCausalLM,
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    *,
    warmup: int,
    decay: bool,
    on_log: Any,
    log_points: int,
) -> None:
    """AdamW on the plain LM loss; linear warm-up, then cosine decay to lr/10 (or constant)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not decay:
            return 1.0
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    log_at = {round(steps * (i + 1) / log_points) for i in range(log_points)}
    for step in range(1, steps + 1):
        model.train()
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step in log_at:
            on_log(step, loss.item())
    model.eval()


# --------------------------------------------------------------------------- the experiment


@dataclass
class Runner:
    preset: Preset
    out: Path
    keep_checkpoints: bool
    ev: EvalSet = field(init=False)
    rows: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ev = eval_set(self.preset)

    def logged(self, phase: str, seed: int, model: LlamaForCausalLM) -> Any:
        def on_log(step: int, train_loss: float) -> None:
            s = evaluate(model, self.ev)
            self.log.append(
                {"phase": phase, "seed": seed, "step": step, "train_loss": train_loss, **asdict(s)}
            )
            print(
                f"  {phase} seed {seed} step {step}: train {train_loss:.3f} "
                f"general {s.general_loss:.3f} task acc {s.task_acc:.3f}",
                flush=True,
            )

        return on_log

    def pretrain(self) -> Path:
        p = self.preset
        torch.manual_seed(p.pretrain_seed)
        model = LlamaForCausalLM(model_config(p))
        n = sum(t.numel() for t in model.parameters())
        print(f"pre-training a {n:,}-parameter byte-level Llama on pydoc topics", flush=True)
        s0 = evaluate(model, self.ev)
        self.log.append(
            {
                "phase": "pretrain",
                "seed": p.pretrain_seed,
                "step": 0,
                "train_loss": float("nan"),
                **asdict(s0),
            }
        )
        train_text, _ = general_split()
        train(
            model,
            windows(train_text, p.seq, p.batch, p.pretrain_seed),
            p.pretrain_steps,
            p.pretrain_lr,
            warmup=max(1, p.pretrain_steps // 20),
            decay=True,
            on_log=self.logged("pretrain", p.pretrain_seed, model),
            log_points=p.log_points,
        )
        path = self.out / "base"
        model.save_pretrained(path)
        return path

    def finetune(self, base: Path, seed: int) -> Path:
        p = self.preset
        torch.manual_seed(seed)
        model = LlamaForCausalLM.from_pretrained(base)
        data = task_stream(
            task_pairs(), p.finetune_steps * p.finetune_batch * p.finetune_seq // LINE + 1000, seed
        )
        train(
            model,
            windows(data, p.finetune_seq, p.finetune_batch, seed),
            p.finetune_steps,
            p.finetune_lr,
            warmup=max(1, p.finetune_steps // 10),
            decay=False,
            on_log=self.logged("finetune", seed, model),
            log_points=p.log_points,
        )
        path = self.out / f"ft{seed}" / "finetuned"
        # Shard differently from base so that fapm has to pair tensors by name across shards.
        model.save_pretrained(path, max_shard_size="2MB")
        return path

    def measure(self, path: Path) -> Scores:
        return evaluate(LlamaForCausalLM.from_pretrained(path), self.ev)

    def add_row(
        self,
        ft_seed: int,
        method: str,
        sparsity: float,
        rseed: int | str,
        s: Scores,
        base: Scores,
        ft: Scores,
        dist: tuple[float, float],
        ft_dist: float,
    ) -> None:
        self.rows.append(
            {
                "finetune_seed": ft_seed,
                "method": method,
                "sparsity": sparsity,
                "random_seed": rseed,
                **asdict(s),
                "forgetting_acc_pct": 100 * (base.general_acc - s.general_acc) / base.general_acc,
                "forgetting_loss_pct": 100
                * (s.general_loss - base.general_loss)
                / base.general_loss,
                "retention_pct": 100 * s.task_acc / ft.task_acc
                if ft.task_acc > 0
                else float("nan"),
                "changed_frac": dist[0],
                "distance_rel": dist[1] / ft_dist if ft_dist > 0 else float("nan"),
            }
        )

    def run(self) -> None:
        p = self.preset
        t0 = time.perf_counter()
        base = self.pretrain()
        self.timings["pretrain_s"] = time.perf_counter() - t0
        base_s = self.measure(base)
        for ft_seed in p.finetune_seeds:
            t0 = time.perf_counter()
            ft = self.finetune(base, ft_seed)
            self.timings[f"finetune{ft_seed}_s"] = time.perf_counter() - t0
            ft_s = self.measure(ft)
            _, ft_l2 = weight_distance(base, ft)
            self.add_row(ft_seed, "base", 1.0, "", base_s, base_s, ft_s, (0.0, 0.0), ft_l2)
            self.add_row(ft_seed, "finetuned", 0.0, "", ft_s, base_s, ft_s, (1.0, ft_l2), ft_l2)
            t0 = time.perf_counter()
            for method in METHODS:
                for sparsity in p.sparsities:
                    for rseed in p.random_seeds if method == "random" else (0,):
                        name = f"{method}-s{sparsity}" + (
                            f"-r{rseed}" if method == "random" else ""
                        )
                        out = ft.parent / name
                        run_prune(base, ft, out, method, sparsity, rseed, p.threads)
                        s = self.measure(out)
                        self.add_row(
                            ft_seed,
                            method,
                            sparsity,
                            rseed if method == "random" else "",
                            s,
                            base_s,
                            ft_s,
                            weight_distance(base, out),
                            ft_l2,
                        )
                        r = self.rows[-1]
                        print(
                            f"  ft{ft_seed} {name:<22} forgetting {r['forgetting_acc_pct']:6.2f}% "
                            f"retention {r['retention_pct']:6.1f}%",
                            flush=True,
                        )
                        if not self.keep_checkpoints:
                            shutil.rmtree(out)
            self.timings[f"prune_eval{ft_seed}_s"] = time.perf_counter() - t0


# --------------------------------------------------------------------------- outputs


def aggregate(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Mean, min and max over seeds of each (method, sparsity)."""
    groups: dict[tuple[str, float], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["sparsity"])), []).append(r)
    order = {m: i for i, m in enumerate(("base", "finetuned", *METHODS))}
    out = []
    for (method, sparsity), rs in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
    ):
        agg: dict[str, Any] = {"method": method, "sparsity": sparsity, "runs": len(rs)}
        for key in (
            "forgetting_acc_pct",
            "forgetting_loss_pct",
            "retention_pct",
            "general_loss",
            "general_acc",
            "task_acc",
        ):
            vals = [float(r[key]) for r in rs]
            agg[key] = sum(vals) / len(vals)
            agg[key + "_min"], agg[key + "_max"] = min(vals), max(vals)
        out.append(agg)
    return out


def summary_table(agg: list[dict[str, Any]]) -> str:
    def rng(a: dict[str, Any], key: str, digits: int) -> str:
        lo, hi = a[key + "_min"], a[key + "_max"]
        mean = f"{a[key]:.{digits}f}"
        return mean if a["runs"] == 1 else f"{mean} ({lo:.{digits}f} to {hi:.{digits}f})"

    lines = [
        "| method | sparsity | runs | forgetting, acc (%) | forgetting, loss (%) | "
        "retention (%) | task acc | general loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in agg:
        s = "" if a["method"] in ("base", "finetuned") else f"{a['sparsity']:g}"
        lines.append(
            f"| {a['method']} | {s} | {a['runs']} | {rng(a, 'forgetting_acc_pct', 2)} | "
            f"{rng(a, 'forgetting_loss_pct', 2)} | {rng(a, 'retention_pct', 1)} | "
            f"{a['task_acc']:.3f} | {a['general_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(agg: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    colors = {"fapm": "C3", "magnitude": "C0", "ratio": "C2", "random": "C7"}
    by = {m: [a for a in agg if a["method"] == m] for m in METHODS}
    ref = {a["method"]: a for a in agg if a["method"] in ("base", "finetuned")}
    meta = {"Software": None}  # no version stamp: reruns give identical files

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for m, pts in by.items():
        x = [a["forgetting_acc_pct"] for a in pts]
        y = [a["retention_pct"] for a in pts]
        ax.plot(x, y, "o-", color=colors[m], label=m)
        for a in pts:
            ax.annotate(
                f"{a['sparsity']:g}",
                (a["forgetting_acc_pct"], a["retention_pct"]),
                fontsize=7,
                color=colors[m],
                xytext=(3, 3),
                textcoords="offset points",
            )
    for name, marker in (("finetuned", "*"), ("base", "s")):
        a = ref[name]
        ax.plot(
            a["forgetting_acc_pct"],
            a["retention_pct"],
            marker,
            color="k",
            ms=10,
            label=name,
            linestyle="none",
        )
    ax.set_xlabel("forgetting: drop of general next-byte accuracy vs base (%)")
    ax.set_ylabel("retention: task exact-match vs fine-tuned (%)")
    ax.set_title("Trade-off per method (labels: sparsity; mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [out / "tradeoff.png"]
    fig.savefig(paths[0], dpi=120, metadata=meta)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sp = sorted({a["sparsity"] for pts in by.values() for a in pts})
    pos = {s: i for i, s in enumerate(sp)}
    for ax, key, label in (
        (axes[0], "forgetting_acc_pct", "forgetting (%): lower is better"),
        (axes[1], "retention_pct", "retention (%): higher is better"),
    ):
        for m, pts in by.items():
            x = [pos[a["sparsity"]] for a in pts]
            ax.plot(x, [a[key] for a in pts], "o-", color=colors[m], label=m)
            ax.fill_between(
                x,
                [a[key + "_min"] for a in pts],
                [a[key + "_max"] for a in pts],
                color=colors[m],
                alpha=0.15,
            )
        ax.axhline(ref["finetuned"][key], color="k", ls="--", lw=1, label="finetuned")
        ax.axhline(ref["base"][key], color="k", ls=":", lw=1, label="base")
        ax.set_xticks(range(len(sp)), [f"{s:g}" for s in sp])
        ax.set_xlabel("sparsity (fraction of the task vector removed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Forgetting and retention against sparsity (band: min to max over seeds)")
    fig.tight_layout()
    paths.append(out / "vs_sparsity.png")
    fig.savefig(paths[1], dpi=120, metadata=meta)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", type=Path, default=Path("experiments/out"))
    ap.add_argument("--publish", type=Path, help="also copy results, log and plots here")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep every pruned output")
    ap.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    hf_logging.disable_progress_bar()  # one line per run is enough in the log
    torch.set_num_threads(p.threads)  # fixed: float reductions can differ with thread count
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    started = time.perf_counter()
    runner = Runner(p, args.out, args.keep_checkpoints)
    runner.run()
    write_csv(args.out / "results.csv", runner.rows)
    write_csv(args.out / "training.csv", runner.log)
    agg = aggregate(read_csv(args.out / "results.csv"))
    table = summary_table(agg)
    (args.out / "summary.md").write_text(table)
    files = [args.out / "results.csv", args.out / "training.csv", args.out / "summary.md"]
    if not args.no_plots:
        files += plot(agg, args.out)
    meta = {
        "preset": args.preset, "sizes": asdict(p), "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config_sha256": hashlib.sha256(json.dumps(asdict(p)).encode()).hexdigest()[:16],
        "seconds": {k: round(v, 1) for k, v in runner.timings.items()}
        | {"total_s": round(time.perf_counter() - started, 1)},
    }  # fmt: skip
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    files.append(args.out / "meta.json")
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, args.publish / f.name)
    print("\n" + table)
    print(f"done in {meta['seconds']['total_s']} s; results in {args.out}")


if __name__ == "__main__":
    main()
