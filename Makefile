# Two entry points for a fresh machine: `make run` (install, then serve on http://127.0.0.1:8000)
# and `make test` (install, then lint, type-check and run the whole suite).
PYTHON ?= python3
VENV ?= .venv
SHARED ?= $(abspath ../shared)
FHIR_CORE ?= hl7.fhir.r4.examples@4.0.1
BIN := $(VENV)/bin

.PHONY: install run test

$(BIN)/cityhealth: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/cityhealth
	$(BIN)/cityhealth fhir install $(FHIR_CORE)
	$(BIN)/cityhealth portal install-assets

run: install
	$(BIN)/cityhealth serve

test: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src
	CITYHEALTH_SHARED=$(SHARED) $(BIN)/pytest -n 2 --dist loadfile
