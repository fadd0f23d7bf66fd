# ddlab — the README's commands. Everything runs inside $(VENV), created on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddlab-installed
# Offline machines of this project keep the official MNIST files in ../shared/data/MNIST/raw.
SHARED_MNIST := $(abspath ../shared/data/MNIST/raw)
ifeq ($(origin DDLAB_DATA_DIR), undefined)
  ifneq ($(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte.gz),)
    export DDLAB_DATA_DIR := $(SHARED_MNIST)
  endif
endif
ARGS ?=
# `make train`'s recipe (configs/experiment/); `make train EXPERIMENT=` trains the plain base config
EXPERIMENT ?= mnist_cfg
N ?= 50000
STEPS ?=
GUIDANCE ?=

.PHONY: install train test sample fid fid-curve nll bench bench-gpu bench-quality classifier lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

train: install  ## the default 10-minute MNIST job, experiment=mnist_cfg (extra Hydra overrides: ARGS="...")
	$(PY) -m ddlab.train $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) torch_threads=2 $(ARGS)

test: install  ## the whole test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

sample: install  ## make sample CKPT=path [ARGS="n=64 sampler.guidance_scale=3"] (the checkpoint's sampler unless overridden)
	@test -n "$(CKPT)" || { echo "usage: make sample CKPT=path/to/last.ckpt"; exit 2; }
	$(PY) -m ddlab.sample ckpt=$(CKPT) $(ARGS)

fid: install  ## make fid CKPT=path [N=50000] [STEPS=...] [GUIDANCE=...] (default: the checkpoint's sampler)
	@test -n "$(CKPT)" || { echo "usage: make fid CKPT=path/to/last.ckpt [N=...] [STEPS=...] [GUIDANCE=...]"; exit 2; }
	$(PY) -m ddlab.fid ckpt=$(CKPT) n=$(N) $(if $(STEPS),sampler.steps=$(STEPS),) $(if $(GUIDANCE),sampler.guidance_scale=$(GUIDANCE),) $(ARGS)

fid-curve: install  ## make fid-curve CKPT=path [ARGS="samplers=[dpmpp_2m,heun] steps=[5,10,20] n=500 fid.feature_extractor=mnist_cnn"]
	@test -n "$(CKPT)" || { echo "usage: make fid-curve CKPT=path/to/last.ckpt [ARGS=\"samplers=[...] steps=[...] n=...\"]"; exit 2; }
	$(PY) -m ddlab.fid_curve ckpt=$(CKPT) $(ARGS)

bench: install  ## speed and memory measurements (not tests)
	$(PY) -m benchmarks.run $(ARGS)

bench-gpu: install  ## the CUDA check in one call, 8-minute budget (ARGS="--device cpu --quick" checks the script on a CPU)
	$(PY) -m benchmarks.gpu_check $(ARGS)

bench-quality: install  ## ddlab's MNIST recipe vs a tuned diffusers baseline, same CPU budget (ARGS="--budget 1800 --search")
	$(PY) -m benchmarks.quality $(ARGS)

classifier: install  ## the MNIST domain classifier for fid.feature_extractor=mnist_cnn (a few minutes on a CPU)
	$(PY) -m ddlab.metrics.classifier train data=mnist $(ARGS)

lint: install
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf logs outputs .pytest_cache
