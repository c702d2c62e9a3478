#!/usr/bin/env bash
# Create ./.venv and install genie-sima into it (editable, with test extras).
#
# Torch: on a machine without a working NVIDIA driver we install the CPU build torch==2.13.0
# first (served from the local wheel cache on our dev/CI machines, from PyPI's CPU index
# elsewhere), so the plain `torch>=...` requirement in pyproject.toml is already satisfied and
# pip never downloads the multi-GB CUDA packages. With `nvidia-smi` working, pip installs the
# normal CUDA build from PyPI. Override with GENIE_SIMA_TORCH=cpu|cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.genie-sima-installed"

if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
  exit 0  # already set up for this pyproject.toml
fi

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "genie-sima needs Python >= 3.11, found " + sys.version' 
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

mode="${GENIE_SIMA_TORCH:-auto}"
if [[ "$mode" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi
echo "setup: installing torch ($mode build) into $VENV" >&2
if [[ "$mode" == cpu ]]; then
  if ! "${PIP[@]}" torch==2.13.0 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
else
  "${PIP[@]}" torch
fi
echo "setup: installing genie-sima and its dependencies" >&2
"${PIP[@]}" -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
touch "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))" >&2
