"""``fapm merge``: base + sum of weighted task vectors (or of fine-tunes pruned on the fly)."""

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
from fapm_cli.plan import Method

EPILOG = """\
Examples:

\b
  fapm merge -b base/ -t math-tv/ -t code-tv/ -w 0.7 -w 0.5 -o merged/
  fapm merge -b base/ -f math-sft/ -f code-sft/ -s 0.9 -o merged/
  fapm merge -b base/ -t tv-compact/ -o model/ --json | jq .totals

\b
Weights pair with the inputs in order: every --task-vector first, then every
--finetuned. One --weight applies to all inputs; none means 1 for each.

""" + exit_codes("base/input mismatch")


@boundary
def merge(
    output: OutputOpt,
    base: AdapterBaseOpt = None,
    task_vectors: Annotated[
        list[str] | None,
        typer.Option(
            "--task-vector",
            "-t",
            metavar="SOURCE",
            help="A task vector, dense or compact (fapm diff, fapm prune --save task-vector). "
            "Repeatable.",
            show_default=False,
        ),
    ] = None,
    finetuned: Annotated[
        list[str] | None,
        typer.Option(
            "--finetuned",
            "-f",
            metavar="SOURCE",
            help="A fine-tune of base, pruned on the fly (--method, --sparsity) before it is "
            "added; or a LoRA adapter directory (the model merge_and_unload() gives on base; "
            "the first one may name base). Repeatable.",
            show_default=False,
        ),
    ] = None,
    weights: Annotated[
        list[float] | None,
        typer.Option(
            "--weight",
            "-w",
            metavar="W",
            help="Weight of each input's task vector (see below). [default: 1]",
            show_default=False,
        ),
    ] = None,
    sparsity: Annotated[
        str | None,
        typer.Option(
            "--sparsity",
            "-s",
            metavar="S",
            help="With --finetuned: fraction of each tensor's task vector removed. [default: 0.9]",
            show_default=False,
        ),
    ] = None,
    density: DensityOpt = None,
    method: Annotated[
        Method,
        typer.Option("--method", "-m", help="With --finetuned: how updates are ranked."),
    ] = Method.FAPM,
    lam: Annotated[
        float,
        typer.Option(
            "--lam", min=0.0, metavar="X", help="With --finetuned: fapm's relative-change weight."
        ),
    ] = 1.0,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", min=0, metavar="N", help="With --finetuned --method random: the seed."
        ),
    ] = 0,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="Output dtype of float tensors: float32, bfloat16, float16, float64, "
            "float8_e4m3fn, float8_e5m2. "
            "[default: the first input's model dtype]",
            show_default=False,
        ),
    ] = None,
    max_shard_size: MaxShardOpt = "5GB",
    disk_budget: DiskBudgetOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = DeviceChoice.cpu,
    part: PartOpt = None,
    finalize: FinalizeOpt = False,
) -> None:
    """Write base + sum_i w_i * tau_i in one streaming pass.

    Each tau_i is a task vector (dense or compact) or the FAPM-pruned update of a fine-tune.
    One input of weight 1 is applied exactly (the result is finetuned, or prune's output, bit
    for bit); otherwise the sum is taken in float32 and rounded once. Entries no input touches
    keep base's bytes. Inputs that do not pair with base are refused before any tensor is read.
    """
    from fapm_cli.io.header import parse_dtype
    from fapm_cli.plan import TASK_VECTOR_KIND, PruneOptions
    from fapm_cli.records import MergeInput
    from fapm_cli.report.console import BarProgress, show
    from fapm_cli.report.merge import merge_json, print_merge
    from fapm_cli.verbs.merge import merge as run

    tvs, fts, ws = list(task_vectors or ()), list(finetuned or ()), list(weights or ())
    n = len(tvs) + len(fts)
    if n == 0:
        raise UsageError("give at least one --task-vector or --finetuned", hint="see --help")
    if len(ws) not in (0, 1, n):
        raise UsageError(
            f"{len(ws)} --weight values for {n} inputs",
            hint="give one weight per input (task vectors first), a single weight, or none",
        )
    if (sparsity is not None or density is not None) and not fts:
        raise UsageError(
            "--sparsity applies to --finetuned inputs",  # also said for its alias --density
            hint="a task vector is merged as it is; prune it with fapm prune --task-vector",
        )
    if any(w != w or w in (float("inf"), float("-inf")) for w in ws):
        raise UsageError("--weight must be a finite number")
    split = parse_part(part, finalize)
    frac = sparsity_of(sparsity, density, "merge")
    shard_bytes = parse_size_option(max_shard_size, "merge")
    assert shard_bytes is not None
    budget_bytes = parse_size_option(disk_budget, "merge")
    try:
        out_dtype = parse_dtype(dtype) if dtype else None
    except ValueError as err:
        raise UsageError(str(err), hint="see fapm merge --help") from err
    full = ws * n if len(ws) == 1 else ws or [1.0] * n
    kinds = [TASK_VECTOR_KIND] * len(tvs) + ["finetuned"] * len(fts)
    inputs = [
        MergeInput(kind, source, weight)
        for kind, source, weight in zip(kinds, tvs + fts, full, strict=True)
    ]
    opts = PruneOptions(method=method, sparsity=frac, lam=lam, seed=seed)
    with quiet_libraries(quiet):
        result = run(
            base,
            output,
            inputs,
            opts=opts,
            dtype=out_dtype,
            max_shard_size=shard_bytes,
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
        as_json=merge_json,
        as_table=print_merge,
    )
