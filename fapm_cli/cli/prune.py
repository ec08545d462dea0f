"""``fapm prune``: keep the top (1 - sparsity) of each tensor's task vector, write base + kept."""

from __future__ import annotations

from typing import Annotated

import typer

from fapm_cli.cli.boundary import boundary
from fapm_cli.cli.options import (
    AdapterBaseOpt,
    DensityOpt,
    DeviceChoice,
    DeviceOpt,
    DiskBudgetOpt,
    FinalizeOpt,
    JsonOpt,
    LamOpt,
    MaxShardOpt,
    OutputOpt,
    OverwriteOpt,
    PartOpt,
    QuietOpt,
    ThreadsOpt,
    default_threads,
    exit_codes,
    parse_part,
    parse_size_option,
    quiet_libraries,
    sparsity_of,
    use_device,
)
from fapm_cli.errors import UsageError
from fapm_cli.plan import FilesFrom, Format, Method, OnBaseOnly, OnFinetunedOnly, Save

EPILOG = """\
Examples:

\b
  fapm prune -b ./llama-base -f ./llama-sft -s 0.9 -o ./llama-fapm
  fapm prune -b base/ -f sft/ -s 0.95 --keep-base '*embed_tokens*' \\
      --keep-base '*norm*' -o out/
  fapm prune -b base/ -f sft/ -m random --seed 1 -o out/ --json | jq .totals
  fapm prune -b base/ -t tv/ -s 0.9 -o out/          # task vector from fapm diff
  fapm prune -b base/ -f sft/ --save task-vector --layout compact -o tv-0.9/

""" + exit_codes()


@boundary
def prune(
    output: OutputOpt,
    base: AdapterBaseOpt = None,
    finetuned: Annotated[
        str | None,
        typer.Option(
            "--finetuned",
            "-f",
            metavar="SOURCE",
            help="Fine-tuned checkpoint of the same architecture (same forms as --base), or a "
            "LoRA adapter directory (PEFT's adapter_config.json + adapter_model.safetensors): "
            "the model merge_and_unload() gives on base. Give this or --task-vector.",
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
        Save,
        typer.Option(
            "--save",
            help="Write the merged model, or the pruned task vector (base + it = the model).",
        ),
    ] = Save.MODEL,
    layout: Annotated[
        Format | None,
        typer.Option(
            "--layout",
            help="With --save task-vector: dense (same names and shapes, exact deltas) or "
            "compact (kept values + bitmask or indices; ranked methods only). See "
            "docs/formats.md. [default: dense]",
            show_default=False,
        ),
    ] = None,
    old_format: Annotated[
        Format | None,
        typer.Option("--format", hidden=True, help="The old name of --layout."),
    ] = None,
    sparsity: Annotated[
        str | None,
        typer.Option(
            "--sparsity",
            "-s",
            metavar="S",
            help="Fraction of each tensor's task vector removed, in [0, 1]; 0.9 keeps 10%. "
            "0 gives finetuned back, 1 gives base back. [default: 0.9]",
            show_default=False,
        ),
    ] = None,
    density: DensityOpt = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method",
            "-m",
            help="Ranking: fapm (|tau| - lam*mean|base|*|tau|/|base|), magnitude (|tau|), "
            "ratio (-|tau|/|base|), or random (DARE: keep with probability 1-S, rescale).",
        ),
    ] = Method.FAPM,
    lam: LamOpt = 1.0,
    seed: Annotated[
        int,
        typer.Option("--seed", min=0, metavar="N", help="Seed of --method random (reproducible)."),
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
        OnFinetunedOnly,
        typer.Option(
            "--on-finetuned-only",
            help="Tensors only in finetuned: error, or copy them as they are.",
        ),
    ] = OnFinetunedOnly.ERROR,
    on_base_only: Annotated[
        OnBaseOnly,
        typer.Option(
            "--on-base-only", help="Tensors only in base: error, or keep their base value."
        ),
    ] = OnBaseOnly.ERROR,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="Output dtype of float tensors: float32, bfloat16, float16, float64, "
            "float8_e4m3fn, float8_e5m2. "
            "[default: finetuned's]",
            show_default=False,
        ),
    ] = None,
    max_shard_size: MaxShardOpt = "5GB",
    files_from: Annotated[
        FilesFrom,
        typer.Option(
            "--files-from",
            help="Where config, tokenizer and other non-weight files are copied from.",
        ),
    ] = FilesFrom.FINETUNED,
    disk_budget: DiskBudgetOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = DeviceChoice.cpu,
    part: PartOpt = None,
    finalize: FinalizeOpt = False,
) -> None:
    """Prune a fine-tune's task vector with FAPM and write base + kept updates.

    Per tensor, scores every entry of tau = finetuned - base, keeps exactly
    floor(numel * (1 - S)) entries with the highest scores (ties: lowest index first), and
    writes finetuned's value there and base's value elsewhere. --task-vector reads tau from
    a task vector instead of a fine-tune; --save task-vector writes the pruned tau instead of
    the model.
    """
    from fapm_cli.io.header import parse_dtype
    from fapm_cli.plan import PruneOptions
    from fapm_cli.report.console import BarProgress, show
    from fapm_cli.report.prune import print_prune, prune_json
    from fapm_cli.verbs.prune import check_forms
    from fapm_cli.verbs.prune import prune as run

    fmt = _layout(layout, old_format)
    check_forms(finetuned, task_vector, save, fmt, method)
    split = parse_part(part, finalize)
    frac = sparsity_of(sparsity, density, "prune")
    shard_bytes = parse_size_option(max_shard_size, "prune")
    budget_bytes = parse_size_option(disk_budget, "prune")
    try:
        out_dtype = parse_dtype(dtype) if dtype else None
    except ValueError as err:
        raise UsageError(str(err), hint="see fapm prune --help") from err
    assert shard_bytes is not None
    opts = PruneOptions(
        method=method,
        sparsity=frac,
        lam=lam,
        seed=seed,
        keep_base=tuple(keep_base or ()),
        keep_finetuned=tuple(keep_finetuned or ()),
        on_finetuned_only=on_finetuned_only,
        on_base_only=on_base_only,
        dtype=out_dtype,
    )
    with quiet_libraries(quiet):
        result = run(
            base,
            finetuned,
            output,
            opts,
            task_vector_source=task_vector,
            save=save,
            fmt=fmt,
            max_shard_size=shard_bytes,
            files_from=files_from,
            overwrite=overwrite,
            progress=BarProgress(enabled=not quiet and not json_out),
            disk_budget=budget_bytes,
            part=split,
            finalize=finalize,
            device=use_device(device),
            threads=default_threads(threads),
        )
    show(
        result.warnings,
        result,
        json_out=json_out,
        quiet=quiet,
        as_json=prune_json,
        as_table=print_prune,
    )


def _layout(layout: Format | None, old_format: Format | None) -> Format:
    """``--layout``; ``--format``, its old name (which now only means an output format, in
    ``score``), still works with a warning, so that scripts keep running."""
    if old_format is None:
        return layout or Format.DENSE
    if layout is not None:
        raise UsageError("--format is the old name of --layout: give --layout only")
    from fapm_cli.report.console import warn

    warn("prune --format is now --layout (--format is score's output format)")
    return old_format
