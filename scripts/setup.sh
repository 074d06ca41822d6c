#!/usr/bin/env bash
# Create .venv and install the project with its test extras.
# torch is installed first and pinned: on these machines `torch==2.13.0` is a local CPU
# wheel, while an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
pip install -q -e ".[test]"
python -c "import torch, transformers, grpc, ray; print('setup ok: torch', torch.__version__)"
