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

.PHONY: install test test-gpu demo bench clean

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

test-gpu: install
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
