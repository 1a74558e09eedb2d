#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then profile the linear RNN sample model: train with probes,
# fit (L0, L1) with the suggested clip threshold and step size, and plot the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="${1:-linear_rnn.h5}"
.venv/bin/smoothprof run sample_models/linear_rnn.py -o "$out" --force
.venv/bin/smoothprof fit "$out"
.venv/bin/smoothprof plot "$out"
