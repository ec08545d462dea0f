"""``fapm inspect``: what a checkpoint holds, whether two pair up, whether a copy is intact.

Reads headers only unless ``--verify`` is given, and never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from fapm_cli.cli.boundary import boundary
from fapm_cli.cli.options import JsonOpt, QuietOpt, quiet_libraries
from fapm_cli.errors import InputError, MismatchError

if TYPE_CHECKING:
    from fapm_cli.verbs.inspect import Comparison, Inspection, Verification

EPILOG = """\
Examples:

\b
  fapm inspect ./llama-sft
  fapm inspect ./llama-sft --tensors --match 'layers\\.0\\..*proj'
  fapm inspect ./llama-base --compare ./llama-sft     # exit 4 if prune would refuse
  fapm inspect ./llama-fapm --verify                  # exit 3 if a shard is corrupted
  fapm inspect ./llama-fapm --json | jq .provenance

\b
Exit codes: 0 ok (and compatible, and intact), 2 usage, 3 bad input or --verify found
a corrupted shard, 4 --compare found tensors prune would refuse. See docs/errors.md.
"""


@boundary
def inspect(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="A checkpoint directory, a .safetensors file, or a Hub id org/name[@revision].",
            show_default=False,
        ),
    ],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="List every tensor: name, shape, dtype, shard.")
    ] = False,
    match: Annotated[
        str | None,
        typer.Option(
            "--match",
            metavar="REGEX",
            help="List only tensors whose name contains a match of this Python regex "
            "(implies --tensors).",
            show_default=False,
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            metavar="SOURCE",
            help="Pair this checkpoint (as base) with SOURCE (as finetuned) by the rules of "
            "prune; exit 4 if prune would refuse them.",
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Re-read every byte of every shard; check sizes and sha256 against the index "
            "written by fapm. Exit 3 on any corruption.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Describe a checkpoint from its headers: shards, tensors, dtypes, config, provenance.

    Reads no tensor data (except with --verify), so it is instant on any size of model.
    """
    from fapm_cli.report import inspect as report
    from fapm_cli.report.console import emit_json
    from fapm_cli.verbs import inspect as inspection

    inspection.compile_match(match)  # a bad regex is a usage error before any reading
    with quiet_libraries(quiet):
        result, comparison, verification = _read(
            source, compare, verify, tensors, match, enabled=not quiet and not json_out
        )
    if json_out:
        emit_json(report.inspect_json(result, comparison, verification))
    elif not quiet:
        report.print_inspection(result)
        if comparison is not None:
            report.print_comparison(comparison)
        if verification is not None:
            report.print_verification(verification)

    # Integrity first: a corrupted copy is the more urgent news.
    if verification is not None and not verification.ok:
        more = len(verification.problems) - 1
        raise InputError(
            verification.problems[0] + (f" (and {more} more problem(s))" if more else ""),
            hint="the copy is corrupted or incomplete; fetch or copy the checkpoint again",
        )
    if comparison is not None and not comparison.compatible:
        raise MismatchError(
            _refusal(comparison),
            hint="base and finetuned must be the same architecture; the report above lists "
            "every difference",
        )


def _refusal(c: Comparison) -> str:
    from fapm_cli.verbs.inspect import names_preview

    parts = []
    if c.only_a:
        parts.append(f"{len(c.only_a)} tensor(s) only in {c.a}: {names_preview(c.only_a)}")
    if c.only_b:
        parts.append(f"{len(c.only_b)} tensor(s) only in {c.b}: {names_preview(c.only_b)}")
    refused = [d for d in c.differences if d.incompatible]
    if refused:
        d = refused[0]
        parts.append(
            f"{len(refused)} mismatched tensor(s), first {d.name!r}: {d.kind.value} {d.a} vs {d.b}"
        )
    return "prune would refuse this pair: " + "; ".join(parts)


def _read(
    source: str,
    compare: str | None,
    verify: bool,
    tensors: bool,
    match: str | None,
    *,
    enabled: bool,
) -> tuple[Inspection, Comparison | None, Verification | None]:
    """The inspection of ``source``, and its comparison and verification when asked."""
    from fapm_cli.io.reader import open_checkpoint
    from fapm_cli.io.sources import resolve_source
    from fapm_cli.report.console import BarProgress
    from fapm_cli.verbs import inspect as inspection

    checkpoint = open_checkpoint(resolve_source(source))
    result = inspection.inspect(checkpoint, tensors=tensors, match=match)
    comparison = None
    if compare is not None:
        other = open_checkpoint(resolve_source(compare))
        comparison = inspection.compare(checkpoint, other)
    verification = None
    if verify:
        bar = BarProgress(enabled=enabled)
        bar.start(inspection.shard_bytes(checkpoint), "verify")
        try:
            verification = inspection.verify(checkpoint, bar.advance)
        finally:
            bar.close()
    return result, comparison, verification
