PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-test demo test test-fast test-gpu

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

# Generate greedily from the bundled tiny random-weight test model (written on first use under ~/.cache/m3jax, or
# $M3JAX_CACHE); there is no trained default model yet, so the text is noise. The CLI names the model and its path.
demo: install
	@echo "m3jax demo: 24 greedy tokens after 'The quick brown fox' from the bundled tiny random-weight test model"
	$(PY) -m m3jax.cli generate --prompt "The quick brown fox" --max-new-tokens 24 --ids

# The full suite (what CI runs); the 15 slowest tests are listed at the end so the suite's cost stays visible.
test: install-test
	$(PY) -m pytest -q --durations=15

# For development: skips the tests marked slow. `make test` stays the full suite.
test-fast: install-test
	$(PY) -m pytest -q -m "not slow" --durations=15

# On a GPU host: the whole suite, 8 pytest workers (no preallocation: each takes what it uses), spread round robin
# over the host's GPUs (tests/gpu_workers.py). Tests that need several devices skip there, saying why (they run
# on CPU's forced host devices in `make test`); GPU-only kernel tests run. float32 is float32 there too: float32
# models and references use precision=HIGHEST, never TF32.
test-gpu: install-test
	XLA_PYTHON_CLIENT_PREALLOCATE=false $(PY) -m pytest -q -n 8 -p tests.gpu_workers --durations=15
