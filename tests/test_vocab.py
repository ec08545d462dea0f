"""Resized vocabularies and tied embeddings (../shared/METHOD.md, "Checkpoints as people have
them"): a fine-tune that added tokens has more rows in its embeddings and head; base's rows
are pruned as one tensor, the added rows taken from finetuned whole, and finetuned's config
describes the output. A side that ties its head to its embedding saves no ``lm_head.weight``:
base's head is then its embedding."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import load_checkpoint, write_checkpoint
from tests.reference import reference_mask

runner = CliRunner()
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def model(vocab: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = {
        EMBED: torch.randn(vocab, 8, generator=gen) * 0.02,
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=gen) * 0.02,
        "model.norm.weight": torch.ones(8) + torch.randn(8, generator=gen) * 0.01,
        HEAD: torch.randn(vocab, 8, generator=gen) * 0.02,
    }
    return {k: v.to(dtype) for k, v in t.items()}


def finetune(base: dict[str, torch.Tensor], added: int, seed: int) -> dict[str, torch.Tensor]:
    """Every shared entry moved a little; ``added`` new rows in embeddings and head."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, b in base.items():
        f = (b.float() + torch.randn(b.shape, generator=gen) * 1e-3).to(b.dtype)
        if k in (EMBED, HEAD) and added:
            f = torch.cat([f, (torch.randn(added, 8, generator=gen) * 0.02).to(b.dtype)])
        out[k] = f
    return out


def expected(b: torch.Tensor, f: torch.Tensor, s: Fraction) -> torch.Tensor:
    """Base's rows pruned as one tensor (m over base's whole tensor), added rows finetuned's."""
    rows = b.shape[0]
    kept = torch.where(reference_mask(b, f[:rows], s, "fapm"), f[:rows], b)
    return torch.cat([kept, f[rows:]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_added_tokens_prune_the_shared_rows_and_keep_the_new_ones(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    base = model(10, 1, dtype)
    ft = finetune(base, added=3, seed=2)
    b = write_checkpoint(tmp_path / "b", base, config={"vocab_size": 10})
    f = write_checkpoint(tmp_path / "f", ft, config={"vocab_size": 13})
    out = tmp_path / "o"
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "-s", "0.75", "-o", str(out), "-q")
    assert code == 0, err
    got = load_checkpoint(out)
    for name in base:
        want = expected(base[name], ft[name], Fraction(3, 4))
        assert got[name].shape == want.shape, name
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got[name].view(bits), want.view(bits)), name
    assert json.loads((out / "config.json").read_text()) == {"vocab_size": 13}


def test_added_tokens_through_diff_prune_score_and_merge(tmp_path: Path) -> None:
    base = model(10, 3)
    ft = finetune(base, added=2, seed=4)
    b, f = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft)
    direct, tv, via = tmp_path / "direct", tmp_path / "tv", tmp_path / "via"
    assert run("prune", "-b", str(b), "-f", str(f), "-o", str(direct), "-q")[0] == 0
    assert run("diff", "-b", str(b), "-f", str(f), "-o", str(tv), "-q")[0] == 0
    assert run("prune", "-b", str(b), "-t", str(tv), "-o", str(via), "-q")[0] == 0
    one, two = load_checkpoint(direct), load_checkpoint(via)
    assert all(torch.equal(one[n], two[n]) for n in one)
    merged = tmp_path / "merged"
    assert run("merge", "-b", str(b), "-f", str(f), "-o", str(merged), "-q")[0] == 0
    three = load_checkpoint(merged)
    assert all(torch.equal(one[n], three[n]) for n in one)
    code, out, _ = run("score", "-b", str(b), "-f", str(f), "--format", "json")
    assert code == 0
    rows = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert rows[EMBED]["numel"] == 10 * 8  # the shared rows are what is scored
    code, _, err = run(
        "merge", "-b", str(b), "-f", str(f), "-f", str(f), "-o", str(tmp_path / "m2")
    )
    assert code == 4 and "adds tokens" in err


def test_fewer_rows_in_finetuned_are_refused(tmp_path: Path) -> None:
    base = model(10, 5)
    ft = {k: (v[:8] if k in (EMBED, HEAD) else v) for k, v in finetune(base, 0, 6).items()}
    b, f = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft)
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"))
    assert code == 4 and "fewer rows (tokens) than base" in err
    assert not (tmp_path / "o").exists()


def test_more_rows_elsewhere_stay_a_shape_mismatch(tmp_path: Path) -> None:
    base = model(10, 7)
    ft = finetune(base, 0, 8)
    name = "model.layers.0.mlp.up_proj.weight"
    ft[name] = torch.cat([ft[name], torch.zeros(2, 8)])
    b, f = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft)
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"))
    assert code == 4 and f"tensor {name!r}: shape" in err


def test_a_tied_base_lends_its_embedding_as_the_head(tmp_path: Path) -> None:
    base = model(10, 9)
    ft = finetune(base, 0, 10)
    ft[HEAD] = base[EMBED] + torch.randn(10, 8, generator=torch.Generator().manual_seed(1)) * 1e-3
    tied = {k: v for k, v in base.items() if k != HEAD}  # base ties lm_head to embed_tokens
    b, f = write_checkpoint(tmp_path / "b", tied), write_checkpoint(tmp_path / "f", ft)
    out = tmp_path / "o"
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "-s", "0.5", "-o", str(out), "-q")
    assert code == 0, err
    got = load_checkpoint(out)
    want = torch.where(reference_mask(base[EMBED], ft[HEAD], Fraction(1, 2), "fapm"), ft[HEAD],
                       base[EMBED])  # fmt: skip
    assert torch.equal(got[HEAD], want)


def test_a_tied_fine_tune_has_no_head_to_prune(tmp_path: Path) -> None:
    base = model(10, 11)
    ft = {k: v for k, v in finetune(base, 0, 12).items() if k != HEAD}
    b, f = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft)
    out = tmp_path / "o"
    code, _, err = run("prune", "-b", str(b), "-f", str(f), "-o", str(out), "-q")
    assert code == 0, err
    assert HEAD not in load_checkpoint(out)  # the output ties, as finetuned does


def test_a_resized_llama_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    ft = transformers.LlamaForCausalLM(config)
    ft.load_state_dict(base.state_dict())
    ft.resize_token_embeddings(104)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    ft.save_pretrained(tmp_path / "ft", safe_serialization=True)
    out = tmp_path / "out"
    code, _, err = run("prune", "-b", str(tmp_path / "base"), "-f", str(tmp_path / "ft"),
                       "-s", "0.9", "-o", str(out), "-q")  # fmt: skip
    assert code == 0, err
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.get_input_embeddings().weight.shape == (104, 32)
    ids = torch.tensor([[1, 2, 103]])
    assert loaded(ids).logits.shape == (1, 3, 104)
    sft = ft.get_input_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight[100:], sft[100:])  # added rows
