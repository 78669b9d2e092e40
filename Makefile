# Shortcuts for the scripts in scripts/; every target installs what is missing first.
PYTHON := .venv/bin/python
BENCHMARKS := $(sort $(wildcard benchmarks/bench_*.py))

.PHONY: setup test demo lint bench bench-codecs

setup:
	./scripts/setup

test:
	./scripts/test

demo:
	./scripts/demo

lint: setup
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m mypy

# Every benchmarks/bench_*.py, one after another (they compete for the same cores).
bench: setup
	@set -e; for bench in $(BENCHMARKS); do \
		echo "== $$bench"; \
		$(PYTHON) $$bench; \
	done

bench-codecs: setup
	$(PYTHON) benchmarks/bench_codecs.py
