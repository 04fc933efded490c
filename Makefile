.PHONY: install test demo bench-micro native

# Create .venv and install the project with its test extras.
install:
	bash scripts/install.sh

# Install everything, then run lint, strict type checks and the test suite.
test:
	bash scripts/test.sh

# A real pull storm in miniature on loopback (installs what it needs first).
demo:
	bash scripts/demo.sh

# Core microbenchmarks: prints JSON and writes bench-out/micro.json.
bench-micro: install
	.venv/bin/p2p-bench micro --out bench-out/micro.json

# The core and the storm simulator compiled with mypyc into build/native (see p2pd/native.py).
native: install
	.venv/bin/python -m p2pd.native build
