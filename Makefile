# `make serve` and `make test` work on a fresh machine: each creates .venv/ when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

# serve's arguments, e.g. `make serve ARGS="/path/to/model --port 8001"`
ARGS ?=
# pytest's arguments, e.g. `make test PYTEST_ARGS="-k chat -x"`
PYTEST_ARGS ?=

.PHONY: serve test fuzz bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# schemathesis over /openapi.json: FUZZ_EXAMPLES positive + negative cases per operation, per model kind
FUZZ_EXAMPLES ?= 50
fuzz: $(STAMP)
	PATCHBAY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/patchbay-bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
