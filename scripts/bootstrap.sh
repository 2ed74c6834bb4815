#!/usr/bin/env bash
# Create or refresh the project's .venv (called by `make`; a no-op when .venv is current).
#
# CPU-only Linux machine: torch==2.13.0 (CPU build) is installed first so no CUDA build is pulled.
#   On a CPU machine whose pip cannot find that file locally, point pip at PyTorch's CPU index:
#     KAT_TORCH_INDEX=https://download.pytorch.org/whl/cpu make test
# GPU machine: set KAT_TORCH_SPEC (e.g. "torch==2.11.0") or install torch yourself before `make`;
#   the bootstrap keeps an installed CUDA torch (see README, "GPU install").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${KAT_TORCH_SPEC:-torch==2.13.0}

"$PYTHON" - <<'PY' || { echo "kat needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if has_cuda; then
    echo "[bootstrap] NVIDIA GPU found: installing $TORCH_SPEC (CUDA build from PyPI)"
    "${PIP[@]}" install -q "$TORCH_SPEC"
  else
    echo "[bootstrap] CPU-only machine: installing $TORCH_SPEC (CPU build)"
    if [ -n "${KAT_TORCH_INDEX:-}" ]; then
      "${PIP[@]}" install -q "$TORCH_SPEC" --index-url "$KAT_TORCH_INDEX"
    else
      "${PIP[@]}" install -q "$TORCH_SPEC"
    fi
  fi
fi

echo "[bootstrap] installing kat (editable) with the dev and sweeps extras"
"${PIP[@]}" install -q setuptools wheel
"${PIP[@]}" install -q --no-build-isolation -e ".[dev,sweeps]"

# The code-reward sandbox uses bubblewrap; install it where we can (Debian/Ubuntu as root).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing bubblewrap (code-reward sandbox)"
    (apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }) \
      || echo "[bootstrap] could not install bubblewrap; code rewards will refuse to run (see docs/rl.md)"
  else
    echo "[bootstrap] bubblewrap (bwrap) not found and not installable here; code rewards will refuse to run (see docs/rl.md)"
  fi
fi
echo "[bootstrap] done"
