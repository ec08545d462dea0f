"""Option types shared by several commands, so each flag reads the same everywhere."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from fractions import Fraction
from typing import TYPE_CHECKING, Annotated

import typer

from fapm_cli.errors import UsageError

if TYPE_CHECKING:
    from fapm_cli.io.parts import Part

AdapterBaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base",
        "-b",
        metavar="SOURCE",
        help="Pre-trained checkpoint: a directory, a .safetensors file, or a Hub id "
        "org/name[@revision]. May be omitted when --finetuned is a LoRA adapter: its "
        "base_model_name_or_path is the base.",
        show_default=False,
    ),
]
FinetunedOpt = Annotated[
    str,
    typer.Option(
        "--finetuned",
        "-f",
        metavar="SOURCE",
        help="Fine-tuned checkpoint of the same architecture (same forms as --base), or a "
        "LoRA adapter directory (PEFT's adapter_config.json + adapter_model.safetensors): "
        "the model merge_and_unload() gives on base.",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        metavar="DIR",
        help="Output checkpoint directory. Written to a temporary sibling and renamed into "
        "place when complete.",
        show_default=False,
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the output if it already exists.")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output)."),
]
MaxShardOpt = Annotated[
    str,
    typer.Option(
        "--max-shard-size",
        metavar="SIZE",
        help="Largest output shard, e.g. 500MB, 5GB, 2GiB. A larger tensor gets a shard "
        "of its own.",
    ),
]
DiskBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--disk-budget",
        metavar="SIZE",
        help="Hub sources: keep at most SIZE of downloaded shards on disk (plus the one being "
        "fetched), e.g. 20GB; each shard is deleted once its tensors are done. Shards already "
        "in the Hugging Face cache cost nothing. [default: no limit, shards stay cached]",
        show_default=False,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        metavar="N",
        help="CPU threads for tensor math. [default: all cores but one, which reads, "
        "hashes and writes meanwhile]",
        show_default=False,
    ),
]


@contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """``--quiet``: the Hub client's own messages (retries, rate limits) are not printed either,
    for the duration of the command (the logger level and ``HF_HUB_VERBOSITY`` are restored).

    huggingface_hub reads ``HF_HUB_VERBOSITY`` when it sets up its logger (it is imported only
    for Hub sources, after this); the level is also set in case it already was."""
    if not quiet:
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level, env = logger.level, os.environ.get("HF_HUB_VERBOSITY")
    os.environ["HF_HUB_VERBOSITY"] = "error"
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if env is None:
            os.environ.pop("HF_HUB_VERBOSITY", None)
        else:
            os.environ["HF_HUB_VERBOSITY"] = env


def default_threads(threads: int | None) -> int:
    """``--threads``, by default every core but one.

    The spare core reads the next tensor and hashes and writes the output; with every core in
    torch's pool its worker threads stall on each other whenever one core is busy with I/O
    (docs/benchmarks.md: 79.7 s instead of 4.5 s on two cores). The command passes it to the
    library call, which sets torch's thread count for the run and restores it afterwards."""
    return threads or max(1, (os.cpu_count() or 1) - 1)


class DeviceChoice(StrEnum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


DeviceOpt = Annotated[
    DeviceChoice,
    typer.Option(
        "--device",
        help="Where scores are computed and selected: cpu, cuda (a GPU), or auto (cuda when "
        "one is available). Same masks and bytes on every device; see docs/benchmarks.md.",
    ),
]


def use_device(choice: DeviceChoice) -> str:
    """The device ``choice`` names (auto -> cuda or cpu), refused when torch has no CUDA; the
    command passes it to the library call."""
    import torch

    if choice is DeviceChoice.cuda and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "torch sees no CUDA device"
        )
        raise UsageError(
            f"--device cuda: {why}",
            hint="use --device cpu (or auto); for a GPU install a CUDA build of torch and "
            "check nvidia-smi and CUDA_VISIBLE_DEVICES",
        )
    if choice is DeviceChoice.cuda or (choice is DeviceChoice.auto and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def exit_codes(mismatch: str = "base/finetuned mismatch") -> str:
    """The epilog paragraph listing exit codes (fapm_cli.errors.ExitCode; docs/errors.md)."""
    return (
        "\b\n"
        f"Exit codes: 0 ok, 2 usage, 3 bad input, 4 {mismatch},\n"
        "5 output problem, 6 resources (disk full), 130 interrupted. See docs/errors.md.\n"
    )


LamOpt = Annotated[
    float,
    typer.Option(
        "--lam",
        min=0.0,
        metavar="X",
        help="Weight of the relative-change penalty in the fapm score.",
    ),
]

PartOpt = Annotated[
    str | None,
    typer.Option(
        "--part",
        metavar="I/N",
        help="Write only part I of N (by output shard) into DIR.fapm-parts/, so N jobs "
        "can share one run; then run the same command with --finalize instead. See "
        "docs/scale.md.",
        show_default=False,
    ),
]
FinalizeOpt = Annotated[
    bool,
    typer.Option(
        "--finalize",
        help="Join the parts written by --part runs with these arguments: check them, "
        "write the index and config files, move the result to --output.",
    ),
]


def parse_part(part: str | None, finalize: bool) -> Part | None:
    """``--part I/N``, refused beside ``--finalize`` (they go in separate runs)."""
    from fapm_cli.io.parts import Part

    if part is not None and finalize:
        raise UsageError(
            "--part and --finalize go in separate runs",
            hint="run each --part I/N, then the same command with --finalize and no --part",
        )
    return Part.parse(part) if part is not None else None


def parse_size_option(text: str | None, command: str) -> int | None:
    """A size option (--max-shard-size, --disk-budget) in bytes; None stays None."""
    from fapm_cli.io.writer import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as err:
        raise UsageError(str(err), hint=f"see fapm {command} --help") from err


DensityOpt = Annotated[
    str | None,
    typer.Option(
        "--density",
        metavar="D",
        help="Fraction of each tensor's task vector kept: 1 - sparsity (mergekit's word). "
        "Give --sparsity or --density, not both.",
        show_default=False,
    ),
]


def sparsities_of(sparsity: str | None, density: str | None, command: str) -> list[Fraction]:
    """A comma-separated list of sparsities (or densities), each as ``sparsity_of`` reads it:
    the sweep ``fapm score --sparsity 0.5,0.7,0.9`` takes."""
    given = sparsity if sparsity is not None else density
    if given is None or "," not in given:
        return [sparsity_of(sparsity, density, command)]
    parts = [p.strip() for p in given.split(",")]
    if not all(parts):
        raise UsageError(f"empty entry in {given!r}", hint=f"e.g. fapm {command} -s 0.5,0.7,0.9")
    as_sparsity = density is None
    return [
        sparsity_of(p if as_sparsity else sparsity, None if as_sparsity else p, command)
        for p in parts
    ]


def sparsity_of(sparsity: str | None, density: str | None, command: str) -> Fraction:
    """``--sparsity``, or ``1 - --density``, exactly (default 0.9); both at once is refused."""
    from fapm_cli.plan import parse_sparsity

    if sparsity is not None and density is not None:
        raise UsageError(
            "--sparsity and --density say the same thing (density = 1 - sparsity): give one",
            hint=f"see fapm {command} --help",
        )
    try:
        if density is not None:
            kept = parse_sparsity(density)  # the same exact parse and the same [0, 1] range
            return 1 - kept
        return parse_sparsity(sparsity if sparsity is not None else "0.9")
    except ValueError as err:
        text = str(err).replace("sparsity", "density") if density is not None else str(err)
        raise UsageError(text, hint=f"see fapm {command} --help") from err
