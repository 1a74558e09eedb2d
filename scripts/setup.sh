#!/usr/bin/env bash
# Create .venv (if missing) and install smoothprof with its test tools, transformers, and the
# trainers of its callbacks (Lightning; the Hugging Face Trainer with accelerate) into it.
# Where no NVIDIA GPU is present, the CPU build of PyTorch goes in first, so that installing
# smoothprof does not pull a multi-GB CUDA build. Set SMOOTHPROF_PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${SMOOTHPROF_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.3"
  else
    # The CPU wheel index of PyTorch; pip falls back to its configured indexes when it is
    # unreachable.
    "${pip[@]}" --retries 0 --timeout 10 "torch==2.13.0" \
      --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" 2>/dev/null \
      || "${pip[@]}" "torch==2.13.0"
  fi
fi
# The test tools, transformers (for the GPT-2 sample's tests) and the trainers (for the
# callbacks' tests) must not replace the torch installed above: a constraint file pins it (pip
# passes PIP_CONSTRAINT on to its subprocesses, so it is a real file, not a pipe).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
PIP_CONSTRAINT="$constraints" "${pip[@]}" -e ".[test,models,lightning,transformers]"
