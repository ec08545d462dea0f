"""``fapm score`` results: tables, the JSON and CSV documented in docs/commands/score.md, and
the layer x module heatmap (HTML, or PNG with matplotlib)."""

from __future__ import annotations

import csv
import html
import io
import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fapm_cli import __version__
from fapm_cli.errors import OutputError, UsageError
from fapm_cli.names import MODULES
from fapm_cli.records import (
    FIGURES,
    ForgettingReport,
    PlotMetric,
    SortKey,
    Sums,
    TensorScore,
    figures,
)
from fapm_cli.report.console import JSON_SCHEMA_VERSION, wide_console

_SCORE_COLUMNS = (
    ("numel", "numel"),
    ("mean_abs_tau", "mean |τ|"),
    ("mean_abs_base", "mean |base|"),
    ("mean_rel_change", "rel change"),
    ("positive_score_fraction", "S>0"),
    ("fapm_sq_norm_kept_fraction", "‖τ‖² fapm"),
    ("magnitude_sq_norm_kept_fraction", "‖τ‖² magnitude"),
    ("mask_jaccard", "Jaccard"),
)


def _figure(name: str, value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if name.endswith(("fraction", "jaccard")):
        return f"{value:.2%}"
    return f"{value:.3g}"


# Narrower than this, the eight figures and a tensor name do not fit one row of a table: each
# row is then stacked (its name, then its figures as "label value" pairs, wrapped).
TABLE_WIDTH = 130


def middle(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters: a tensor name keeps its module path
    head and its parameter tail (``model.layers.1…proj.weight``)."""
    if len(text) <= width:
        return text
    keep = max(width - 1, 2)
    return text[: keep - keep // 2] + "…" + text[len(text) - keep // 2 :]


def print_score(r: ForgettingReport, rows: list[TensorScore]) -> None:
    """Tables per tensor (sorted and cut as asked), per layer, per module type, and the total;
    stacked rows on a terminal too narrow for the table (no line wider than it)."""
    from rich.table import Table

    out = wide_console()
    stacked = out.width < TABLE_WIDTH

    def stack(title: str, head: str, entries: list[tuple[str, Sums]]) -> None:
        out.print(title, style="bold", overflow="ellipsis", no_wrap=True)
        for key, s in entries:
            label = key if head in ("", "tensor") else f"{head} {key}"
            out.print(middle(label, out.width), no_wrap=True, overflow="ellipsis")
            # A no-break space inside each "label value" pair: lines break between pairs only.
            pairs = [f"{lab} {_figure(n, getattr(s, n))}".replace(" ", "\u00a0")
                     for n, lab in _SCORE_COLUMNS]  # fmt: skip
            tokens = [f"{pair}\u00a0·" for pair in pairs[:-1]] + pairs[-1:]
            for line in textwrap.wrap("  ".join(tokens), out.width - 2):
                out.print("  " + line.replace("\u00a0", " "), no_wrap=True, overflow="ellipsis")
        out.print()

    def table(title: str, head: str, entries: list[tuple[str, Sums]]) -> None:
        if stacked:
            stack(title, head, entries)
            return
        t = Table(title=title, title_justify="left")
        t.add_column(head, overflow="fold")
        for _, label in _SCORE_COLUMNS:
            t.add_column(label, justify="right", no_wrap=True)
        for key, s in entries:
            t.add_row(key, *(_figure(n, getattr(s, n)) for n, _ in _SCORE_COLUMNS))
        out.print(t)

    table(f"tensors ({len(rows)} of {len(r.tensors)})", "tensor", [(t.name, t.sums) for t in rows])
    table("per layer", "layer", [("-" if k is None else str(k), s) for k, s in r.by_layer()])
    table("per module type", "module", r.by_module())
    table(f"total (sparsity {float(r.sparsity):g}, lam {r.lam:g})", "", [("all", r.total)])
    zero = r.total.base_zero
    if zero:
        out.print(f"rel change excludes the {zero:,} entries where base == 0 (undefined there)")


def score_json(
    r: ForgettingReport,
    rows: list[TensorScore],
    sort: SortKey | None,
    top: int | None,
    plot: str | None,
) -> dict[str, Any]:
    """The documented object of ``fapm score --format json`` (docs/commands/score.md)."""
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "score",
        "fapm_version": __version__,
        **report_json(r, rows, sort, top),
        "plot": plot,
    }


def sweep_json(
    reports: Sequence[ForgettingReport],
    rows: Sequence[list[TensorScore]],
    sort: SortKey | None,
    top: int | None,
) -> dict[str, Any]:
    """``fapm score --sparsity A,B,... --format json``: the single run's report object for
    each sparsity, in the order given, under ``sweep`` (docs/commands/score.md)."""
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "score",
        "fapm_version": __version__,
        "sparsities": [float(r.sparsity) for r in reports],
        "sweep": [report_json(r, t, sort, top) for r, t in zip(reports, rows, strict=True)],
        "plot": None,
    }


def sweep_csv(reports: Sequence[ForgettingReport], rows: Sequence[list[TensorScore]]) -> str:
    """The single run's CSV for each sparsity, one table, with a first column ``sparsity``."""
    out = []
    for i, (r, t) in enumerate(zip(reports, rows, strict=True)):
        lines = report_csv(r, t).splitlines(keepends=True)
        out += [f"sparsity,{lines[0]}"] if i == 0 else []
        out += [f"{float(r.sparsity)!r},{line}" for line in lines[1:]]
    return "".join(out)


def print_sweep(reports: Sequence[ForgettingReport]) -> None:
    """One row per sparsity: what each mask keeps of ||tau||^2 and how much they agree; the
    sparsity-free figures once."""
    from rich.table import Table

    out = wide_console()
    total = reports[0].total
    pairs = [(n, lab) for n, lab in _SCORE_COLUMNS if n in _SWEEP_COLUMNS]
    title = f"sparsity sweep (lam {reports[0].lam:g}; {len(reports[0].tensors)} tensors)"
    if out.width < 70:  # stacked, as print_score does on a narrow terminal
        out.print(title, style="bold", overflow="ellipsis", no_wrap=True)
        for r in reports:
            figs = " · ".join(f"{lab} {_figure(n, getattr(r.total, n))}" for n, lab in pairs)
            out.print(f"s {float(r.sparsity):g}: {figs}", overflow="fold")
    else:
        t = Table(title=title, title_justify="left")
        t.add_column("sparsity", justify="right")
        for _, label in pairs:
            t.add_column(label, justify="right", no_wrap=True)
        for r in reports:
            t.add_row(
                f"{float(r.sparsity):g}", *(_figure(n, getattr(r.total, n)) for n, _ in pairs)
            )
        out.print(t)
    shared = [(n, lab) for n, lab in _SCORE_COLUMNS if n not in _SWEEP_COLUMNS]
    out.print(" · ".join(f"{lab} {_figure(n, getattr(total, n))}" for n, lab in shared))
    out.print("per tensor, layer and module at each sparsity: --format json or --format csv")


# The figures that depend on the sparsity (the rest are the same in every report of a sweep).
_SWEEP_COLUMNS = ("fapm_sq_norm_kept_fraction", "magnitude_sq_norm_kept_fraction", "mask_jaccard")


def report_json(
    r: ForgettingReport, rows: Sequence[TensorScore], sort: SortKey | None, top: int | None
) -> dict[str, object]:
    return {
        "base": r.base,
        "finetuned": r.finetuned,
        "sparsity": float(r.sparsity),
        "lam": r.lam,
        "sort": sort.value if sort else None,
        "top": top,
        "total": figures(r.total),
        "tensors": [
            figures(t.sums, {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                             "layer": t.layer, "module": t.module})
            for t in rows
        ],
        "layers": [figures(s, {"layer": k}) for k, s in r.by_layer()],
        "modules": [figures(s, {"module": k}) for k, s in r.by_module()],
        "cells": [
            figures(s, {"layer": k[0], "module": k[1]})
            for k, s in sorted(r.grid().items(), key=lambda kv: _cell_order(kv[0]))
        ],
        "skipped": r.skipped,
        "scores_output": r.scores_output,
        "seconds": round(r.seconds, 3),
    }  # fmt: skip


def _cell_order(key: tuple[int | None, str]) -> tuple[bool, int, int]:
    return (key[0] is None, key[0] or 0, MODULES.index(key[1]))


CSV_COLUMNS = ("level", "name", "shape", "dtype", "layer", "module", *FIGURES)


def report_csv(r: ForgettingReport, rows: Sequence[TensorScore]) -> str:
    """One table: a row per tensor, then per layer, per module type, and the total.

    ``level`` says which (tensor, layer, module, total); undefined figures are empty cells.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def put(
        level: str, name: str, shape: str, dtype: str, layer: str, module: str, s: Sums
    ) -> None:
        w.writerow(
            [level, name, shape, dtype, layer, module, *(_cell(v) for v in figures(s).values())]
        )

    for t in rows:
        shape = "x".join(map(str, t.shape))
        put("tensor", t.name, shape, t.dtype, _text(t.layer), t.module, t.sums)
    for layer, s in r.by_layer():
        put("layer", _text(layer) or "none", "", "", _text(layer), "", s)
    for module, s in r.by_module():
        put("module", module, "", "", "", module, s)
    put("total", "all", "", "", "", "", r.total)
    return buf.getvalue()


def _text(v: int | None) -> str:
    return "" if v is None else str(v)


def _cell(v: float | int | None) -> str:
    if v is None:
        return ""
    return str(v) if isinstance(v, int) else repr(float(v))


def check_plot_path(path: str, overwrite: bool = False) -> str:
    """The plot kind for ``path`` ("png" or "html"), checked before any heavy work. An existing
    file is replaced only with ``overwrite``, as every file fapm writes."""
    target = Path(path)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(f"{path}: already exists", hint="pass --overwrite to replace it")
    if target.is_dir():
        raise OutputError(f"{path}: is a directory", hint="name the plot file, e.g. plot.html")
    suffix = target.suffix.lower()
    if suffix in (".html", ".htm"):
        return "html"
    if suffix == ".png":
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(
                f"--plot {path}: PNG output needs matplotlib, which is not installed",
                hint="pip install 'fapm[plot]', or write an HTML plot: --plot report.html",
            )
        return "png"
    raise UsageError(
        f"--plot {path}: unknown plot type {suffix or '(no suffix)'!r}",
        hint="name the file .png (needs the plot extra) or .html (self-contained)",
    )


def heatmap(
    r: ForgettingReport, metric: PlotMetric
) -> tuple[list[int | None], list[str], list[list[float | None]]]:
    """Rows (layers, None last), columns (module types present) and cell values."""
    grid = r.grid()
    layers = sorted({k[0] for k in grid}, key=lambda x: (x is None, x or 0))
    modules = [m for m in MODULES if any(k[1] == m for k in grid)]
    values = [
        [getattr(grid[(la, m)], metric.value) if (la, m) in grid else None for m in modules]
        for la in layers
    ]
    return layers, modules, values


def write_plot(r: ForgettingReport, path: str, metric: PlotMetric, overwrite: bool = False) -> None:
    """Write the plot through a temporary sibling renamed into place: complete or absent."""
    kind = check_plot_path(path, overwrite)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.fapm-tmp-{os.getpid()}{target.suffix}")
    try:
        if kind == "png":
            _write_png(r, tmp, metric)
        else:
            tmp.write_text(render_html(r, metric), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        raise OutputError(f"{path}: cannot write the plot ({err.strerror})") from err
    finally:
        tmp.unlink(missing_ok=True)


def _write_png(r: ForgettingReport, path: Path, metric: PlotMetric) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    layers, modules, values = heatmap(r, metric)
    data = [[math.nan if v is None else v for v in row] for row in values]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(modules), 1.5 + 0.28 * len(layers)))
    try:
        im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [_layer_label(x) for x in layers])
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        ax.set_title(f"{metric.value} (sparsity {float(r.sparsity):g})", fontsize=10)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _layer_label(layer: int | None) -> str:
    return "no layer" if layer is None else str(layer)


# Viridis at five stops: enough for a readable, colour-blind-safe scale in plain SVG.
_STOPS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _colour(x: float) -> str:
    x = min(max(x, 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(x), len(_STOPS) - 2)
    t = x - i
    rgb = (round(a + (b - a) * t) for a, b in zip(_STOPS[i], _STOPS[i + 1], strict=True))
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def render_html(r: ForgettingReport, metric: PlotMetric) -> str:
    """One self-contained page: an SVG heat map of layer x module and the roll-up tables."""
    layers, modules, values = heatmap(r, metric)
    known = [v for row in values for v in row if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    cw, ch, left, top = 78, 18, 70, 40
    width, height = left + cw * len(modules) + 10, top + ch * len(layers) + 50
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for j, m in enumerate(modules):
        x = left + j * cw + cw / 2
        parts.append(f'<text x="{x}" y="{top - 8}" text-anchor="middle">{html.escape(m)}</text>')
    for i, layer in enumerate(layers):
        y = top + i * ch
        parts.append(
            f'<text x="{left - 6}" y="{y + ch * 0.7}" text-anchor="end">'
            f"{html.escape(_layer_label(layer))}</text>"
        )
        for j, v in enumerate(values[i]):
            x = left + j * cw
            fill = "#eeeeee" if v is None else _colour((v - lo) / (hi - lo) if hi > lo else 0.5)
            tip = f"layer {_layer_label(layer)}, {modules[j]}: {metric.value} = {_fmt(v)}"
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{fill}">'
                f"<title>{html.escape(tip)}</title></rect>"
            )
    y = top + ch * len(layers) + 16
    for k in range(5):
        x = left + k * 40
        parts.append(f'<rect x="{x}" y="{y}" width="40" height="10" fill="{_colour(k / 4)}"/>')
    parts.append(f'<text x="{left}" y="{y + 24}">{_fmt(lo)}</text>')
    parts.append(f'<text x="{left + 200}" y="{y + 24}" text-anchor="end">{_fmt(hi)}</text>')
    parts.append("</svg>")

    def table(title: str, head: str, rows: Iterable[tuple[str, Sums]]) -> str:
        cols = "".join(f"<th>{c}</th>" for c in (head, *FIGURES))
        body = "".join(
            "<tr><td>" + html.escape(k) + "</td>"
            + "".join(f"<td>{_fmt(v)}</td>" for v in figures(s).values()) + "</tr>"
            for k, s in rows
        )  # fmt: skip
        return f"<h2>{title}</h2><table><tr>{cols}</tr>{body}</table>"

    total = r.total
    title = f"fapm score: {html.escape(r.finetuned)} vs {html.escape(r.base)}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}"
        "</style></head><body>"
        f"<h1>{title}</h1>"
        f"<p>sparsity {float(r.sparsity):g}, lam {r.lam:g}; heat map of "
        f"<b>{metric.value}</b> per layer and module type (grey: no such tensors). "
        f"Total: {len(r.tensors)} tensors, {total.numel:,} entries, mean relative change "
        f"{_fmt(total.mean_rel_change)}, fapm keeps {_fmt(total.fapm_sq_norm_kept_fraction)} "
        "of the squared norm of the task vector, magnitude "
        f"{_fmt(total.magnitude_sq_norm_kept_fraction)}.</p>"
        + "".join(parts)
        + table("Per layer", "layer", ((_layer_label(k), s) for k, s in r.by_layer()))
        + table("Per module type", "module", r.by_module())
        + "</body></html>\n"
    )
