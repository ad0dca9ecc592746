# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup browser demo test test-all flower-demo

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/spearfl run configs/demo.yaml

browser:
	bash scripts/browser.sh

test: setup browser
	.venv/bin/python -m pytest -q

test-all: setup browser
	.venv/bin/python -m pytest -q -m "slow or not slow"

# The demo on Flower's simulation engine: 4 virtual SuperNodes, one client each (see README, "Run on Flower").
# Flower would otherwise re-install the project's dependencies (torch) for every run.
flower-demo: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
		flwr run . --stream --federation-config "num-supernodes=4 client-resources-num-cpus=2"
