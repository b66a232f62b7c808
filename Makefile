# alignpress developer commands. `make demo` and `make test` set up what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all test-slow lint clean venv

venv: $(STAMP)

# torch is pinned in the lock: the pip configuration on the CPU machines points at the CPU wheel.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) entrypoint.py run recipes/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf outputs .pytest_cache
