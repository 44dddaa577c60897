# Two commands matter: `make demo` (the main job, offline) and `make test`.
# `make setup` installs the dev tools and the optional Ray backend (tested by `make test`).
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch first, pinned: the CPU build on local disk. Any other request may pull a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: setup test test-slow gpu-check demo fashion-mnist lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $(STAMP)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	.venv/bin/pytest -m "not slow"

test-slow: setup
	.venv/bin/pytest -m slow

# On a machine with a CUDA device (and a CUDA build of torch in .venv): the CUDA tests and the
# speed benchmarks at small sizes, under 8 minutes, in runs/gpu-check/report.md. Without one:
# a one-line message, exit 0.
gpu-check: setup
	$(PY) -m benchmarks.gpu_check --out runs/gpu-check/report.md

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Real Fashion-MNIST comes from Debian's dataset-fashion-mnist; install it when apt can.
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

fashion-mnist:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or put"; \
	    echo "its four IDX .gz files in ~/.cache/qmse/fashion-mnist/ (see 'qmse data --help')."; \
	  fi; }

demo: setup fashion-mnist
	.venv/bin/qmse demo

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache .ruff_cache
