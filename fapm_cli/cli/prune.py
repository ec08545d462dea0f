"""``fapm prune``: keep the top (1 - sparsity) of each tensor's task vector, write base + kept."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from fapm_cli.cli.boundary import boundary
from fapm_cli.cli.options import (
    BaseOpt,
    DiskBudgetOpt,
    FinetunedOpt,
    JsonOpt,
    MaxShardOpt,
    OutputOpt,
    OverwriteOpt,
    QuietOpt,
    ThreadsOpt,
)
from fapm_cli.errors import UsageError


# Mirrors of the engine's enums: the engine imports torch, and `fapm --help` must not.
class MethodChoice(StrEnum):
    fapm = "fapm"
    magnitude = "magnitude"
    ratio = "ratio"
    random = "random"


class FinetunedOnlyChoice(StrEnum):
    error = "error"
    copy = "copy"


class BaseOnlyChoice(StrEnum):
    error = "error"
    keep = "keep"


class FilesFromChoice(StrEnum):
    finetuned = "finetuned"
    base = "base"
    none = "none"


EPILOG = """\
Examples:

\b
  fapm prune -b ./llama-base -f ./llama-sft -s 0.9 -o ./llama-fapm
  fapm prune -b base/ -f sft/ -s 0.95 --keep-base '*embed_tokens*' \\
      --keep-base '*norm*' -o out/
  fapm prune -b base/ -f sft/ -m random --seed 1 -o out/ --json | jq .totals

\b
Exit codes: 0 ok, 2 usage, 3 bad input, 4 base/finetuned mismatch,
5 output problem, 6 resources (disk full), 130 interrupted. See docs/errors.md.
"""


@boundary
def prune(
    base: BaseOpt,
    finetuned: FinetunedOpt,
    output: OutputOpt,
    sparsity: Annotated[
        str,
        typer.Option(
            "--sparsity",
            "-s",
            metavar="S",
            help="Fraction of each tensor's task vector removed, in [0, 1]; 0.9 keeps 10%. "
            "0 gives finetuned back, 1 gives base back.",
        ),
    ] = "0.9",
    method: Annotated[
        MethodChoice,
        typer.Option(
            "--method",
            "-m",
            help="Ranking: fapm (|tau| - lam*mean|base|*|tau|/|base|), magnitude (|tau|), "
            "ratio (-|tau|/|base|), or random (DARE: keep with probability 1-S, rescale).",
        ),
    ] = MethodChoice.fapm,
    lam: Annotated[
        float,
        typer.Option(
            "--lam", min=0.0, help="Weight of the relative-change penalty in the fapm score."
        ),
    ] = 1.0,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of --method random (reproducible).")
    ] = 0,
    keep_base: Annotated[
        list[str] | None,
        typer.Option(
            "--keep-base",
            metavar="GLOB",
            help="Tensors whose name matches this glob keep their base value (task vector "
            "dropped). Repeatable.",
            show_default=False,
        ),
    ] = None,
    keep_finetuned: Annotated[
        list[str] | None,
        typer.Option(
            "--keep-finetuned",
            metavar="GLOB",
            help="Tensors whose name matches this glob keep their whole task vector (finetuned "
            "value). Repeatable.",
            show_default=False,
        ),
    ] = None,
    on_finetuned_only: Annotated[
        FinetunedOnlyChoice,
        typer.Option(
            "--on-finetuned-only",
            help="Tensors only in finetuned: error, or copy them as they are.",
        ),
    ] = FinetunedOnlyChoice.error,
    on_base_only: Annotated[
        BaseOnlyChoice,
        typer.Option(
            "--on-base-only", help="Tensors only in base: error, or keep their base value."
        ),
    ] = BaseOnlyChoice.error,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="Output dtype of float tensors: float32, bfloat16, float16, float64. "
            "[default: finetuned's]",
            show_default=False,
        ),
    ] = None,
    max_shard_size: MaxShardOpt = "5GB",
    files_from: Annotated[
        FilesFromChoice,
        typer.Option(
            "--files-from",
            help="Where config, tokenizer and other non-weight files are copied from.",
        ),
    ] = FilesFromChoice.finetuned,
    disk_budget: DiskBudgetOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Prune a fine-tune's task vector with FAPM and write base + kept updates.

    Per tensor, scores every entry of tau = finetuned - base, keeps exactly
    floor(numel * (1 - S)) entries with the highest scores (ties: lowest index first), and
    writes finetuned's value there and base's value elsewhere.
    """
    from fapm_cli import engine, report, scoring
    from fapm_cli.header import parse_dtype
    from fapm_cli.writer import parse_size

    try:
        frac = scoring.parse_sparsity(sparsity)
        shard_bytes = parse_size(max_shard_size)
        budget_bytes = parse_size(disk_budget) if disk_budget is not None else None
        out_dtype = parse_dtype(dtype) if dtype else None
        if lam == float("inf"):  # typer's min=0 refuses negatives and NaN, not infinity
            raise ValueError("--lam inf is not a finite number")
    except ValueError as err:
        raise UsageError(str(err), hint="see fapm prune --help") from err
    if threads:
        import torch

        torch.set_num_threads(threads)
    opts = engine.PruneOptions(
        method=scoring.Method(method.value),
        sparsity=frac,
        lam=lam,
        seed=seed,
        keep_base=tuple(keep_base or ()),
        keep_finetuned=tuple(keep_finetuned or ()),
        on_finetuned_only=engine.OnFinetunedOnly(on_finetuned_only.value),
        on_base_only=engine.OnBaseOnly(on_base_only.value),
        dtype=out_dtype,
    )
    result = engine.prune(
        base,
        finetuned,
        output,
        opts,
        max_shard_size=shard_bytes,
        files_from=engine.FilesFrom(files_from.value),
        overwrite=overwrite,
        disk_budget=budget_bytes,
        progress=report.BarProgress(enabled=not quiet and not json_out),
    )
    for w in result.warnings:
        if not quiet:
            report.warn(w)
    if json_out:
        report.emit_json(report.prune_json(result))
    elif not quiet:
        report.print_prune(result)
