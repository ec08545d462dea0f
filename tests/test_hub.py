"""Hub sources, with the real huggingface_hub against a Hub emulator on 127.0.0.1 (no network).

In-process tests point huggingface_hub's module constants (read from the environment at import)
at the emulator and at a cache in ``tmp_path``; the subprocess tests use the environment
variables themselves (``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``), as users do.
Outputs are compared with the same prune on local copies and with tests/reference.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fapm_cli import plan
from fapm_cli.cli.app import app
from fapm_cli.errors import InputError, ResourceError, UsageError
from fapm_cli.io import hub as hub_source
from fapm_cli.io.header import DTYPES, PlannedTensor, TensorInfo, read_header
from fapm_cli.io.reader import TensorRef, open_checkpoint
from fapm_cli.io.sources import LocalDir, resolve_source
from fapm_cli.verbs import prune as verbs_prune
from tests.checkpoints import load_checkpoint, make_pair, write_checkpoint
from tests.hub_server import Blob, FakeHub, etag_of
from tests.reference import reference_prune

FAPM = str(Path(sys.executable).parent / "fapm")
SHARD = 150_000  # each big tensor gets a shard of its own, larger than hub_source.FIRST_READ
TOKEN = "hf_MARKERtokenNEVERprintedXYZ"


def big_pair(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """make_pair's awkward tensors plus four 128 KiB ones, so that shards exceed a header read."""
    base, ft = make_pair(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    for i in range(4):
        b = torch.randn(128, 256, generator=gen) * 0.02
        base[f"model.layers.{i}.mlp.gate_proj.weight"] = b
        ft[f"model.layers.{i}.mlp.gate_proj.weight"] = (
            b + torch.randn(128, 256, generator=gen) * 1e-3
        )
    return base, ft


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        x, y = a[name].reshape(-1), b[name].reshape(-1)
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def metadata(out: Path) -> dict[str, str]:
    shard = sorted(out.glob("*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f:
        return dict(f.metadata())


def shard_files(tree: Path) -> list[Path]:
    return [p for p in tree.rglob("*") if p.is_file() and p.suffix == ".safetensors"]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def hf(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point in-process huggingface_hub at the emulator and an empty cache; return the same
    settings as an environment for subprocesses."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    settings = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "NO_COLOR": "1"}


@pytest.fixture
def repos(tmp_path: Path, hub: FakeHub) -> dict[str, Path]:
    """org/base and org/ft on the emulator, and the same files as local directories."""
    base, ft = big_pair(1)
    b = write_checkpoint(tmp_path / "local" / "base", base, shard_bytes=SHARD)
    f = write_checkpoint(
        tmp_path / "local" / "ft", ft, shard_bytes=SHARD, config={"model_type": "x", "side": "ft"}
    )
    hub.add_commit("org/base", b)
    hub.add_commit("org/ft", f)
    return {"base": b, "ft": f}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def local_run(tmp_path: Path, base: Path, ft: Path, name: str = "lo") -> dict[str, torch.Tensor]:
    code, _, err = run("prune", "-b", str(base), "-f", str(ft), "-o", str(tmp_path / name), "-q")
    assert code == 0, err
    return load_checkpoint(tmp_path / name)


# -- source syntax ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo_id", "revision"),
    [
        ("org/name", "org/name", None),
        ("org/name@v1.0", "org/name", "v1.0"),
        ("hf://org/name@" + "0a" * 20, "org/name", "0a" * 20),
        ("hf://Org-1/my.model_2", "Org-1/my.model_2", None),
        ("org/name@refs/pr/3", "org/name", "refs/pr/3"),
    ],
)  # fmt: skip
def test_repo_ref_syntax(text: str, repo_id: str, revision: str | None) -> None:
    ref = hub_source.parse_repo_ref(text)
    assert (ref.repo_id, ref.revision) == (repo_id, revision)


@pytest.mark.parametrize("text", ["org/na--me", "org/../x", "./org/name", "org", "a/b/c"])
def test_not_a_repo_ref(text: str) -> None:
    with pytest.raises(UsageError):
        hub_source.parse_repo_ref(text)


def test_local_path_wins_and_dot_slash_is_local(
    tmp_path: Path, hub: FakeHub, hf: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = make_pair(0)
    write_checkpoint(tmp_path / "org" / "name", base)
    hub.add_commit("org/name", tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert isinstance(resolve_source("org/name"), LocalDir)
    assert isinstance(resolve_source("./org/name"), LocalDir)
    assert hub.records == []
    hub_src = resolve_source("hf://org/name")  # hf:// always means the Hub
    assert isinstance(hub_src, hub_source.HubSource)
    with pytest.raises(InputError, match="no such file"):
        resolve_source("./org/other")  # never looked up on the Hub
    assert all("org/other" not in r.path for r in hub.records)


# -- headers without downloads -------------------------------------------------------------


def test_headers_are_read_remotely_without_downloading(
    repos: dict[str, Path], hub: FakeHub, hf: dict[str, str], tmp_path: Path
) -> None:
    checkpoint = open_checkpoint(resolve_source("org/base"))
    local = open_checkpoint(resolve_source(str(repos["base"])))
    assert checkpoint.tensors == local.tensors  # same names, shards, dtypes, shapes, offsets
    assert hub.downloads() == []
    for shard in checkpoint.shards:
        size = (repos["base"] / shard).stat().st_size
        assert size > hub_source.FIRST_READ
        assert hub.bytes_sent("org/base", shard) <= hub_source.FIRST_READ  # never the weights
    assert shard_files(tmp_path / "hf") == []


def test_large_header_takes_a_second_ranged_read(
    tmp_path: Path, hub: FakeHub, hf: dict[str, str]
) -> None:
    base, _ = make_pair(0)
    meta = {"padding": "x" * (hub_source.FIRST_READ + 5000)}
    d = write_checkpoint(tmp_path / "padded", base, metadata=meta)
    hub.add_commit("org/padded", d)
    header = resolve_source("org/padded").read_header("model.safetensors")
    expected = read_header(str(d / "model.safetensors"))
    assert header.tensors == expected.tensors and header.metadata["padding"] == meta["padding"]
    ranges = [r.range for r in hub.records if r.file == "model.safetensors"]
    assert len(ranges) == 2 and ranges[1] is not None and ranges[1].startswith("bytes=8-")


def test_remote_header_gets_the_same_validation_as_a_local_file(
    tmp_path: Path, hub: FakeHub, hf: dict[str, str]
) -> None:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # header length beyond the file
    hub.add_commit("org/broken", d)
    with pytest.raises(InputError) as remote:
        open_checkpoint(resolve_source("org/broken"))
    with pytest.raises(InputError) as local:
        open_checkpoint(resolve_source(str(d)))
    assert remote.value.message.split(": ", 1)[1] == local.value.message.split(": ", 1)[1]
    assert remote.value.message.startswith("org/broken/model.safetensors: ")


def test_mismatch_is_refused_before_any_shard_download(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    _, ft = big_pair(1)
    ft["model.layers.2.mlp.gate_proj.weight"] = ft["model.layers.2.mlp.gate_proj.weight"][:, :255]
    hub.add_commit("org/other-arch", write_checkpoint(tmp_path / "other", ft, shard_bytes=SHARD))
    hub.reset()
    code, out, err = run(
        "prune", "-b", "org/base", "-f", "org/other-arch", "-o", str(tmp_path / "o")
    )
    assert code == 4, err
    assert "shape" in err and "model.layers.2.mlp.gate_proj.weight" in err
    assert out == ""
    assert hub.downloads() == []  # no shard fetched
    shards = {(r.repo, r.file) for r in hub.records if (r.file or "").endswith(".safetensors")}
    assert len(shards) == 8  # every header of both repos was read...
    for repo, file in shards:  # ...as a prefix, never the weights
        assert repo and file and hub.bytes_sent(repo, file) <= hub_source.FIRST_READ
    assert shard_files(tmp_path / "hf") == []
    assert not (tmp_path / "o").exists()


# -- prune with Hub sources ----------------------------------------------------------------


def test_hub_base_with_local_finetuned_equals_local_run(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    out = tmp_path / "o"
    code, _, err = run("prune", "-b", "org/base", "-f", str(repos["ft"]), "-o", str(out), "-q")
    assert code == 0, err
    result = load_checkpoint(out)
    assert_same_tensors(result, local_run(tmp_path, repos["base"], repos["ft"]))
    base, ft = load_checkpoint(repos["base"]), load_checkpoint(repos["ft"])
    assert_same_tensors(result, reference_prune(base, ft, Fraction(9, 10)))
    sha = hub.repos["org/base"].refs["main"]
    assert metadata(out)["fapm.base"] == f"org/base@{sha}"
    # Each shard fetched once, lazily, at the resolved commit.
    fetched = sorted(r.file or "" for r in hub.downloads())
    assert fetched == sorted(p.name for p in repos["base"].glob("*.safetensors"))
    assert all(f"/resolve/{sha}/" in r.path for r in hub.records if r.file)


def test_local_base_with_hub_finetuned_copies_files_from_the_hub(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    out = tmp_path / "o"
    code, _, err = run("prune", "-b", str(repos["base"]), "-f", "hf://org/ft@main", "-o", str(out))
    assert code == 0, err
    assert_same_tensors(load_checkpoint(out), local_run(tmp_path, repos["base"], repos["ft"]))
    assert (out / "config.json").read_bytes() == (repos["ft"] / "config.json").read_bytes()
    assert metadata(out)["fapm.finetuned"] == f"org/ft@{hub.repos['org/ft'].refs['main']}"


def test_pinned_revisions_select_their_own_content(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    first = hub.repos["org/ft"].refs["main"]
    hub.tag("org/ft", "v1", first)
    _, ft2 = big_pair(2)  # a second fine-tune on the same base
    ft2_dir = write_checkpoint(tmp_path / "local" / "ft2", ft2, shard_bytes=SHARD)
    second = hub.add_commit("org/ft", ft2_dir)
    assert second != first and hub.repos["org/ft"].refs["main"] == second
    want1 = local_run(tmp_path, repos["base"], repos["ft"], "l1")
    want2 = local_run(tmp_path, repos["base"], ft2_dir, "l2")
    assert not all(torch.equal(want1[n], want2[n]) for n in want1)

    cases = [
        ("org/ft@v1", want1, first),
        (f"org/ft@{first}", want1, first),
        ("org/ft", want2, second),
    ]
    for i, (source, want, sha) in enumerate(cases):
        hub.reset()
        out = tmp_path / f"o{i}"
        code, _, err = run("prune", "-b", str(repos["base"]), "-f", source, "-o", str(out), "-q")
        assert code == 0, err
        assert_same_tensors(load_checkpoint(out), want)
        assert metadata(out)["fapm.finetuned"] == f"org/ft@{sha}"
        resolves = [r for r in hub.records if r.file]
        assert all(f"/resolve/{sha}/" in r.path for r in resolves)
        assert bool(hub.downloads()) == (i != 1)  # the same commit again: all from the cache


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("org/missing", "repository org/missing not found"),
        ("org/base@no-such-branch", "revision 'no-such-branch' not found"),
        ("org/gated", "is gated"),
        ("org/private", "not found (or private)"),
    ],
)
def test_hub_errors_are_one_line_with_a_hint(
    tmp_path: Path,
    repos: dict[str, Path],
    hub: FakeHub,
    hf: dict[str, str],
    source: str,
    needle: str,
) -> None:
    for repo_id, kind in (("org/gated", "gated"), ("org/private", "private")):
        hub.add_commit(repo_id, repos["base"])
        setattr(hub.repos[repo_id], kind, True)
    code, out, err = run("prune", "-b", source, "-f", str(repos["ft"]), "-o", str(tmp_path / "o"))
    assert code == 3
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert needle in lines[0]
    statuses = {r.status for r in hub.records if "/api/models/" in r.path}
    assert statuses == ({401} if source in ("org/gated", "org/private") else {404})


def test_connection_lost_mid_shard(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    hub.drop_after["model-00002-of-00004.safetensors"] = 1000
    out = tmp_path / "o"
    code, _, err = run("prune", "-b", "org/base", "-f", str(repos["ft"]), "-o", str(out), "-q")
    assert code == 3
    assert (
        "error: org/base/model-00002-of-00004.safetensors: connection lost while downloading" in err
    )
    assert "hint: " in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".o.fapm-tmp-*"))


# -- disk budget ---------------------------------------------------------------------------


def _big_files_bytes(root: Path) -> int:
    """Bytes of files over 50 kB under ``root``: shards (whole or partial), never config/index."""
    total = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            size = p.stat().st_size
            total += size if size > 50_000 else 0
    return total


def test_disk_budget_smaller_than_one_checkpoint(
    tmp_path: Path,
    repos: dict[str, Path],
    hub: FakeHub,
    hf: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shard_sizes = [p.stat().st_size for p in repos["base"].glob("*.safetensors")]
    checkpoint = sum(shard_sizes)
    budget = max(shard_sizes) + 10_000  # two checkpoints need 4x that
    assert budget < checkpoint
    peaks: list[int] = []
    original = hub_source.HubSource.local_path

    def measured(self: hub_source.HubSource, name: str) -> str:
        path = original(self, name)  # right after a fetch: the moment of peak use
        peaks.append(_big_files_bytes(tmp_path / "hf"))
        return path

    monkeypatch.setattr(hub_source.HubSource, "local_path", measured)
    out = tmp_path / "o"
    report = verbs_prune.prune(
        "org/base", "org/ft", str(out), plan.PruneOptions(), disk_budget=budget
    )
    assert_same_tensors(load_checkpoint(out), local_run(tmp_path, repos["base"], repos["ft"]))
    assert len(hub.downloads()) == 2 * len(shard_sizes)  # every shard fetched exactly once
    assert peaks and max(peaks) <= budget + max(shard_sizes)
    assert report.base.startswith("org/base@")
    # Fetched shards went to a private directory, now removed; the user's cache got none.
    assert _big_files_bytes(tmp_path / "hf") == 0
    assert not list((tmp_path / "hf" / "hub").glob(".fapm-download-*"))


@pytest.mark.parametrize("command", ["diff", "merge", "score", "prune-tv"])
def test_disk_budget_bounds_every_command_that_reads_the_hub(
    tmp_path: Path,
    repos: dict[str, Path],
    hub: FakeHub,
    hf: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """diff, merge, score and prune of a task vector keep at most the budget (plus the shard
    being fetched) of downloads on disk, releasing each shard after its last use, and give
    what the same command gives on local copies."""
    shard_sizes = [p.stat().st_size for p in repos["base"].glob("*.safetensors")]
    # While merge's third side is fetched, base's and the first input's shards are held.
    held = 2 if command == "merge" else 1
    budget = held * max(shard_sizes) + 10_000
    assert budget < sum(shard_sizes)
    peaks: list[int] = []
    original = hub_source.HubSource.local_path

    def measured(self: hub_source.HubSource, name: str) -> str:
        path = original(self, name)
        peaks.append(_big_files_bytes(tmp_path / "hf"))
        return path

    local_tv = tmp_path / "local-tv"
    if command == "prune-tv":  # the task vector on the Hub, base local... and on the Hub too
        code, _, err = run("diff", "-b", str(repos["base"]), "-f", str(repos["ft"]),
                           "-o", str(local_tv), "-q", "--max-shard-size", str(SHARD))  # fmt: skip
        assert code == 0, err
        hub.add_commit("org/tv", local_tv)
    monkeypatch.setattr(hub_source.HubSource, "local_path", measured)
    args = {
        "diff": ["diff", "-b", "{base}", "-f", "{ft}"],
        "merge": ["merge", "-b", "{base}", "-f", "{ft}", "-f", "{ft}", "-w", "0.5"],
        "score": ["score", "-b", "{base}", "-f", "{ft}", "--format", "json"],
        "prune-tv": ["prune", "-b", "{base}", "-t", "{tv}"],
    }[command]
    out = [] if command == "score" else ["-o"]

    def argv(base: str, ft: str, tv: str, dest: Path) -> list[str]:
        filled = [a.format(base=base, ft=ft, tv=tv) for a in args]
        return filled + ([*out, str(dest)] if out else [])

    code, hub_out, err = run(*argv("org/base", "org/ft", "org/tv", tmp_path / "o"),
                             "--disk-budget", str(budget))  # fmt: skip
    assert code == 0, err
    assert peaks and max(peaks) <= budget + max(shard_sizes)
    assert _big_files_bytes(tmp_path / "hf") == 0  # every download released, none cached
    monkeypatch.setattr(hub_source.HubSource, "local_path", original)
    code, local_out, err = run(
        *argv(str(repos["base"]), str(repos["ft"]), str(local_tv), tmp_path / "lo")
    )
    assert code == 0, err
    if command == "score":
        a, b = json.loads(hub_out), json.loads(local_out)
        assert a["tensors"] == b["tensors"] and a["total"] == b["total"]
    else:
        assert_same_tensors(load_checkpoint(tmp_path / "o"), load_checkpoint(tmp_path / "lo"))


def test_impossible_disk_budget_fails_before_downloading(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    hub.reset()
    code, _, err = run(
        "prune",
        "-b",
        "org/base",
        "-f",
        "org/ft",
        "-o",
        str(tmp_path / "o"),
        "--disk-budget",
        "50kB",
    )
    assert code == 6, err
    assert "--disk-budget" in err and "hint: raise --disk-budget to at least" in err
    assert hub.downloads() == []


def test_disk_budget_with_one_hub_side_needs_one_shard_at_a_time(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    out = tmp_path / "o"
    code, _, err = run(
        "prune",
        "-b",
        "org/base",
        "-f",
        str(repos["ft"]),
        "-o",
        str(out),
        "--disk-budget",
        "1",
        "-q",
    )
    assert code == 0, err
    assert_same_tensors(load_checkpoint(out), local_run(tmp_path, repos["base"], repos["ft"]))


def _item(name: str, base_shard: str | None, ft_shard: str | None) -> plan.Item:
    info = TensorInfo(name, DTYPES["F32"], (4,), 0, 16)
    return plan.Item(
        name,
        plan.Action.PRUNE,
        TensorRef(base_shard, info) if base_shard else None,
        TensorRef(ft_shard, info) if ft_shard else None,
        PlannedTensor(name, DTYPES["F32"], (4,)),
    )


def test_order_for_disk_groups_tensors_by_shard() -> None:
    # Finetuned is one local file whose tensor order alternates between two Hub base shards.
    items = [_item("t1", "b1", "f"), _item("t2", "b2", "f"), _item("t3", "b1", "f"),
             _item("t4", "b2", "f")]  # fmt: skip

    def cost(side: str, shard: str) -> int:
        return 100 if side == "base" else 0

    assert plan.disk_needed(items, cost) == 100  # b1 still held when b2 is fetched
    ordered = plan.order_for_disk(items, cost, budget=0)
    assert [i.name for i in ordered] == ["t1", "t3", "t2", "t4"]
    assert plan.disk_needed(ordered, cost) == 0


def test_order_for_disk_keeps_aligned_shards_and_refuses_too_small_budgets() -> None:
    items = [_item("a", "b1", "f1"), _item("b", "b1", "f1"), _item("c", "b2", "f2")]

    def cost(side: str, shard: str) -> int:
        return {"b1": 70, "f1": 100, "b2": 50, "f2": 60}[shard]

    assert plan.order_for_disk(items, cost, budget=70) == items  # f1 fetched while b1 held
    with pytest.raises(ResourceError) as err:
        plan.order_for_disk(items, cost, budget=69)
    assert "at least 70 bytes" in (err.value.hint or "")


# -- the cache, offline, and tokens (subprocesses, configured by environment only) ----------


def fill_cache(home: Path, repo_id: str, files: Path, sha: str) -> None:
    """huggingface_hub's cache layout: blobs named by ETag, snapshot symlinks, refs/main."""
    root = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / sha).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    for p in files.iterdir():
        etag = etag_of(p.name, Blob(p.read_bytes()))
        shutil.copyfile(p, root / "blobs" / etag)
        (root / "snapshots" / sha / p.name).symlink_to(Path("..") / ".." / "blobs" / etag)


def fapm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAPM, *args], capture_output=True, text=True, env=env, timeout=300)


def test_offline_prune_from_a_prepopulated_cache(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    sha = hub.repos["org/base"].refs["main"]
    fill_cache(tmp_path / "hf", "org/base", repos["base"], sha)
    env = {**hf, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "o"
    r = fapm(env, "prune", "-b", "org/base", "-f", str(repos["ft"]), "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == ("", "")
    assert hub.records == []  # not one request
    want = reference_prune(
        load_checkpoint(repos["base"]), load_checkpoint(repos["ft"]), Fraction(9, 10)
    )
    assert_same_tensors(load_checkpoint(out), want)
    assert metadata(out)["fapm.base"] == f"org/base@{sha}"

    missing = fapm(env, "prune", "-b", "org/ft", "-f", str(repos["ft"]), "-o", str(tmp_path / "p"))
    assert missing.returncode == 3
    assert "offline (HF_HUB_OFFLINE=1)" in missing.stderr and "hint: " in missing.stderr
    assert hub.records == []


def test_token_is_used_but_never_shown_or_written(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    hub.repos["org/base"].gated = True
    hub.repos["org/base"].tokens.add(TOKEN)
    out = tmp_path / "o"
    ok = fapm({**hf, "HF_TOKEN": TOKEN}, "prune", "-b", "org/base", "-f", "org/ft", "-o", str(out),
              "--json")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert any(r.authorized and r.status == 200 for r in hub.records)
    denied = fapm({**hf, "HF_TOKEN": TOKEN + "x"}, "--debug", "prune", "-b", "org/base",
                  "-f", "org/ft", "-o", str(tmp_path / "p"))  # fmt: skip
    assert denied.returncode == 3 and "is gated" in denied.stderr
    for text in (ok.stdout, ok.stderr, denied.stdout, denied.stderr):
        assert TOKEN not in text
    written = [p for p in (*out.rglob("*"), *(tmp_path / "hf").rglob("*")) if p.is_file()]
    assert written and not any(TOKEN.encode() in p.read_bytes() for p in written)


def test_a_cache_filled_online_serves_the_same_sources_offline(
    tmp_path: Path,
    repos: dict[str, Path],
    hub: FakeHub,
    hf: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    args = ["prune", "-b", "org/base", "-f", "org/ft@main", "-q", "-o"]
    code, _, err = run(*args, str(tmp_path / "online"))
    assert code == 0, err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.reset()
    code, _, err = run(*args, str(tmp_path / "offline"))
    assert code == 0, err
    assert hub.records == []
    assert_same_tensors(load_checkpoint(tmp_path / "offline"), load_checkpoint(tmp_path / "online"))


def test_quiet_silences_the_hub_clients_own_warnings(
    tmp_path: Path, repos: dict[str, Path], hub: FakeHub, hf: dict[str, str]
) -> None:
    """huggingface_hub logs its retries (here a 429 on a shard) on stderr itself: without -q
    the user sees them, with -q nothing but errors is printed, and the run still succeeds."""
    shard = sorted(p.name for p in repos["base"].glob("*.safetensors"))[0]
    outputs = {}
    for quiet in (False, True):
        hub.rate_limit[shard] = 1
        out = tmp_path / f"o{int(quiet)}"
        args = ["prune", "-b", "org/base", "-f", str(repos["ft"]), "-o", str(out)]
        r = fapm({**hf, "HF_HOME": str(tmp_path / f"hf{int(quiet)}")}, *args, *["-q"] * quiet)
        assert r.returncode == 0, r.stderr
        assert hub.rate_limit[shard] == 0  # the 429 was served and retried
        outputs[quiet] = r.stderr
    assert "retry" in outputs[False].lower()
    assert outputs[True] == ""
