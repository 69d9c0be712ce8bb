# vmhive — the two commands a user needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE_CACHE := $(CURDIR)/.cache/images
STAMP := $(VENV)/.installed

.PHONY: setup deps venv image run test lint unit functional bench golden lock clean ui screenshots

setup: deps venv ui image

deps:
	@scripts/install-deps.sh

venv: $(STAMP)

# requirements.lock pins every package, transitive ones included (regenerate
# with `make lock` after changing pyproject.toml's dependencies).
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

lock: venv
	$(BIN)/pip freeze --exclude-editable | grep -v '^vmhive' > requirements.lock

# The web UI's pinned npm packages, copied into src/vmhive/web/static/vendor/.
ui: deps
	@scripts/build-ui.sh

# PNGs of every page of the web UI (a real daemon running a tiny VM) for the README.
screenshots: setup
	VMHIVE_IMAGE_CACHE=$(IMAGE_CACHE) $(BIN)/python -m tests.e2e.screenshots docs/screenshots

image: venv
	@$(BIN)/python -m vmhive.guest.tiny $(IMAGE_CACHE)

run: setup
	VMHIVE_IMAGE_SEED=$(IMAGE_CACHE) $(BIN)/vmhive serve

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: setup lint
	VMHIVE_IMAGE_CACHE=$(IMAGE_CACHE) $(BIN)/pytest -q --durations=30

unit: venv
	$(BIN)/pytest -q tests/unit

functional: setup
	VMHIVE_IMAGE_CACHE=$(IMAGE_CACHE) $(BIN)/pytest -q tests/functional

golden: venv
	VMHIVE_REGENERATE_GOLDEN=1 $(BIN)/pytest -q tests/unit/test_argv.py

bench: setup
	VMHIVE_IMAGE_CACHE=$(IMAGE_CACHE) $(BIN)/python bench/start_latency.py --runs 30

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
