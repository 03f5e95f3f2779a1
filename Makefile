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

.PHONY: serve test fuzz bench ray test-ray clean-venv

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

# patchbay-ray lives in its own environment: Ray's wheel installs a console script named `serve`
# that would shadow ours. `make ray ARGS="MODEL --num-replicas 2"`; `make ray ARGS=--help`.
RAY_VENV := .venv-ray
RAY_PY := $(RAY_VENV)/bin/python
RAY_STAMP := $(RAY_VENV)/.installed-stamp
RAY_PIP := $(RAY_PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

$(RAY_STAMP): pyproject.toml constraints.txt contrib/patchbay-ray/pyproject.toml
	test -x $(RAY_PY) || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_PIP) --upgrade pip
	$(RAY_PIP) torch==2.13.0
	$(RAY_PIP) -e '.[test]' -e 'contrib/patchbay-ray[test]'
	touch $(RAY_STAMP)

ray: $(RAY_STAMP)
	$(RAY_VENV)/bin/patchbay-ray $(ARGS)

# the Ray package's tests: the unit layer and one end-to-end run on a local Ray cluster
test-ray: $(RAY_STAMP)
	$(RAY_PY) -m pytest contrib/patchbay-ray/tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) $(RAY_VENV)
