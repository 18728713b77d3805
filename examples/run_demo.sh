#!/usr/bin/env bash
# The Quickstart's main job: set up .venv (first time only), then run the HVP demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python examples/demo.py
