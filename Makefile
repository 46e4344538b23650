# Two commands do everything on a fresh machine: `make repro` and `make test`.
# The virtual environment is (re)installed only when requirements.lock or pyproject.toml change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline machines read the corpora from a mirror folder (checked against the same sha256).
# ../shared/corpora is used when it exists beside the clone; set LM_DATA_MIRROR= to force downloads.
LM_DATA_MIRROR ?= $(if $(wildcard ../shared/corpora/names.txt),$(abspath ../shared/corpora),)
export LM_DATA_MIRROR
# dvc.yaml runs `python -m stages...`: make it the venv's python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export HF_DATASETS_CACHE := $(CURDIR)/.cache/huggingface/datasets
export HF_HUB_OFFLINE := 1

.PHONY: install repro finetune gguf track verify test lint format ui screenshots check-params gpu-wheels clean-venv

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# Params first: a broken params.yaml (a run naming a missing tokenizer, a typo) gets its one-line-per-problem
# message before DVC resolves the DAG, where it could only say that a path is missing.
# The stages write their MLflow runs to mlflow-journal/ (LM_TRACKING=deferred: no MLflow import in 80 stage processes,
# docs/mlflow.md, Cost) and stages.track logs them all in one process, also after a failed stage; LM_TRACKING=live logs
# each run as it happens. Make exits with dvc's status if it failed, else with stages.track's.
TRACKED_REPRO = LM_TRACKING=$${LM_TRACKING:-deferred} $(BIN)/dvc repro $(1); s=$$?; $(BIN)/python -m stages.track; \
	t=$$?; exit $$(( s ? s : t ))
repro: install
	$(BIN)/lm check-params params.yaml
	$(call TRACKED_REPRO,report)

# The fine-tuning study (docs/finetune.md): every `finetune` and `probe` entry and reports/finetune/, after the ladder's
# runs they start from (`make repro` leaves it out: its 5-seed spreads cost more than the ladder's time budget).
finetune: install
	$(BIN)/lm check-params params.yaml
	$(call TRACKED_REPRO,finetune-report)

# llama.cpp's checks of the GGUF exports (docs/gguf.md): every `gguf` entry and reports/gguf/, after the ladder's runs;
# the first run builds llama.cpp from the llama-cpp-python sdist into .cache/llama.cpp (minutes, once).
gguf: install
	$(BIN)/lm check-params params.yaml
	$(call TRACKED_REPRO,gguf-report)

# MLflow gets the train and evaluate runs it lacks, from their outputs (a lost or new store; see stages/track.py).
track: install
	$(BIN)/python -m stages.track

# Re-run every stage from scratch, then judge every number against the committed one (lm verify): bit for bit
# on the machine class that made the commit (reports/machine.json), within each run's tolerance on another CPU.
verify: install
	$(BIN)/lm check-params params.yaml
	$(call TRACKED_REPRO,--force report)
	$(BIN)/lm verify

# The tests run in TEST_WORKERS pytest-xdist workers, one test file per worker at a time (a file's fixtures are built
# once), each torch process on one thread (tests/conftest.py). The llama.cpp tests (tests/test_gguf.py, the tiny
# preset's gguf stage) need llama.cpp's tools: a first build (minutes, once; .cache/llama.cpp) starts at low priority
# beside the other tests, and the tests that need it wait for it (lm/llamacpp.py locks the build).
TEST_WORKERS ?= 2
test: install
	@mkdir -p .cache; (nice -n 15 $(BIN)/lm llama-cpp > .cache/llama-cpp-build.log 2>&1 &)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff, configured in pyproject.toml: lint (pyflakes, isort, pycodestyle at 120 columns, bugbear) and format check.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

check-params: install
	$(BIN)/lm check-params params.yaml

# The stages' default store (README, 'Compare runs in MLflow'); prints the runs table's URL first.
ui: install
	$(BIN)/lm ui

# The README's MLflow screenshots (reports/mlflow/*.png) from the project's store; needs `chromium` (apt-get install
# chromium). Not part of `dvc repro`: the UI's pixels are not results.
screenshots: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/lm ui --screenshots reports/mlflow

# The wheels bench/gpu.sh installs on a lent GPU machine (no network there; it lacks pydantic): pinned versions
# from requirements.lock, for CPython 3.12 on x86-64 Linux.
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	for p in $(GPU_WHEELS); do \
	  $(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$$(grep -i "^$$p==" requirements.lock)" || exit 1; \
	done
	ls .whl

clean-venv:
	rm -rf $(VENV)
