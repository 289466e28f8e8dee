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

.PHONY: setup pipeline test lint format lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, on its own pin: a range alone could pull a several-GB CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==$$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.lock)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

pipeline: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# Re-pin requirements.lock from pyproject.toml's ranges (in a throwaway venv).
lock:
	rm -rf /tmp/ftp-lock && $(PYTHON) -m venv /tmp/ftp-lock
	/tmp/ftp-lock/bin/pip install --quiet torch==2.13.0 && /tmp/ftp-lock/bin/pip install --quiet ".[dev]"
	/tmp/ftp-lock/bin/pip freeze --exclude-editable | grep -v '^finetune-pipeline' | sed 's/+cpu$$//' > requirements.lock

clean:
	rm -rf $(VENV)
