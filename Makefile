# The two commands of the README, their parts, and the job service (`make serve`).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart serve test lint schema

$(BIN)/finetune: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	@touch $@

setup: $(BIN)/finetune

# The quick start on embedded defaults: validate the recipe, prepare its dataset with a report
# (read, check, chat template, labels, packing), estimate its cost, train a tiny model of a
# registry architecture on CPU (job folder finetune-data/jobs/quickstart), then package and
# verify its model archive (finetune-data/archives/quickstart.tar).
quickstart: setup
	$(BIN)/finetune validate recipes/quickstart.yaml
	$(BIN)/finetune data inspect recipes/quickstart.yaml
	$(BIN)/finetune estimate recipes/quickstart.yaml --gpu cpu
	$(BIN)/finetune train recipes/quickstart.yaml
	$(BIN)/finetune archive build finetune-data/jobs/quickstart --out finetune-data/archives/quickstart.tar
	$(BIN)/finetune archive verify finetune-data/archives/quickstart.tar

# The job service on embedded defaults (SQLite and file:// buckets under finetune-data/, a local Ray
# head started by the service): makes a demo tenant and prints its API key; Ctrl-C stops it.
serve: setup
	$(BIN)/finetune serve --demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The schema is rendered by a real form library (rjsf) in the tests: Node.js and its packages.
tests/form/node_modules: tests/form/package.json tests/form/package-lock.json
	npm ci --prefix tests/form --no-audit --no-fund --loglevel=error
	@touch $@

test: lint tests/form/node_modules
	$(BIN)/python -m pytest -q

# Regenerate recipes/schema.json from the Recipe model.
schema: setup
	$(BIN)/finetune schema > recipes/schema.json
