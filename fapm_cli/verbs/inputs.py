"""The checkpoints a run reads: opened from what the user typed, sharing one disk budget for
Hub downloads, and what a verb asks of them (local paths, files to copy, fetch costs).

``open_finetuned`` opens the fine-tune side whatever stands for it: a checkpoint, a task
vector, or a LoRA adapter (``io.adapter``), as the view ``plan.plan_prune`` pairs with base
and, where tensors are rebuilt from base, the rebuilder ``verbs.prune.Pair`` streams with."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fapm_cli.errors import InputError, UsageError
from fapm_cli.io.adapter import (
    Adapter,
    is_adapter,
    looks_like_adapter_file,
    refuse_as_task_vector,
)
from fapm_cli.io.header import DType
from fapm_cli.io.quantized import BlockFP8, DequantReader, refuse_quantized
from fapm_cli.io.reader import Checkpoint, TensorReader, open_checkpoint
from fapm_cli.io.sources import resolve_source

if TYPE_CHECKING:
    import torch

    from fapm_cli.io.hub import DiskBudget
    from fapm_cli.io.taskvector_io import TaskVector


class Inputs:
    """Opens sources for one run; ``close`` removes downloaded shards still held."""

    def __init__(self, disk_budget: int | None = None, show_progress: bool = False) -> None:
        self.budget: DiskBudget | None = None
        if disk_budget is not None:
            from fapm_cli.io.hub import DiskBudget

            self.budget = DiskBudget(disk_budget)
        self.show_progress = show_progress
        self.opened: dict[str, Checkpoint] = {}  # side label -> checkpoint
        # side label -> its block-FP8 decoding (``io.quantized``), dequantized on read
        self.quantized: dict[str, BlockFP8] = {}
        self._base_view: Checkpoint | None = None
        self._base_targeted = False

    def open(self, side: str, text: str) -> Checkpoint:
        """The checkpoint as stored; a quantized one other than block FP8 is refused here."""
        source = resolve_source(text, budget=self.budget, show_progress=self.show_progress)
        checkpoint = open_checkpoint(source)
        self.opened[side] = checkpoint
        q = refuse_quantized(checkpoint)
        if q is not None:
            self.quantized[side] = q
        return checkpoint

    def open_base(self, base: str | None, finetuned: str | None) -> Checkpoint:
        """``base`` opened; when it is None, the base a LoRA adapter ``finetuned`` names. A
        block-FP8 base is the view of its dequantized weights (``base_rebuild`` reads them),
        in bfloat16 until ``open_finetuned`` sets the fine-tune's dtypes."""
        if base is None:
            base = self._adapter_base(finetuned)
        checkpoint = self.open("base", base)
        q = self.quantized.get("base")
        if q is None:
            return checkpoint
        q.retarget(lambda name: None)
        self._base_view = q.view()
        return self._base_view

    @property
    def dequantized(self) -> bool:
        """Whether a side was block-FP8 (the output's config then loses its
        ``quantization_config``)."""
        return bool(self.quantized)

    def base_rebuild(self) -> Callable[[], Rebuilder] | None:
        """How a block-FP8 base's tensors are read (None: base is read directly)."""
        q = self.quantized.get("base")
        return None if q is None else (lambda: DequantReader(q))

    def _adapter_base(self, finetuned: str | None) -> str:
        if finetuned is not None:
            source = resolve_source(finetuned, budget=self.budget, show_progress=self.show_progress)
            if is_adapter(source):
                from fapm_cli.io.adapter import read_config

                named = read_config(source).get("base_model_name_or_path")
                if isinstance(named, str) and named:
                    return named
                raise UsageError(
                    f"{finetuned}: the adapter names no base (base_model_name_or_path)",
                    hint="pass --base",
                )
        raise UsageError(
            "--base is needed unless --finetuned is a LoRA adapter that names its base",
            hint="pass --base",
        )

    def open_finetuned(
        self,
        base: Checkpoint,
        finetuned: str | None = None,
        task_vector: str | None = None,
        side: str = "finetuned",
    ) -> FineTune:
        """The fine-tune side: ``finetuned`` (a checkpoint or a LoRA adapter directory), or
        ``task_vector``; every refusal comes from headers and configs, before any data."""
        if task_vector is not None:
            from fapm_cli.io.taskvector_io import TaskVectorReader, open_task_vector

            opened = self.open(side, task_vector)
            refuse_as_task_vector(opened)
            taskvec = open_task_vector(opened, base)
            # a block-FP8 base dequantizes to the dtypes the task vector's model has
            self.retarget_base(
                base, lambda n: e.model_dtype if (e := taskvec.entries.get(n)) else None
            )
            return FineTune(
                taskvec.checkpoint,
                taskvec.finetuned_view(),
                lambda: TaskVectorReader(taskvec),
                taskvec=taskvec,
                warnings=list(taskvec.warnings),
            )
        assert finetuned is not None
        checkpoint = self.open(side, finetuned)
        # a block-FP8 base dequantizes to the fine-tune's dtype of each tensor (PEFT adapters
        # merge in base's: bfloat16 then)
        self.retarget_base(base, lambda name: _dtype(checkpoint, name))
        q = self.quantized.get(side)
        if q is not None:
            q.retarget(lambda name: _dtype(base, name))
            return FineTune(checkpoint, q.view(), lambda: DequantReader(q))
        if is_adapter(checkpoint.source):
            from fapm_cli.io.adapter import AdapterReader, open_adapter

            adapter = open_adapter(checkpoint, base)
            return FineTune(
                checkpoint, adapter.finetuned_view(), lambda: AdapterReader(adapter), adapter
            )
        if looks_like_adapter_file(checkpoint) and not looks_like_adapter_file(base):
            raise InputError(
                f"{checkpoint.display}: holds PEFT adapter tensors but no adapter_config.json "
                "beside them",
                hint="pass the adapter's directory (adapter_config.json + "
                "adapter_model.safetensors) as --finetuned",
            )
        return FineTune(checkpoint, checkpoint)

    def retarget_base(self, base: Checkpoint, dtype_of: Callable[[str], DType | None]) -> None:
        """A block-FP8 base's view, each weight in the dtype ``dtype_of`` gives (the other
        side's), in place: the view is the object the caller already holds. Only the first
        input opened decides (merge plans every later input against the same base)."""
        q = self.quantized.get("base")
        if q is None or base is not self._base_view or self._base_targeted:
            return
        self._base_targeted = True
        q.retarget(dtype_of)
        base.tensors.clear()
        base.tensors.update(q.view().tensors)

    def local_paths(self) -> list[Path]:
        """Every local input, which the output must not overlap."""
        paths = []
        for c in self.opened.values():
            p = getattr(c.source, "path", None)
            if p is not None:
                paths.append(Path(p))
        return paths

    def identity(self) -> str:
        """Where every input is, in full (local real paths, Hub commits), for the digest that
        keeps split runs apart; outputs record only names (``Source.provenance``)."""
        where = {}
        for side, c in self.opened.items():
            p = getattr(c.source, "path", None)
            where[side] = os.path.realpath(p) if p is not None else c.source.provenance()
        return json.dumps(where, sort_keys=True)

    def fetch_costs(self) -> Callable[[str, str], int]:
        """Bytes each (side, shard) would add to the disk when read (0 unless a download)."""
        from fapm_cli.io.hub import fetch_size

        costs = {
            (side, shard): fetch_size(c.source, shard, header)
            for side, c in self.opened.items()
            for shard, header in c.shards.items()
        }
        return lambda side, shard: costs.get((side, shard), 0)

    def close(self) -> None:
        if self.budget is not None:
            self.budget.close()  # removes shards still held, e.g. after an error

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dtype(checkpoint: Checkpoint, name: str) -> DType | None:
    ref = checkpoint.tensors.get(name)
    return ref.info.dtype if ref is not None else None


class Rebuilder(Protocol):
    """Rebuilds finetuned tensors from base as the stream yields them: a task vector's
    (``TaskVectorReader``) or a LoRA adapter's (``AdapterReader``)."""

    reader: TensorReader  # the rebuilder's own files, released shard by shard

    def model(self, name: str, base: torch.Tensor | None) -> torch.Tensor: ...

    def shards(self, name: str) -> list[str]: ...


@dataclass(frozen=True)
class FineTune:
    """The fine-tune side of a run, as ``Inputs.open_finetuned`` opened it."""

    opened: Checkpoint  # what the user named
    view: Checkpoint  # what is paired with base: the fine-tune's names, shapes and dtypes
    rebuild: Callable[[], Rebuilder] | None = None  # None: ``view`` is read directly
    adapter: Adapter | None = None
    taskvec: TaskVector | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "task_vector" if self.taskvec is not None else "finetuned"

    def sources(self) -> dict[str, str]:
        """Its entries of the output's provenance (``plan.provenance``'s ``sources``)."""
        out = {self.kind: self.opened.source.provenance()}
        if self.adapter is not None:
            out["finetuned_adapter"] = "lora"
        return out

    def files(self, base: Checkpoint) -> list[tuple[str, Callable[[], str]]]:
        """Its non-weight files to copy. A task vector has none of its own: base's. An
        adapter has no model config: base's files, with the adapter's tokenizer files (if it
        has any) in place of base's."""
        if self.taskvec is not None:
            return extra_files(base)
        if self.adapter is not None:
            own = dict(extra_files(self.opened))
            names = self.adapter.tokenizer_files()
            files = [(n, get) for n, get in extra_files(base) if n not in names]
            return files + [(n, own[n]) for n in names]
        return extra_files(self.opened)


def extra_files(checkpoint: Checkpoint | None) -> list[tuple[str, Callable[[], str]]]:
    """Non-weight files (config, tokenizer, ...) to copy, with a way to get each locally."""
    if checkpoint is None:
        return []
    return [
        (name, lambda name=name: checkpoint.source.local_path(name))  # type: ignore[misc]
        for name in checkpoint.extra_files
    ]


Files = list[tuple[str, Callable[[], str]]]
Generated = Callable[[list[dict[str, Any]]], list[tuple[str, str]]]


def published(
    files: Files,
    dtype: DType | None,
    card: Callable[[list[dict[str, Any]]], str],
    dequantized: bool = False,
) -> tuple[Files, Generated]:
    """What a model output gets beside its shards: the copied files less the fine-tune's card
    (``README.md`` describes another model: fapm writes its own), and with ``--dtype`` a
    ``config.json`` that names the dtype the weights now have (``from_pretrained(dtype="auto")``
    reads it). ``dequantized``: a side was block-FP8, whose ``quantization_config`` the
    output's config must not keep (its weights are not quantized)."""
    from fapm_cli.report.card import CARD_NAME

    config = next((get for name, get in files if name == "config.json"), None)
    rewrite = (dtype is not None or dequantized) and config is not None
    copied = [(n, g) for n, g in files if n != CARD_NAME and not (rewrite and n == "config.json")]

    def generated(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
        out = [(CARD_NAME, card(records))]
        if rewrite:
            assert config is not None
            out.append(("config.json", config_with_dtype(config(), dtype)))
        return out

    return copied, generated


def config_with_dtype(path: str, dtype: DType | None) -> str:
    """``config.json`` at ``path`` with its dtype set to ``dtype`` (as transformers writes it;
    None: as it is), and without ``quantization_config`` (fapm writes unquantized weights)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(
            f"{path}: cannot read config.json to set its dtype ({err})",
            hint="restore the config file, or drop --dtype",
        ) from err
    if not isinstance(config, dict):
        raise InputError(f"{path}: config.json is not an object", hint="restore the config file")
    config.pop("quantization_config", None)
    if dtype is not None:
        config["torch_dtype"] = dtype.torch_name
        if "dtype" in config:  # transformers 4.56+ writes this name
            config["dtype"] = dtype.torch_name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
