"""A tiny Llama from a transformers config: the pruned output loads and computes the same
logits as a model whose state dict was pruned in memory by the reference."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from fapm_cli.plan import PruneOptions
from fapm_cli.verbs import prune as verbs_prune
from tests.reference import reference_prune

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_llama_loads_and_matches_in_memory_pruning(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config).to(dtype)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ft = transformers.LlamaForCausalLM(config).to(dtype)
    sd_base = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        for p, b in zip(ft.parameters(), sd_base.values(), strict=True):
            p.copy_(b + torch.randn_like(b) * 0.01)
    ft.save_pretrained(tmp_path / "ft", max_shard_size="50KB")
    sd_ft = {k: v.clone() for k, v in ft.state_dict().items()}

    verbs_prune.prune(
        str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "out"),
        PruneOptions(sparsity=Fraction(9, 10)), max_shard_size=30_000,
    )  # fmt: skip
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)

    # Built the way `loaded` was (from_pretrained keeps rotary buffers in float32, .to() would not).
    expected = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    expected.load_state_dict(reference_prune(sd_base, sd_ft, Fraction(9, 10)))
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
        assert torch.equal(got, want)
        # ... and the pruning did something: neither base nor finetuned.
        ft_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ft", dtype=dtype)
        assert not torch.equal(got, ft_model(ids).logits)
    assert (tmp_path / "out" / "config.json").exists()
