#!/usr/bin/env bash
# On the GPU machine: build with CUDA, run the CUDA tests, the GPU benchmarks (benchmarks/gpu.py, the
# PINN step, the small-call profile), then every CUDA case of the suite ("full": the whole suite).
#   bash benchmarks/gpu_check.sh [build] [test] [bench] [suite|full]   (no argument: build test bench suite)
# GPU_CHECK_SECONDS (default 540) bounds the whole script: each phase gets what is left, so the
# logs written so far come back. Logs and results go under $OUT (default benchmarks/results/gpu). A
# build is reused when hessext._C already imports with CUDA (a warm machine, or a stripped copy
# carried in as .gpu/_C.so); each build leaves a stripped copy at $OUT/_C.so to carry into the next call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 \
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The GPU image's CC/CXX (/opt/gcc, a g++ wrapper) link libstdc++ statically; setup.py refuses such a
# build (see hessext/_build.py), so the system compilers build it, as they built torch's own.
export CC=${HESSEXT_CC:-/usr/bin/gcc} CXX=${HESSEXT_CXX:-/usr/bin/g++}
phases=${*:-build test bench suite}
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
left() { echo $((deadline - SECONDS > 5 ? deadline - SECONDS : 5)); }
so=hessext/_C$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
[ -f .gpu/_C.so ] && [ ! -f "$so" ] && cp .gpu/_C.so "$so"
with_cuda() { python3 -c 'import hessext._C as c, sys; sys.exit(0 if c.with_cuda() else 1)' 2>/dev/null; }
{ nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; git rev-parse HEAD; } \
  > "$OUT/device.txt" 2>&1
if [[ $phases == *build* ]]; then
  if with_cuda; then echo "build: reusing $so"; else
    start=$SECONDS
    timeout "$(left)" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
    echo "build: $((SECONDS - start)) s"
    strip --strip-debug -o "$OUT/_C.so" "$so"
  fi
  python3 -m hessext.info | tee "$OUT/info.txt"
fi
if [[ $phases == *test* ]]; then
  start=$SECONDS
  timeout "$(left)" python3 -m pytest -q -p no:cacheprovider --timeout 300 tests/test_cuda.py > "$OUT/pytest_cuda.txt" 2>&1
  echo "pytest test_cuda.py exit $? ($((SECONDS - start)) s)"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.txt" | head -20
  tail -1 "$OUT/pytest_cuda.txt"
fi
if [[ $phases == *bench* ]]; then
  timeout "$(left)" python3 benchmarks/gpu.py --out "$OUT" > "$OUT/gpu_bench.txt" 2>&1; echo "gpu.py exit $?"
  timeout "$(left)" python3 benchmarks/pinn_step.py --device cuda > "$OUT/pinn_step.txt" 2>&1; echo "pinn_step exit $?"
  cp benchmarks/results/pinn_step_gpu.md benchmarks/results/pinn_step_gpu.json "$OUT/" 2>/dev/null
  timeout "$(left)" python3 benchmarks/gpu_profile.py --out "$OUT" > "$OUT/gpu_profile.log" 2>&1; echo "gpu_profile exit $?"
fi
if [[ $phases == *suite* || $phases == *full* ]]; then
  start=$SECONDS
  select=(-k cuda); [[ $phases == *full* ]] && select=()
  timeout "$(left)" python3 -m pytest -q -p no:cacheprovider --timeout 300 -rs "${select[@]}" tests > "$OUT/pytest.txt" 2>&1
  echo "pytest suite exit $? ($((SECONDS - start)) s)"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -30
  tail -1 "$OUT/pytest.txt"
fi
[[ $phases == *bench* ]] && { cat "$OUT/gpu_bench.md" "$OUT/pinn_step_gpu.md" 2>/dev/null | cut -c1-400; }
