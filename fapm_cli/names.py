"""Tensor names -> layer and module type (Llama, Mistral, Qwen, GPT-2, NeoX spellings).

Torch-free rules shared by the pairing (which tensors may grow rows with a resized vocabulary)
and ``score``'s roll-ups per layer and module type.
"""

from __future__ import annotations

import re

MODULES = ("embeddings", "q", "k", "v", "qkv", "o", "mlp", "norms", "lm_head", "other")


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


# Checked in this order: a norm inside an attention block is a norm, "o_proj" is not "q".
_MODULE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norms", re.compile(r"norm|(?:^|\.)ln_?\w*\.")),
    ("embeddings", re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.")),
    ("lm_head", re.compile(r"lm_head|(?:^|\.)output\.weight$")),
    ("qkv", re.compile(r"qkv|query_key_value|c_attn|(?:^|\.)w_pack\.")),
    ("q", re.compile(r"(?:^|\.)(?:q_proj|q|query|wq)\.")),
    ("k", re.compile(r"(?:^|\.)(?:k_proj|k|key|wk)\.")),
    ("v", re.compile(r"(?:^|\.)(?:v_proj|v|value|wv)\.")),
    (
        "o",
        re.compile(
            r"^(?!.*(?:mlp|feed_forward|ffn))"  # GPT-2's mlp.c_proj is an MLP weight
            r".*(?:(?:^|\.)(?:o_proj|out_proj|o|wo|c_proj)\.|(?:attn|attention)\.dense\.)"
        ),
    ),
    ("mlp", re.compile(r"mlp|feed_forward|ffn|experts|gate_proj|up_proj|down_proj|fc\d|w[123]\.")),
)


def layer_of(name: str) -> int | None:
    """The block index in ``...layers.N...`` (also ``h.N``, ``blocks.N``, ``layer.N``)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """One of ``MODULES``, from the tensor name (Llama, Mistral, Qwen, GPT-2, NeoX spellings)."""
    low = name.lower()
    for module, pattern in _MODULE_RULES:
        if pattern.search(low):
            return module
    return "other"


def is_vocabulary(name: str) -> bool:
    """An embedding or output head: one row per token, so a fine-tune that added tokens has
    more rows there (``resize_token_embeddings``)."""
    low = name.lower()
    return module_of(name) in ("embeddings", "lm_head") and not ("wpe" in low or "position" in low)
