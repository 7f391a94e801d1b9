# The two commands of the README, and their parts.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint schema

$(BIN)/finetune: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	@touch $@

setup: $(BIN)/finetune

# Validate the quick-start recipe, build its tiny model into the embedded model store, and
# prepare its dataset (read, check, tokenise with the chat template, pack) with a report.
quickstart: setup
	$(BIN)/finetune validate recipes/quickstart.yaml
	$(BIN)/finetune data inspect recipes/quickstart.yaml

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
