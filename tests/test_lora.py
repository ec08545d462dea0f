"""A LoRA adapter as --finetuned (METHOD.md, "A LoRA adapter as the fine-tune"), with real
PEFT as the oracle: every command given the adapter directory gives the bytes it gives on the
checkpoint PEFT's ``merge_and_unload()`` writes for that adapter on that base.

Tiny seeded transformers models: a Llama (linear and embedding LoRA, rsLoRA, rank and alpha
patterns, ``modules_to_save``) in float32 and bfloat16, and a GPT-2 whose Conv1D layers need
``fan_in_fan_out``. LoRA's B is zero at PEFT's init, so every LoRA weight is set to seeded noise.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import assert_same_bits, load_checkpoint
from tests.hub_server import FakeHub
from tests.test_hub import hf, hub  # noqa: F401  (fixtures: the Hub emulator)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

runner = CliRunner()


def fapm(*args: str, code: int = 0) -> str:
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == code, r.output
    return r.output


def llama(dtype: torch.dtype) -> Any:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype)


def gpt2(dtype: torch.dtype) -> Any:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)
    return transformers.GPT2LMHeadModel(config).to(dtype)


# name -> (model, dtype, LoraConfig arguments)
SCENARIOS: dict[str, tuple[Callable[[torch.dtype], Any], torch.dtype, dict[str, Any]]] = {
    "linear-bf16": (
        llama, torch.bfloat16,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj"],
         "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}},
    ),
    "rslora-embed-save-fp32": (
        llama, torch.float32,
        {"r": 4, "lora_alpha": 7, "use_rslora": True,
         "target_modules": ["q_proj", "down_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    ),
    "rslora-embed-save-bf16": (
        llama, torch.bfloat16,
        {"r": 4, "lora_alpha": 7, "use_rslora": True,
         "target_modules": ["k_proj", "up_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    ),
    "embed-fp16": (
        llama, torch.float16,
        {"r": 2, "lora_alpha": 5, "target_modules": ["v_proj", "embed_tokens"]},
    ),
    "linear-fp64": (llama, torch.float64, {"r": 3, "lora_alpha": 4, "target_modules": ["q_proj"]}),
    "gpt2-fan-in-fan-out": (
        gpt2, torch.float32,
        {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"],
         "fan_in_fan_out": True},
    ),
}  # fmt: skip


def build(root: Path, scenario: str) -> tuple[Path, Path, Path]:
    """(base, adapter, merged): the base checkpoint, a PEFT adapter for it, and what PEFT's
    merge_and_unload() writes for that adapter loaded onto that base."""
    make, dtype, lora = SCENARIOS[scenario]
    base, adapter, merged = root / "base", root / "adapter", root / "merged"
    torch.manual_seed(0)
    model = make(dtype)
    model.save_pretrained(base, safe_serialization=True)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
    wrapped.save_pretrained(adapter)
    # The oracle, as a user makes it: base loaded in its dtype, the adapter loaded onto it.
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft.PeftModel.from_pretrained(fresh, adapter).merge_and_unload().save_pretrained(merged)
    return base, adapter, merged


_BUILT: dict[str, tuple[Path, Path, Path]] = {}
Made = Callable[[str], tuple[Path, Path, Path]]


@pytest.fixture
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """Each scenario is built once per session (building is what takes the time)."""

    def get(scenario: str) -> tuple[Path, Path, Path]:
        if scenario not in _BUILT:
            _BUILT[scenario] = build(tmp_path_factory.mktemp(scenario), scenario)
        return _BUILT[scenario]

    return get


def shards(out: Path) -> dict[str, tuple[dict[str, Any], bytes]]:
    """Every shard's header without its ``__metadata__`` (provenance), and its data bytes."""
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        found[f.name] = (header, raw[8 + n :])
    return found


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_prune_adapter_is_prune_of_merged(made: Made, tmp_path: Path, scenario: str) -> None:
    base, adapter, merged = made(scenario)
    # --sparsity 0: the fine-tune the adapter stands for is PEFT's merged model, bit for bit.
    fapm("prune", "-b", str(base), "-f", str(adapter), "-s", "0", "-o", str(tmp_path / "s0"))
    want = load_checkpoint(merged)
    assert_same_bits(load_checkpoint(tmp_path / "s0"), want)
    changed = [n for n, t in load_checkpoint(base).items() if not torch.equal(t, want[n])]
    assert changed  # the adapter did change tensors (so the comparison above means something)
    # Pruned: every byte of every shard but the provenance metadata.
    fapm("prune", "-b", str(base), "-f", str(adapter), "-s", "0.5", "-o", str(tmp_path / "a"))
    fapm("prune", "-b", str(base), "-f", str(merged), "-s", "0.5", "-o", str(tmp_path / "m"))
    got, exp = shards(tmp_path / "a"), shards(tmp_path / "m")
    assert got == exp
    assert got != shards(tmp_path / "s0")  # and pruning did prune
    meta = load_meta(tmp_path / "a")
    assert meta["fapm.finetuned"] == adapter.name  # outputs record names, never local paths
    assert meta["fapm.finetuned_adapter"] == "lora"
    assert "fapm.finetuned_adapter" not in load_meta(tmp_path / "m")
    # An adapter has no model config: base's is copied.
    assert (tmp_path / "a" / "config.json").read_text() == (base / "config.json").read_text()
    assert not (tmp_path / "a" / "adapter_config.json").exists()


def load_meta(out: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        return dict(f.metadata())


def test_pruned_output_loads_in_transformers(made: Made, tmp_path: Path) -> None:
    base, adapter, merged = made("rslora-embed-save-bf16")
    fapm("prune", "-b", str(base), "-f", str(adapter), "-s", "0", "-o", str(tmp_path / "out"))
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    want = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


def test_task_vector_forms(made: Made, tmp_path: Path) -> None:
    """diff of the adapter, then prune of that task vector; and prune --save task-vector."""
    base, adapter, merged = made("linear-bf16")
    fapm("diff", "-b", str(base), "-f", str(adapter), "-o", str(tmp_path / "tv"))
    fapm("diff", "-b", str(base), "-f", str(merged), "-o", str(tmp_path / "tv-m"))
    assert shards(tmp_path / "tv") == shards(tmp_path / "tv-m")
    fapm(
        "prune", "-b", str(base), "-t", str(tmp_path / "tv"), "-s", "0.7", "-o", str(tmp_path / "p")
    )
    fapm("prune", "-b", str(base), "-f", str(merged), "-s", "0.7", "-o", str(tmp_path / "pm"))
    assert shards(tmp_path / "p") == shards(tmp_path / "pm")
    for fmt in ("dense", "compact"):
        outs = []
        for ft in (adapter, merged):
            out = tmp_path / f"tv-{fmt}-{ft.name}"
            fapm("prune", "-b", str(base), "-f", str(ft), "-s", "0.7", "--save", "task-vector",
                 "--format", fmt, "-o", str(out))  # fmt: skip
            outs.append(shards(out))
        assert outs[0] == outs[1], fmt


def test_score_adapter_is_score_of_merged(made: Made, tmp_path: Path) -> None:
    base, adapter, merged = made("rslora-embed-save-fp32")
    reports = []
    for ft in (adapter, merged):
        r = runner.invoke(app, ["score", "-b", str(base), "-f", str(ft), "--json"])
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report.pop("finetuned") == ft.name
        report.pop("seconds")
        reports.append(report)
    assert reports[0] == reports[1]
    assert reports[0]["total"]["mean_abs_tau"] > 0  # the adapter changed something
    assert "model.embed_tokens.weight" in {t["name"] for t in reports[0]["tensors"]}


def test_merge_adapter_weight_one_is_prune_of_merged(made: Made, tmp_path: Path) -> None:
    base, adapter, merged = made("gpt2-fan-in-fan-out")
    fapm("merge", "-b", str(base), "-f", str(adapter), "-s", "0.6", "-o", str(tmp_path / "mg"))
    fapm("prune", "-b", str(base), "-f", str(merged), "-s", "0.6", "-o", str(tmp_path / "pm"))
    assert_same_bits(load_checkpoint(tmp_path / "mg"), load_checkpoint(tmp_path / "pm"))
    # Two inputs: the sum path slices the rebuilt tensor; same as with the merged checkpoint.
    for ft, out in ((adapter, "two-a"), (merged, "two-m")):
        fapm("merge", "-b", str(base), "-f", str(ft), "-f", str(ft), "-w", "0.5", "-s", "0.6",
             "-o", str(tmp_path / out))  # fmt: skip
    assert_same_bits(load_checkpoint(tmp_path / "two-a"), load_checkpoint(tmp_path / "two-m"))


def copy_adapter(src: Path, dst: Path, **config: object) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    (dst / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes()
    )
    return dst


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "'IA3'"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "pissa"),
    ],
)
def test_other_adapter_kinds_are_refused(
    made: Made,
    tmp_path: Path,
    config: dict[str, Any],
    named: str,
) -> None:
    base, adapter, _ = made("linear-bf16")
    bad = copy_adapter(adapter, tmp_path / "bad", **config)
    for verb in (["prune", "-o", str(tmp_path / "o")], ["score"]):
        out = fapm(*verb, "-b", str(base), "-f", str(bad), code=3)
        assert named in out
    assert not (tmp_path / "o").exists()


def test_adapter_not_for_this_base_is_refused(made: Made, tmp_path: Path) -> None:
    base, adapter, _ = made("linear-bf16")
    tensors = load_file(adapter / "adapter_model.safetensors")
    # A target module base does not have.
    moved = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    bad = copy_adapter(adapter, tmp_path / "elsewhere")
    save_file(moved, bad / "adapter_model.safetensors")
    out = fapm("prune", "-b", str(base), "-f", str(bad), "-o", str(tmp_path / "o"), code=4)
    assert "layers.7." in out
    # A target of another shape (an adapter for a wider model).
    wide = {k: (torch.zeros(v.shape[0], 48) if k.endswith("q_proj.lora_A.weight") else v)
            for k, v in tensors.items()}  # fmt: skip
    bad = copy_adapter(adapter, tmp_path / "wide")
    save_file(wide, bad / "adapter_model.safetensors")
    out = fapm("diff", "-b", str(base), "-f", str(bad), "-o", str(tmp_path / "o"), code=4)
    assert "q_proj" in out
    assert not (tmp_path / "o").exists()


def test_base_named_by_the_adapter(made: Made, tmp_path: Path) -> None:
    base, adapter, merged = made("linear-bf16")
    named = copy_adapter(adapter, tmp_path / "named", base_model_name_or_path=str(base))
    fapm("prune", "-f", str(named), "-s", "0.5", "-o", str(tmp_path / "a"))
    fapm("prune", "-b", str(base), "-f", str(merged), "-s", "0.5", "-o", str(tmp_path / "m"))
    assert shards(tmp_path / "a") == shards(tmp_path / "m")
    assert load_meta(tmp_path / "a")["fapm.base"] == base.name
    fapm("merge", "-f", str(named), "-s", "0.5", "-o", str(tmp_path / "mg"))
    assert_same_bits(load_checkpoint(tmp_path / "mg"), load_checkpoint(tmp_path / "m"))
    r = runner.invoke(app, ["score", "-f", str(named), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["base"] == base.name
    # Neither --base nor a base in the adapter's config (nor an adapter at all): a usage error.
    out = fapm("prune", "-f", str(adapter), "-o", str(tmp_path / "o"), code=2)
    assert "base_model_name_or_path" in out
    out = fapm("diff", "-f", str(merged), "-o", str(tmp_path / "o"), code=2)
    assert "--base is needed" in out
    assert not (tmp_path / "o").exists()


def test_saved_embedding_base_layer_replaces_base(made: Made, tmp_path: Path) -> None:
    """PEFT saves a LoRA-adapted embedding's base layer beside the LoRA (resized or retrained
    vocabularies) and loads it onto base: the adapter's copy is the weight the update goes on."""
    base, adapter, plain = made("rslora-embed-save-fp32")
    changed = copy_adapter(adapter, tmp_path / "changed")
    tensors = load_file(changed / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, changed / "adapter_model.safetensors", metadata={"format": "pt"})
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = tmp_path / "merged"
    peft.PeftModel.from_pretrained(fresh, changed).merge_and_unload().save_pretrained(merged)
    fapm("prune", "-b", str(base), "-f", str(changed), "-s", "0", "-o", str(tmp_path / "out"))
    want = load_checkpoint(merged)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(want[emb], load_checkpoint(plain)[emb])  # PEFT did use the copy
    assert_same_bits(load_checkpoint(tmp_path / "out"), want)


def test_adapter_in_the_wrong_place(made: Made, tmp_path: Path) -> None:
    base, adapter, _ = made("linear-bf16")
    out = fapm("prune", "-b", str(base), "-t", str(adapter), "-o", str(tmp_path / "o"), code=3)
    assert "is a LoRA adapter, not a task vector" in out
    out = fapm("merge", "-b", str(base), "-t", str(adapter), "-o", str(tmp_path / "o"), code=3)
    assert "is a LoRA adapter, not a task vector" in out
    both = copy_adapter(adapter, tmp_path / "both")
    (both / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    out = fapm("score", "-b", str(base), "-f", str(both), code=3)
    assert "not adapter_model.safetensors alone" in out
    alone = str(adapter / "adapter_model.safetensors")  # without its config
    out = fapm("prune", "-b", str(base), "-f", alone, "-o", str(tmp_path / "o"), code=3)
    assert "no adapter_config.json" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("hf")
def test_adapter_and_its_base_on_the_hub(
    made: Made, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An adapter repo naming a base repo: ``fapm prune -f org/lora`` fetches both (under a
    disk budget too) and gives what the local merged model gives."""
    base, adapter, merged = made("linear-bf16")
    fake: FakeHub = request.getfixturevalue("hub")
    fake.add_commit("org/base", base)
    fake.add_commit(
        "org/lora", copy_adapter(adapter, tmp_path / "named", base_model_name_or_path="org/base")
    )
    fapm("prune", "-f", "org/lora", "-s", "0.5", "-o", str(tmp_path / "a"), "--disk-budget", "1MB")
    fapm("prune", "-b", str(base), "-f", str(merged), "-s", "0.5", "-o", str(tmp_path / "m"))
    assert shards(tmp_path / "a") == shards(tmp_path / "m")
    meta = load_meta(tmp_path / "a")
    assert "org/lora" in meta["fapm.finetuned"] and "org/base" in meta["fapm.base"]
    assert (tmp_path / "a" / "config.json").exists()


def test_parts_of_an_adapter_run_join_to_a_single_run(made: Made, tmp_path: Path) -> None:
    base, adapter, merged = made("rslora-embed-save-bf16")
    args = ["prune", "-b", str(base), "-f", str(adapter), "-s", "0.5", "--max-shard-size", "20KB"]
    fapm(*args, "-o", str(tmp_path / "single"))
    joined = str(tmp_path / "joined")
    for part in ("--part=1/2", "--part=2/2", "--finalize"):
        fapm(*args, "-o", joined, part)
    got, want = shards(tmp_path / "joined"), shards(tmp_path / "single")
    assert len(want) > 2 and got == want
    fapm("prune", "-b", str(base), "-f", str(merged), "-s", "0.5", "-o", str(tmp_path / "m"))
    assert_same_bits(load_checkpoint(tmp_path / "joined"), load_checkpoint(tmp_path / "m"))


def test_files_copied_for_an_adapter(made: Made, tmp_path: Path) -> None:
    """Base's config and files, with the adapter's tokenizer files (never its own config or
    README) in their place; --files-from base takes base's alone."""
    base, adapter, _ = made("linear-bf16")
    own = copy_adapter(adapter, tmp_path / "own")
    (own / "tokenizer_config.json").write_text('{"from": "adapter"}')
    (own / "README.md").write_text("adapter card")
    (own / "trainer_state.json").write_text("{}")
    fapm("prune", "-b", str(base), "-f", str(own), "-o", str(tmp_path / "a"))
    base_files = files(base) | {"README.md"}  # fapm's own card, not the adapter's
    assert files(tmp_path / "a") == base_files | {"tokenizer_config.json"}
    assert (tmp_path / "a" / "tokenizer_config.json").read_text() == '{"from": "adapter"}'
    assert "adapter card" not in (tmp_path / "a" / "README.md").read_text()
    fapm(
        "prune", "-b", str(base), "-f", str(own), "-o", str(tmp_path / "b"), "--files-from", "base"
    )
    assert files(tmp_path / "b") == base_files


def files(tree: Path) -> set[str]:
    """Non-weight file names (neither shards nor the index fapm writes)."""
    return {p.name for p in tree.iterdir() if not p.name.startswith("model.safetensors")}
