#!/usr/bin/env bash
# Check foe's CUDA paths on a machine with a GPU (they are written, but this repository's CI has none):
#   1. what the machine has: nvidia-smi, torch's CUDA build and devices;
#   2. pytest -m gpu: the model (MoE and FoE) against a float64 reference, cached decode, the grouped
#      experts (torch._grouped_mm) against the loop, the engine against generate, foe serve --device cuda;
#   3. smoke runs: foe generate and foe bench model on --device cuda.
# Without CUDA it says so, shows the GPU tests being skipped, and exits 0. Run from anywhere:
#   bash scripts/gpu-check.sh            (uses .venv/bin/python, or $PYTHON)
# Each step is bounded by GPU_CHECK_TIMEOUT seconds (default 900), so a hung kernel fails instead of waiting.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT=${GPU_CHECK_TIMEOUT:-900}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME COMMAND...: run it under the time limit, remember a failure, go on
  local name=$1 rc=0
  shift
  echo
  echo "== $name: $*"
  timeout "$LIMIT" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "gpu-check: $name took over $LIMIT s" >&2
    failed+=("$name (exit $rc)")
  fi
}

echo "== machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
else
  echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
      f"cuda available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    # torch._grouped_mm runs bf16 as one CUTLASS kernel on sm90/sm100 only; elsewhere torch loops over experts
    print(f"  cuda:{i} {p.name}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
EOF

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo
  echo "gpu-check: torch sees no CUDA device here; the GPU tests are skipped:"
  step "gpu tests (skipped)" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
  if [ ${#failed[@]} -ne 0 ]; then
    echo "gpu-check: even skipping failed: ${failed[*]}" >&2
    exit 1
  fi
  echo "gpu-check: nothing to check without a GPU (exit 0)"
  exit 0
fi

step "gpu tests" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
step "foe generate --device cuda" "$PY" -m foe.cli.main generate --preset small --device cuda --dtype bfloat16 \
  --prompt-ids "1 2 3" --max-new-tokens 8
out=$(mktemp -d)
step "foe bench model --device cuda" "$PY" -m foe.cli.main bench model --preset small --device cuda --dtype bfloat16 \
  --batch-sizes 1,16,64 --seq-lens 128 --repeats 5 --json "$out/bench_model.json" --plot none
rm -rf "$out"

echo
if [ ${#failed[@]} -ne 0 ]; then
  echo "gpu-check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "gpu-check: all CUDA checks passed"
