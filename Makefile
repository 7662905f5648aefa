# `make demo` and `make test` are the two commands of the README; `.ci/run` runs `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit bench

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m remote_vector_index_builder demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check remote_vector_index_builder test_remote_vector_index_builder benchmarks
	$(VENV)/bin/black --check --quiet remote_vector_index_builder test_remote_vector_index_builder benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint --ignore DL3008 --ignore DL3013 base_image/Dockerfile Dockerfile.api Dockerfile.cpu

unit: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider --cov=remote_vector_index_builder --cov-report=term \
	  $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test: lint unit

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)
