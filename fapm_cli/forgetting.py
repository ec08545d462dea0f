"""The forgetting report behind ``fapm score``: where a fine-tune moved, and what pruning keeps.

Per tensor pair (float tensors present in both checkpoints, as ``prune`` pairs them), streamed one
tensor at a time like ``prune`` (memory is bounded by the largest tensor):

- ``mean_abs_tau``, ``mean_abs_base``: mean |tau| and mean |base| over all entries;
- ``mean_rel_change``: mean of |tau| / |base| over the entries where base != 0 (those where
  base == 0 are excluded and counted in ``base_zero``; the ratio is undefined there);
- ``positive_score_fraction``: share of entries whose FAPM score S is > 0, i.e. whose absolute
  update outweighs the forgetting penalty (S = -inf where base == 0, so those never count);
- at the given sparsity, the share of ||tau||^2 kept by the fapm mask and by the magnitude mask,
  and the Jaccard overlap of the two masks. The masks come from ``engine.iter_keep_masks``, so
  they are exactly the ones ``prune`` would apply.

Every figure is a ratio of sums kept in ``Sums``, so the roll-ups per layer, per module type and
per (layer, module) cell are exact, not averages of averages. Sums are accumulated in float64;
element-wise math is in the compute dtype (float32, float64 for float64 inputs), as in ``prune``.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import torch

from fapm_cli import engine, scoring
from fapm_cli.errors import OutputError, UsageError
from fapm_cli.header import DTYPES, PlannedTensor
from fapm_cli.reader import Checkpoint, TensorReader
from fapm_cli.scoring import Method

K = TypeVar("K")

# -- names -> layer and module type -------------------------------------------------------------

MODULES = ("embeddings", "q", "k", "v", "qkv", "o", "mlp", "norms", "lm_head", "other")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
# Checked in this order: a norm inside an attention block is a norm, "o_proj" is not "q".
_MODULE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norms", re.compile(r"norm|(?:^|\.)ln_?\w*\.")),
    ("embeddings", re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.")),
    ("lm_head", re.compile(r"lm_head|(?:^|\.)output\.weight$")),
    ("qkv", re.compile(r"qkv|query_key_value|c_attn|(?:^|\.)w_pack\.")),
    ("q", re.compile(r"(?:^|\.)(?:q_proj|q|query|wq)\.")),
    ("k", re.compile(r"(?:^|\.)(?:k_proj|k|key|wk)\.")),
    ("v", re.compile(r"(?:^|\.)(?:v_proj|v|value|wv)\.")),
    (
        "o",
        re.compile(
            r"^(?!.*(?:mlp|feed_forward|ffn))"  # GPT-2's mlp.c_proj is an MLP weight
            r".*(?:(?:^|\.)(?:o_proj|out_proj|o|wo|c_proj)\.|(?:attn|attention)\.dense\.)"
        ),
    ),
    ("mlp", re.compile(r"mlp|feed_forward|ffn|experts|gate_proj|up_proj|down_proj|fc\d|w[123]\.")),
)


def layer_of(name: str) -> int | None:
    """The block index in ``...layers.N...`` (also ``h.N``, ``blocks.N``, ``layer.N``)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """One of ``MODULES``, from the tensor name (Llama, Mistral, Qwen, GPT-2, NeoX spellings)."""
    low = name.lower()
    for module, pattern in _MODULE_RULES:
        if pattern.search(low):
            return module
    return "other"


# -- figures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sums:
    """Additive totals over a set of entries; every reported figure is a ratio of two of these."""

    numel: int = 0
    abs_tau: float = 0.0  # sum |tau|
    abs_base: float = 0.0  # sum |base|
    rel: float = 0.0  # sum |tau| / |base| over entries with base != 0
    base_nonzero: int = 0
    positive: int = 0  # entries with FAPM score > 0
    sq: float = 0.0  # sum tau^2
    sq_fapm: float = 0.0  # sum tau^2 over the fapm mask
    sq_magnitude: float = 0.0  # sum tau^2 over the magnitude mask
    kept: int = 0  # entries each mask keeps (both keep exactly floor(numel * (1 - s)))
    overlap: int = 0  # entries both masks keep

    def __add__(self, other: Sums) -> Sums:
        return Sums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Sums)))

    @property
    def mean_abs_tau(self) -> float | None:
        return self.abs_tau / self.numel if self.numel else None

    @property
    def mean_abs_base(self) -> float | None:
        return self.abs_base / self.numel if self.numel else None

    @property
    def mean_rel_change(self) -> float | None:
        return self.rel / self.base_nonzero if self.base_nonzero else None

    @property
    def base_zero(self) -> int:
        return self.numel - self.base_nonzero

    @property
    def positive_score_fraction(self) -> float | None:
        return self.positive / self.numel if self.numel else None

    @property
    def fapm_sq_norm_kept_fraction(self) -> float | None:
        return self.sq_fapm / self.sq if self.sq > 0 else None

    @property
    def magnitude_sq_norm_kept_fraction(self) -> float | None:
        return self.sq_magnitude / self.sq if self.sq > 0 else None

    @property
    def mask_jaccard(self) -> float | None:
        union = 2 * self.kept - self.overlap
        return self.overlap / union if union else None


# Columns of every row, in display order; --sort takes one of these names.
FIGURES = (
    "numel",
    "mean_abs_tau",
    "mean_abs_base",
    "mean_rel_change",
    "base_zero",
    "positive_score_fraction",
    "fapm_sq_norm_kept_fraction",
    "magnitude_sq_norm_kept_fraction",
    "mask_jaccard",
    "kept",
)


class SortKey(StrEnum):
    NAME = "name"
    LAYER = "layer"
    NUMEL = "numel"
    MEAN_ABS_TAU = "mean_abs_tau"
    MEAN_ABS_BASE = "mean_abs_base"
    MEAN_REL_CHANGE = "mean_rel_change"
    POSITIVE = "positive_score_fraction"
    FAPM_KEPT = "fapm_sq_norm_kept_fraction"
    MAGNITUDE_KEPT = "magnitude_sq_norm_kept_fraction"
    JACCARD = "mask_jaccard"


class PlotMetric(StrEnum):
    MEAN_REL_CHANGE = "mean_rel_change"
    MEAN_ABS_TAU = "mean_abs_tau"
    POSITIVE = "positive_score_fraction"
    FAPM_KEPT = "fapm_sq_norm_kept_fraction"
    JACCARD = "mask_jaccard"


def figures(s: Sums) -> dict[str, float | int | None]:
    return {name: getattr(s, name) for name in FIGURES}


@dataclass(frozen=True)
class TensorScore:
    name: str
    shape: tuple[int, ...]
    dtype: str
    layer: int | None
    module: str
    sums: Sums


@dataclass(frozen=True)
class ForgettingReport:
    base: str
    finetuned: str
    sparsity: Fraction
    lam: float
    tensors: list[TensorScore]  # in the finetuned checkpoint's on-disk order
    skipped: list[str]  # tensors not scored: integer/bool tensors, copied by prune
    scores_output: str | None
    seconds: float

    @property
    def total(self) -> Sums:
        return sum((t.sums for t in self.tensors), Sums())

    def by_layer(self) -> list[tuple[int | None, Sums]]:
        """Per layer, in layer order; tensors outside any layer last (key None)."""
        groups = _group(self.tensors, lambda t: t.layer)
        return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))

    def by_module(self) -> list[tuple[str, Sums]]:
        groups = _group(self.tensors, lambda t: t.module)
        return [(m, groups[m]) for m in MODULES if m in groups]

    def grid(self) -> dict[tuple[int | None, str], Sums]:
        return _group(self.tensors, lambda t: (t.layer, t.module))


def _group(tensors: Iterable[TensorScore], key: Callable[[TensorScore], K]) -> dict[K, Sums]:
    out: dict[K, Sums] = {}
    for t in tensors:
        k = key(t)
        out[k] = out.get(k, Sums()) + t.sums
    return out


def sort_tensors(
    rows: Sequence[TensorScore], key: SortKey | None, top: int | None
) -> list[TensorScore]:
    """Numbers largest first (undefined values last), names and layers in ascending order."""
    out = list(rows)
    if key is SortKey.NAME:
        out.sort(key=lambda t: t.name)
    elif key is SortKey.LAYER:
        out.sort(key=lambda t: (t.layer is None, t.layer or 0))
    elif key is not None:
        values = {t.name: getattr(t.sums, key.value) for t in out}
        out.sort(key=lambda t: (values[t.name] is None, -(values[t.name] or 0)))
    return out[:top] if top is not None else out


# -- computation ------------------------------------------------------------------------------


def score_tensor(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsity: Fraction,
    lam: float,
    write: Callable[[torch.Tensor], None] | None = None,
) -> Sums:
    """The figures of one tensor pair; ``write`` receives its FAPM scores (float32, in chunks)."""
    b = base.reshape(-1)
    f = finetuned.reshape(-1)
    n = b.numel()
    cdt = scoring.compute_dtype(b.dtype, f.dtype)
    f64 = torch.float64
    # The same coefficient the engine uses, so "S > 0" agrees with the scores prune ranks.
    coef = torch.tensor(lam, dtype=cdt) * torch.tensor(scoring.mean_abs(b, cdt), dtype=cdt)
    fapm_opts = engine.PruneOptions(method=Method.FAPM, sparsity=sparsity, lam=lam)
    magnitude_opts = engine.PruneOptions(method=Method.MAGNITUDE, sparsity=sparsity, lam=lam)

    acc = dict.fromkeys(("abs_tau", "abs_base", "rel", "sq", "sq_fapm", "sq_magnitude"), 0.0)
    nonzero = positive = kept = overlap = 0
    fapm_mask = torch.empty(n, dtype=torch.bool)  # (n,) the only full-size extra besides keys
    for start, stop, mask in engine.iter_keep_masks(name, base, finetuned, fapm_opts):
        bc, fc = b[start:stop].to(cdt), f[start:stop].to(cdt)
        tau = fc - bc
        a, ab = tau.abs(), bc.abs()
        nz = bc != 0
        acc["abs_tau"] += float(a.sum(dtype=f64))
        acc["abs_base"] += float(ab.sum(dtype=f64))
        # where() instead of boolean indexing: masked_select costs ~4.5 ns per entry here,
        # arithmetic 0.1-0.3 ns; |tau| / 0 (inf or nan) is replaced by 0 before the sum.
        acc["rel"] += float(torch.where(nz, a / ab, 0.0).sum(dtype=f64))
        nonzero += int(nz.sum())
        s = scoring.score_chunk(Method.FAPM, bc, fc, coef)
        positive += int((s > 0).sum())
        if write is not None:
            write(s.to(torch.float32))
        tau2 = tau * tau
        acc["sq"] += float(tau2.sum(dtype=f64))
        acc["sq_fapm"] += float(torch.where(mask, tau2, 0.0).sum(dtype=f64))
        kept += int(mask.sum())
        fapm_mask[start:stop] = mask
    for start, stop, mask in engine.iter_keep_masks(name, base, finetuned, magnitude_opts):
        tau = f[start:stop].to(cdt) - b[start:stop].to(cdt)
        acc["sq_magnitude"] += float(torch.where(mask, tau * tau, 0.0).sum(dtype=f64))
        overlap += int((mask & fapm_mask[start:stop]).sum())
    return Sums(
        numel=n,
        base_nonzero=nonzero,
        positive=positive,
        kept=kept,
        overlap=overlap,
        **acc,
    )


def score(
    base_source: str,
    finetuned_source: str,
    sparsity: Fraction,
    lam: float = 1.0,
    *,
    save_scores: str | None = None,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: engine.Progress | None = None,
) -> ForgettingReport:
    """Score every float tensor pair of ``finetuned`` against ``base``; writes no model.

    Tensors are paired by ``engine.plan_prune`` with default options, so the inputs ``prune``
    would refuse are refused here too, before any tensor data is read.
    """
    from fapm_cli.reader import open_checkpoint
    from fapm_cli.sources import resolve_source
    from fapm_cli.writer import CheckpointWriter, check_output_path

    started = time.monotonic()
    progress = progress or engine.NoProgress()
    base = open_checkpoint(resolve_source(base_source))
    finetuned = open_checkpoint(resolve_source(finetuned_source))
    items = engine.plan_prune(base, finetuned, engine.PruneOptions(sparsity=sparsity, lam=lam))
    scored = [i for i in items if i.action is engine.Action.PRUNE]
    skipped = [i.name for i in items if i.action is not engine.Action.PRUNE]

    writer = None
    if save_scores is not None:
        out = Path(save_scores)
        check_output_path(out, _local_paths(base, finetuned), overwrite)
        writer = CheckpointWriter(
            out,
            [PlannedTensor(i.name, DTYPES["F32"], i.out.shape) for i in scored],
            max_shard_size=max_shard_size,
            metadata=scores_metadata(lam, base, finetuned),
            overwrite=overwrite,
        )
    results: list[TensorScore] = []
    base_reader, ft_reader = TensorReader(base), TensorReader(finetuned)
    try:
        progress.start(sum(i.read_bytes for i in scored), "score")
        for item in scored:
            b = base_reader.read(item.name)
            f = ft_reader.read(item.name)
            write = None
            if writer is not None:
                writer.begin(item.name)
                write = writer.write
            sums = score_tensor(item.name, b, f, sparsity, lam, write)
            del b, f
            results.append(
                TensorScore(
                    item.name,
                    item.out.shape,
                    item.out.dtype.name,
                    layer_of(item.name),
                    module_of(item.name),
                    sums,
                )
            )
            progress.advance(item.read_bytes)
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        base_reader.close()
        ft_reader.close()
        progress.close()
    return ForgettingReport(
        base.source.provenance(),
        finetuned.source.provenance(),
        sparsity,
        lam,
        results,
        skipped,
        save_scores,
        time.monotonic() - started,
    )


def scores_metadata(lam: float, base: Checkpoint, finetuned: Checkpoint) -> dict[str, str]:
    """Provenance of a ``--save-scores`` checkpoint (scores do not depend on the sparsity)."""
    from fapm_cli import __version__

    return {
        "format": "pt",
        "fapm.version": __version__,
        "fapm.kind": "scores",
        "fapm.method": Method.FAPM.value,
        "fapm.lam": repr(lam),
        "fapm.base": base.source.provenance(),
        "fapm.finetuned": finetuned.source.provenance(),
    }


def _local_paths(*checkpoints: Checkpoint) -> list[Path]:
    return [Path(p) for c in checkpoints if (p := getattr(c.source, "path", None)) is not None]


# -- JSON and CSV (schemas documented in docs/commands/score.md) ------------------------------


def _row(s: Sums) -> dict[str, float | int | None]:
    return figures(s)


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
        "total": _row(r.total),
        "tensors": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "layer": t.layer,
             "module": t.module, **_row(t.sums)}
            for t in rows
        ],
        "layers": [{"layer": k, **_row(s)} for k, s in r.by_layer()],
        "modules": [{"module": k, **_row(s)} for k, s in r.by_module()],
        "cells": [
            {"layer": k[0], "module": k[1], **_row(s)}
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


# -- plots --------------------------------------------------------------------------------------


def check_plot_path(path: str) -> str:
    """The plot kind for ``path`` ("png" or "html"), checked before any heavy work."""
    suffix = Path(path).suffix.lower()
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


def write_plot(r: ForgettingReport, path: str, metric: PlotMetric) -> None:
    kind = check_plot_path(path)
    try:
        if kind == "png":
            _write_png(r, Path(path), metric)
        else:
            Path(path).write_text(render_html(r, metric), encoding="utf-8")
    except OSError as err:
        raise OutputError(f"{path}: cannot write the plot ({err.strerror})") from err


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
