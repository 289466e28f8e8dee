# Two commands: `make pipeline` (set up, then run the pipeline) and `make test` (set up, then test).
# Set-up is idempotent: .venv is built once from requirements.lock and rebuilt when it changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

# PyTorch's CPU wheel index, for machines where PyPI's torch is the several-GB CUDA build
# (GitHub's runners): `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

.PHONY: setup pipeline test test-fast ui lint lint-workflows stale hooks format lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, on its own pin: a range alone could pull a several-GB CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.lock)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

pipeline: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest

# The unit tests only (no real `dvc` runs): seconds, for the edit-test loop.
test-fast: setup
	$(BIN)/python -m pytest -m "not e2e"

# The MLflow UI on the runs table of this project's experiment (prints the address).
ui: setup
	$(BIN)/python -m scripts.mlflow_ui

lint: setup lint-workflows stale
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The GitHub workflows against their JSON schema, and zizmor's offline security audit: any
# finding above low fails, but unpinned actions (.github/zizmor.yml says why).
lint-workflows: setup
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/zizmor --offline --min-severity medium .github/workflows

# Does the committed dvc.lock match the code and params? (no stage would run)
stale: setup
	.ci/stale-pipeline

# Every pre-commit hook on every file.
hooks: setup
	$(BIN)/pre-commit run --all-files

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# Re-pin requirements.lock from pyproject.toml's ranges (in a throwaway venv).
lock:
	rm -rf /tmp/ftp-lock && $(PYTHON) -m venv /tmp/ftp-lock
	/tmp/ftp-lock/bin/pip install --quiet torch==2.13.0 && /tmp/ftp-lock/bin/pip install --quiet ".[dev]"
	/tmp/ftp-lock/bin/pip freeze --exclude-editable | grep -v '^finetune-pipeline' | sed 's/+cpu$$//' > requirements.lock

clean:
	rm -rf $(VENV)
