"""``fapm prune``: keep the top (1 - sparsity) of each tensor's task vector, write base + kept."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from fapm_cli.cli.boundary import boundary
from fapm_cli.cli.options import (
    BaseOpt,
    DeviceChoice,
    DeviceOpt,
    DiskBudgetOpt,
    JsonOpt,
    LamOpt,
    MaxShardOpt,
    MethodChoice,
    OutputOpt,
    OverwriteOpt,
    QuietOpt,
    ThreadsOpt,
    exit_codes,
    quiet_libraries,
    set_threads,
    use_device,
)
from fapm_cli.errors import UsageError


# Mirrors of the engine's enums: the engine imports torch, and `fapm --help` must not.
class FinetunedOnlyChoice(StrEnum):
    error = "error"
    copy = "copy"


class BaseOnlyChoice(StrEnum):
    error = "error"
    keep = "keep"


class SaveChoice(StrEnum):
    model = "model"
    task_vector = "task-vector"


class FormatChoice(StrEnum):
    dense = "dense"
    compact = "compact"


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
  fapm prune -b base/ -t tv/ -s 0.9 -o out/          # task vector from fapm diff
  fapm prune -b base/ -f sft/ --save task-vector --format compact -o tv-0.9/

""" + exit_codes()


@boundary
def prune(
    base: BaseOpt,
    output: OutputOpt,
    finetuned: Annotated[
        str | None,
        typer.Option(
            "--finetuned",
            "-f",
            metavar="SOURCE",
            help="Fine-tuned checkpoint of the same architecture (same forms as --base). "
            "Give this or --task-vector.",
            show_default=False,
        ),
    ] = None,
    task_vector: Annotated[
        str | None,
        typer.Option(
            "--task-vector",
            "-t",
            metavar="SOURCE",
            help="A task vector (fapm diff, or prune --save task-vector) in place of "
            "--finetuned: finetuned is rebuilt from base + task vector, bit for bit.",
            show_default=False,
        ),
    ] = None,
    save: Annotated[
        SaveChoice,
        typer.Option(
            "--save",
            help="Write the merged model, or the pruned task vector (base + it = the model).",
        ),
    ] = SaveChoice.model,
    fmt: Annotated[
        FormatChoice,
        typer.Option(
            "--format",
            help="With --save task-vector: dense (same names and shapes, exact deltas) or "
            "compact (kept values + bitmask or indices; ranked methods only). See "
            "docs/formats.md.",
        ),
    ] = FormatChoice.dense,
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
    lam: LamOpt = 1.0,
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
    device: DeviceOpt = DeviceChoice.cpu,
    part: Annotated[
        str | None,
        typer.Option(
            "--part",
            metavar="I/N",
            help="Write only part I of N (by output shard) into DIR.fapm-parts/, so N jobs "
            "can share one prune; then run the same command with --finalize instead. See "
            "docs/scale.md.",
            show_default=False,
        ),
    ] = None,
    finalize: Annotated[
        bool,
        typer.Option(
            "--finalize",
            help="Join the parts written by --part runs with these arguments: check them, "
            "write the index and config files, move the result to --output.",
        ),
    ] = False,
) -> None:
    """Prune a fine-tune's task vector with FAPM and write base + kept updates.

    Per tensor, scores every entry of tau = finetuned - base, keeps exactly
    floor(numel * (1 - S)) entries with the highest scores (ties: lowest index first), and
    writes finetuned's value there and base's value elsewhere. --task-vector reads tau from
    a task vector instead of a fine-tune; --save task-vector writes the pruned tau instead of
    the model.
    """
    from fapm_cli import engine, merging, report, scoring
    from fapm_cli.header import parse_dtype
    from fapm_cli.taskvector import Format
    from fapm_cli.writer import parse_size

    if (finetuned is None) == (task_vector is None):
        raise UsageError(
            "give exactly one of --finetuned and --task-vector", hint="see fapm prune --help"
        )
    extended = task_vector is not None or save is not SaveChoice.model
    if fmt is FormatChoice.compact and save is SaveChoice.model:
        raise UsageError("--format compact needs --save task-vector", hint="see fapm prune --help")
    if part is not None and finalize:
        raise UsageError(
            "--part and --finalize go in separate runs",
            hint="run each --part I/N, then the same command with --finalize and no --part",
        )
    if extended and (part is not None or finalize):
        raise UsageError(
            "--part and --finalize work with --finetuned and --save model only",
            hint="run the whole prune in one job, or save the model and diff it afterwards",
        )
    if extended and disk_budget is not None:
        raise UsageError(
            "--disk-budget works with --finetuned and --save model only",
            hint="download the checkpoints first, or drop --disk-budget",
        )

    from fapm_cli.parts import Part

    split = Part.parse(part) if part is not None else None
    try:
        frac = scoring.parse_sparsity(sparsity)
        shard_bytes = parse_size(max_shard_size)
        budget_bytes = parse_size(disk_budget) if disk_budget is not None else None
        out_dtype = parse_dtype(dtype) if dtype else None
    except ValueError as err:
        raise UsageError(str(err), hint="see fapm prune --help") from err
    set_threads(threads)
    quiet_libraries(quiet)
    use_device(device)
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
    progress = report.BarProgress(enabled=not quiet and not json_out)
    if not extended:
        assert finetuned is not None
        result = engine.prune(
            base,
            finetuned,
            output,
            opts,
            max_shard_size=shard_bytes,
            files_from=engine.FilesFrom(files_from.value),
            overwrite=overwrite,
            disk_budget=budget_bytes,
            progress=progress,
            part=split,
            finalize=finalize,
        )
        extra = merging.TVPruneReport(result, merging.Save.MODEL, Format.DENSE, None, [], 1)
    else:
        extra = merging.prune(
            base,
            output,
            opts,
            finetuned_source=finetuned,
            task_vector_source=task_vector,
            save=merging.Save(save.value),
            fmt=Format(fmt.value),
            max_shard_size=shard_bytes,
            files_from=engine.FilesFrom(files_from.value),
            overwrite=overwrite,
            progress=progress,
        )
        result = extra.prune
    report.show(
        result.warnings,
        extra,
        json_out=json_out,
        quiet=quiet,
        as_json=report.prune_tv_json,
        as_table=report.print_prune_tv,
    )
