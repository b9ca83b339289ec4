# The README's two commands: `make run` (set up, train on MNIST) and `make test`.
PY := .venv/bin/python

.PHONY: setup run demo test lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	@$(PY) -m vqvae demo

demo: setup
	@$(PY) -m vqvae demo

test: setup
	@$(PY) -m pytest -q
	@$(PY) -m ruff check src tests benchmarks

lint: setup
	@$(PY) -m ruff check src tests benchmarks

bench: setup
	@$(PY) benchmarks/quantizer.py

clean:
	rm -rf .venv runs .pytest_cache .ruff_cache
