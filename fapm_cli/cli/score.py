"""``fapm score``: a forgetting report per tensor, layer and module type; writes no model."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from fapm_cli.cli.boundary import boundary
from fapm_cli.cli.options import (
    BaseOpt,
    DeviceChoice,
    DeviceOpt,
    FinetunedOpt,
    JsonOpt,
    LamOpt,
    OverwriteOpt,
    QuietOpt,
    ThreadsOpt,
    exit_codes,
    quiet_libraries,
    set_threads,
    use_device,
)
from fapm_cli.errors import UsageError


# Mirrors of forgetting's enums: that module imports torch, and `fapm --help` must not.
class SortChoice(StrEnum):
    name = "name"
    layer = "layer"
    numel = "numel"
    mean_abs_tau = "mean_abs_tau"
    mean_abs_base = "mean_abs_base"
    mean_rel_change = "mean_rel_change"
    positive_score_fraction = "positive_score_fraction"
    fapm_sq_norm_kept_fraction = "fapm_sq_norm_kept_fraction"
    magnitude_sq_norm_kept_fraction = "magnitude_sq_norm_kept_fraction"
    mask_jaccard = "mask_jaccard"


class PlotMetricChoice(StrEnum):
    mean_rel_change = "mean_rel_change"
    mean_abs_tau = "mean_abs_tau"
    positive_score_fraction = "positive_score_fraction"
    fapm_sq_norm_kept_fraction = "fapm_sq_norm_kept_fraction"
    mask_jaccard = "mask_jaccard"


class FormatChoice(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


EPILOG = """\
Examples:

\b
  fapm score -b ./llama-base -f ./llama-sft -s 0.9
  fapm score -b base/ -f sft/ --sort mean_rel_change --top 20
  fapm score -b base/ -f sft/ --format csv > scores.csv
  fapm score -b base/ -f sft/ --plot forgetting.html --save-scores ./scores

""" + exit_codes()


@boundary
def score(
    base: BaseOpt,
    finetuned: FinetunedOpt,
    sparsity: Annotated[
        str,
        typer.Option(
            "--sparsity",
            "-s",
            metavar="S",
            help="Sparsity at which the fapm and magnitude masks are compared, in [0, 1].",
        ),
    ] = "0.9",
    lam: LamOpt = 1.0,
    sort: Annotated[
        SortChoice | None,
        typer.Option(
            "--sort",
            help="Order tensor rows by this column (numbers largest first). "
            "[default: order on disk]",
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
        FormatChoice,
        typer.Option("--format", help="Output on stdout: rich tables, one JSON object, or CSV."),
    ] = FormatChoice.table,
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
        PlotMetricChoice,
        typer.Option("--plot-metric", help="The figure shown in the heat map."),
    ] = PlotMetricChoice.mean_rel_change,
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
) -> None:
    """Measure where a fine-tune risks forgetting, and what FAPM and magnitude pruning keep.

    Per tensor: mean |tau|, mean |base|, mean relative change |tau|/|base| (entries where
    base is 0 excluded), share of entries with a positive fapm score, and at sparsity S the
    share of ||tau||^2 kept by fapm and by magnitude pruning and the Jaccard overlap of their
    masks. Roll-ups per layer and per module type. Writes no model.
    """
    from fapm_cli import forgetting, report, scoring

    try:
        frac = scoring.parse_sparsity(sparsity)
    except ValueError as err:
        raise UsageError(str(err), hint="see fapm score --help") from err
    if json_out:  # the flag every command has; same as --format json
        if fmt is FormatChoice.csv:
            raise UsageError("--json and --format csv exclude each other")
        fmt = FormatChoice.json
    if plot is not None:
        forgetting.check_plot_path(plot)  # before the heavy work
    set_threads(threads)
    quiet_libraries(quiet)
    use_device(device)
    result = forgetting.score(
        base,
        finetuned,
        frac,
        lam,
        save_scores=save_scores,
        overwrite=overwrite,
        progress=report.BarProgress(enabled=not quiet and fmt is FormatChoice.table),
    )
    key = forgetting.SortKey(sort.value) if sort is not None else None
    rows = forgetting.sort_tensors(result.tensors, key, top)
    if plot is not None:
        forgetting.write_plot(result, plot, forgetting.PlotMetric(plot_metric.value))
    if fmt is FormatChoice.json:
        report.emit_json(report.score_json(result, rows, key, top, plot))
    elif fmt is FormatChoice.csv:
        typer.echo(forgetting.report_csv(result, rows), nl=False)
    elif not quiet:
        report.print_score(result, rows)
