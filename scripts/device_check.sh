#!/usr/bin/env bash
# One GPU session's checks, in priority order, each under its own time limit, everything logged under $OUT.
# Run on the GPU machine from the project root (with ./.whl for an offline machine: docs/benchmarks.md,
# "Running on a GPU machine without network"):
#   OUT=/tmp/out scripts/device_check.sh
# Steps: install kat from the wheelhouse; GPU-marked tests (kernels at full size, CUDA paths); ULD, GRPO and
# train-step benchmarks (tables in $OUT/*.md).
set -uo pipefail
OUT=${OUT:-/tmp/kat_device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  tail -n 40 "$OUT/$name.log"
}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    && export PYTHONPATH=$PWD/.site:${PYTHONPATH:-} \
    && python3 -m pip install -q --no-deps --no-build-isolation . > "$OUT/install.log" 2>&1 || { echo install failed; tail -20 "$OUT/install.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
STEPS=${STEPS:-uld grpo train tests}   # a subset reruns only those, e.g. STEPS="grpo train"
for s in $STEPS; do
  case $s in
    uld)   step bench_uld 140 python3 benchmarks/uld.py ;;
    grpo)  step bench_grpo 110 python3 benchmarks/grpo.py ;;
    train) step bench_train 200 python3 benchmarks/train_step.py --budget-s 170 --out "$OUT/train_step.md" ${TRAIN_ARGS:-} ;;
    tests) step gpu_tests 130 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/models --timeout 120 ;;
    *) echo "unknown step $s" ;;
  esac
done
