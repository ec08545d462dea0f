"""Outputs ready to publish: fapm's own model card, a config that names the dtype written, and
no local path of the inputs in any file of the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import make_pair, write_checkpoint

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def carded(tmp_path: Path) -> tuple[Path, Path]:
    """A pair deep inside tmp_path, the fine-tune with its own card and a float32 config."""
    base, ft = make_pair(seed=9)
    deep = tmp_path / "home" / "alice" / "models"
    b = write_checkpoint(
        deep / "llama-base", base, config={"model_type": "x", "torch_dtype": "float32"}
    )
    f = write_checkpoint(
        deep / "llama-sft", ft, config={"model_type": "x", "torch_dtype": "float32"}
    )
    (f / "README.md").write_text("# llama-sft\nThe fine-tune's own card: another model.\n")
    return b, f


def front_matter(card: str) -> dict[str, object]:
    head, sep, _ = card.partition("\n---\n")
    assert head.startswith("---\n") and sep, card[:200]
    return {k: json.loads(v) for k, v in (line.split(": ", 1) for line in head[4:].splitlines())}


def test_prune_writes_its_own_card_not_the_fine_tunes(
    tmp_path: Path, carded: tuple[Path, Path]
) -> None:
    b, f = carded
    out = tmp_path / "out"
    assert run("prune", "-b", str(b), "-f", str(f), "-s", "0.8", "-o", str(out), "-q")[0] == 0
    card = (out / "README.md").read_text()
    assert "another model" not in card
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "fapm" in meta["tags"]  # type: ignore[operator]
    assert "base_model" not in meta  # a local base has no Hub id to link to
    assert "| sparsity | 0.8 (keeps 20% of each tensor's task vector) |" in card
    assert "fapm prune --base llama-base --finetuned llama-sft --method fapm --sparsity 0.8" in card
    assert "| task-vector entries kept |" in card


def test_no_output_file_names_a_local_path(tmp_path: Path, carded: tuple[Path, Path]) -> None:
    b, f = carded
    outs = []
    for command, extra in (("prune", []), ("merge", ["-f", str(f)]), ("diff", [])):
        out = tmp_path / f"out-{command}"
        args = [command, "-b", str(b), *(["-f", str(f)] if command != "merge" else extra)]
        code, _, err = run(*args, "-o", str(out), "-q")
        assert code == 0, err
        outs.append(out)
    for out in outs:
        for path in out.iterdir():
            data = path.read_bytes()
            assert str(tmp_path).encode() not in data, path
            assert b"alice" not in data, path
    merged = (outs[1] / "README.md").read_text()
    assert "| finetuned | `llama-sft` (weight 1) |" in merged


def test_dtype_is_written_into_config(tmp_path: Path, carded: tuple[Path, Path]) -> None:
    b, f = carded
    out = tmp_path / "out"
    assert (
        run("prune", "-b", str(b), "-f", str(f), "--dtype", "bfloat16", "-o", str(out), "-q")[0]
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_type": "x", "torch_dtype": "bfloat16"}
    plain = tmp_path / "plain"
    assert run("prune", "-b", str(b), "-f", str(f), "-o", str(plain), "-q")[0] == 0
    assert (plain / "config.json").read_bytes() == (f / "config.json").read_bytes()  # copied


def test_the_card_of_a_hub_base_links_to_it() -> None:
    from fapm_cli.plan import PruneOptions
    from fapm_cli.report.card import CardInput, model_card

    base = "meta-llama/Llama-3.1-8B@abc123"
    inputs = [CardInput("finetuned", "me/sft@def")]
    card = model_card("prune", base, inputs, PruneOptions(), 0.1, ["--base", base])
    meta = front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B"
    assert meta["base_model_relation"] == "merge"


def test_split_runs_on_two_inputs_of_one_name_refuse_to_mix(tmp_path: Path) -> None:
    """Outputs record names only, so split runs also compare where the inputs are."""
    base, ft = make_pair(seed=10)
    _, other = make_pair(seed=11)
    b = write_checkpoint(tmp_path / "base", base)
    f1 = write_checkpoint(tmp_path / "a" / "sft", ft)
    f2 = write_checkpoint(tmp_path / "b" / "sft", other)
    out = tmp_path / "out"
    common = ["prune", "-b", str(b), "-o", str(out), "--max-shard-size", "1500B", "-q"]
    assert run(*common, "-f", str(f1), "--part", "1/2")[0] == 0
    assert run(*common, "-f", str(f2), "--part", "2/2")[0] == 0
    code, _, err = run(*common, "-f", str(f1), "--finalize")
    assert code == 5 and "was written with different options or inputs" in err
