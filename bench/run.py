"""Benchmark fapm (and mergekit, when installed) on generated Llama-shaped bf16 pairs.

    python bench/run.py [--sizes small,large,moe,grid10k,grid1] [--data bench-data] [--repeat 1]

For each size: generate the pair once (bench/make_pair.py; cached), then run, each as its own
process, in one interleaved round per ``--repeat``:

- ``io-floor``: read both checkpoints and write (and fsync) as many bytes as one output;
- ``fapm prune`` with ``--method fapm`` and ``--method magnitude`` at sparsity 0.9;
- ``fapm diff``, ``fapm merge`` (of that diff, and of two fine-tunes pruned on the fly) and
  ``fapm score`` when ``fapm --help`` lists them;
- ``mergekit ties`` at density 0.1 when bench/.venv-mergekit exists (``make bench-mergekit-env``).

Wall time is measured around each child; peak RSS is that child's own ``ru_maxrss`` from
``wait4`` (so one run never inherits another's peak). Results: a Markdown table on stdout and
JSON in DATA/results.json. Each row records the 1-minute load average when it started: numbers
taken while other jobs use the CPUs are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAPM = Path(sys.executable).parent / "fapm"
MERGEKIT_ENV = HERE / ".venv-mergekit"
SPARSITY = "0.9"
BUF = 8 << 20


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def io_floor(inputs: list[Path], out_bytes: int, out: Path) -> float:
    """Seconds to read every byte of ``inputs`` and write (and fsync) ``out_bytes``: what a
    command that reads those and writes that much cannot go below."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for side in inputs:
        for f in _files(side):
            fd = os.open(f, os.O_RDONLY)
            try:
                pos = 0
                while got := os.preadv(fd, [view], pos):
                    pos += got
            finally:
                os.close(fd)
    if out_bytes:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = out_bytes
            while left:
                left -= os.write(fd, view[: min(left, BUF)])
            os.fsync(fd)
        finally:
            os.close(fd)
        out.unlink()
    return time.perf_counter() - t0


def tensor_bytes(path: Path) -> int:
    """Bytes of the .safetensors files in ``path``: what an output of that size writes."""
    return sum(f.stat().st_size for f in _files(path))


def load1() -> float:
    return os.getloadavg()[0]


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``cmd``; wall seconds, the child's own peak RSS, exit code and stderr tail."""
    load = load1()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports kB
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "rc": proc.returncode,
        "load1": round(load, 2),
        "stdout": out[-2000:],
        "stderr": err[-2000:],
    }


def fapm_commands() -> set[str]:
    """Commands ``fapm --help`` lists (score, diff, merge may not exist yet)."""
    text = subprocess.run([str(FAPM), "--help"], capture_output=True, text=True).stdout
    found = set()
    for line in text.splitlines():
        word = line.strip().split(" ")[0] if line.startswith("  ") else ""
        if word in {"prune", "score", "diff", "merge", "inspect"}:
            found.add(word)
    return found


def mergekit_config(base: Path, finetuned: Path, path: Path) -> None:
    # TIES with one model is magnitude pruning of its task vector: trim to the top 10%.
    path.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "models:\n"
        f"  - model: {finetuned}\n"
        "    parameters:\n"
        "      density: 0.1\n"
        "      weight: 1.0\n"
        "dtype: bfloat16\n"
    )


# The torch path, which fapm takes without the C kernels: the same bytes, for comparison.
TORCH_PATH = "fapm prune (fapm, FAPM_NATIVE=0)"
SWEEP = "0.5,0.7,0.8,0.9,0.95,0.99"
NAIVE = "naive script (load whole, topk, save_file)"

# A run is a command (argv) or a floor: ("floor", inputs, bytes written as a path whose size
# counts, or None for nothing written), measured in-process.
Floor = tuple[str, list[Path], Path | None]
Run = tuple[str, list[str] | Floor]


def runs_for(
    pair: Path, work: Path, commands: set[str], threads: int | None, size: str
) -> list[Run]:
    base, ft = pair / "base", pair / "finetuned"
    extra = ["--threads", str(threads)] if threads else []
    out = str(work / "out")
    prune = [str(FAPM), "prune", "-b", str(base), "-f", str(ft), "-s", SPARSITY, "-q", *extra]
    runs: list[Run] = [
        ("io-floor", ("floor", [base, ft], ft)),
        ("fapm prune (fapm)", [*prune, "-o", out]),
    ]
    if size in ("small", "large"):
        runs += [
            ("fapm prune (magnitude)", [*prune, "-m", "magnitude", "-o", out]),
            (TORCH_PATH, [*prune, "-o", out]),
        ]
    if size in SMALL_TENSOR_PAIRS:  # the yardstick of issue #15.3
        runs.append((NAIVE, [sys.executable, str(HERE / "naive_prune.py"), str(base), str(ft),
                             str(work / "naive.safetensors")]))  # fmt: skip
    tv = work / "tv"
    if "score" in commands:
        score = [str(FAPM), "score", "-b", str(base), "-f", str(ft), "--format", "json", *extra]
        runs += [
            ("io-floor (score: read both)", ("floor", [base, ft], None)),
            ("fapm score", [*score, "-s", SPARSITY]),
            (f"fapm score (sweep {SWEEP})", [*score, "-s", SWEEP]),
        ]
    if "diff" in commands:
        runs.append(
            (
                "fapm diff",
                [str(FAPM), "diff", "-b", str(base), "-f", str(ft), "-o", str(tv), "-q", *extra],
            )
        )
        runs.append(
            ("io-floor (diff: read both, write the task vector)", ("floor", [base, ft], tv))
        )
        if "merge" in commands:
            runs.append(
                (
                    "fapm merge",
                    [
                        str(FAPM),
                        "merge",
                        "-b",
                        str(base),
                        "--task-vector",
                        str(tv),
                        "-o",
                        out,
                        "-q",
                        *extra,
                    ],
                )
            )
            runs.append(("io-floor (merge: read base and task vector)", ("floor", [base, tv], ft)))
    if "merge" in commands and size in ("small", "large"):
        # Two fine-tunes pruned on the fly and summed (the same one twice: the memory and the
        # work of two different ones): bounded like prune (issue #12's 2.5 x f32 + 400 MB).
        runs.append(
            (
                "fapm merge (2 fine-tunes)",
                [str(FAPM), "merge", "-b", str(base), "-f", str(ft), "-f", str(ft),
                 "-w", "0.5", "-s", SPARSITY, "-o", out, "-q", *extra],
            )
        )  # fmt: skip
    mk = MERGEKIT_ENV / "bin" / "mergekit-yaml"
    if mk.exists() and size in ("small", "large"):
        cfg = work / "ties.yml"
        mergekit_config(base, ft, cfg)
        runs.append(("mergekit ties (density 0.1)", [str(mk), str(cfg), out, "--lazy-unpickle"]))
    return runs


# Pairs of many small tensors, where the fixed cost per tensor shows.
SMALL_TENSOR_PAIRS = ("moe", "grid10k")


def bench_size(
    size: str, data: Path, repeat: int, commands: set[str], threads: int | None
) -> dict[str, object]:
    pair = data / size
    t0 = time.perf_counter()
    gen = subprocess.run(
        [sys.executable, str(HERE / "make_pair.py"), str(pair), "--size", size],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    facts = json.loads(gen.stdout)
    print(
        f"[{size}] pair ready ({time.perf_counter() - t0:.0f} s): {facts['parameters']:,} params",
        file=sys.stderr,
    )
    work = data / f"work-{size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows: dict[str, list[dict[str, object]]] = {}
    for rnd in range(repeat):
        for name, cmd in runs_for(pair, work, commands, threads, size):
            shutil.rmtree(work / "out", ignore_errors=True)
            if isinstance(cmd, tuple):
                load = load1()
                _, inputs, written = cmd
                nbytes = tensor_bytes(written) if written is not None else 0
                secs = io_floor(inputs, nbytes, work / "floor.bin")
                row: dict[str, object] = {
                    "wall_s": round(secs, 3),
                    "rc": 0,
                    "load1": round(load, 2),
                    "bytes_written": nbytes,
                }
            else:
                torch_path = {**os.environ, "FAPM_NATIVE": "0"} if name == TORCH_PATH else None
                row = measure(cmd, torch_path)
            rows.setdefault(name, []).append(row)
            status = (
                "ok"
                if row["rc"] == 0
                else f"FAILED rc={row['rc']}: {str(row.get('stderr'))[-300:]}"
            )
            print(
                f"[{size}] round {rnd + 1} {name}: {row['wall_s']} s, "
                f"{row.get('peak_rss_mb', '-')} MB, load {row['load1']} {status}",
                file=sys.stderr,
            )
        shutil.rmtree(work / "tv", ignore_errors=True)
        (work / "naive.safetensors").unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"facts": facts, "runs": rows}


def summarize(size_result: dict[str, object]) -> list[dict[str, object]]:
    facts = size_result["facts"]
    assert isinstance(facts, dict)
    params = int(facts["parameters"])
    largest_f32_mb = 4 * int(facts["largest_tensor_numel"]) / 2**20
    runs = size_result["runs"]
    assert isinstance(runs, dict)
    table = []
    for name, rows in runs.items():
        ok = [r for r in rows if r["rc"] == 0]
        if not ok:
            table.append({"run": name, "failed": True})
            continue
        wall = statistics.median(float(r["wall_s"]) for r in ok)
        rss = max((float(r["peak_rss_mb"]) for r in ok if "peak_rss_mb" in r), default=None)
        table.append(
            {
                "run": name,
                "wall_s": round(wall, 2),
                "mparams_per_s": round(params / wall / 1e6, 1),
                "peak_rss_mb": rss,
                "rss_budget_mb": round(2.5 * largest_f32_mb + 400, 0),
                "load1": [r["load1"] for r in ok],
            }
        )
    return table


def markdown(results: dict[str, dict[str, object]]) -> str:
    lines = []
    for size, res in results.items():
        facts = res["facts"]
        assert isinstance(facts, dict)
        table = summarize(res)
        walls = {str(r["run"]): r.get("wall_s") for r in table}
        mk = next((r["wall_s"] for r in table if r["run"].startswith("mergekit")), None)
        lines.append(
            f"\n### {size}: {facts['parameters'] / 1e6:.0f}M parameters, "
            f"{facts['bytes_per_side'] / 1e9:.2f} GB per checkpoint, largest tensor "
            f"{facts['largest_tensor_numel'] / 1e6:.1f}M elements\n"
        )
        lines.append(
            "| run | wall (s) | M params/s | × I/O floor | vs mergekit | peak RSS (MB) "
            "| RSS budget (MB) | load |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in table:
            if r.get("failed"):
                lines.append(f"| {r['run']} | failed | | | | | | |")
                continue
            w = float(r["wall_s"])
            floor = walls.get(floor_of(str(r["run"])))
            xf = f"{w / float(floor):.2f}" if floor and not r["run"].startswith("io") else ""
            xm = (
                f"{mk / w:.1f}× faster"
                if mk and not r["run"].startswith(("mergekit", "io"))
                else ""
            )
            rss = r["peak_rss_mb"] if r["peak_rss_mb"] is not None else "—"
            bounded = r["run"].startswith(("fapm prune", "fapm merge (2"))
            budget = r["rss_budget_mb"] if bounded else ""
            load = ", ".join(str(x) for x in r["load1"])
            lines.append(
                f"| {r['run']} | {w} | {r['mparams_per_s']} | {xf} | {xm} | {rss} "
                f"| {budget} | {load} |"
            )
    lines += ["", "### Targets (issue #15), as ratios inside this run", ""]
    lines += [f"- {t}" for t in targets(results)]
    return "\n".join(lines) + "\n"


def floor_of(run: str) -> str:
    """The I/O floor a run is measured against: what it must read and write at least."""
    if run.startswith("fapm score"):
        return "io-floor (score: read both)"
    if run == "fapm diff":
        return "io-floor (diff: read both, write the task vector)"
    if run == "fapm merge":
        return "io-floor (merge: read base and task vector)"
    return "io-floor"


def targets(results: dict[str, dict[str, object]]) -> list[str]:
    """Each target of issue #15 as the ratio this run measured (medians of the rounds)."""

    def wall(size: str, run: str) -> float | None:
        if size not in results:
            return None
        for r in summarize(results[size]):
            if r["run"] == run and not r.get("failed"):
                return float(r["wall_s"])
        return None

    out = []

    def ratio(label: str, a: float | None, b: float | None, goal: str) -> None:
        if a is not None and b is not None:
            out.append(f"{label}: {a:.2f} s / {b:.2f} s = {a / b:.2f} ({goal})")

    sweep = f"fapm score (sweep {SWEEP})"
    for size in results:
        p = wall(size, "fapm prune (fapm)")
        ratio(f"[{size}] score / prune", wall(size, "fapm score"), p, "target <= 1")
        ratio(f"[{size}] sweep of 6 / score", wall(size, sweep), wall(size, "fapm score"),
              "target <= 1.5")  # fmt: skip
        for run in ("fapm prune (fapm)", "fapm diff", "fapm merge"):
            ratio(f"[{size}] {run} / its I/O floor", wall(size, run), wall(size, floor_of(run)),
                  "target <= 1.5")  # fmt: skip
        mk = next((r["run"] for r in summarize(results[size]) if r["run"].startswith("mergekit")),
                  None)  # fmt: skip
        if mk:
            ratio(f"[{size}] prune / mergekit ties", p, wall(size, mk), "target <= 0.1")
        ratio(f"[{size}] prune / naive script", p, wall(size, NAIVE), "target <= 1")
    many, one = wall("grid10k", "fapm prune (fapm)"), wall("grid1", "fapm prune (fapm)")
    if many is not None and one is not None:
        tensors = GRID_TENSORS - 1
        out.append(
            f"fixed cost per tensor: (prune of 10,000 tensors {many:.2f} s - prune of one tensor "
            f"of the same 41M entries {one:.2f} s) / {tensors:,} = "
            f"{(many - one) / tensors * 1e3:.3f} ms (target < 0.1 ms)"
        )
    return out


GRID_TENSORS = 10_000


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kernels = subprocess.run(
        [sys.executable, "-c", "from fapm_cli.compute import native; print(native.status())"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    ).stdout.strip() or "unknown"  # fmt: skip
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
        f"{mem:.0f} GiB RAM, Python {platform.python_version()}, C kernels {kernels}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="small,large,moe,grid10k,grid1")
    ap.add_argument("--data", type=Path, default=ROOT / "bench-data")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    commands = fapm_commands()
    skipped = sorted({"score", "diff", "merge"} - commands)
    if skipped:
        print(f"fapm has no {', '.join(skipped)} command yet: skipped", file=sys.stderr)
    if not (MERGEKIT_ENV / "bin" / "mergekit-yaml").exists():
        print("mergekit not installed (make bench-mergekit-env): skipped", file=sys.stderr)
    results = {
        size: bench_size(size, args.data, args.repeat, commands, args.threads)
        for size in args.sizes.split(",")
    }
    (args.data / "results.json").write_text(
        json.dumps({"machine": machine(), "results": results}, indent=2)
    )
    print(f"Machine: {machine()}")
    print(markdown(results))


if __name__ == "__main__":
    main()
