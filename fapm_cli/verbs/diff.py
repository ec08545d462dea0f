"""``fapm diff``: the dense task vector ``finetuned - base``, exact by default.

The same reader, loop and task-vector writer as ``prune --save task-vector`` (``verbs.prune``),
with nothing pruned: every entry is kept.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from fapm_cli.compute.scoring import workspace
from fapm_cli.io.header import DType
from fapm_cli.io.output import Output
from fapm_cli.io.parts import Part
from fapm_cli.plan import (
    TASK_VECTOR_KIND,
    Format,
    NoProgress,
    Progress,
    PruneOptions,
    Repr,
    order_for_disk,
    plan_prune,
    provenance,
)
from fapm_cli.records import DiffReport
from fapm_cli.verbs.inputs import Inputs
from fapm_cli.verbs.prune import Pair, unchanged_warning, write_task_vector


def diff(
    base_source: str | None,
    finetuned_source: str,
    output: str,
    *,
    dtype: DType | None = None,
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    progress: Progress | None = None,
    disk_budget: int | None = None,
    part: Part | None = None,
    finalize: bool = False,
    threads: int | None = None,
) -> DiffReport:
    """Write the task vector ``finetuned - base`` (dense) to ``output``.

    ``dtype`` None: per tensor the narrowest exact delta dtype (see ``compute.encode``); a
    dtype stores every delta in it, which is lossy unless it happens to be exact.
    ``disk_budget``, ``part`` and ``finalize`` as in ``verbs.prune.prune``.
    """
    out = Output(Path(output), max_shard_size, overwrite, part, finalize)
    started = time.monotonic()
    progress = progress or NoProgress()
    show = bool(getattr(progress, "enabled", False))
    with Inputs(disk_budget, show) as inputs:
        base = inputs.open_base(base_source, finetuned_source)
        side = inputs.open_finetuned(base, finetuned_source)
        finetuned = side.view
        items = plan_prune(base, finetuned, PruneOptions())
        if inputs.budget is not None:
            items = order_for_disk(items, inputs.fetch_costs(), inputs.budget.limit)
        out.check(inputs.local_paths())
        out = replace(out, identity=inputs.identity())
        metadata = provenance(
            TASK_VECTOR_KIND,
            sources={"base": base.source.provenance(), **side.sources()},
        )
        with workspace("cpu", threads) as ws:
            pair = Pair(base, finetuned, side.rebuild, inputs.base_rebuild())
            written = write_task_vector(
                pair, items, None, Format.DENSE, dtype, metadata, out, ws, progress
            )
    warnings = []
    deltas = [t for t in written.stored if t.repr is Repr.DELTA]
    if deltas and not any(t.kept for t in deltas):
        warnings.append(unchanged_warning())
    if dtype is not None:
        warnings.append(
            f"--dtype {dtype.name.lower()}: deltas are rounded, so base + task vector may differ "
            "from finetuned (the default dtype is exact)"
        )
    return DiffReport(
        str(out.target),
        base.source.provenance(),
        finetuned.source.provenance(),
        written.stored,
        written.shards,
        dtype is None,
        written.passes,
        time.monotonic() - started,
        warnings,
    )
