"""``fapm merge``: base + the weighted sum of task vectors and of fine-tunes pruned on the fly.

Plans from headers (every input paired with base before any tensor is read), then streams base
tensor by tensor through the one loop; each input is read by the per-tensor operation
(``compute.merge``) as it needs it, and its shards are released after their last use. Memory is
bounded like ``prune``'s whatever the number of inputs; ``--part``/``--finalize`` and
``--disk-budget`` work as in ``prune``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fapm_cli.compute import taskvector as tv
from fapm_cli.compute.merge import (
    Contribution,
    FineTuned,
    TaskVectorInput,
    exact_finetuned,
    merge_tensor,
)
from fapm_cli.compute.scoring import Workspace, workspace
from fapm_cli.errors import MismatchError, UsageError
from fapm_cli.io.adapter import Adapter, AdapterReader, refuse_as_task_vector
from fapm_cli.io.header import DType, PlannedTensor
from fapm_cli.io.output import Output
from fapm_cli.io.parts import Part, options_doc
from fapm_cli.io.quantized import BlockFP8, DequantReader
from fapm_cli.io.reader import Checkpoint, Side, TensorReader, TensorRef, stream
from fapm_cli.io.taskvector_io import (
    Entry,
    TaskVector,
    TaskVectorReader,
    check_pairs,
    open_task_vector,
)
from fapm_cli.io.writer import CheckpointWriter
from fapm_cli.plan import (
    MODEL_KIND,
    TASK_VECTOR_KIND,
    Item,
    NoProgress,
    Progress,
    PruneOptions,
    Repr,
    order_for_disk,
    plan_prune,
    plan_warnings,
    provenance,
)
from fapm_cli.records import MergeInput, MergeReport, MergeTensor
from fapm_cli.report.card import CardInput, model_card
from fapm_cli.verbs.inputs import Inputs, Rebuilder, extra_files, published


@dataclass
class _Opened:
    """One input: a task vector, or a fine-tune with its prune plan against base."""

    spec: MergeInput
    side: str  # its label for fetch costs ("input0", ...)
    checkpoint: Checkpoint
    stream: int = 0  # fine-tunes: which one (0 first), for DARE's independent masks
    taskvec: TaskVector | None = None
    items: dict[str, Item] | None = None  # fine-tunes: the prune plan, by tensor name
    tv_reader: TaskVectorReader | None = None
    reader: TensorReader | None = None
    adapter: Adapter | None = None  # a LoRA adapter as the fine-tune (``items`` from its view)
    ad_reader: AdapterReader | None = None
    dequant: BlockFP8 | None = None  # a block-FP8 fine-tune, dequantized on read
    dq_reader: DequantReader | None = None
    files: list[tuple[str, Callable[[], str]]] = field(default_factory=list)  # to copy

    def has(self, name: str) -> bool:
        return name in (self.taskvec.entries if self.taskvec else self.items or {})

    def model_dtype(self, name: str) -> DType:
        if self.taskvec is not None:
            return self.taskvec.entries[name].model_dtype
        assert self.items is not None
        return self.items[name].out.dtype

    def shape(self, name: str) -> tuple[int, ...]:
        if self.taskvec is not None:
            return self.taskvec.entries[name].shape
        assert self.items is not None
        return self.items[name].out.shape

    def refs(self, name: str) -> list[TensorRef]:
        if self.taskvec is not None:
            e = self.taskvec.entries.get(name)
            return [r for r in (e.main, e.positions) if r is not None] if e else []
        if self.adapter is not None:
            return self.adapter.refs(name) if self.items and name in self.items else []
        item = (self.items or {}).get(name)
        if self.dequant is not None:  # the stored weight and its scale
            c = self.dequant.checkpoint
            stored = c.tensors.get(name) if item and item.finetuned else None
            scale = self.dequant.scales.get(name)
            return [r for r in (stored, scale) if r is not None]
        return [item.finetuned] if item and item.finetuned else []

    def open_reader(self) -> TensorReader:
        if self.taskvec is not None:
            self.tv_reader = TaskVectorReader(self.taskvec)
            return self.tv_reader.reader
        if self.adapter is not None:
            self.ad_reader = AdapterReader(self.adapter)
            return self.ad_reader.reader
        if self.dequant is not None:
            self.dq_reader = DequantReader(self.dequant)
            return self.dq_reader.reader
        self.reader = TensorReader(self.checkpoint)
        return self.reader


@dataclass(frozen=True)
class _Planned:
    """One output tensor of the merge: base's tensor, and which inputs hold it."""

    out: PlannedTensor
    base: TensorRef | None
    holders: tuple[int, ...]  # positions in the input list

    @property
    def name(self) -> str:
        return self.out.name


def merge(
    base_source: str | None,
    output: str,
    inputs: Sequence[MergeInput],
    *,
    opts: PruneOptions | None = None,
    dtype: DType | None = None,
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    progress: Progress | None = None,
    disk_budget: int | None = None,
    part: Part | None = None,
    finalize: bool = False,
    device: str = "cpu",
    threads: int | None = None,
) -> MergeReport:
    """Write ``base + sum_i w_i * tau_i`` to ``output`` in one streaming pass.

    Task-vector inputs give tau directly; fine-tune inputs are pruned with ``opts`` (FAPM by
    default) and their kept update is tau. A single input of weight 1 is applied exactly
    (its model bytes: finetuned's kept bytes, or the task vector rebuilt bit for bit); otherwise
    the sum is taken in float32 (float64 if any input is float64) and rounded once to the
    output dtype, and entries no input touches keep base's bytes.
    """
    if not inputs:
        raise UsageError("give at least one --task-vector or --finetuned")
    out = Output(Path(output), max_shard_size, overwrite, part, finalize)
    started = time.monotonic()
    progress = progress or NoProgress()
    opts = replace(opts or PruneOptions(), dtype=dtype)
    show = bool(getattr(progress, "enabled", False))
    with Inputs(disk_budget, show) as sources:
        first_ft = next((i.source for i in inputs if i.kind != TASK_VECTOR_KIND), None)
        base = sources.open_base(base_source, first_ft)  # None: the adapter's base
        opened: list[_Opened] = []
        warnings: list[str] = []
        for k, spec in enumerate(inputs):
            side = f"input{k}"
            if spec.kind == TASK_VECTOR_KIND:
                c = sources.open(side, spec.source)
                refuse_as_task_vector(c)
                o = _Opened(spec, side, c)
                o.taskvec = open_task_vector(c, base)
                sources.retarget_base(base, functools.partial(_model_dtype, o.taskvec))
                warnings += o.taskvec.warnings
                check_pairs(base, o.taskvec)
            else:  # a fine-tune, or a LoRA adapter standing for one
                ft = sources.open_finetuned(base, spec.source, side=side)
                o = _Opened(spec, side, ft.opened, adapter=ft.adapter)
                o.dequant = sources.quantized.get(side)
                items = plan_prune(base, ft.view, opts)
                warnings += [f"{spec.source}: {w}" for w in plan_warnings(items, opts)]
                o.items = {i.name: i for i in items}
                o.files = ft.files(base)
                o.stream = sum(1 for p in opened if p.taskvec is None)
            opened.append(o)
        planned = _plan(base, opened, dtype)
        if sources.budget is not None:
            planned = order_for_disk(
                planned, sources.fetch_costs(), sources.budget.limit, _shards(opened)
            )
        out.check(sources.local_paths())
        out = replace(out, identity=sources.identity())
        finetunes = [o for o in opened if o.taskvec is None]
        described = [
            {"kind": o.spec.kind, "source": o.checkpoint.source.provenance(),
             "weight": o.spec.weight}
            for o in opened
        ]  # fmt: skip
        metadata = provenance(
            MODEL_KIND,
            opts if finetunes else None,
            sources={
                "base": base.source.provenance(),
                "inputs": json.dumps(described, separators=(",", ":")),
            },
        )
        # Every chunk written is a fresh tensor (inputs are read without a reused ring), so
        # hashing and writing may run on the writer's thread, beside the next chunk's sum.
        job = out.open([p.out for p in planned], metadata, options_doc(opts), {}, background=True)
        try:
            mine = [p for p in planned if job.wants([p.name])]
            records: list[MergeTensor] = []
            if job.writes_data:
                with workspace(device, threads) as ws:
                    records = _run(
                        base, opened, mine, opts, job.writer, ws, progress,
                        sources.base_rebuild(),
                    )  # fmt: skip
            copy = finetunes[0].files if finetunes else extra_files(base)
            card = _card(base.source.provenance(), opened, opts if finetunes else None, dtype)
            copied, generated = published(copy, dtype, card, sources.dequantized)
            joined = job.finish([r.to_json() for r in records], copied, generated)
            if not job.writes_data:
                records = [MergeTensor.from_json(r) for r in joined]
        except BaseException:
            job.abort()
            raise
        finally:
            progress.close()
    floats = [r for r in records if r.dtype.startswith(("F", "BF"))]
    if floats and not any(r.changed for r in floats):
        warnings.append(
            "the merged model equals base in every float tensor: the inputs change nothing "
            "(the same checkpoint as base, or all updates pruned away)"
        )
    return MergeReport(
        str(out.target),
        base.source.provenance(),
        [
            {
                "kind": o.spec.kind,
                "source": o.spec.source,
                "provenance": o.checkpoint.source.provenance(),
                "weight": o.spec.weight,
                "format": o.taskvec.format.value if o.taskvec else "model",
            }
            for o in opened
        ],
        opts if finetunes else None,
        records,
        job.shard_info,
        time.monotonic() - started,
        warnings,
    )


def _card(
    base: str, opened: Sequence[_Opened], opts: PruneOptions | None, dtype: DType | None
) -> Callable[[list[dict[str, Any]]], str]:
    """The model card of a merged model."""
    inputs = [
        CardInput(
            "task vector" if o.taskvec is not None else "finetuned",
            o.checkpoint.source.provenance(),
            o.spec.weight,
        )
        for o in opened
    ]
    args = ["--base", base]
    for o in opened:
        args += ["--task-vector" if o.taskvec is not None else "--finetuned",
                 o.checkpoint.source.provenance()]  # fmt: skip
    for o in opened:
        args += ["--weight", f"{o.spec.weight:g}"]
    if opts is not None:
        args += ["--method", opts.method.value, "--sparsity", str(float(opts.sparsity))]
    if dtype is not None:
        args += ["--dtype", dtype.torch_name]

    def card(records: list[dict[str, Any]]) -> str:
        return model_card("merge", base, inputs, opts, None, args)

    return card


def _plan(base: Checkpoint, opened: Sequence[_Opened], dtype: DType | None) -> list[_Planned]:
    """Every output tensor: base's, then those only in the inputs, in the inputs' order."""
    names = list(base.tensors)
    seen = set(names)
    for o in opened:
        for n in o.taskvec.entries if o.taskvec else o.items or {}:
            if n not in seen:
                seen.add(n)
                names.append(n)
    planned = []
    for name in names:
        holders = tuple(k for k, o in enumerate(opened) if o.has(name))
        first = opened[holders[0]] if holders else None
        ref = base.tensors.get(name)
        if first is None:  # a base tensor no input holds: base's values
            assert ref is not None
            model, shape = ref.info.dtype, ref.info.shape
        else:
            item = (first.items or {}).get(name)
            if ref is None and item is not None:
                ref = item.base  # base ties its head to its embedding (plan.tied_heads)
            model = first.model_dtype(name)
            shape = ref.info.shape if ref is not None else first.shape(name)
            resized = [
                k
                for k in holders
                if (it := (opened[k].items or {}).get(name)) is not None and it.resized
            ]
            if resized:
                if len(holders) > 1 or first.spec.weight != 1.0:
                    raise MismatchError(
                        f"tensor {name!r}: {opened[resized[0]].spec.source} adds tokens "
                        f"(shape {list(first.shape(name))} against base's {list(shape)}), "
                        "which merge can only take from a single input of weight 1",
                        hint="prune each fine-tune on its own, or merge fine-tunes that keep "
                        "base's vocabulary",
                    )
                shape = first.shape(name)
        out_dtype = dtype if dtype is not None and model.is_float else model
        planned.append(_Planned(PlannedTensor(name, out_dtype, shape), ref, holders))
    return planned


def _shards(opened: Sequence[_Opened]) -> Callable[[_Planned], list[tuple[str, str]]]:
    """(side, shard) of every shard a merged tensor reads, base first (for --disk-budget)."""

    def shards(p: _Planned) -> list[tuple[str, str]]:
        out = [("base", p.base.shard)] if p.base is not None else []
        for k in p.holders:
            out += [(opened[k].side, r.shard) for r in opened[k].refs(p.name)]
        return out

    return shards


def _run(
    base: Checkpoint,
    opened: Sequence[_Opened],
    planned: Sequence[_Planned],
    opts: PruneOptions,
    writer: CheckpointWriter,
    ws: Workspace,
    progress: Progress,
    base_rebuild: Callable[[], Rebuilder] | None = None,
) -> list[MergeTensor]:
    base_reader = base_rebuild() if base_rebuild is not None else None
    if base_reader is None:
        sides = [Side(TensorReader(base), [p.base for p in planned])]
    else:  # a block-FP8 base, dequantized as each tensor comes
        sides = [
            Side(
                base_reader.reader,
                [None] * len(planned),
                [base_reader.shards(p.base.info.name) if p.base else [] for p in planned],
            )
        ]
    for o in opened:
        reader = o.open_reader()
        shards = [list(dict.fromkeys(r.shard for r in o.refs(p.name))) for p in planned]
        sides.append(Side(reader, [None] * len(planned), shards))
    sizes = [
        (p.base.info.nbytes if p.base is not None else 0)
        + sum(r.info.nbytes for k in p.holders for r in opened[k].refs(p.name))
        for p in planned
    ]
    held = [p.base.info.nbytes if p.base is not None else 0 for p in planned]
    progress.start(sum(sizes), "merge")
    records: list[MergeTensor] = []
    # Base is read ahead into the loop's reused ring (a region goes back once the writer has
    # written what came from it); the inputs are read by the operation, slice by slice.
    steps = stream(sides, held=held, progress=progress.advance, sizes=sizes,
                   after=writer.after_written if base_reader is None else None)  # fmt: skip
    with contextlib.closing(steps):
        for step in steps:
            p = planned[step.pos]
            b = step.tensors[0]
            if base_reader is not None and p.base is not None:
                b = base_reader.model(p.base.info.name, None)
            holders = [opened[k] for k in p.holders]
            writer.begin(p.name)
            changed = _merge_one(p, b, holders, opts, writer.write, ws)
            numel = p.out.nbytes // max(p.out.dtype.itemsize, 1)
            records.append(
                MergeTensor(p.name, p.out.shape, p.out.dtype.name, numel, changed, len(holders))
            )
            del b
    return records


def _merge_one(
    p: _Planned,
    base: torch.Tensor | None,
    holders: Sequence[_Opened],
    opts: PruneOptions,
    write: Callable[[torch.Tensor], None],
    ws: Workspace,
) -> int:
    """One merged tensor through ``compute.merge``, its inputs read as it needs them."""
    name = p.name
    first = holders[0]
    if base is None or not p.out.dtype.is_float or (len(holders) == 1 and first.spec.weight == 1.0):
        # Non-float tensors, tensors only in the inputs, and a single input of weight 1: the
        # first input's model bytes, chunk by chunk (never a full-size copy of the output).
        exact: Callable[[Callable[[torch.Tensor], None]], None]
        if first.tv_reader is not None:
            reader = first.tv_reader
            out = tv.torch_dtype(p.out.dtype)

            def exact(keep: Callable[[torch.Tensor], None]) -> None:
                for chunk in reader.model_chunks(name, base):
                    keep(chunk.to(out))

        else:
            assert first.items is not None
            exact = exact_finetuned(first.items[name], base, _whole(first, name, base), opts, ws)
        return merge_tensor(p.out, base, [], write, ws, exact=exact)
    inputs: list[Contribution] = []
    dtypes = []
    for o in holders:
        if o.adapter is not None or o.dequant is not None:
            # a rebuilt tensor: the merged model's dtype (base's), or the dequantized one
            assert o.items is not None
            ref = o.items[name].finetuned
            assert ref is not None
            dtypes.append(tv.torch_dtype(ref.info.dtype))
        else:
            dtypes += [tv.torch_dtype(r.info.dtype) for r in o.refs(name)]
        if o.tv_reader is not None:
            e = o.tv_reader.tv.entries[name]
            inputs.append(
                TaskVectorInput(
                    e.repr,
                    o.spec.weight,
                    _ranged(o.tv_reader.reader, e.main.info.name),
                    _mask_of(o.tv_reader, e) if e.repr is Repr.SPARSE else None,
                )
            )
        else:
            assert o.items is not None
            whole = _whole(o, name, base)
            ranged = _ranged(o.reader, name) if o.reader is not None else _sliced(whole)
            inputs.append(FineTuned(o.items[name], o.spec.weight, whole, ranged, opts, o.stream))
    return merge_tensor(p.out, base, inputs, write, ws, dtypes=dtypes)


def _model_dtype(taskvec: TaskVector, name: str) -> DType | None:
    e = taskvec.entries.get(name)
    return e.model_dtype if e is not None else None


def _ranged(reader: TensorReader, stored: str) -> Callable[[int, int], torch.Tensor]:
    return lambda start, stop: reader.read_range(stored, start, stop)


def _whole(o: _Opened, name: str, base: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """A fine-tune's whole tensor ``name``: read, or rebuilt from base by an adapter (once:
    the rebuilt tensor is kept for the item's slices)."""
    if o.ad_reader is not None:
        ad_reader = o.ad_reader
        kept: list[torch.Tensor] = []

        def rebuilt() -> torch.Tensor:
            if not kept:
                kept.append(ad_reader.model(name, base))
            return kept[0]

        return rebuilt
    if o.dq_reader is not None:
        dq_reader = o.dq_reader
        once: list[torch.Tensor] = []

        def dequantized() -> torch.Tensor:  # once: kept for the item's slices
            if not once:
                once.append(dq_reader.model(name, None))
            return once[0]

        return dequantized
    assert o.reader is not None
    reader = o.reader
    return lambda: reader.read(name)


def _sliced(whole: Callable[[], torch.Tensor]) -> Callable[[int, int], torch.Tensor]:
    """Entries ``start:stop`` of the flattened ``whole()``."""
    return lambda start, stop: whole().reshape(-1)[start:stop]


def _mask_of(reader: TaskVectorReader, entry: Entry) -> Callable[[], torch.Tensor]:
    return lambda: reader.mask(entry)
