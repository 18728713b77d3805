#!/usr/bin/env bash
# The committed sweep: hessext.bench on the [1,16,1] network and the PINN-sized stack, N = 100 and 1000,
# every quantity against every installed peer (float64, 2 threads).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -m hessext.bench --quantities hvp,hvp-batched,ggn_vp,diagonal,hessian,input-hessian,laplacian \
  --preset tiny --preset pinn --batch 100,1000 --threads 2 --min-run-time 0.5 \
  --out benchmarks/results/bench_cpu.json --md benchmarks/results/bench_cpu.md --plot benchmarks/results/bench_cpu.png
