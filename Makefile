# Two entry points for a fresh machine; each does all of its own set-up.
#   make main   - train -> postproc -> test LeNet-5 + BN on Fashion-MNIST, prints test accuracy
#   make test   - the test-suite
#   make gpu-check [PYTHON=python3] - the CUDA path on an NVIDIA GPU machine (tools/gpu_check.sh)
VENV   ?= .venv
PYTHON ?= python3
RUN    ?= runs/fashion-lenet5-bn
ARGS   ?=
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: main test bench setup data clean gpu-check

setup: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test,mpi]'
	$(VENV)/bin/arraybn warmup
	touch $@

data:
	@if [ -z "$$ARRAYBN_DATA" ] && [ ! -f $(FMNIST) ]; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; fi

main: setup data
	$(VENV)/bin/arraybn run $(RUN) --force $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/bn_kernels.py
	$(VENV)/bin/python benchmarks/train_speed.py

# Any python with CuPy (the GPU machine's own; .venv's if it has CuPy); logs under $OUT or
# gpu-check-out/. Fails at once with "no CUDA GPU" where there is none.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
