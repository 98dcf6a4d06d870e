# Two commands a newcomer needs: `make test` and (once it lands) `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch first: a bare `pip install torch` would pull a multi-GB CUDA build on machines
# without one. On a GPU machine install your CUDA torch (>=2.4,<2.14) before `make install`.
TORCH_SPEC ?= torch>=2.4,<2.14
# deepspeed: a pure-Python build (~45 s on 2 cores, no C++ ops compiled at install); the
# ZeRO tests skip without it (make install EXTRAS=dev,wan,decord,lora).
EXTRAS ?= dev,wan,decord,lora,deepspeed

.PHONY: install test test-gpu gpu-wheels gpu-check demo bench clean vbench-env test-vbench mutations

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# The toy demo: teacher -> ODE init -> Self-Forcing -> 10x streaming -> ToyBench -> report.
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning (a spinning policy made
# a toy step tens of times slower when another process shared the cores).
demo: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m forcelab.cli demo $(DEMO_ARGS)

# Mutation testing: each semantic mutation of tests/mutation_list.py applied to a copy of the package
# must make the suite fail (7-11 minutes on 2 cores).
mutations: install
	OMP_NUM_THREADS=1 $(PY) tests/mutations.py --jobs 2 --out mutations.md

test-gpu: install
	$(PY) -m pytest -q -m gpu

# The GPU check (bench/gpu_check): the gpu tests, attention kernels, streaming FPS and a Wan-1.3B
# Self-Forcing step on one GPU, each part within its own budget (8 minutes in all), reported in
# $(GPU_CHECK_OUT)/gpu_check.json and .md. For a GPU machine without network access whose Python
# already has CUDA torch and triton: run `make gpu-wheels` first where pip works, copy the
# checkout (with .whl/) over, then `make gpu-check` there. It uses that Python as it is (no venv,
# no `pip install -e`): the wheels go into $(GPU_SITE)/lib, and $(GPU_SITE)/path/forcelab links to
# this checkout (the repository root is the package), both put on PYTHONPATH.
# gpu-wheels: the pure-Python packages forcelab imports that such a machine lacks (a CUDA image
# usually has torch, accelerate, einops, safetensors, numpy, tqdm, pytest): omegaconf (configs),
# webdataset + braceexpand (the data modules the trainer imports), diffusers + importlib_metadata
# (the Wan VAE of the streaming part). av and wandb are not needed by the check; the parts that
# need a missing package record it and the others run.
GPU_PYTHON ?= python3
GPU_WHEELS_DIR ?= .whl
GPU_SITE ?= /tmp/forcelab-gpu-site
GPU_CHECK_OUT ?= gpu_check_out
GPU_CHECK_ARGS ?=                  # e.g. --smoke, --budget 300, --parts attention training
GPU_WHEELS = omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 diffusers==0.42.1 importlib_metadata==8.7.0
GPU_WHEEL_PLATFORM = --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64

gpu-wheels:
	rm -rf $(GPU_WHEELS_DIR)
	$(PYTHON) -m pip download --no-deps $(GPU_WHEEL_PLATFORM) -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)
	du -sh $(GPU_WHEELS_DIR)

gpu-check:
	rm -rf $(GPU_SITE)
	mkdir -p $(GPU_SITE)/path $(GPU_SITE)/lib
	ln -s "$(CURDIR)" $(GPU_SITE)/path/forcelab
	if ls $(GPU_WHEELS_DIR)/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps \
		--no-compile --no-cache-dir --target $(GPU_SITE)/lib $(GPU_WHEELS_DIR)/*.whl; fi
	PYTHONUNBUFFERED=1 PYTHONPATH=$(GPU_SITE)/path:$(GPU_SITE)/lib $(GPU_PYTHON) -m forcelab.bench.gpu_check \
		--out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# VBench's own environment (VBench pins torch, numpy<2 and transformers==4.33.2, which cannot share
# forcelab's; `forcelab eval vbench --vbench-python $(VBENCH_ENV)/bin/python` runs it as a subprocess).
# It installs: torch + torchvision from $(VBENCH_TORCH_INDEX) (PyPI's Linux wheels are CUDA builds, so a
# CUDA torch where the platform has one; a torchvision that matches it: PyPI's torchvision does not
# load beside a CPU-only torch), numpy<2, `vbench --no-deps` (its setup refuses a torch without CUDA
# 11.6-12.1 and would pull its own torch) and VBench's pure-Python requirements. ~5 GB, ~5 minutes.
# Semantic dimensions that use GRiT (object_class, multiple_objects, color, spatial_relationship)
# also need detectron2 built from source: $(VBENCH_ENV)/bin/pip install --no-build-isolation
# 'git+https://github.com/facebookresearch/detectron2.git'. Weights: put them in $$VBENCH_CACHE_DIR
# (or ~/.cache/vbench); `forcelab eval vbench` names any missing file (eval/vbench_runner.py WEIGHTS).
VBENCH_ENV ?= $(HOME)/vbench-env
VBENCH_VERSION ?= 0.1.5
VBENCH_TORCH_INDEX ?=          # a CUDA wheel index for torch/torchvision (empty: pip's default)
VBENCH_DEPS = "numpy<2" Pillow matplotlib "timm>=0.9,<=1.0.12" scipy opencv-python scikit-learn scikit-image \
	openai-clip decord requests pyyaml easydict pyiqa lvis "fairscale>=0.4.4" fvcore urllib3 boto3 omegaconf \
	"transformers==4.33.2" pycocoevalcap tensorboard wheel cython
FORCELAB_VBENCH_PYTHON ?= $(VBENCH_ENV)/bin/python

vbench-env:
	$(PYTHON) -m venv $(VBENCH_ENV)
	$(VBENCH_ENV)/bin/python -m pip install --upgrade pip
	$(VBENCH_ENV)/bin/python -m pip install $(if $(strip $(VBENCH_TORCH_INDEX)),--index-url $(VBENCH_TORCH_INDEX)) torch torchvision
	$(VBENCH_ENV)/bin/python -m pip install $(VBENCH_DEPS)
	$(VBENCH_ENV)/bin/python -m pip install --no-deps "vbench==$(VBENCH_VERSION)"
	$(VBENCH_ENV)/bin/python -c "import vbench, torch, torchvision; print('VBench env ready:', torch.__version__, 'cuda', torch.cuda.is_available())"

# Real VBench on videos generated by the toy teacher; native == real where forcelab has both.
# Skips (saying why) when $(FORCELAB_VBENCH_PYTHON) does not exist.
test-vbench: install
	FORCELAB_VBENCH_PYTHON=$(FORCELAB_VBENCH_PYTHON) $(PY) -m pytest -q -rs tests/test_eval_vbench_real.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
