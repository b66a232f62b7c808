# alignpress developer commands. `make demo` and `make test` set up what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SKY_VENV  := .venv-sky
SKY_STAMP := $(SKY_VENV)/.installed

.PHONY: demo test test-container check-sky bench bench-smoke clean venv

venv: $(STAMP)

# torch is pinned in the lock: the pip configuration on the CPU machines points at the CPU wheel.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# SkyPilot is the launcher, not part of the job: skypilot 0.14.1 pins click<8.2 and
# huggingface_hub 2.4 needs click>=8.4.2, so it gets its own environment (requirements-sky.lock).
$(SKY_STAMP): requirements-sky.lock
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install -q -r requirements-sky.lock
	touch $@

demo: $(STAMP)
	$(PY) entrypoint.py run recipes/demo.yaml

test: $(STAMP) $(SKY_STAMP)
	$(PY) -m pytest -q

# Builds the Docker image with podman on a local Debian base and runs the demo inside it (~3 min warm, more cold).
test-container: $(STAMP)
	$(PY) -m pytest -q -m container

# GPU kernels for the fast path (liger-kernel; its torch and triton come with the CUDA torch wheel)
GPU_STAMP := $(VENV)/.installed-gpu
$(GPU_STAMP): $(STAMP) requirements-gpu.lock
	$(PY) -m pip install -q --no-deps -r requirements-gpu.lock
	touch $@

# GPU: every variant for both seed models -> benchmarks/results/<gpu>-<date>.json and .md
# (10 steps, 2 warm-up, 128 synthetic pairs: the settings of benchmarks/results/2026-11-26-h200)
BENCH_ARGS ?= --steps 10 --warmup 2 --pool 128
bench: $(GPU_STAMP)
	$(PY) benchmarks/bench_dpo.py --model phi3-mini $(BENCH_ARGS)
	$(PY) benchmarks/bench_dpo.py --model gemma-2b $(BENCH_ARGS)

# CPU: the harness on a tiny model (also run by the test suite); results to a temporary folder
bench-smoke: $(STAMP)
	$(PY) benchmarks/bench_dpo.py --smoke --out $${TMPDIR:-/tmp}/alignpress-bench-smoke

check-sky: $(SKY_STAMP)
	$(SKY_VENV)/bin/python sky/check_tasks.py

clean:
	rm -rf outputs .pytest_cache
