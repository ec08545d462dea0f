"""``fapm prune`` and ``fapm diff`` results: JSON (docs/commands/prune.md, diff.md) and tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fapm_cli import __version__
from fapm_cli.plan import Action, Method
from fapm_cli.records import DiffReport, PruneReport, TensorResult, TVTensor, summarize
from fapm_cli.report.console import JSON_SCHEMA_VERSION, console, human_bytes


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


def _prune_totals_json(report: PruneReport) -> dict[str, Any]:
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


def _print_prune_totals(report: PruneReport) -> None:
    from rich.table import Table

    totals = summarize(report.tensors)
    counts = {a: sum(1 for r in report.tensors if r.action is a) for a in Action}
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    o = report.options
    table.add_row("output", report.output)
    table.add_row("method", f"{o.method.value}, sparsity {float(o.sparsity):g}"
                  + (f", lam {o.lam:g}" if o.method is Method.FAPM else ""))  # fmt: skip
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


def tv_tensor_json(t: TVTensor) -> dict[str, Any]:
    """One ``records.TVTensor``: how a tensor was stored in a task vector."""
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


def _stored_totals(tensors: Sequence[TVTensor]) -> dict[str, Any]:
    reprs: dict[str, int] = {"delta": 0, "values": 0, "sparse": 0}
    for t in tensors:
        reprs[t.repr.value] += 1
    return {"bytes": sum(t.nbytes for t in tensors), "tensors_by_repr": reprs}


def prune_json(r: PruneReport) -> dict[str, Any]:
    """``fapm prune --json`` (docs/commands/prune.md): the run, and the stored layout when a
    task vector was saved."""
    out = _prune_totals_json(r)
    out["save"] = r.save.value
    out["format"] = r.format.value
    out["task_vector"] = r.task_vector
    out["stored"] = (
        {**_stored_totals(r.stored), "passes": r.passes,
         "tensors": [tv_tensor_json(t) for t in r.stored]}
        if r.stored else None
    )  # fmt: skip
    return out


def print_prune(r: PruneReport) -> None:
    """The prune summary, plus what was read from or written as a task vector."""
    _print_prune_totals(r)
    if r.task_vector:
        console().print(f"finetuned rebuilt from task vector {r.task_vector}")
    if r.stored:
        totals = _stored_totals(r.stored)
        reprs = ", ".join(f"{n} {k}" for k, n in totals["tensors_by_repr"].items() if n)
        console().print(
            f"saved the pruned task vector ({r.format.value}): {reprs} tensor(s), "
            f"{human_bytes(totals['bytes'])} of tensor data"
        )


def diff_json(r: DiffReport) -> dict[str, Any]:
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


def print_diff(r: DiffReport) -> None:
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
    size = sum(int(v["bytes"]) for v in r.shards.values())  # type: ignore[call-overload]
    table.add_row("written", f"{len(r.shards)} shard(s), {human_bytes(size)} in {r.seconds:.1f} s")
    console().print(table)
