PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-test demo test

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

# Generate greedily from the bundled tiny model (created on first use under ~/.cache/m3jax).
demo: install
	$(PY) -m m3jax.cli generate --prompt "The quick brown fox" --max-new-tokens 24 --ids

test: install-test
	$(PY) -m pytest -x -q
