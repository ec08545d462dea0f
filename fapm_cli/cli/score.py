"""``fapm score``: a forgetting report per tensor, layer and module type; writes no model."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from fapm_cli.cli.boundary import boundary
from fapm_cli.cli.options import (
    AdapterBaseOpt,
    DensityOpt,
    DeviceChoice,
    DeviceOpt,
    DiskBudgetOpt,
    FinetunedOpt,
    JsonOpt,
    LamOpt,
    OverwriteOpt,
    QuietOpt,
    ThreadsOpt,
    default_threads,
    exit_codes,
    parse_size_option,
    quiet_libraries,
    sparsities_of,
    use_device,
)
from fapm_cli.errors import UsageError
from fapm_cli.records import PlotMetric, SortKey


class OutputFormat(StrEnum):
    """What ``fapm score`` prints on stdout (a rendering choice of the CLI alone)."""

    table = "table"
    json = "json"
    csv = "csv"


EPILOG = """\
Examples:

\b
  fapm score -b ./llama-base -f ./llama-sft -s 0.9
  fapm score -b base/ -f sft/ --sort mean_rel_change --top 20
  fapm score -b base/ -f sft/ -s 0.5,0.7,0.8,0.9,0.95,0.99
  fapm score -b base/ -f sft/ --format csv > scores.csv
  fapm score -b base/ -f sft/ --plot forgetting.html --save-scores ./scores

""" + exit_codes()


@boundary
def score(
    finetuned: FinetunedOpt,
    base: AdapterBaseOpt = None,
    sparsity: Annotated[
        str | None,
        typer.Option(
            "--sparsity",
            "-s",
            metavar="S",
            help="Sparsity at which the fapm and magnitude masks are compared, in [0, 1]; "
            "several, comma-separated (0.5,0.7,0.9), in one pass. [default: 0.9]",
            show_default=False,
        ),
    ] = None,
    density: DensityOpt = None,
    lam: LamOpt = 1.0,
    sort: Annotated[
        SortKey | None,
        typer.Option(
            "--sort",
            help="Order tensor rows by this column (numbers largest first). "
            "[default: order on disk; with --top, mean_rel_change: the riskiest first]",
            show_default=False,
        ),
    ] = None,
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            min=1,
            metavar="N",
            help="Show only the first N tensor rows (after --sort); roll-ups cover all.",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        OutputFormat,
        typer.Option("--format", help="Output on stdout: rich tables, one JSON object, or CSV."),
    ] = OutputFormat.table,
    json_out: JsonOpt = False,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Also draw a layer x module heat map: FILE.html (self-contained) or FILE.png "
            "(needs the plot extra: pip install 'fapm[plot]').",
            show_default=False,
        ),
    ] = None,
    plot_metric: Annotated[
        PlotMetric,
        typer.Option("--plot-metric", help="The figure shown in the heat map."),
    ] = PlotMetric.MEAN_REL_CHANGE,
    save_scores: Annotated[
        str | None,
        typer.Option(
            "--save-scores",
            metavar="DIR",
            help="Also write the fapm score of every entry as a float32 checkpoint "
            "(same names and shapes; -inf where base is 0).",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = DeviceChoice.cpu,
    disk_budget: DiskBudgetOpt = None,
) -> None:
    """Measure where a fine-tune risks forgetting, and what FAPM and magnitude pruning keep.

    Per tensor: mean |tau|, mean |base|, mean relative change |tau|/|base| (entries where
    base is 0 excluded), share of entries with a positive fapm score, and at sparsity S the
    share of ||tau||^2 kept by fapm and by magnitude pruning and the Jaccard overlap of their
    masks. Roll-ups per layer and per module type. Writes no model.
    """
    from fapm_cli.records import sort_tensors
    from fapm_cli.report.console import BarProgress, emit_json
    from fapm_cli.report.score import (
        check_plot_path,
        print_score,
        print_sweep,
        report_csv,
        score_json,
        sweep_csv,
        sweep_json,
        write_plot,
    )
    from fapm_cli.verbs.score import sweep

    fracs = sparsities_of(sparsity, density, "score")
    if json_out:  # the flag every command has; same as --format json
        if fmt is OutputFormat.csv:
            raise UsageError("--json and --format csv exclude each other")
        fmt = OutputFormat.json
    if plot is not None:
        if len(fracs) > 1:
            raise UsageError(
                "--plot draws the heat map of one sparsity; this run has several",
                hint="run --plot with one --sparsity",
            )
        check_plot_path(plot, overwrite)  # before the heavy work
    budget_bytes = parse_size_option(disk_budget, "score")
    with quiet_libraries(quiet):
        results = sweep(
            base,
            finetuned,
            fracs,
            lam,
            save_scores=save_scores,
            overwrite=overwrite,
            progress=BarProgress(enabled=not quiet and fmt is OutputFormat.table),
            disk_budget=budget_bytes,
            device=use_device(device),
            threads=default_threads(threads),
        )
    if sort is None and top is not None:
        sort = SortKey.MEAN_REL_CHANGE  # the first N worth showing are the riskiest
    rows = [sort_tensors(r.tensors, sort, top) for r in results]
    if len(results) > 1:  # a sweep: one report per sparsity
        if fmt is OutputFormat.json:
            emit_json(sweep_json(results, rows, sort, top))
        elif fmt is OutputFormat.csv:
            typer.echo(sweep_csv(results, rows), nl=False)
        elif not quiet:
            print_sweep(results)
        return
    result = results[0]
    if plot is not None:
        write_plot(result, plot, plot_metric, overwrite)
    if fmt is OutputFormat.json:
        emit_json(score_json(result, rows[0], sort, top, plot))
    elif fmt is OutputFormat.csv:
        typer.echo(report_csv(result, rows[0]), nl=False)
    elif not quiet:
        print_score(result, rows[0])
