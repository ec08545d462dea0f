"""Rendering results: JSON objects for scripts, tables for people, progress bars on a terminal.

Results go to stdout; progress, warnings and errors go to stderr. Colour and progress bars only
appear on a terminal, and never when ``NO_COLOR`` is set (colour) or ``--quiet`` is given.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:
    from fapm_cli.engine import PruneReport, TensorResult

JSON_SCHEMA_VERSION = 1
T = TypeVar("T")


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def console(stream: TextIO | None = None) -> Any:
    from rich.console import Console

    stream = stream or sys.stdout
    return Console(
        file=stream,
        no_color="NO_COLOR" in os.environ,
        force_terminal=None,
        highlight=False,
        soft_wrap=not is_terminal(stream),
    )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def show(
    warnings: Sequence[str],
    result: T,
    *,
    json_out: bool,
    quiet: bool,
    as_json: Callable[[T], dict[str, Any]],
    as_table: Callable[[T], None],
) -> None:
    """How every command ends: warnings on stderr, then the result on stdout as one JSON
    object (--json) or as tables; --quiet keeps only the JSON."""
    if not quiet:
        for w in warnings:
            warn(w)
    if json_out:
        emit_json(as_json(result))
    elif not quiet:
        as_table(result)


class BarProgress:
    """A tqdm bar by bytes with ETA on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and is_terminal(sys.stderr)
        self._bar: Any = None

    def start(self, total_bytes: int, label: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den else empty


def tensor_json(r: TensorResult) -> dict[str, Any]:
    return {
        "name": r.name,
        "shape": list(r.shape),
        "dtype": r.dtype,
        "action": r.action.value,
        "numel": r.numel,
        "kept": r.kept,
        "kept_fraction": _ratio(r.kept, r.numel, 0.0),
        "sq_norm_kept_fraction": _ratio(r.sq_norm_kept, r.sq_norm, 1.0 if r.kept else 0.0),
    }


def prune_json(report: PruneReport) -> dict[str, Any]:
    from fapm_cli import __version__
    from fapm_cli.engine import summarize

    o = report.options
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "prune",
        "fapm_version": __version__,
        "output": report.output,
        "base": report.base,
        "finetuned": report.finetuned,
        "method": o.method.value,
        "sparsity": float(o.sparsity),
        "lam": o.lam,
        "seed": o.seed,
        "totals": summarize(report.tensors),
        "shards": [{"name": k, **v} for k, v in report.shards.items()],
        "tensors": [tensor_json(r) for r in report.tensors],
        "warnings": report.warnings,
        "seconds": round(report.seconds, 3),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_prune(report: PruneReport) -> None:
    from rich.table import Table

    from fapm_cli.engine import Action, summarize

    totals = summarize(report.tensors)
    counts = {a: sum(1 for r in report.tensors if r.action is a) for a in Action}
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    o = report.options
    table.add_row("output", report.output)
    table.add_row("method", f"{o.method.value}, sparsity {float(o.sparsity):g}"
                  + (f", lam {o.lam:g}" if o.method.value == "fapm" else ""))  # fmt: skip
    table.add_row(
        "tensors",
        f"{counts[Action.PRUNE]} pruned, {counts[Action.BASE]} at base value, "
        f"{counts[Action.FINETUNED]} whole from finetuned, {counts[Action.COPY]} copied",
    )
    table.add_row(
        "task vector kept",
        f"{totals['kept']:,} of {totals['pruned_parameters']:,} entries "
        f"({totals['kept_fraction']:.2%}), "
        f"{totals['sq_norm_kept_fraction']:.2%} of its squared norm",
    )
    size = sum(int(v["bytes"]) for v in report.shards.values())  # type: ignore[call-overload]
    table.add_row(
        "written", f"{len(report.shards)} shard(s), {human_bytes(size)} in {report.seconds:.1f} s"
    )
    console().print(table)


# -- fapm inspect -----------------------------------------------------------------------------

if TYPE_CHECKING:
    from fapm_cli.forgetting import ForgettingReport, SortKey, TensorScore
    from fapm_cli.inspection import Comparison, Inspection, Verification


def inspect_json(
    inspection: Inspection,
    comparison: Comparison | None = None,
    verification: Verification | None = None,
) -> dict[str, Any]:
    """The documented object of ``fapm inspect --json`` (docs/commands/inspect.md)."""
    from fapm_cli import __version__
    from fapm_cli.inspection import comparison_json, inspection_json, verification_json

    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "inspect",
        "fapm_version": __version__,
        **inspection_json(inspection),
        "compare": comparison_json(comparison) if comparison else None,
        "verify": verification_json(verification) if verification else None,
    }


def _wide_console() -> Any:
    """A console for wide tables: piped output is not folded at 80 columns."""
    out = console()
    if not is_terminal(sys.stdout):
        out.width = max(out.width, 160)
    return out


def _pairs_table(rows: list[tuple[str, str]]) -> Any:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


def print_inspection(r: Inspection) -> None:
    from rich.table import Table

    out = _wide_console()
    kind = r.kind + (f" ({r.format})" if r.format else "")
    rows = [
        ("source", r.source),
        ("kind", kind + (", written by fapm" if r.written_by_fapm else "")),
        ("shards", f"{len(r.shards)}" + (f" (index {r.index})" if r.index else "")),
        ("tensors", f"{r.tensor_count:,}"),
        ("parameters", f"{r.parameters:,}"),
        ("size", f"{human_bytes(r.tensor_bytes)} of tensors, {human_bytes(r.file_bytes)} on disk"),
    ]
    c = r.config
    if c is not None:
        parts = [
            c.architecture or c.model_type or "?",
            f"hidden {c.hidden_size}" if c.hidden_size is not None else "",
            f"{c.layers} layers" if c.layers is not None else "",
            f"vocab {c.vocab_size:,}" if c.vocab_size is not None else "",
            c.torch_dtype or "",
        ]
        rows.append(("config", ", ".join(p for p in parts if p)))
    rows += [(k, v) for k, v in r.provenance.items()]
    out.print(_pairs_table(rows))

    dt = Table(title="by dtype", title_justify="left")
    for col in ("dtype", "tensors", "parameters", "bytes"):
        dt.add_column(col, justify="left" if col == "dtype" else "right")
    for d in r.dtypes:
        dt.add_row(d.dtype, f"{d.tensors:,}", f"{d.parameters:,}", human_bytes(d.bytes))
    out.print(dt)
    if len(r.shards) > 1:
        st = Table(title="shards", title_justify="left")
        for col in ("shard", "tensors", "bytes"):
            st.add_column(col, justify="left" if col == "shard" else "right")
        for s in r.shards:
            st.add_row(s.name, f"{s.tensors:,}", human_bytes(s.file_bytes))
        out.print(st)
    if r.tensors is not None:
        tt = Table(title=f"tensors ({len(r.tensors)})", title_justify="left")
        for col in ("name", "shape", "dtype", "shard"):
            tt.add_column(col, overflow="fold")
        for t in r.tensors:
            tt.add_row(t.name, str(list(t.shape)), t.dtype, t.shard)
        out.print(tt)
    for w in r.warnings:
        warn(w)


def print_comparison(c: Comparison) -> None:
    from rich.table import Table

    from fapm_cli.inspection import names_preview

    out = _wide_console()
    incompatible = [d for d in c.differences if d.incompatible]
    verdict = "compatible" if c.compatible else "INCOMPATIBLE"
    accept = "accept" if c.compatible else "refuse"

    def only(names: list[str]) -> str:
        return f"{len(names)}" + (f": {names_preview(names)}" if names else "")

    allowed = len(c.differences) - len(incompatible)
    rows = [
        ("compare", f"{c.a} (A, base) with {c.b} (B, finetuned)"),
        ("verdict", f"{verdict}: prune would {accept} them"),
        ("paired", f"{c.common:,} tensor(s)"),
        ("only in A", only(c.only_a)),
        ("only in B", only(c.only_b)),
        ("mismatches", f"{len(incompatible)} refused, {allowed} allowed (dtype only)"),
    ]
    out.print(_pairs_table(rows))
    if c.differences:
        t = Table(title="differences", title_justify="left")
        for col in ("tensor", "kind", "A", "B", "prune"):
            t.add_column(col, overflow="fold")
        for d in c.differences:
            t.add_row(d.name, d.kind.value, d.a, d.b, "refuses" if d.incompatible else "allows")
        out.print(t)


def print_verification(v: Verification) -> None:
    from rich.table import Table

    out = _wide_console()
    t = Table(title="verify", title_justify="left")
    for col in ("shard", "bytes", "sha256", "status"):
        t.add_column(col, overflow="fold")
    for s in v.shards:
        t.add_row(s.name, f"{s.bytes:,}", s.sha256[:16] + "…", s.status.value)
    out.print(t)
    if v.ok:
        how = (
            "matched the recorded sizes and sha256"
            if v.recorded
            else "read completely; no recorded digests to compare against (not written by fapm)"
        )
        out.print(f"verify: ok, {len(v.shards)} shard(s) {how}")
    for w in v.warnings:
        warn(w)


# -- fapm score -------------------------------------------------------------------------------

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


def print_score(r: ForgettingReport, rows: list[TensorScore]) -> None:
    """Tables per tensor (sorted and cut as asked), per layer, per module type, and the total."""
    from rich.table import Table

    from fapm_cli.forgetting import Sums

    out = _wide_console()

    def table(title: str, head: str, entries: list[tuple[str, Sums]]) -> None:
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
    from fapm_cli import __version__
    from fapm_cli.forgetting import report_json

    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "score",
        "fapm_version": __version__,
        **report_json(r, rows, sort, top),
        "plot": plot,
    }


# -- task vectors: prune --task-vector / --save task-vector, diff, merge ------------------------


def tv_tensor_json(t: Any) -> dict[str, Any]:
    """One ``merging.TVTensor``: how a tensor was stored in a task vector."""
    return {
        "name": t.name,
        "shape": list(t.shape),
        "repr": t.repr.value,
        "dtype": t.dtype,
        "model_dtype": t.model_dtype,
        "numel": t.numel,
        "kept": t.kept,
        "positions": t.positions,
        "bytes": t.nbytes,
    }


def _stored_totals(tensors: list[Any]) -> dict[str, Any]:
    reprs: dict[str, int] = {"delta": 0, "values": 0, "sparse": 0}
    for t in tensors:
        reprs[t.repr.value] += 1
    return {"bytes": sum(t.nbytes for t in tensors), "tensors_by_repr": reprs}


def prune_tv_json(r: Any) -> dict[str, Any]:
    """``fapm prune`` JSON: prune_json plus save, format, task_vector and the stored layout."""
    out = prune_json(r.prune)
    out["save"] = r.save.value
    out["format"] = r.format.value
    out["task_vector"] = r.task_vector
    out["stored"] = (
        {**_stored_totals(r.tv_tensors), "passes": r.passes,
         "tensors": [tv_tensor_json(t) for t in r.tv_tensors]}
        if r.tv_tensors else None
    )  # fmt: skip
    return out


def print_prune_tv(r: Any) -> None:
    """The prune summary, plus what was read from or written as a task vector."""
    print_prune(r.prune)
    if r.task_vector:
        console().print(f"finetuned rebuilt from task vector {r.task_vector}")
    if r.tv_tensors:
        totals = _stored_totals(r.tv_tensors)
        reprs = ", ".join(f"{n} {k}" for k, n in totals["tensors_by_repr"].items() if n)
        console().print(
            f"saved the pruned task vector ({r.format.value}): {reprs} tensor(s), "
            f"{human_bytes(totals['bytes'])} of tensor data"
        )


def diff_json(r: Any) -> dict[str, Any]:
    from fapm_cli import __version__

    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "diff",
        "fapm_version": __version__,
        "output": r.output,
        "base": r.base,
        "finetuned": r.finetuned,
        "exact": r.exact,
        "passes": r.passes,
        "totals": {
            "tensors": len(r.tensors),
            "parameters": sum(t.numel for t in r.tensors),
            "changed": sum(t.kept for t in r.tensors if t.repr.value == "delta"),
            **_stored_totals(r.tensors),
        },
        "shards": [{"name": k, **v} for k, v in r.shards.items()],
        "tensors": [tv_tensor_json(t) for t in r.tensors],
        "warnings": r.warnings,
        "seconds": round(r.seconds, 3),
    }


def print_diff(r: Any) -> None:
    from rich.table import Table

    j = diff_json(r)
    t = j["totals"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output", r.output)
    reprs = ", ".join(f"{n} {k}" for k, n in t["tensors_by_repr"].items() if n)
    dtypes = sorted({x.dtype for x in r.tensors if x.repr.value == "delta"})
    table.add_row("task vector", f"{t['tensors']} tensors: {reprs} (deltas in {', '.join(dtypes)})")
    table.add_row("exact", "yes: base + task vector = finetuned, bit for bit" if r.exact
                  else "no (--dtype rounds the deltas)")  # fmt: skip
    size = sum(int(v["bytes"]) for v in r.shards.values())
    table.add_row("written", f"{len(r.shards)} shard(s), {human_bytes(size)} in {r.seconds:.1f} s")
    console().print(table)


def merge_json(r: Any) -> dict[str, Any]:
    from fapm_cli import __version__

    o = r.options
    numel = sum(t.numel for t in r.tensors)
    changed = sum(t.changed for t in r.tensors)
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "merge",
        "fapm_version": __version__,
        "output": r.output,
        "base": r.base,
        "inputs": r.inputs,
        "pruning": None
        if o is None
        else {
            "method": o.method.value,
            "sparsity": float(o.sparsity),
            "lam": o.lam,
            "seed": o.seed,
        },
        "totals": {
            "tensors": len(r.tensors),
            "parameters": numel,
            "changed": changed,
            "changed_fraction": changed / numel if numel else 0.0,
        },
        "shards": [{"name": k, **v} for k, v in r.shards.items()],
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "numel": t.numel,
                "changed": t.changed,
                "inputs": t.inputs,
            }
            for t in r.tensors
        ],
        "warnings": r.warnings,
        "seconds": round(r.seconds, 3),
    }


def print_merge(r: Any) -> None:
    from rich.table import Table

    t = merge_json(r)["totals"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output", r.output)
    for i in r.inputs:
        table.add_row(f"+ {i['weight']:g} x", f"{i['kind']} {i['source']} ({i['format']})")
    table.add_row(
        "changed",
        f"{t['changed']:,} of {t['parameters']:,} entries ({t['changed_fraction']:.2%}) differ "
        "from base",
    )
    size = sum(int(v["bytes"]) for v in r.shards.values())
    table.add_row("written", f"{len(r.shards)} shard(s), {human_bytes(size)} in {r.seconds:.1f} s")
    console().print(table)
