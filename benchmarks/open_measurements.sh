#!/usr/bin/env bash
# The GPU measurements that open issues 12 and 13 still need, in parts that each fit one 10-minute call on one
# H200 (jax 0.11.2). Results go to $OUT (default .); each part prints its tables last.
#
#   benchmarks/open_measurements.sh kernels    # compiled GPU tests of the kernels not yet run on a GPU (stacked
#                                              # linear, fused-topk MSA, MXFP8 scaled_dot), then the MoE sweep
#   benchmarks/open_measurements.sh generate   # issue 12: generate.py --experts 128, bf16 then MXFP8: decode
#                                              # b1 / b32 at 32K (bytes, x bound), prefill 8K, --profile
#   benchmarks/open_measurements.sh issue13    # issue 13: kernels.py --issue13 (two-step vs fused-topk decode
#                                              # in one jit, 512K / 1M chunked prefill, FP8 index-K)
#   benchmarks/open_measurements.sh long       # issue 13: the 2**20-token Engine run, transformers at 16K / 32K
#   benchmarks/open_measurements.sh full       # issue 12 / 19: full_m3.py, the full-geometry projection
#
# Then `make test-gpu` (about 8 minutes) on the same code; on a host without network its test extras
# (transformers 5.23.0, starlette, openai, ...; torch is preinstalled there) must be carried as wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
out="${OUT:-.}"
mkdir -p "$out"

case "${1:-}" in
  kernels)
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_linear_gpu.py \
      tests/test_inplace_weights.py tests/kernels/test_gpu_model.py tests/kernels/test_gpu_kernels.py \
      -k "not random_ragged" 2>&1 | tail -25
    timeout 280 python3 benchmarks/moe.py --weights mxfp8 --sweep mxfp8 --budget-s 220 --out "$out"
    ;;
  generate)
    timeout 290 python3 benchmarks/generate.py --part jax --experts 128 --batches 1 32 --prefill 8192 \
      --profile --out "$out/generate_bf16.jsonl"
    timeout 290 python3 benchmarks/generate.py --part jax --experts 128 --batches 1 32 --prefill 8192 \
      --profile --fp8-experts --out "$out/generate_mxfp8.jsonl"
    ;;
  issue13)
    timeout 580 python3 benchmarks/kernels.py --issue13 --out "$out"
    ;;
  long)
    timeout 420 python3 benchmarks/long_context.py --part jax --out "$out/long_context.jsonl"
    timeout 150 python3 benchmarks/long_context.py --part torch --torch-lengths 16384 32768 \
      --out "$out/long_context.jsonl"
    ;;
  full)
    timeout 580 python3 benchmarks/full_m3.py --out "$out"
    ;;
  *)
    echo "usage: benchmarks/open_measurements.sh kernels|generate|issue13|long|full" >&2
    exit 2
    ;;
esac
