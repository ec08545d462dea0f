"""``fapm merge`` results: JSON (docs/commands/merge.md) and a table."""

from __future__ import annotations

from typing import Any

from fapm_cli import __version__
from fapm_cli.records import MergeReport
from fapm_cli.report.console import JSON_SCHEMA_VERSION, console, human_bytes


def merge_json(r: MergeReport) -> dict[str, Any]:
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


def print_merge(r: MergeReport) -> None:
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
    size = sum(int(v["bytes"]) for v in r.shards.values())  # type: ignore[call-overload]
    table.add_row("written", f"{len(r.shards)} shard(s), {human_bytes(size)} in {r.seconds:.1f} s")
    console().print(table)
