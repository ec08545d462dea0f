"""LoRA adapters (PEFT) as the fine-tune: the model PEFT's ``merge_and_unload()`` gives on base.

A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) stands for
one fine-tune of base. Per LoRA target module, PEFT 0.21 merges (``tuners/lora/layer.py``,
default path: the adapter's weights are float32 after loading, float64 on a float64 base):

- a linear layer: ``W += transpose(B @ A, fan_in_fan_out) * scaling``, the add in float32
  (the float32 delta promotes W), rounded once to W's dtype;
- an embedding: ``W += ((B @ A).T * scaling).to(W.dtype)``, the delta rounded to W's dtype
  first, then added in that dtype;

with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and
``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` where a pattern matches the module.
Tensors the adapter stores whole (``modules_to_save``, an embedding's saved ``base_layer``)
replace base's, in base's dtype. Every other tensor is base's.

Everything is decided from headers and the config (``open_adapter``), so a refusal comes
before any tensor data is read; ``AdapterReader.model`` then rebuilds one finetuned tensor
at a time from base's, as the stream yields it (never a merged model in memory or on disk).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fapm_cli.errors import InputError, MismatchError
from fapm_cli.io.reader import Checkpoint, TensorReader, TensorRef
from fapm_cli.io.source import Source

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's saved names: the wrapped model's module names after it
LINEAR, EMBEDDING = "linear", "embedding"
_PARTS = {
    ".lora_A.weight": (LINEAR, "A"),
    ".lora_B.weight": (LINEAR, "B"),
    ".lora_embedding_A": (EMBEDDING, "A"),
    ".lora_embedding_B": (EMBEDDING, "B"),
}
_FLOATS = ("F16", "BF16", "F32", "F64")  # base dtypes PEFT merges into (CPU)
# Tokenizer files an adapter directory may carry (they win over base's of the same name).
_TOKENIZER_FILES = {
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
}
_HINT_MERGE = (
    "merge it with PEFT (model.merge_and_unload(), then save_pretrained) and pass the merged "
    "model as --finetuned"
)
_HINT_BASE = "was the adapter trained on this base model?"


def is_adapter(source: Source) -> bool:
    """A PEFT adapter directory: it has an ``adapter_config.json``."""
    from fapm_cli.io.sources import LocalFile

    return not isinstance(source, LocalFile) and ADAPTER_CONFIG in source.list_files()


def refuse_as_task_vector(checkpoint: Checkpoint) -> None:
    """An adapter given where a task vector is expected: say what it is."""
    if is_adapter(checkpoint.source):
        raise InputError(
            f"{checkpoint.display}: is a LoRA adapter, not a task vector",
            hint="pass it as --finetuned",
        )


def looks_like_adapter_file(checkpoint: Checkpoint) -> bool:
    """Every tensor named as PEFT names adapter tensors (an adapter file given without its
    directory, hence without its config)."""
    return bool(checkpoint.tensors) and all(n.startswith(PREFIX) for n in checkpoint.tensors)


def is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in _TOKENIZER_FILES


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted base tensor: ``delta = (B @ A) * scaling`` in its layout."""

    name: str  # the base tensor (``<module>.weight``)
    kind: str  # LINEAR or EMBEDDING
    a: TensorRef
    b: TensorRef
    scaling: float
    transpose: bool  # the delta is (B @ A).T: fan_in_fan_out, and every embedding


@dataclass
class Adapter:
    """An adapter checked against base: which base tensors it changes, and how."""

    checkpoint: Checkpoint  # the adapter's own tensors
    base: Checkpoint
    config: dict[str, Any]
    targets: dict[str, LoraTarget]  # base tensor name -> its LoRA
    replaced: dict[str, TensorRef]  # base tensor name -> the adapter tensor replacing it whole

    @property
    def display(self) -> str:
        return self.checkpoint.display

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` of the config (where PEFT loads base from)."""
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    def refs(self, name: str) -> list[TensorRef]:
        """The adapter tensors base tensor ``name`` is rebuilt from."""
        t = self.targets.get(name)
        out = [t.a, t.b] if t is not None else []
        r = self.replaced.get(name)
        return ([r] if r is not None else []) + out

    def finetuned_view(self) -> Checkpoint:
        """The checkpoint the engine sees for finetuned: base's names, shapes and dtypes (the
        merged model's), each in the adapter shard it is rebuilt from. Data comes from
        ``AdapterReader.model``, never through this view."""
        c = self.checkpoint
        first = next(iter(c.shards), "")
        tensors = {}
        for name, ref in self.base.tensors.items():
            own = self.refs(name)
            tensors[name] = TensorRef(own[0].shard if own else first, ref.info)
        return Checkpoint(c.source, c.shards, tensors, None, {}, [])

    def tokenizer_files(self) -> list[str]:
        return [f for f in self.checkpoint.extra_files if is_tokenizer_file(f)]


def read_config(source: Source) -> dict[str, Any]:
    """The adapter's config, refused unless it is a plain LoRA fapm rebuilds exactly."""
    where = f"{source.display}/{ADAPTER_CONFIG}"
    try:
        config = json.loads(source.read_text(ADAPTER_CONFIG, limit=10_000_000))
    except (ValueError, RecursionError) as err:
        raise InputError(f"{where}: not valid JSON ({err})", hint="restore the file") from err
    if not isinstance(config, dict):
        raise InputError(f"{where}: not a JSON object", hint="restore the file")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise InputError(
            f"{where}: {kind!r} adapters are not supported (fapm reads LoRA adapters only)",
            hint=_HINT_MERGE,
        )
    variant = _variant(config)
    if variant is not None:
        raise InputError(
            f"{where}: this is a {variant} adapter, which fapm does not rebuild (plain LoRA only)",
            hint=_HINT_MERGE,
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive_int(r) or not _number(alpha):
        raise InputError(
            f"{where}: r must be a positive integer and lora_alpha a number (r={r!r}, "
            f"lora_alpha={alpha!r})",
            hint="restore the file",
        )
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(check(v) for v in pattern.values()):
            raise InputError(f"{where}: bad {key} {pattern!r}", hint="restore the file")
    return config


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _variant(config: dict[str, Any]) -> str | None:
    """The name of a LoRA variant whose merge is not plain ``B @ A * scaling``, if any."""
    flags = {
        "use_dora": "DoRA",
        "use_qalora": "QALoRA",
        "lora_bias": "LoRA with lora_bias",
        "alora_invocation_tokens": "aLoRA",
        "use_bdlora": "BD-LoRA",
        "arrow_config": "Arrow LoRA",
        "kasa_config": "KaSA",
        "monteclora_config": "MonteCLoRA",
        "velora_config": "VeLoRA",
        "layer_replication": "LoRA with layer_replication",
        "target_parameters": "LoRA with target_parameters",
        "trainable_token_indices": "LoRA with trainable_token_indices",
        "megatron_config": "Megatron LoRA",
    }
    for key, label in flags.items():
        if config.get(key):
            return label
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        return f"LoRA with bias={bias!r}"
    init = config.get("init_lora_weights")
    # These initializations change base's weights too: the adapter needs that changed base.
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        return f"LoRA with init_lora_weights={init!r}"
    return None


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` rule: the first key that matches the end of
    the module name (``(.*\\.)?(key)$``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(checkpoint: Checkpoint, base: Checkpoint) -> Adapter:
    """Read ``checkpoint`` (an adapter directory) as a fine-tune of ``base``, from its config
    and headers alone; refuse what does not fit base before any data is read."""
    config = read_config(checkpoint.source)
    where = checkpoint.display
    if list(checkpoint.shards) != [ADAPTER_WEIGHTS]:
        raise InputError(
            f"{where}: has {ADAPTER_CONFIG} but its weights are {sorted(checkpoint.shards)}, "
            f"not {ADAPTER_WEIGHTS} alone",
            hint="point --finetuned at a directory holding either a model or a PEFT adapter",
        )
    parts: dict[str, dict[str, TensorRef]] = {}
    kinds: dict[str, str] = {}
    replaced: dict[str, TensorRef] = {}
    for stored, ref in checkpoint.tensors.items():
        if not stored.startswith(PREFIX):
            raise InputError(
                f"{where}: tensor {stored!r} is not under {PREFIX!r}, as PEFT saves adapters",
                hint="is this a PEFT adapter directory?",
            )
        name = stored[len(PREFIX) :]
        for suffix, (kind, part) in _PARTS.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                if kinds.setdefault(module, kind) != kind:
                    raise InputError(
                        f"{where}: module {module!r} has both linear and embedding LoRA tensors",
                        hint="the adapter is damaged; save it again with PEFT",
                    )
                parts.setdefault(module, {})[part] = ref
                break
        else:
            if "lora_" in name:
                raise InputError(
                    f"{where}: tensor {stored!r} is not one of plain LoRA's (lora_A, lora_B, "
                    "lora_embedding_A, lora_embedding_B)",
                    hint=_HINT_MERGE,
                )
            # Stored whole: modules_to_save, or a saved embedding's base layer.
            target = name.replace(".base_layer.", ".")
            replaced[target] = ref
    targets = {}
    for module, ab in parts.items():
        targets[module + ".weight"] = _target(checkpoint, base, config, module, kinds[module], ab)
    for name, ref in replaced.items():
        b = base.tensors.get(name)
        if b is None:
            raise MismatchError(
                f"adapter {where}: tensor {name!r} is not in base {base.display}",
                hint=_HINT_BASE,
            )
        if b.info.shape != ref.info.shape or b.info.dtype.is_float != ref.info.dtype.is_float:
            raise MismatchError(
                f"adapter {where}: tensor {name!r} is {ref.info.dtype.name} "
                f"{list(ref.info.shape)} but {b.info.dtype.name} {list(b.info.shape)} in base",
                hint=_HINT_BASE,
            )
    return Adapter(checkpoint, base, config, targets, replaced)


def _target(
    adapter: Checkpoint,
    base: Checkpoint,
    config: dict[str, Any],
    module: str,
    kind: str,
    ab: dict[str, TensorRef],
) -> LoraTarget:
    where = adapter.display
    if set(ab) != {"A", "B"}:
        raise InputError(
            f"{where}: LoRA module {module!r} has only its {''.join(ab)} matrix",
            hint="the adapter is damaged; save it again with PEFT",
        )
    name = module + ".weight"
    w = base.tensors.get(name)
    if w is None:
        raise MismatchError(
            f"adapter {where}: LoRA target {module!r} has no tensor {name!r} in base "
            f"{base.display}",
            hint=_HINT_BASE,
        )
    a, b = ab["A"].info, ab["B"].info
    if len(a.shape) != 2 or len(b.shape) != 2 or not a.dtype.is_float or not b.dtype.is_float:
        raise InputError(
            f"{where}: LoRA module {module!r}: A {a.dtype.name} {list(a.shape)} and B "
            f"{b.dtype.name} {list(b.shape)} are not two float matrices (convolution LoRA is "
            "not supported)",
            hint=_HINT_MERGE,
        )
    r = _pattern(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if a.shape[0] != r or b.shape[1] != r:
        raise InputError(
            f"{where}: LoRA module {module!r} has rank {a.shape[0]}x{b.shape[1]} but the "
            f"config says r={r}",
            hint="the adapter's weights and config do not belong together",
        )
    if w.info.dtype.name not in _FLOATS:
        raise MismatchError(
            f"adapter {where}: LoRA target {name!r} is {w.info.dtype.name} in base, not a "
            "float16, bfloat16, float32 or float64 tensor",
            hint=_HINT_BASE,
        )
    product = (b.shape[0], a.shape[1])  # B @ A
    if kind == EMBEDDING:
        transpose = True  # A is (r, num_embeddings), B is (embedding_dim, r)
        fits = w.info.shape == product[::-1]
    else:
        flag = bool(config.get("fan_in_fan_out"))
        plain, flipped = w.info.shape == product, w.info.shape == product[::-1]
        # PEFT sets fan_in_fan_out by the layer's class (Conv1D stores W as (in, out)); the
        # shape tells the same unless W is square, where the config's flag is PEFT's.
        transpose = flipped and (flag or not plain)
        fits = plain or flipped
    if not fits:
        raise MismatchError(
            f"adapter {where}: LoRA module {module!r} gives a {list(product)} update "
            f"(B {list(b.shape)} @ A {list(a.shape)}) for base's {list(w.info.shape)} {name!r}",
            hint=_HINT_BASE,
        )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraTarget(name, kind, ab["A"], ab["B"], scaling, transpose)


class AdapterReader:
    """Rebuilds the merged model's tensors from base's, one at a time."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.reader = TensorReader(adapter.checkpoint)

    def model(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        """The tensor ``name`` of the merged model, from base's ``base`` (not modified)."""
        import torch

        assert base is not None
        w = base
        replaced = self.adapter.replaced.get(name)
        if replaced is not None:
            w = self.reader.read(replaced.info.name).to(base.dtype)
        t = self.adapter.targets.get(name)
        if t is None:
            return w
        cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
        a = self.reader.read(t.a.info.name).to(cdt)
        b = self.reader.read(t.b.info.name).to(cdt)
        delta = b @ a
        if t.transpose:
            delta = delta.T
        delta.mul_(t.scaling)
        if t.kind == EMBEDDING:
            return w + delta.to(w.dtype)
        if w.dtype == cdt:
            return w + delta
        # W promoted to float32, the sum rounded once (PEFT's in-place ``W += delta``); the
        # float32 temporaries are the delta and the sum, never base's bytes overwritten.
        total = w.to(cdt)
        total += delta
        del delta
        return total.to(w.dtype)

    def shards(self, name: str) -> list[str]:
        """The adapter shards tensor ``name`` reads."""
        return list(dict.fromkeys(r.shard for r in self.adapter.refs(name)))

    def close(self) -> None:
        self.reader.close()
