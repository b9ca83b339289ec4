# The README's two commands: `make run` (set up, then train on MNIST) and `make test`.
PY := .venv/bin/python

# MNIST is read from ../shared/data/mnist when that copy exists (machines without internet);
# otherwise from $VQVAE_DATA_DIR, the cache, or downloaded (see src/vqvae/data.py).
ifeq ($(VQVAE_DATA_DIR),)
export VQVAE_DATA_DIR := $(abspath $(wildcard ../shared/data/mnist))
endif

.PHONY: setup run test test-fast lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	@$(PY) -m vqvae train

# -n auto: one pytest-xdist worker per usable core (tests/conftest.py), each with its share of
# torch's threads; `pytest -q` without it runs the same tests in one process. Not for
# test-fast: its tests are short, and with a neighbour on one core two workers ran it slower
# than one process (README, "Development").
test: setup
	@$(PY) -m pytest -q -n auto
	@$(PY) -m ruff check src tests benchmarks

# The tests that start no processes, compile nothing and run no command end to end.
test-fast: setup
	@$(PY) -m pytest -q -m "not slow"
	@$(PY) -m ruff check src tests benchmarks

lint: setup
	@$(PY) -m ruff check src tests benchmarks

bench: setup
	@$(PY) benchmarks/quantizer.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache
