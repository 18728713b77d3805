#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the test suite (CUDA cases included), run the
# GPU benchmark; logs and results under $OUT (default benchmarks/results/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
{ nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; } > "$OUT/device.txt" 2>&1
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -m hessext.info | tee "$OUT/info.txt"
python3 -m pytest -q tests -p no:cacheprovider > "$OUT/pytest.txt" 2>&1; echo "pytest exit $?"; tail -5 "$OUT/pytest.txt"
python3 benchmarks/gpu.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.txt" | tail -40
