# Two commands matter: `make demo` (the main job, offline) and `make test`.
# `make setup` installs the dev tools and the optional Ray backend (tested by `make test`).
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch first, pinned: the CPU build on local disk. Any other request may pull a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: setup test test-fast test-slow gpu-check demo fashion-mnist fmnist-end fmnist-end-docs \
	fmnist-300 fmnist-full fmnist-300-docs fmnist-full-docs stability-phase lint format clean

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

# the same without the integration tests (Ray, torchrun, SIGKILL): a quick check while working
test-fast: lint
	.venv/bin/pytest -m "not slow and not integration"

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

# The end-of-training grid (docs/results.md, "Wall time and commands"): SimpleCNN
# on 2,000 Fashion-MNIST images, 5 losses x momentum {0, 0.9} x 5 seeds x 100 epochs, at the
# paper's lr and at each method's own lr (sweeps on seed 100), every final checkpoint
# diagnosed. One core; resumable pieces of about an hour, in this order: `make fmnist-end`
# runs those not finished, `make fmnist-end PIECE=seed3` one. Each piece ends with the report
# of what is finished; `make fmnist-end-docs` copies the grid without checkpoints to
# docs/fmnist-end/ and rewrites its report from those files.
FMNIST_END := OMP_NUM_THREADS=1 .venv/bin/qmse reproduce --dataset fashion-mnist \
	--losses mse,qmse,expected-qmse,label-noise,ce --loss-param sigma=0.1 --seeds 5 \
	--epochs 100 --batch-size 128 --train-subset 2000 --test-subset 2000 --eval-every 5 \
	--tune --sweep-seed 100 --sweep-start-step 0.1 --max-extend 4 \
	--diagnose --diagnose-samples 256 --lanczos-steps 20 --device cpu --out runs/fmnist-end
PIECES  := sweep-m0.9 sweep-m0 seed0 seed1 seed2 seed3 seed4
PIECE   ?= $(PIECES)

fmnist-end: setup fashion-mnist
	@for piece in $(PIECE); do echo "== piece $$piece"; $(FMNIST_END) --piece $$piece || exit 1; done

fmnist-end-docs: setup
	rm -rf docs/fmnist-end && mkdir -p docs/fmnist-end
	tar -C runs/fmnist-end -cf - --exclude=checkpoint.pt --exclude=.lock --exclude=diagnosis.txt \
	  --exclude=kind.json . | tar -C docs/fmnist-end -xf -
	.venv/bin/qmse reproduce --report-only --out docs/fmnist-end

# The paper's claim at a longer budget and at full size (docs/results.md):
# fmnist-300: MSE and QMSE, 300 epochs on the 2,000 images, own lr swept for that budget and
# lr 0.01, 5 seeds (pieces as fmnist-end's, about 5 min a run on one core);
# fmnist-full: MSE and QMSE on all 60,000 images, 100 epochs at lr 0.01, 3 seeds, diagnosed
# (pieces seed0..seed2, about 1 h a run on one core). `make fmnist-300-docs` /
# `make fmnist-full-docs` copy what is finished to docs/, without checkpoints.
FMNIST_300 := OMP_NUM_THREADS=1 .venv/bin/qmse reproduce --dataset fashion-mnist \
	--losses mse,qmse --seeds 5 --epochs 300 --batch-size 128 --train-subset 2000 \
	--test-subset 2000 --eval-every 5 --tune --sweep-seed 100 --sweep-start-step 0.1 \
	--max-extend 4 --diagnose --diagnose-samples 256 --lanczos-steps 20 --device cpu \
	--out runs/fmnist-300
FMNIST_FULL := OMP_NUM_THREADS=1 .venv/bin/qmse reproduce --dataset fashion-mnist \
	--losses mse,qmse --seeds 3 --epochs 100 --lr 0.01 --batch-size 128 --eval-every 5 \
	--diagnose --diagnose-samples 256 --lanczos-steps 20 --device cpu --out runs/fmnist-full
FULL_PIECES := seed0 seed1 seed2

fmnist-300: setup fashion-mnist
	@for piece in $(PIECE); do echo "== piece $$piece"; $(FMNIST_300) --piece $$piece || exit 1; done

fmnist-full: setup fashion-mnist
	@for piece in $(or $(filter seed%,$(PIECE)),$(FULL_PIECES)); do echo "== piece $$piece"; \
	  $(FMNIST_FULL) --piece $$piece || exit 1; done

fmnist-300-docs fmnist-full-docs: fmnist-%-docs: setup
	mkdir -p docs/fmnist-$*
	tar -C runs/fmnist-$* -cf - --exclude=checkpoint.pt --exclude=.lock --exclude=diagnosis.txt \
	  --exclude=kind.json . | tar -C docs/fmnist-$* -xf -
	.venv/bin/qmse reproduce --report-only --out docs/fmnist-$*

# The measured escape phase diagrams of docs/stability.md: teacher-student k = 8 and rank-1
# matrix sensing (delta 0.75, n 2, seed 0, m 8), beta in {0, 0.5, 0.8, 0.9, 0.95, 0.99}, B in
# {4, 16, 64, 256, population}: 30 panels each, about 25 step sizes 2^(1/8) apart x 64 starts
# x 3000 steps, every end point finished by gradient descent. One core: about 20 minutes for
# k = 8 and 13 for matrix sensing on the shared 2-core machine under load (the JSON's
# seconds); then QMSE and expected-QMSE from the k = 8 minimum at beta in {0, 0.9}, B in
# {16, 64}: about 7 and 4 minutes. Resumable. Writes runs/stability/phase-{k8,sensing,
# k8-qmse,k8-expected-qmse}.{json,png}; the committed copies are in docs/stability/.
stability-phase: setup
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.stability_phase --widths 8 \
	  --betas 0,0.5,0.8,0.9,0.95,0.99 --batches 4,16,64,256,population --out runs/stability
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.stability_phase --widths '' --sensing 0.75,2,0,8 \
	  --below 24 --betas 0,0.5,0.8,0.9,0.95,0.99 --batches 4,16,64,256,population \
	  --out runs/stability
	for loss in qmse expected-qmse; do OMP_NUM_THREADS=1 $(PY) -m benchmarks.stability_phase \
	  --widths 8 --loss $$loss --below 24 --betas 0,0.9 --batches 16,64 --out runs/stability \
	  || exit 1; done

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache .ruff_cache

# docs/symmetry.md section 6: barriers between two ResNets at widths 1, 2, 4, straight and
# matched, with and without BatchNorm recomputation: ResNet-8 (about 11 CPU minutes on one
# core), then ResNet-20 (about 8). Run again, it keeps the widths already in each JSON
# (delete a JSON to rerun it).
symmetry-width: setup fashion-mnist
	OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.symmetry_width --out docs/symmetry/width.json
	OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.symmetry_width --blocks 3 \
	  --out docs/symmetry/width-resnet20.json
