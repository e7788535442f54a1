# Set-up and the two commands the README promises: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint docs clean

$(STAMP): pyproject.toml examples/decodekit-cfg-cutoff/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# This machine's torch lies on disk; a GPU user keeps whatever torch (>=2.6, <2.15: pyproject) they have.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	# The example third-party plugin: CI checks that it is found and used like any other.
	$(BIN)/pip install -q --no-deps -e examples/decodekit-cfg-cutoff
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/decodekit demo --out outputs/demo

test: $(STAMP)
	$(BIN)/ruff check core plugins pipelines tests examples benchmarks
	$(BIN)/ruff format --check core plugins pipelines tests examples benchmarks
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q tests examples/decodekit-cfg-cutoff/tests
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir .site

lint: $(STAMP)
	$(BIN)/ruff check core plugins pipelines tests examples benchmarks
	$(BIN)/ruff format --check core plugins pipelines tests examples benchmarks

docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) .site build dist *.egg-info
