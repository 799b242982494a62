# `make demo` and `make test` do all set-up on a fresh machine: they create
# .venv and install the package into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: install demo test bench notebooks clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[lm,test,keras-hub,bench,notebooks]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m keras_moe.train --preset quick --compare-baseline --out runs/demo

# The notebooks run in their quick mode (KERAS_MOE_QUICK=1; the tests do not
# read it); the committed outputs come from full runs (`make notebooks`).
# Two pytest workers (the machine's two cores: tracing is single-threaded
# Python), the long notebooks handed out first.
test: $(STAMP)
	KERAS_MOE_QUICK=1 $(PY) -m pytest -q -n 2 --durations=15 \
		--nbmake --nbmake-timeout=1200 notebooks tests

notebooks: $(STAMP)
	$(PY) notebooks/run.py

# Three processes: TensorFlow keeps what it allocated, and one process going
# on after the fixed regime's E=1,024 (to keras-hub's dense block at 64
# experts, or to the paper's E=1,024, N=65,536) outgrew this 24 GB machine.
# The JAX rows run with the keras-hub regime.
bench: $(STAMP)
	$(PY) -m benchmarks.run --regimes fixed --jax-experts ''
	$(PY) -m benchmarks.run --regimes hub --no-memory --out benchmarks/results/hub
	$(PY) -m benchmarks.run --regimes paper --no-memory --jax-experts '' \
		--out benchmarks/results/paper

clean:
	rm -rf $(VENV) build *.egg-info
