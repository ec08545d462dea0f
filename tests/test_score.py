"""`fapm score`: every figure against an independent whole-tensor computation.

The reference is tests/reference.py (scores, masks) plus float64 whole-tensor math here.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fapm_cli.names import layer_of, module_of
from tests.checkpoints import LABELS, load_checkpoint, make_pair, tree_hash, write_checkpoint
from tests.reference import reference_mask, reference_scores

runner = CliRunner()


def fapm(*args: str) -> tuple[int, str, str]:
    from fapm_cli.cli.app import app

    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def expected(
    names: list[str], base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], s: Fraction
) -> dict[str, float | int | None]:
    """The figures over the union of ``names``, from whole tensors in float64."""
    b = torch.cat([base[n].reshape(-1).double() for n in names])
    f = torch.cat([ft[n].reshape(-1).double() for n in names])
    tau = f - b
    nz = b != 0
    positive = sum(int((reference_scores(base[n], ft[n], "fapm") > 0).sum()) for n in names)
    fm = torch.cat([reference_mask(base[n], ft[n], s, "fapm").reshape(-1) for n in names])
    mm = torch.cat([reference_mask(base[n], ft[n], s, "magnitude").reshape(-1) for n in names])
    sq = float((tau * tau).sum())
    union = int((fm | mm).sum())
    n = b.numel()
    return {
        "numel": n,
        "mean_abs_tau": float(tau.abs().mean()) if n else None,
        "mean_abs_base": float(b.abs().mean()) if n else None,
        "mean_rel_change": float((tau[nz].abs() / b[nz].abs()).mean()) if nz.any() else None,
        "base_zero": int((~nz).sum()),
        "positive_score_fraction": positive / n if n else None,
        "fapm_sq_norm_kept_fraction": float((tau * tau)[fm].sum()) / sq if sq else None,
        "magnitude_sq_norm_kept_fraction": float((tau * tau)[mm].sum()) / sq if sq else None,
        "mask_jaccard": int((fm & mm).sum()) / union if union else None,
        "kept": int(fm.sum()),
    }


def assert_figures(got: dict[str, object], want: dict[str, float | int | None]) -> None:
    for key, value in want.items():
        if value is None or isinstance(value, int) or key == "positive_score_fraction":
            assert got[key] == value, key  # counts and shares of counts: exact
        else:
            # element-wise math is float32 in fapm, float64 here
            assert got[key] == pytest.approx(value, rel=2e-6, abs=1e-12), key


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base, ft = make_pair(seed=5, dtype=request.param)
    b = write_checkpoint(tmp_path / "base", base, shard_bytes=1800)
    f = write_checkpoint(tmp_path / "ft", ft, shard_bytes=2600)
    return b, f, base, ft


@pytest.mark.parametrize("sparsity", ["0.9", "0.5", "0", "1"])
def test_every_figure_matches_an_independent_computation(
    pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]], sparsity: str
) -> None:
    b, f, base, ft = pair
    s = Fraction(sparsity)
    before = tree_hash(b.parent)
    code, out, err = fapm("score", "-b", str(b), "-f", str(f), "-s", sparsity, "--format", "json")
    assert (code, err) == (0, ""), err
    doc = json.loads(out)
    assert doc["command"] == "score" and doc["sparsity"] == float(s) and doc["lam"] == 1.0
    assert doc["skipped"] == ["model.position_ids"]  # integer: copied by prune, not scored
    rows = {t["name"]: t for t in doc["tensors"]}
    assert set(rows) == set(LABELS)
    for name, (layer, module) in LABELS.items():
        assert (rows[name]["layer"], rows[name]["module"]) == (layer, module)
        assert rows[name]["shape"] == list(base[name].shape)
        assert_figures(rows[name], expected([name], base, ft, s))

    layers = {r["layer"]: r for r in doc["layers"]}
    assert list(layers) == [0, 1, None]
    for layer, row in layers.items():
        assert_figures(row, expected([n for n, v in LABELS.items() if v[0] == layer], base, ft, s))
    modules = {r["module"]: r for r in doc["modules"]}
    assert list(modules) == ["embeddings", "q", "mlp", "norms", "lm_head", "other"]
    for module, row in modules.items():
        names = [n for n, v in LABELS.items() if v[1] == module]
        assert_figures(row, expected(names, base, ft, s))
    for cell in doc["cells"]:
        names = [n for n, v in LABELS.items() if v == (cell["layer"], cell["module"])]
        assert names
        assert_figures(cell, expected(names, base, ft, s))
    assert_figures(doc["total"], expected(list(LABELS), base, ft, s))
    assert tree_hash(b.parent) == before  # inputs untouched, and no model written


def test_figures_by_hand_on_the_method_worked_example(tmp_path: Path) -> None:
    # ../shared/METHOD.md: s = 0.75 keeps {2, 5} (fapm) and {2, 4} (magnitude).
    w_pre = torch.tensor([[0.020, -0.001, 0.015, 0.030], [0.005, -0.025, 0.0005, 0.010]])
    tau = torch.tensor([[1e-4, 2e-4, -3e-4, 5e-5], [-4e-4, 1e-4, 3e-4, -2e-4]])
    b = write_checkpoint(tmp_path / "b", {"w": w_pre})
    f = write_checkpoint(tmp_path / "f", {"w": w_pre + tau})
    code, out, _ = fapm("score", "-b", str(b), "-f", str(f), "-s", "0.75", "--format", "json")
    assert code == 0
    row = json.loads(out)["tensors"][0]
    assert row["kept"] == 2
    assert row["mask_jaccard"] == pytest.approx(1 / 3)  # {2,5} vs {2,4}
    assert row["positive_score_fraction"] == 4 / 8  # S > 0 at flat indices 0, 2, 3, 5
    sq = [x * x for x in (1e-4, 2e-4, 3e-4, 5e-5, 4e-4, 1e-4, 3e-4, 2e-4)]
    assert row["fapm_sq_norm_kept_fraction"] == pytest.approx((sq[2] + sq[5]) / sum(sq), rel=1e-5)
    assert row["magnitude_sq_norm_kept_fraction"] == pytest.approx(
        (sq[2] + sq[4]) / sum(sq), rel=1e-5
    )
    assert row["mean_abs_base"] == pytest.approx(0.0133125, rel=1e-6)


def test_sort_and_top(
    pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> None:
    b, f, base, ft = pair
    args = ["score", "-b", str(b), "-f", str(f), "--format", "json"]
    code, out, _ = fapm(*args, "--sort", "mean_rel_change", "--top", "3")
    assert code == 0
    doc = json.loads(out)
    s = Fraction(9, 10)
    want = sorted(LABELS, key=lambda n: -(expected([n], base, ft, s)["mean_rel_change"] or 0))[:3]
    assert [t["name"] for t in doc["tensors"]] == want
    assert (doc["sort"], doc["top"]) == ("mean_rel_change", 3)
    assert len(doc["layers"]) == 3  # roll-ups cover every tensor, whatever --top says
    assert doc["total"]["numel"] == sum(base[n].numel() for n in LABELS)
    _, out, _ = fapm(*args, "--sort", "name")
    assert [t["name"] for t in json.loads(out)["tensors"]] == sorted(LABELS)
    code, _, err = fapm(*args, "--sort", "bogus")
    assert code == 2 and "bogus" in err


def test_csv_parses_and_matches_json(
    pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> None:
    b, f, _, _ = pair
    common = ["score", "-b", str(b), "-f", str(f), "--sort", "numel"]
    code, out, err = fapm(*common, "--format", "csv")
    assert (code, err) == (0, "")
    rows = list(csv.DictReader(io.StringIO(out)))
    doc = json.loads(fapm(*common, "--format", "json")[1])
    tensors = [r for r in rows if r["level"] == "tensor"]
    assert [r["name"] for r in tensors] == [t["name"] for t in doc["tensors"]]
    for r, t in zip(tensors, doc["tensors"], strict=True):
        assert int(r["numel"]) == t["numel"]
        assert float(r["mean_abs_tau"]) == t["mean_abs_tau"]
        assert r["layer"] == ("" if t["layer"] is None else str(t["layer"]))
        jac = t["mask_jaccard"]
        assert r["mask_jaccard"] == ("" if jac is None else repr(jac))
    assert [r["name"] for r in rows if r["level"] == "layer"] == ["0", "1", "none"]
    assert [r["name"] for r in rows if r["level"] == "module"] == [
        m["module"] for m in doc["modules"]
    ]
    (total,) = [r for r in rows if r["level"] == "total"]
    assert float(total["fapm_sq_norm_kept_fraction"]) == doc["total"]["fapm_sq_norm_kept_fraction"]
    code, out, _ = fapm(*common, "--json")  # the flag every command has
    assert code == 0
    doc2 = json.loads(out)
    doc.pop("seconds", None), doc2.pop("seconds", None)
    assert doc2 == doc
    assert fapm(*common, "--json", "--format", "csv")[0] == 2


def test_table_output(
    pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> None:
    b, f, _, _ = pair
    code, out, err = fapm("score", "-b", str(b), "-f", str(f), "--top", "2", "--sort", "numel")
    assert (code, err) == (0, "")
    assert "tensors (2 of 11)" in out and "per layer" in out and "per module type" in out
    assert "where base == 0" in out  # says that zero-base entries are excluded


def test_html_plot_is_self_contained(
    tmp_path: Path, pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]
) -> None:
    b, f, _, _ = pair
    page = tmp_path / "plot.html"
    code, out, _ = fapm(
        "score", "-b", str(b), "-f", str(f), "--plot", str(page), "--format", "json"
    )
    assert code == 0 and json.loads(out)["plot"] == str(page)
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")
    cells = {(la, m) for la, m in LABELS.values()}
    grid = 3 * 6  # layers 0, 1, none x the six module types present
    assert text.count("<rect") == grid + 5  # + 5 legend stops
    assert text.count('fill="#eeeeee"') == grid - len(cells)  # grey: no such tensors
    assert "layer 1, mlp: mean_rel_change" in text


def test_png_plot(
    tmp_path: Path, pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]
) -> None:
    pytest.importorskip("matplotlib")
    b, f, _, _ = pair
    png = tmp_path / "plot.png"
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "--plot", str(png), "-q")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_is_a_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> None:
    b, f, _, _ = pair
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
    code, out, err = fapm("score", "-b", str(b), "-f", str(f), "--plot", str(tmp_path / "p.png"))
    assert code == 2 and out == ""
    assert "matplotlib" in err and "fapm[plot]" in err
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "--plot", str(tmp_path / "p.svg"))
    assert code == 2 and ".svg" in err
    assert not list(tmp_path.glob("p.*"))


def test_save_scores_writes_the_fapm_scores(
    tmp_path: Path, pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]
) -> None:
    b, f, base, ft = pair
    out = tmp_path / "scores"
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "--save-scores", str(out), "-q")
    assert (code, err) == (0, "")
    scores = load_checkpoint(out)
    assert set(scores) == set(LABELS)
    for name in LABELS:
        want = reference_scores(base[name], ft[name], "fapm").to(torch.float32)
        assert scores[name].dtype == torch.float32
        assert scores[name].shape == base[name].shape
        assert torch.equal(scores[name].reshape(-1), want), name
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as fh:
        meta = fh.metadata()
    assert meta["fapm.kind"] == "scores" and meta["fapm.lam"] == "1.0"
    # the output exists now: a second run refuses it unless --overwrite
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "--save-scores", str(out))
    assert code == 5 and "already exists" in err
    code, _, _ = fapm("score", "-b", str(b), "-f", str(f), "--save-scores", str(out), "--overwrite")
    assert code == 0


def test_refuses_what_prune_refuses(tmp_path: Path) -> None:
    base, ft = make_pair()
    ft["model.layers.1.odd"] = torch.ones(11)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    code, out, err = fapm("score", "-b", str(b), "-f", str(f))
    assert code == 4 and out == "" and "model.layers.1.odd" in err
    code, _, err = fapm("score", "-b", str(b), "-f", str(b), "-s", "1.5")
    assert code == 2 and "sparsity" in err


@pytest.mark.parametrize(
    ("name", "layer", "module"),
    [
        ("model.layers.12.self_attn.k_proj.weight", 12, "k"),
        ("model.layers.3.self_attn.v_proj.bias", 3, "v"),
        ("model.layers.3.self_attn.o_proj.weight", 3, "o"),
        ("model.layers.0.post_attention_layernorm.weight", 0, "norms"),
        ("model.layers.7.mlp.gate_proj.weight", 7, "mlp"),
        ("transformer.h.5.attn.c_attn.weight", 5, "qkv"),
        ("transformer.h.5.mlp.c_fc.weight", 5, "mlp"),
        ("transformer.h.5.mlp.c_proj.weight", 5, "mlp"),
        ("transformer.h.5.attn.c_proj.weight", 5, "o"),
        ("transformer.h.5.ln_1.weight", 5, "norms"),
        ("transformer.wte.weight", None, "embeddings"),
        ("gpt_neox.layers.2.attention.query_key_value.weight", 2, "qkv"),
        ("gpt_neox.layers.2.attention.dense.weight", 2, "o"),
        ("lm_head.weight", None, "lm_head"),
        ("model.rotary.inv_freq", None, "other"),
    ],
)
def test_layer_and_module_from_names(name: str, layer: int | None, module: str) -> None:
    assert layer_of(name) == layer
    assert module_of(name) == module


def test_top_without_sort_shows_the_riskiest(tmp_path: Path) -> None:
    base, ft = make_pair(seed=21)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    code, out, _ = fapm("score", "-b", str(b), "-f", str(f), "--top", "3", "--format", "json")
    assert code == 0
    doc = json.loads(out)
    everything = json.loads(fapm("score", "-b", str(b), "-f", str(f), "--format", "json")[1])
    ranked = sorted(
        (t for t in everything["tensors"] if t["mean_rel_change"] is not None),
        key=lambda t: -t["mean_rel_change"],
    )
    assert [t["name"] for t in doc["tensors"]] == [t["name"] for t in ranked[:3]]
    assert doc["sort"] == "mean_rel_change"


@pytest.mark.parametrize("width", [60, 80, 100])
def test_tables_fit_a_narrow_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """Below the table's width, rows are stacked: names kept (cut in the middle only if
    longer than the line), every figure shown, no line wider than the terminal."""
    import io

    from rich.console import Console

    from fapm_cli.records import SortKey, sort_tensors
    from fapm_cli.report import score as rendering
    from fapm_cli.verbs.score import score

    base, ft = make_pair(seed=22)
    long = "model.layers.0.self_attn.a_very_long_projection_name_for_a_narrow_terminal.weight"
    base[long], ft[long] = base["model.norm.weight"].clone(), ft["model.norm.weight"].clone()
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    buf = io.StringIO()
    monkeypatch.setattr(rendering, "wide_console", lambda: Console(file=buf, width=width))
    report = score(str(b), str(f), Fraction(9, 10))
    rows = sort_tensors(report.tensors, SortKey.NAME, None)
    rendering.print_score(report, rows)
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= width
    for t in rows:
        shown = t.name if len(t.name) <= width else rendering.middle(t.name, width)
        assert shown in lines, t.name
    assert rendering.middle(long, 40).startswith("model.layers.0.self")
    assert (
        rendering.middle(long, 40).endswith("terminal.weight")
        and len(rendering.middle(long, 40)) == 40
    )
    text = buf.getvalue()
    assert text.count("Jaccard") == len(rows) + len(report.by_layer()) + len(report.by_module()) + 1


def test_plot_follows_the_overwrite_rule_of_every_output(tmp_path: Path) -> None:
    base, ft = make_pair(seed=23)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    plot = tmp_path / "plot.html"
    plot.write_text("mine")
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "--plot", str(plot), "-q")
    assert code == 5 and "already exists" in err and plot.read_text() == "mine"
    code, _, err = fapm(
        "score", "-b", str(b), "-f", str(f), "--plot", str(plot), "-q", "--overwrite"
    )
    assert code == 0, err
    assert plot.read_text().startswith("<!DOCTYPE html") or "<svg" in plot.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f", "plot.html"]  # no temp left


# -- sweeps: several sparsities in one pass ----------------------------------------------------


SWEEP = ["0", "0.5", "0.9", "0.99", "1"]


@pytest.mark.parametrize("path", ["small", "histogram"])
def test_a_sweep_reports_what_each_single_run_reports(
    pair: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]],
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``-s A,B,...``: per sparsity, the very report a run at that sparsity gives (only the
    run time differs), and every figure against the independent computation; on both
    selection paths (small tensors: radix select; larger ones: histograms, many chunks)."""
    from fapm_cli.compute import scoring

    if path == "histogram":
        monkeypatch.setattr(scoring, "SMALL_TENSOR", 0)
        monkeypatch.setattr(scoring, "FUSED_CHUNK", 64)
    b, f, base, ft = pair
    code, out, err = fapm("score", "-b", str(b), "-f", str(f), "-s", ",".join(SWEEP), "--json")
    assert (code, err) == (0, ""), err
    doc = json.loads(out)
    assert doc["command"] == "score" and doc["sparsities"] == [float(Fraction(s)) for s in SWEEP]
    assert len(doc["sweep"]) == len(SWEEP)
    for s, one in zip(SWEEP, doc["sweep"], strict=True):
        code, out, err = fapm("score", "-b", str(b), "-f", str(f), "-s", s, "--json")
        assert code == 0, err
        single = json.loads(out)
        for d in (single, one):
            d.pop("seconds")
        assert one == {k: v for k, v in single.items()
                       if k not in ("schema", "command", "fapm_version", "plot")}  # fmt: skip
        assert_figures(one["total"], expected(list(LABELS), base, ft, Fraction(s)))
        rows = {t["name"]: t for t in one["tensors"]}
        for name in LABELS:
            assert_figures(rows[name], expected([name], base, ft, Fraction(s)))


def test_sweep_csv_table_and_refusals(tmp_path: Path) -> None:
    base, ft = make_pair(seed=3)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    code, out, _ = fapm("score", "-b", str(b), "-f", str(f), "-s", "0.5,0.9", "--format", "csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert {r["sparsity"] for r in table} == {"0.5", "0.9"}
    totals = {r["sparsity"]: r for r in table if r["level"] == "total"}
    _, single, _ = fapm("score", "-b", str(b), "-f", str(f), "-s", "0.5", "--format", "csv")
    want = next(r for r in csv.DictReader(io.StringIO(single)) if r["level"] == "total")
    assert {k: v for k, v in totals["0.5"].items() if k != "sparsity"} == want
    code, out, _ = fapm("score", "-b", str(b), "-f", str(f), "--density", "0.5,0.1")
    assert code == 0 and "sparsity sweep" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("│")] == ["0.5", "0.9"]
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "-s", "0.5,0.9", "--plot", "x.html")
    assert code == 2 and "one sparsity" in err
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "-s", "0.5,,0.9")
    assert code == 2 and "empty entry" in err
    code, _, err = fapm("score", "-b", str(b), "-f", str(f), "-s", "0.5,1.5")
    assert code == 2 and "outside" in err


@pytest.mark.parametrize("n", [7, 5000, 70_000])
def test_native_sweep_equals_the_torch_path_with_ties_in_order(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C path of a sweep against the torch path, sparsity by sparsity: counts exact,
    sums to the last bits a summation order allows; with a plateau of equal scores straddling
    chunks, so that some thresholds keep only part of their ties (taken in flat order)."""
    from fapm_cli.compute import native, scoring
    from fapm_cli.compute import score as compute_score

    if native.kernels() is None:
        pytest.skip("the C kernels are not built")
    monkeypatch.setattr(scoring, "FUSED_CHUNK", 1000)
    gen = torch.Generator().manual_seed(n)
    b = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    f = (b.float() + torch.randn(n, generator=gen) * 5e-4).to(torch.bfloat16)
    b[n // 5 : n // 2], f[n // 5 : n // 2] = 0.01, 0.0105  # equal scores: ties at 0.7, 0.8
    b[:2] = 0.0
    sparsities = [Fraction(x) for x in ("0", "3/10", "7/10", "8/10", "9/10", "1")]
    ws = scoring.Workspace()
    got = compute_score.score_sweep("t", b, f, sparsities, 0.7, None, ws)
    for s, g in zip(sparsities, got, strict=True):
        w = compute_score._score_torch("t", b, f, s, 0.7, None, ws)
        for name in ("numel", "base_nonzero", "positive", "kept", "overlap"):
            assert getattr(g, name) == getattr(w, name), (s, name)
        for name in ("abs_tau", "abs_base", "rel", "sq", "sq_fapm", "sq_magnitude"):
            assert getattr(g, name) == pytest.approx(getattr(w, name), rel=1e-12), (s, name)


def test_sums_add_every_field() -> None:
    """Sums.__add__ is written out field by field: it must cover each one, in order."""
    import dataclasses

    from fapm_cli.records import Sums

    names = [f.name for f in dataclasses.fields(Sums)]
    a = Sums(*range(1, len(names) + 1))
    b = Sums(*(10 * i for i in range(1, len(names) + 1)))
    assert [getattr(a + b, x) for x in names] == [11 * i for i in range(1, len(names) + 1)]


def test_indented_json_is_the_standard_librarys(tmp_path: Path) -> None:
    """emit_json's encoder against json.dumps(indent=2, allow_nan=False): the same text for
    random nested documents (empty and nested containers, escapes, floats, non-ASCII), for a
    sweep's report, and the same refusals."""
    import random

    from fapm_cli.report.console import dumps_indented

    rng = random.Random(5)
    leaves = [None, True, False, 0, -3, 1.5, 1e-300, 2**70, 'a"b\n\u00e9\u2603', "", -0.0]

    def doc(depth: int) -> object:
        r = rng.random()
        if depth > 3 or r < 0.4:
            return rng.choice(leaves)
        if r < 0.7:
            return {rng.choice(["k", "x y", "\u00e9", 'a"']) + str(i): doc(depth + 1)
                    for i in range(rng.randrange(6))}  # fmt: skip
        return [doc(depth + 1) for _ in range(rng.randrange(6))]

    for _ in range(3000):
        d = doc(0)
        assert dumps_indented(d) == json.dumps(d, indent=2, allow_nan=False)
    from collections import OrderedDict

    from fapm_cli.plan import Method

    odd = [  # subclasses of dict and str, tuples, keys that are not strings
        {"a": OrderedDict(b=[1, (2, 3)], c={}), "m": Method.FAPM, "e": [{"f": OrderedDict()}]},
        {1: [1], "x": {2: 3}, "k": {1.5: None}},
        [OrderedDict(z=1), (), {}],
    ]
    for d in odd:
        assert dumps_indented(d) == json.dumps(d, indent=2, allow_nan=False)
    row = {"name": 'w"%s\n', "shape": [64, 2], "x": 1.5, "k": 3, "n": None, "b": True}
    tables = [  # lists of rows (formatted in one go when uniform), and what must not be
        [row, row, {**row, "shape": []}, {**row, "shape": [7], "n": 0.25, "b": False}],
        [row, {**row, "shape": [1.0, 2.0]}],  # floats equal to ints: their own text
        [row, {**row, "shape": [True]}],
        [row, {**row, "x": {"y": 1}}],
        [row, {"shape": [1], "name": "a", "x": 1.5, "k": 3, "n": None, "b": True}],
        [row, {**row, "z": 1}],
        [row, {**row, "name": Method.FAPM}],
        [{"%d": 1, "e\u00e9": [3]}, {"%d": 2, "e\u00e9": [3]}],
        [row, [1]],
        [{1: 2}, {1: 3}],
    ]
    for t in tables:
        d = {"rows": t, "nested": [[t]]}
        assert dumps_indented(d) == json.dumps(d, indent=2, allow_nan=False)
    # Columns met again in one document are looked up, not encoded again: columns equal in
    # value but not in text (-0.0 == 0.0, 1 == 1.0 == True; mixed with None) must not be
    # taken for each other, nor a column of lists at another depth.
    a = {"x": 0.0, "n": 1, "m": None, "s": [1, 2]}
    twins = [
        [a, {**a, "x": 1.5}],
        [{**a, "x": -0.0}, {**a, "x": 1.5}],
        [{**a, "n": 1.0}, {**a, "n": True}],
        [{**a, "n": True}, a],
        [{**a, "m": 1}, {**a, "m": None}],
        [{**a, "m": True}, {**a, "m": None}],
        [{**a, "m": 1.0, "x": None}, {**a, "m": None}],
        [{**a, "m": -0.0, "x": None}, {**a, "m": None}],
    ]
    d = {"t": twins, "again": twins[::-1], "deeper": {"t": [[t] for t in twins]}}
    assert dumps_indented(d) == json.dumps(d, indent=2, allow_nan=False)
    for bad in ({"a": float("nan")}, [float("inf")], {"a": [1, {"b": float("-inf")}]},
                [row, {**row, "x": float("nan")}]):  # fmt: skip
        with pytest.raises(ValueError):
            dumps_indented(bad)
    base, ft = make_pair(seed=2)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    code, out, err = fapm("score", "-b", str(b), "-f", str(f), "-s", "0.5,0.9", "--json")
    assert code == 0, err
    assert out == json.dumps(json.loads(out), indent=2, allow_nan=False) + "\n"
