"""``fapm prune`` for every input and output form, and the task-vector writer ``diff`` shares.

Inputs: a fine-tune, or a task vector (dense or compact) from which each finetuned tensor is
rebuilt exactly (``taskvector_io.TaskVectorReader``), so pruning ``diff(base, finetuned)`` is
pruning ``finetuned``, bit for bit. Outputs: the merged model, or the pruned task vector (dense
or compact). Every form plans from headers first (``plan.plan_prune``), streams through the one
loop (``reader.stream``), runs the per-tensor operation of ``compute.prune`` (or
``compute.encode`` for task vectors), and writes through ``output.Output``, so ``--part`` /
``--finalize`` and ``--disk-budget`` work in every form.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fapm_cli.compute import taskvector as tv
from fapm_cli.compute.encode import (
    StoragePlan,
    Unexact,
    encode_item,
    input_dtypes,
    storage_plan,
    tv_metadata,
)
from fapm_cli.compute.prune import process_item
from fapm_cli.compute.scoring import Workspace, workspace
from fapm_cli.errors import OutputError, UsageError
from fapm_cli.io.header import DType
from fapm_cli.io.output import Job, Output
from fapm_cli.io.parts import Part, options_doc
from fapm_cli.io.reader import Checkpoint, Side, TensorReader, stream
from fapm_cli.plan import (
    MODEL_KIND,
    TASK_VECTOR_KIND,
    Action,
    FilesFrom,
    Format,
    Item,
    Method,
    NoProgress,
    Progress,
    PruneOptions,
    Repr,
    Save,
    held_bytes,
    order_for_disk,
    plan_prune,
    plan_warnings,
    provenance,
)
from fapm_cli.records import PruneReport, TensorResult, TVTensor, summarize
from fapm_cli.report.card import CardInput, model_card
from fapm_cli.verbs.inputs import Generated, Inputs, Rebuilder, extra_files, published


def prune(
    base_source: str | None,
    finetuned_source: str | None,
    output: str,
    opts: PruneOptions,
    *,
    task_vector_source: str | None = None,
    save: Save = Save.MODEL,
    fmt: Format = Format.DENSE,
    max_shard_size: int = 5 * 10**9,
    files_from: FilesFrom = FilesFrom.FINETUNED,
    overwrite: bool = False,
    progress: Progress | None = None,
    disk_budget: int | None = None,
    prefetch: bool = True,
    part: Part | None = None,
    finalize: bool = False,
    device: str = "cpu",
    threads: int | None = None,
) -> PruneReport:
    """Prune ``finetuned`` (or the fine-tune ``task_vector_source`` stands for) against
    ``base`` and write the merged model, or with ``save=TASK_VECTOR`` the pruned task vector.

    ``finetuned_source`` may be a LoRA adapter directory (``io.adapter``): the fine-tune is
    then the model PEFT's ``merge_and_unload()`` gives on base, rebuilt tensor by tensor;
    ``base_source`` None then means the base the adapter names (``base_model_name_or_path``).
    ``disk_budget`` bounds the bytes of downloaded Hub shards kept on disk (see ``io.hub``).
    ``part`` writes only that part's shards, next to ``output`` (see ``io.parts``);
    ``finalize`` then joins all parts into ``output``. The report of a part covers its own
    tensors. ``device`` and ``threads``: where and on how many torch threads scores are
    computed (the same bytes everywhere).
    """
    check_forms(finetuned_source, task_vector_source, save, fmt, opts.method)
    out = Output(Path(output), max_shard_size, overwrite, part, finalize)
    started = time.monotonic()
    progress = progress or NoProgress()
    show = bool(getattr(progress, "enabled", False))  # Hub download bars follow the main bar
    with Inputs(disk_budget, show) as inputs:
        base = inputs.open_base(base_source, finetuned_source)
        side = inputs.open_finetuned(base, finetuned_source, task_vector_source)
        warnings = list(side.warnings)
        finetuned = side.view
        sources = side.sources()
        items = plan_prune(base, finetuned, opts)
        if inputs.budget is not None:
            items = order_for_disk(items, inputs.fetch_costs(), inputs.budget.limit)
        warnings += plan_warnings(items, opts)
        if fmt is Format.COMPACT:
            check_compact_names(items)
        out.check(inputs.local_paths())
        out = replace(out, identity=inputs.identity())
        base_prov = base.source.provenance()
        pair = Pair(base, finetuned, side.rebuild, inputs.base_rebuild())
        with workspace(device, threads) as ws:
            if save is Save.MODEL:
                metadata = provenance(MODEL_KIND, opts, sources={"base": base_prov, **sources})
                # A task vector or an adapter has no model config of its own: "finetuned"
                # files then come from base (see ``FineTune.files``).
                files = {
                    FilesFrom.FINETUNED: side.files,
                    FilesFrom.BASE: extra_files,
                }.get(files_from)
                settings = {"files_from": files_from.value, "save": save.value}
                job = out.open(
                    [i.out for i in items], metadata, options_doc(opts), settings,
                    # Read buffers are reused only after the writer is done with them.
                    background=prefetch and not pair.rebuilt,
                )  # fmt: skip
                copied, generated = published(
                    files(base) if files else [], opts.dtype,
                    _card(base_prov, side.kind, sources[side.kind], opts), inputs.dequantized,
                )  # fmt: skip
                results, shards = _write_model(
                    pair, items, opts, job, copied, generated, ws, progress, prefetch
                )
                stored: list[TVTensor] = []
                passes = 1
            else:
                metadata = provenance(
                    TASK_VECTOR_KIND, opts, sources={"base": base_prov, **sources}
                )
                written = write_task_vector(
                    pair, items, opts, fmt, None, metadata, out, ws, progress
                )
                results = [r for r in written.results if r is not None]
                stored, shards, passes = written.stored, written.shards, written.passes
    pruned = [r for r in results if r.action is Action.PRUNE]
    if pruned and not any(r.sq_norm for r in pruned):
        warnings.append(unchanged_warning())
    return PruneReport(
        str(out.target),
        base_prov,
        finetuned.source.provenance(),
        opts,
        results,
        shards,
        time.monotonic() - started,
        warnings,
        save,
        fmt,
        sources.get("task_vector"),
        stored,
        passes,
    )


def _card(
    base: str, kind: str, finetuned: str, opts: PruneOptions
) -> Callable[[list[dict[str, Any]]], str]:
    """The model card of a pruned model, from the records of all its tensors."""

    def card(records: list[dict[str, Any]]) -> str:
        totals = summarize([TensorResult.from_json(r) for r in records])
        flag = "--task-vector" if kind == "task_vector" else "--finetuned"
        args = ["--base", base, flag, finetuned, "--method", opts.method.value,
                "--sparsity", str(float(opts.sparsity))]  # fmt: skip
        if opts.method is Method.FAPM:
            args += ["--lam", f"{opts.lam:g}"]
        if opts.method is Method.RANDOM:
            args += ["--seed", str(opts.seed)]
        for flag_name, patterns in (("--keep-base", opts.keep_base),
                                    ("--keep-finetuned", opts.keep_finetuned)):  # fmt: skip
            for pattern in patterns:
                args += [flag_name, pattern]
        if opts.dtype is not None:
            args += ["--dtype", opts.dtype.torch_name]
        role = "task vector" if kind == "task_vector" else "finetuned"
        kept = float(totals["kept_fraction"]) if totals["pruned_tensors"] else None
        return model_card("prune", base, [CardInput(role, finetuned)], opts, kept, args)

    return card


def unchanged_warning() -> str:
    return (
        "finetuned equals base in every tensor to prune (the task vector is zero), so nothing "
        "changed: was the same checkpoint given twice?"
    )


def check_forms(
    finetuned: str | None, task_vector: str | None, save: Save, fmt: Format, method: Method
) -> None:
    """Refuse input and output forms that do not go together, before anything is opened."""
    if (finetuned is None) == (task_vector is None):
        raise UsageError(
            "give exactly one of --finetuned and --task-vector", hint="see fapm prune --help"
        )
    if save is Save.MODEL and fmt is Format.COMPACT:
        raise UsageError("--layout compact needs --save task-vector", hint="see fapm prune --help")
    if fmt is Format.COMPACT and method is Method.RANDOM:
        raise UsageError(
            "--layout compact needs a ranked method (fapm, magnitude, ratio)",
            hint="--method random keeps a random number of entries, so the compact layout "
            "cannot be planned before scoring; use --layout dense",
        )


def check_compact_names(items: Sequence[Item]) -> None:
    for item in items:
        if tv.SEP in item.name:
            raise UsageError(
                f"tensor {item.name!r} has '{tv.SEP}' in its name, which the compact format "
                "reserves",
                hint="use --layout dense",
            )


@dataclass(frozen=True)
class Pair:
    """What prune, diff and score read: base, and finetuned, or what stands for it (a task
    vector, a LoRA adapter) with the rebuilder of its tensors."""

    base: Checkpoint
    finetuned: Checkpoint  # a task vector's or adapter's ``finetuned_view`` with ``rebuild``
    rebuild: Callable[[], Rebuilder] | None = None  # a fresh rebuilder for each stream
    # base's, where base is read through one (a block-FP8 base, dequantized on read)
    base_rebuild: Callable[[], Rebuilder] | None = None

    @property
    def rebuilt(self) -> bool:
        return self.rebuild is not None or self.base_rebuild is not None

    def steps(
        self,
        items: Sequence[Item],
        progress: Callable[[int], None],
        after: Callable[[Callable[[], None]], None] | None = None,
        prefetch: bool = True,
    ) -> contextlib.closing[Any]:
        """The one stream over ``items``, yielding ``(item, base, finetuned, own)``; rebuilt
        finetuned tensors are rebuilt from base as they come."""
        return contextlib.closing(self._steps(items, progress, after, prefetch))

    def _steps(
        self,
        items: Sequence[Item],
        progress: Callable[[int], None],
        after: Callable[[Callable[[], None]], None] | None,
        prefetch: bool,
    ) -> Any:
        base_reader: Rebuilder | None = None
        if self.base_rebuild is None:
            base_side = Side(TensorReader(self.base), [i.base for i in items])
        else:
            base_reader = self.base_rebuild()
            base_side = Side(
                base_reader.reader,
                [None] * len(items),
                [base_reader.shards(i.base.info.name) if i.base else [] for i in items],
            )
        reader: Rebuilder | None = None
        if self.rebuild is None:
            ft_side = Side(TensorReader(self.finetuned), [i.finetuned for i in items])
        else:
            reader = self.rebuild()
            ft_side = Side(
                reader.reader, [None] * len(items), [reader.shards(i.name) for i in items]
            )
        # rebuilt tensors are not read into the loop's buffers
        plain = reader is None and base_reader is None
        steps = stream(
            [base_side, ft_side],
            held=[held_bytes(i) for i in items],
            progress=progress,
            sizes=[i.read_bytes for i in items],
            after=after if plain else None,
            prefetch=prefetch and plain,
        )
        with contextlib.closing(steps):
            for step in steps:
                item = items[step.pos]
                b, f = step.tensors
                if base_reader is not None and item.base is not None:
                    b = base_reader.model(item.base.info.name, None)
                if reader is not None and item.finetuned is not None:
                    f = reader.model(item.name, b)
                yield item, b, f, step.own and plain
                del b, f


def _write_model(
    pair: Pair,
    items: Sequence[Item],
    opts: PruneOptions,
    job: Job,
    files: Sequence[tuple[str, Callable[[], str]]],
    generated: Generated,
    ws: Workspace,
    progress: Progress,
    prefetch: bool,
) -> tuple[list[TensorResult], dict[str, dict[str, object]]]:
    """The merged model: each item through ``compute.prune`` into the output's writer."""
    mine = [i for i in items if job.wants([i.out.name])]
    results: list[TensorResult] = []
    writer = job.writer
    try:
        if job.writes_data:
            progress.start(sum(i.read_bytes for i in mine), "prune")
            with pair.steps(mine, progress.advance, writer.after_written, prefetch) as steps:
                for item, b, f, own in steps:
                    writer.begin(item.name)
                    # Tensors read here are the loop's own: the output may overwrite finetuned's.
                    results.append(process_item(item, b, f, opts, writer.write, ws, inplace=own))
        joined = job.finish([r.to_json() for r in results], files, generated)
        if not job.writes_data:
            results = [TensorResult.from_json(r) for r in joined]
    except BaseException:
        job.abort()
        raise
    finally:
        progress.close()
    return results, job.shard_info


# -- task vectors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenTaskVector:
    results: list[TensorResult | None]  # per item; None for a diff (nothing is pruned)
    stored: list[TVTensor]
    shards: dict[str, dict[str, object]]
    passes: int


def write_task_vector(
    pair: Pair,
    items: Sequence[Item],
    opts: PruneOptions | None,
    fmt: Format,
    forced: DType | None,
    metadata: dict[str, str],
    out: Output,
    ws: Workspace,
    progress: Progress,
) -> WrittenTaskVector:
    """Stream a task vector (``opts`` None: the whole one, a diff) to ``out``; re-plan once if
    a delta dtype is not exact (see ``compute.encode``)."""
    verify = forced is None
    chosen: dict[str, DType | None] = {}
    settings = {"format": fmt.value, "dtype": forced.name if forced else "exact"}
    for attempt in range(2):
        plans = [storage_plan(i, fmt, opts, chosen, forced) for i in items]
        job = out.open(
            [t for p in plans for t in p.planned()],
            {**metadata, **tv_metadata(plans, fmt, verify)},
            options_doc(opts),
            settings,
            # The stream below reuses no buffer and every encoded chunk is a fresh tensor:
            # hashing and writing run on the writer's thread, beside the next chunk.
            background=True,
        )
        try:
            mine = [p for p in plans if job.wants(t.name for t in p.planned())]
            results: list[TensorResult | None] = []
            stored: list[TVTensor] = []
            if job.writes_data:
                progress.start(sum(p.item.read_bytes for p in mine), "task vector")
                # The ring's regions go back once the writer has written what came from them
                # (whole values are written as views of the inputs).
                steps_of = pair.steps(
                    [p.item for p in mine], progress.advance, job.writer.after_written
                )
                with steps_of as steps:
                    for plan, (_, b, f, _) in zip(mine, steps, strict=True):
                        w = job.writer
                        result, record = encode_item(plan, b, f, opts, verify, w.begin, w.write, ws)
                        results.append(result)
                        stored.append(record)
            joined = job.finish(
                [
                    {"result": r.to_json() if r is not None else None, "stored": s.to_json()}
                    for r, s in zip(results, stored, strict=True)
                ]
            )
            if not job.writes_data:
                results = [TensorResult.from_json(d["result"]) if d["result"] else None
                           for d in joined]  # fmt: skip
                stored = [TVTensor.from_json(d["stored"]) for d in joined]
            return WrittenTaskVector(results, stored, job.shard_info, 1 + 2 * attempt)
        except Unexact as err:
            job.abort()
            if attempt:
                raise AssertionError("a checked representation failed its own check") from None
            if out.part is not None:
                # The re-plan changes every shard's layout and metadata, which a part cannot
                # know from its own tensors alone.
                raise OutputError(
                    f"tensor {err.name!r}: no delta dtype gives it back exactly at this plan, "
                    "so the task vector must be planned from every tensor's data",
                    hint="write this task vector in one run (without --part), or pass --dtype",
                ) from None
        except BaseException:
            job.abort()
            raise
        finally:
            progress.close()
        chosen = _choose_representations(pair, items, opts, ws)
    raise AssertionError("unreachable")


def _choose_representations(
    pair: Pair, items: Sequence[Item], opts: PruneOptions | None, ws: Workspace
) -> dict[str, DType | None]:
    """For every delta tensor, the narrowest dtype that gives it back exactly (None: values)."""
    chosen: dict[str, DType | None] = {}

    def discard(_: object) -> None:
        pass

    with pair.steps(items, discard) as steps:
        for item, b, f, _ in steps:
            if item.action is Action.COPY:
                continue
            chosen[item.name] = None
            for dtype in tv.delta_dtypes(*input_dtypes(item)):
                plan = StoragePlan(item, Repr.DELTA, dtype)
                try:
                    encode_item(plan, b, f, opts, True, discard, discard, ws)
                except Unexact:
                    continue
                chosen[item.name] = dtype
                break
    return chosen
