"""``fapm score``: the forgetting report of a fine-tune against its base; writes no model.

Tensors are paired by ``plan.plan_prune`` with default options, so the inputs ``prune`` would
refuse are refused here too, before any tensor data is read; then every float pair goes through
the one loop (``reader.stream``: read-ahead, shards released after their last use) and
``compute.score``. ``--save-scores`` writes the FAPM scores through ``output.Output``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from fapm_cli.compute.score import score_sweep
from fapm_cli.compute.scoring import workspace
from fapm_cli.io.header import DTYPES, PlannedTensor
from fapm_cli.io.output import Output
from fapm_cli.names import layer_of, module_of
from fapm_cli.plan import (
    SCORES_KIND,
    Action,
    NoProgress,
    Progress,
    PruneOptions,
    order_for_disk,
    plan_prune,
    provenance,
)
from fapm_cli.records import ForgettingReport, TensorScore
from fapm_cli.verbs.inputs import Inputs
from fapm_cli.verbs.prune import Pair


def score(
    base_source: str | None,
    finetuned_source: str,
    sparsity: Fraction,
    lam: float = 1.0,
    **options: Any,
) -> ForgettingReport:
    """Score every float tensor pair of ``finetuned`` against ``base`` at one sparsity (the
    options of ``sweep``)."""
    return sweep(base_source, finetuned_source, [sparsity], lam, **options)[0]


def sweep(
    base_source: str | None,
    finetuned_source: str,
    sparsities: Sequence[Fraction],
    lam: float = 1.0,
    *,
    save_scores: str | None = None,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: Progress | None = None,
    disk_budget: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> list[ForgettingReport]:
    """Score every float tensor pair of ``finetuned`` against ``base``, one report per
    sparsity, in one pass over the inputs (the sparsity-free figures are shared); writes no
    model.

    ``disk_budget``: as in ``verbs.prune.prune``; each Hub shard is deleted once scored."""
    if not sparsities:
        raise ValueError("no sparsity to score at")
    started = time.monotonic()
    progress = progress or NoProgress()
    show = bool(getattr(progress, "enabled", False))
    with Inputs(disk_budget, show) as inputs:
        base = inputs.open_base(base_source, finetuned_source)
        side = inputs.open_finetuned(base, finetuned_source)
        finetuned = side.view
        items = plan_prune(base, finetuned, PruneOptions(sparsity=sparsities[0], lam=lam))
        scored = [i for i in items if i.action is Action.PRUNE]
        skipped = [i.name for i in items if i.action is not Action.PRUNE]
        if inputs.budget is not None:
            scored = order_for_disk(scored, inputs.fetch_costs(), inputs.budget.limit)
        job = None
        if save_scores is not None:
            out = Output(Path(save_scores), max_shard_size, overwrite)
            out.check(inputs.local_paths())
            metadata = provenance(
                SCORES_KIND,
                lam=lam,
                sources={"base": base.source.provenance(), **side.sources()},
            )
            planned = [PlannedTensor(i.name, DTYPES["F32"], i.out.shape) for i in scored]
            job = out.open(planned, metadata, {}, {})
        results: list[list[TensorScore]] = [[] for _ in sparsities]
        try:
            progress.start(sum(i.read_bytes for i in scored), "score")
            pair = Pair(base, finetuned, side.rebuild, inputs.base_rebuild())
            # Inputs go into the loop's reused ring: nothing keeps a view of them past the
            # item (the scores written are fresh tensors), so each region is handed back as
            # soon as its item is scored.
            steps_of = pair.steps(scored, progress.advance, after=_at_once)
            with workspace(device, threads) as ws, steps_of as steps:
                for item, b, f, _ in steps:
                    assert b is not None and f is not None
                    write = None
                    if job is not None:
                        job.writer.begin(item.name)
                        write = job.writer.write
                    if item.resized:  # added tokens: the rows base has are scored
                        f = f.reshape(-1)[: b.numel()]
                    sums = score_sweep(item.name, b, f, sparsities, lam, write, ws)
                    del b, f
                    head = (item.name, item.out.shape, item.out.dtype.name)
                    where = layer_of(item.name), module_of(item.name)
                    for row, one in zip(results, sums, strict=True):
                        row.append(TensorScore(*head, *where, one))
            if job is not None:
                job.finish([])
        except BaseException:
            if job is not None:
                job.abort()
            raise
        finally:
            progress.close()
    seconds = time.monotonic() - started
    return [
        ForgettingReport(
            base.source.provenance(),
            finetuned.source.provenance(),
            sparsity,
            lam,
            rows,
            skipped,
            save_scores,
            seconds,
        )
        for sparsity, rows in zip(sparsities, results, strict=True)
    ]


def _at_once(give_back: Callable[[], None]) -> None:
    give_back()
