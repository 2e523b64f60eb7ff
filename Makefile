PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-test demo test test-fast test-gpu

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

# Continue a Python prompt greedily with the bundled default model (m3jax.default_model_path(): a 15.9M-parameter
# M3, MSA + MoE, trained on the Python standard library by benchmarks/train_default.py; quality in
# benchmarks/RESULTS.md). The prompt is printed first, then the model's continuation; the CLI names the model on
# stderr. The prompt ends without a newline: the tokenizer joins a newline with the next line's indentation.
DEMO_PROMPT = def read_lines(path):\n    with open(path) as f:
demo: install
	@echo "m3jax demo: 64 greedy tokens of Python from the bundled default model (trained on the standard library)"
	@echo "-----"
	@printf '$(DEMO_PROMPT)'
	@$(PY) -m m3jax.cli generate --prompt "$$(printf '$(DEMO_PROMPT)')" --max-new-tokens 64

# The full suite (what CI runs); the 15 slowest tests are listed at the end so the suite's cost stays visible.
# One process (13.6 min on the 2-core CI box, 2026-12-08): two pytest-xdist workers took 10-11 min, but one of two
# such runs lost a worker to a segfault inside XLA's CPU compiler (tests/test_vision.py), so the gain is not worth it.
test: install-test
	$(PY) -m pytest -q --durations=15

# For development: skips the tests marked slow. `make test` stays the full suite.
test-fast: install-test
	$(PY) -m pytest -q -m "not slow" --durations=15

# On a GPU host: the whole suite, 12 pytest workers (no preallocation: each takes what it uses), spread round robin
# over the host's GPUs (tests/gpu_workers.py). Tests that need several devices skip there, saying why (they run
# on CPU's forced host devices in `make test`); GPU-only kernel tests run. float32 is float32 there too: float32
# models and references use precision=HIGHEST, never TF32.
test-gpu: install-test
	XLA_PYTHON_CLIENT_PREALLOCATE=false $(PY) -m pytest -q -n 12 -p tests.gpu_workers --durations=15
