# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test test-all

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/spearfl run configs/demo.yaml

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m "slow or not slow"
