"""The ``fapm`` application: global options, and one command per module of this package.

Heavy modules (torch, the engine, huggingface_hub) are imported inside command bodies, so that
``fapm --help`` and shell completion start in well under a second.
"""

from __future__ import annotations

import gc
import sys
from typing import Annotated

import typer

from fapm_cli import __version__
from fapm_cli.cli import diff as diff_cmd
from fapm_cli.cli import inspect_cmd
from fapm_cli.cli import merge as merge_cmd
from fapm_cli.cli import prune as prune_cmd
from fapm_cli.cli import score as score_cmd
from fapm_cli.cli.boundary import set_debug

app = typer.Typer(
    name="fapm",
    help="Remove catastrophic forgetting from fine-tuned checkpoints by forgetting-aware "
    "pruning of the task vector (FAPM, EMNLP 2025). Streams safetensors tensor by tensor.",
    no_args_is_help=True,
    rich_markup_mode=None,  # help text is shown as written: org/name[@revision] stays intact
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        print(f"fapm {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show tracebacks of errors (also FAPM_DEBUG=1)."),
    ] = False,
) -> None:
    set_debug(debug)


app.command("prune", epilog=prune_cmd.EPILOG)(prune_cmd.prune)
app.command("diff", epilog=diff_cmd.EPILOG)(diff_cmd.diff)
app.command("merge", epilog=merge_cmd.EPILOG)(merge_cmd.merge)
app.command("score", epilog=score_cmd.EPILOG)(score_cmd.score)
app.command("inspect", epilog=inspect_cmd.EPILOG)(inspect_cmd.inspect)


# The collector's young-generation threshold for the command's process (CPython's default is
# 700). A run keeps a plan of every tensor alive (headers, items: ~10 objects per tensor), and
# each full collection walks all of it again: on 10,000 tensors that was 0.4 s of a 2.5 s run.
# Set by the console command only; a library caller keeps its own setting.
GC_THRESHOLD = 50_000


def main() -> None:
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    app(args=debug_first(sys.argv[1:]), prog_name="fapm")


def debug_first(args: list[str]) -> list[str]:
    """``--debug`` anywhere on the command line (the internal-error hint says "run again with
    --debug", which users add at the end): moved to the front, where the app takes it."""
    if "--" in args:
        head, tail = args[: args.index("--")], args[args.index("--") :]
    else:
        head, tail = args, []
    if "--debug" in head[1:]:
        head = ["--debug", *[a for a in head if a != "--debug"]]
    return head + tail
