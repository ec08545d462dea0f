"""Option types shared by several commands, so each flag reads the same everywhere."""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from typing import Annotated

import typer

from fapm_cli.errors import UsageError

BaseOpt = Annotated[
    str,
    typer.Option(
        "--base",
        "-b",
        metavar="SOURCE",
        help="Pre-trained checkpoint: a directory, a .safetensors file, or a Hub id "
        "org/name[@revision].",
        show_default=False,
    ),
]
FinetunedOpt = Annotated[
    str,
    typer.Option(
        "--finetuned",
        "-f",
        metavar="SOURCE",
        help="Fine-tuned checkpoint of the same architecture (same forms as --base).",
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


def quiet_libraries(quiet: bool) -> None:
    """``--quiet``: the Hub client's own messages (retries, rate limits) are not printed either.

    huggingface_hub reads ``HF_HUB_VERBOSITY`` when it sets up its logger (it is imported only
    for Hub sources, after this); the level is also set in case it already was."""
    if quiet:
        os.environ["HF_HUB_VERBOSITY"] = "error"
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def set_threads(threads: int | None) -> None:
    """Give torch ``threads`` threads, by default every core but one.

    The spare core reads the next tensor and hashes and writes the output; with every core in
    torch's pool its worker threads stall on each other whenever one core is busy with I/O
    (docs/benchmarks.md: 79.7 s instead of 4.5 s on two cores)."""
    import os

    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))


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
    """Point the scoring at ``choice`` (resolved: auto -> cuda or cpu) and return its name."""
    import torch

    from fapm_cli import scoring

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
    name = "cpu"
    if choice is DeviceChoice.cuda or (choice is DeviceChoice.auto and torch.cuda.is_available()):
        name = "cuda"
    scoring.set_device(name)
    return name


def exit_codes(mismatch: str = "base/finetuned mismatch") -> str:
    """The epilog paragraph listing exit codes (fapm_cli.errors.ExitCode; docs/errors.md)."""
    return (
        "\b\n"
        f"Exit codes: 0 ok, 2 usage, 3 bad input, 4 {mismatch},\n"
        "5 output problem, 6 resources (disk full), 130 interrupted. See docs/errors.md.\n"
    )


# Mirror of scoring.Method: the engine imports torch, and `fapm --help` must not.
class MethodChoice(StrEnum):
    fapm = "fapm"
    magnitude = "magnitude"
    ratio = "ratio"
    random = "random"


LamOpt = Annotated[
    float,
    typer.Option("--lam", min=0.0, help="Weight of the relative-change penalty in the fapm score."),
]
