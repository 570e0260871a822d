#!/usr/bin/env bash
# Create .venv and install foe into it, with the test extras.
# PyTorch: an existing torch is kept. If the python running this script already imports torch, the venv
# sees it (--system-site-packages); otherwise the CPU wheel torch==2.13.0 is installed (no CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi

# pip install, keeping its exit status but not the index-location warnings some machines print.
pip_install() {
  local log rc=0
  log=$(mktemp)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing PyTorch (CPU wheel torch==2.13.0)"
  pip_install "torch==2.13.0" || pip_install torch || { echo "setup: could not install PyTorch" >&2; exit 1; }
fi
echo "setup: installing foe and its dependencies into .venv"
pip_install -e ".[dev]" || { echo "setup: installing foe failed (see pip's messages above)" >&2; exit 1; }
# The engine's native paged-attention kernel: compiled once here rather than in the first server start.
.venv/bin/python -c "import torch; from foe.engine.kernels import decode_kernel_available as ok; ok(torch.device('cpu'))" \
  || echo "setup: the native kernel did not build; the engine uses its slower torch path" >&2
.venv/bin/python -c "import foe, torch; print(f'setup: foe {foe.__version__} with torch {torch.__version__} is ready')"
