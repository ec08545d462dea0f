"""``fapm inspect`` results: the JSON documented in docs/commands/inspect.md, and tables."""

from __future__ import annotations

from typing import Any

from fapm_cli import __version__
from fapm_cli.report.console import (
    JSON_SCHEMA_VERSION,
    human_bytes,
    pairs_table,
    warn,
    wide_console,
)
from fapm_cli.verbs.inspect import (
    Comparison,
    Inspection,
    Verification,
    names_preview,
)


def inspect_json(
    inspection: Inspection,
    comparison: Comparison | None = None,
    verification: Verification | None = None,
) -> dict[str, Any]:
    """The documented object of ``fapm inspect --json`` (docs/commands/inspect.md)."""
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "inspect",
        "fapm_version": __version__,
        **inspection_json(inspection),
        "compare": comparison_json(comparison) if comparison else None,
        "verify": verification_json(verification) if verification else None,
    }


def print_inspection(r: Inspection) -> None:
    from rich.table import Table

    out = wide_console()
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
        if c.quantization is not None:
            block = f", {c.block_size[0]}x{c.block_size[1]} blocks" if c.block_size else ""
            rows.append(("quantization", c.quantization + block))
    rows += [(k, v) for k, v in r.provenance.items()]
    out.print(pairs_table(rows))

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

    out = wide_console()
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
    out.print(pairs_table(rows))
    if c.differences:
        t = Table(title="differences", title_justify="left")
        for col in ("tensor", "kind", "A", "B", "prune"):
            t.add_column(col, overflow="fold")
        for d in c.differences:
            t.add_row(d.name, d.kind.value, d.a, d.b, "refuses" if d.incompatible else "allows")
        out.print(t)


def print_verification(v: Verification) -> None:
    from rich.table import Table

    out = wide_console()
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


def inspection_json(r: Inspection) -> dict[str, object]:
    c = r.config
    return {
        "source": r.source,
        "kind": r.kind,
        "format": r.format,
        "written_by_fapm": r.written_by_fapm,
        "index": r.index,
        "shards": [
            {"name": s.name, "tensors": s.tensors, "bytes": s.file_bytes,
             "header_bytes": s.header_bytes}
            for s in r.shards
        ],
        "tensor_count": r.tensor_count,
        "parameters": r.parameters,
        "tensor_bytes": r.tensor_bytes,
        "file_bytes": r.file_bytes,
        "dtypes": [
            {"dtype": d.dtype, "tensors": d.tensors, "parameters": d.parameters, "bytes": d.bytes}
            for d in r.dtypes
        ],
        "config": None if c is None else {
            "architecture": c.architecture, "model_type": c.model_type,
            "hidden_size": c.hidden_size, "layers": c.layers, "vocab_size": c.vocab_size,
            "torch_dtype": c.torch_dtype,
            "quantization": None if c.quantization is None else {
                "method": c.quantization,
                "weight_block_size": list(c.block_size) if c.block_size else None,
            },
        },
        "metadata": r.metadata,
        "provenance": r.provenance,
        "index_metadata": r.index_metadata,
        "tensors": None if r.tensors is None else [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "shard": t.shard,
             "parameters": t.parameters, "bytes": t.bytes}
            for t in r.tensors
        ],
        "warnings": r.warnings,
    }  # fmt: skip


def comparison_json(c: Comparison) -> dict[str, object]:
    return {
        "a": c.a,
        "b": c.b,
        "a_kind": c.a_kind,
        "b_kind": c.b_kind,
        "compatible": c.compatible,
        "common": c.common,
        "only_a": c.only_a,
        "only_b": c.only_b,
        "differences": [
            {"name": d.name, "kind": d.kind.value, "a": d.a, "b": d.b,
             "incompatible": d.incompatible}
            for d in c.differences
        ],
    }  # fmt: skip


def verification_json(v: Verification) -> dict[str, object]:
    return {
        "ok": v.ok,
        "recorded": v.recorded,
        "shards": [
            {"name": s.name, "bytes": s.bytes, "sha256": s.sha256,
             "expected_bytes": s.expected_bytes, "expected_sha256": s.expected_sha256,
             "status": s.status.value}
            for s in v.shards
        ],
        "problems": v.problems,
        "warnings": v.warnings,
    }  # fmt: skip
