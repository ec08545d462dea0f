"""`--part I/N` then `--finalize` (prune in every form, diff, merge): the parts together are a
single run, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import load_checkpoint, tree_hash

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args), env={"NO_COLOR": "1"})
    return r.exit_code, r.stdout, r.stderr


def prune_args(b: Path, f: Path, out: Path, *extra: str) -> list[str]:
    # Small shards: the 12 tensors of the test pair make several output shards.
    return ["prune", "-b", str(b), "-f", str(f), "-o", str(out), "--max-shard-size", "1500B",
            "-q", *extra]  # fmt: skip


def run_parts(b: Path, f: Path, out: Path, n: int, *extra: str) -> None:
    for i in range(1, n + 1):
        code, _, err = run(*prune_args(b, f, out, "--part", f"{i}/{n}", *extra))
        assert code == 0, err
        assert not out.exists()  # parts never touch the output itself


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])  # 20: more parts than shards, some empty
def test_parts_then_finalize_equal_a_single_run_bit_for_bit(
    tmp_path: Path, pair_dirs: tuple[Path, Path], n: int
) -> None:
    b, f = pair_dirs
    single, joined = tmp_path / "single", tmp_path / "joined"
    assert run(*prune_args(b, f, single))[0] == 0
    run_parts(b, f, joined, n)
    code, _, err = run(*prune_args(b, f, joined, "--finalize"))
    assert code == 0, err
    expected = tree_hash(single)
    assert len([p for p in expected if p.endswith(".safetensors")]) >= 3  # really sharded
    assert tree_hash(joined) == expected  # every shard, the index and config.json
    assert not (tmp_path / "joined.fapm-parts").exists()  # staging removed on success
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "joined", "single"]


def test_parts_bf16_with_options_and_one_shard(
    tmp_path: Path, bf16_pair_dirs: tuple[Path, Path]
) -> None:
    b, f = bf16_pair_dirs
    extra = ("--max-shard-size", "5GB", "-m", "magnitude", "-s", "0.7", "--keep-base", "*norm*")
    single, joined = tmp_path / "single", tmp_path / "joined"
    assert run(*prune_args(b, f, single, *extra))[0] == 0
    run_parts(b, f, joined, 3, *extra)  # one shard: parts 1 and 2 have nothing to write
    assert run(*prune_args(b, f, joined, "--finalize", *extra))[0] == 0
    assert tree_hash(joined) == tree_hash(single)
    assert set(load_checkpoint(joined)) == set(load_checkpoint(single))


def test_part_reports_its_tensors_and_finalize_reports_all(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    code, single_out, _ = run(*prune_args(b, f, tmp_path / "single", "--json"))
    assert code == 0
    single = json.loads(single_out)
    seen: list[str] = []
    for i in (1, 2):
        code, out, err = run(*prune_args(b, f, tmp_path / "o", "--part", f"{i}/2", "--json"))
        assert code == 0, err
        doc = json.loads(out)
        assert doc["output"].endswith(f"o.fapm-parts/part-0000{i}-of-00002")
        seen += [t["name"] for t in doc["tensors"]]
    assert sorted(seen) == sorted(t["name"] for t in single["tensors"])  # each tensor once
    code, out, _ = run(*prune_args(b, f, tmp_path / "o", "--finalize", "--json"))
    assert code == 0
    doc = json.loads(out)
    assert doc["tensors"] == single["tensors"]
    assert doc["totals"] == single["totals"]


def test_rerunning_a_part_is_idempotent(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    run_parts(b, f, out, 3)
    part2 = tmp_path / "o.fapm-parts" / "part-00002-of-00003"
    before = tree_hash(part2)
    assert run(*prune_args(b, f, out, "--part", "2/3"))[0] == 0
    assert tree_hash(part2) == before
    assert sorted(p.name for p in part2.parent.iterdir()) == [
        "part-00001-of-00003",
        "part-00002-of-00003",
        "part-00003-of-00003",
    ]  # fmt: skip  (no temporary left behind)
    assert run(*prune_args(b, f, tmp_path / "single"))[0] == 0
    assert run(*prune_args(b, f, out, "--finalize"))[0] == 0
    assert tree_hash(out) == tree_hash(tmp_path / "single")


def test_finalize_names_a_missing_part(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    for i in (1, 3):
        assert run(*prune_args(b, f, out, "--part", f"{i}/3"))[0] == 0
    code, stdout, err = run(*prune_args(b, f, out, "--finalize"))
    assert code == 5
    assert stdout == ""
    assert "error: part 2/3 missing" in err and "--part 2/3" in err
    assert not out.exists()
    assert len(list((tmp_path / "o.fapm-parts").iterdir())) == 2  # parts kept for a retry


def test_finalize_without_any_part(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    code, _, err = run(*prune_args(b, f, tmp_path / "o", "--finalize"))
    assert code == 5 and "no parts found" in err


def test_a_part_run_with_other_options_is_refused(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    run_parts(b, f, out, 2)
    assert run(*prune_args(b, f, out, "--part", "2/2", "-s", "0.8"))[0] == 0
    code, _, err = run(*prune_args(b, f, out, "--finalize"))
    assert code == 5
    assert "part 2/2" in err and "different options" in err
    assert not out.exists()


def test_parts_of_two_splits_are_refused(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    run_parts(b, f, out, 2)
    assert run(*prune_args(b, f, out, "--part", "1/3"))[0] == 0
    code, _, err = run(*prune_args(b, f, out, "--finalize"))
    assert code == 5 and "different splits (2 parts, 3 parts)" in err


def test_a_truncated_shard_is_found_at_finalize(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    run_parts(b, f, out, 2)
    part = tmp_path / "o.fapm-parts" / "part-00002-of-00002"
    shard = sorted(part.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4])
    code, _, err = run(*prune_args(b, f, out, "--finalize"))
    assert code == 5
    assert shard.name in err and "run that part again" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_part_without_its_marker_is_incomplete(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    run_parts(b, f, out, 2)
    (tmp_path / "o.fapm-parts" / "part-00001-of-00002" / "fapm-part.json").unlink()
    code, _, err = run(*prune_args(b, f, out, "--finalize"))
    assert code == 5 and "part 1/2 incomplete" in err


def test_finalize_refuses_an_existing_output(tmp_path: Path, pair_dirs: tuple[Path, Path]) -> None:
    b, f = pair_dirs
    out = tmp_path / "o"
    run_parts(b, f, out, 2)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(*prune_args(b, f, out, "--finalize"))
    assert code == 5 and "already exists" in err
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("spec", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_bad_part_spec_is_a_usage_error(
    tmp_path: Path, pair_dirs: tuple[Path, Path], spec: str
) -> None:
    b, f = pair_dirs
    code, _, err = run(*prune_args(b, f, tmp_path / "o", "--part", spec))
    assert code == 2 and "is not I/N" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]  # nothing made


@pytest.mark.parametrize("command", ["prune", "diff", "merge"])
def test_part_and_finalize_go_in_separate_runs(
    tmp_path: Path, pair_dirs: tuple[Path, Path], command: str
) -> None:
    b, f = pair_dirs
    args = [command, "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o")]
    code, _, err = run(*args, "--part", "1/2", "--finalize")
    assert code == 2 and "separate runs" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]  # nothing made


def split_equals_single(tmp_path: Path, args: list[str], n: int) -> dict[str, str]:
    """Run ``args`` once whole and once as ``n`` parts + --finalize; both trees, equal."""
    single, joined = tmp_path / "single", tmp_path / "joined"
    args = [*args, "-q", "--max-shard-size", "400B" if "compact" in args else "1500B"]
    code, _, err = run(*args, "-o", str(single))
    assert code == 0, err
    for i in range(1, n + 1):
        code, _, err = run(*args, "-o", str(joined), "--part", f"{i}/{n}")
        assert code == 0, err
        assert not joined.exists()
    code, _, err = run(*args, "-o", str(joined), "--finalize")
    assert code == 0, err
    expected = tree_hash(single)
    assert len([p for p in expected if p.endswith(".safetensors")]) >= 3  # really sharded
    assert tree_hash(joined) == expected
    assert not (tmp_path / "joined.fapm-parts").exists()
    return expected


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(
    "form",
    [
        ("prune", "--save", "task-vector"),
        ("prune", "--save", "task-vector", "--layout", "compact", "-m", "magnitude"),
        ("prune", "-m", "random", "--seed", "3", "--save", "task-vector"),
        ("diff",),
        ("merge", "-s", "0.7"),
    ],
)
def test_every_writing_command_splits_bit_for_bit(
    tmp_path: Path, pair_dirs: tuple[Path, Path], form: tuple[str, ...], n: int
) -> None:
    b, f = pair_dirs
    command, *extra = form
    split_equals_single(tmp_path, [command, "-b", str(b), "-f", str(f), *extra], n)


@pytest.mark.parametrize("n", [2, 3])
def test_prune_of_a_task_vector_and_merge_of_two_split_bit_for_bit(
    tmp_path: Path, pair_dirs: tuple[Path, Path], n: int
) -> None:
    b, f = pair_dirs
    tv = tmp_path / "tv"
    assert run("diff", "-b", str(b), "-f", str(f), "-o", str(tv), "-q")[0] == 0
    split_equals_single(tmp_path / "p", ["prune", "-b", str(b), "-t", str(tv)], n)
    merged = ["merge", "-b", str(b), "-t", str(tv), "-f", str(f), "-w", "0.5", "-w", "0.25"]
    split_equals_single(tmp_path / "m", merged, n)


def test_finalize_of_a_task_vector_reports_every_part(
    tmp_path: Path, pair_dirs: tuple[Path, Path]
) -> None:
    b, f = pair_dirs
    args = ["diff", "-b", str(b), "-f", str(f), "--max-shard-size", "1500B"]
    code, out, _ = run(*args, "-o", str(tmp_path / "single"), "--json")
    assert code == 0
    for i in (1, 2):
        assert run(*args, "-o", str(tmp_path / "o"), "--part", f"{i}/2", "-q")[0] == 0
    code, joined, err = run(*args, "-o", str(tmp_path / "o"), "--finalize", "--json")
    assert code == 0, err
    keys = ("totals", "tensors", "shards", "exact")
    assert {k: json.loads(joined)[k] for k in keys} == {k: json.loads(out)[k] for k in keys}
