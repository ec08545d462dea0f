"""``fapm diff``: write the task vector finetuned - base as a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from fapm_cli.cli.boundary import boundary
from fapm_cli.cli.options import (
    AdapterBaseOpt,
    DiskBudgetOpt,
    FinalizeOpt,
    FinetunedOpt,
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
)
from fapm_cli.errors import UsageError

EPILOG = """\
Examples:

\b
  fapm diff -b ./llama-base -f ./llama-sft -o ./sft-tv
  fapm merge -b ./llama-base -t ./sft-tv -o ./sft-again     # = llama-sft, bit for bit
  fapm diff -b base/ -f sft/ --dtype bfloat16 -o tv-small/  # half the size, lossy

""" + exit_codes()


@boundary
def diff(
    finetuned: FinetunedOpt,
    output: OutputOpt,
    base: AdapterBaseOpt = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="Store every delta in this dtype (float32, bfloat16, float16, float64). Lossy: "
            "base + task vector may then differ from finetuned. [default: per tensor the "
            "narrowest exact one, float32 for bf16/fp16/fp32 models]",
            show_default=False,
        ),
    ] = None,
    max_shard_size: MaxShardOpt = "5GB",
    disk_budget: DiskBudgetOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    part: PartOpt = None,
    finalize: FinalizeOpt = False,
) -> None:
    """Write the task vector tau = finetuned - base (same tensor names and shapes).

    By default fapm merge (or prune --task-vector) gives finetuned back bit for bit: each delta
    is stored in the narrowest dtype that is checked to reproduce finetuned exactly, and a
    tensor no float delta can reproduce (negative zeros, huge exponent gaps) is stored as
    finetuned's values, as are integer tensors. See docs/formats.md.
    """
    from fapm_cli.io.header import parse_dtype
    from fapm_cli.report.console import BarProgress, show
    from fapm_cli.report.prune import diff_json, print_diff
    from fapm_cli.verbs.diff import diff as run

    split = parse_part(part, finalize)
    shard_bytes = parse_size_option(max_shard_size, "diff")
    assert shard_bytes is not None
    budget_bytes = parse_size_option(disk_budget, "diff")
    try:
        delta_dtype = parse_dtype(dtype) if dtype else None
    except ValueError as err:
        raise UsageError(str(err), hint="see fapm diff --help") from err
    with quiet_libraries(quiet):
        result = run(
            base,
            finetuned,
            output,
            dtype=delta_dtype,
            max_shard_size=shard_bytes,
            overwrite=overwrite,
            progress=BarProgress(enabled=not quiet and not json_out),
            disk_budget=budget_bytes,
            part=split,
            finalize=finalize,
            threads=default_threads(threads),
        )
    show(
        result.warnings,
        result,
        json_out=json_out,
        quiet=quiet,
        as_json=diff_json,
        as_table=print_diff,
    )
