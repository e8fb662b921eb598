#!/usr/bin/env bash
# One command on one CUDA GPU (issue 23): the figures (bench/gpu_suite.py), then the GPU tests (pytest -m gpu).
# Everything lands in $OUT (default ./out/gpu): gpu_suite.json (the record), gpu_suite.log, gpu_tests.log,
# gpu_tests.xml, env.txt. At most ~9.5 min: the suite's budget (BUDGET, default 360 s; it skips what would not fit
# and says so) plus its startup, then the tests (TEST_TIMEOUT, default 160 s).
#
#   bash bench/gpu_run.sh                   # on a machine with a GPU
#   bash bench/gpu_run.sh --cpu             # this script's CPU check: suite --device cpu --tiny, and the GPU tests'
#                                           # code run on the CPU (LMSELECT_GPU_DRYRUN=1, quick subset)
#
# Wheels in ./.whl (packages the GPU image lacks, e.g. lm-eval for `lmselect eval`) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
OUT=${OUT:-$PWD/out/gpu}
BUDGET=${BUDGET:-360}
TEST_TIMEOUT=${TEST_TIMEOUT:-160}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ "$MODE" != "--cpu" ] && ls .whl/*.whl >/dev/null 2>&1; then  # built for the GPU image's python, not this one
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "gpu_run: carried wheels did not install; lm-eval tests will skip"
fi
{
  date -u; uname -a; nvidia-smi 2>&1 || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else ''); print('transformers', transformers.__version__)"
  python3 -c "import lmselect; print('lmselect', lmselect.__file__)"
  python3 -c "import lm_eval; print('lm_eval', lm_eval.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$MODE" = "--cpu" ]; then
  SUITE_ARGS=(--device cpu --tiny)
  export LMSELECT_GPU_DRYRUN=1
  TEST_ARGS=(-k "bliss_batched_equals or mates_batched or rho1 or scoring")
else
  SUITE_ARGS=()
  TEST_ARGS=()
fi

# 1. the figures: the suite stops its own items at BUDGET; the hard limit only guards against a hang outside one
timeout -k 10 $((BUDGET + 30)) python3 bench/gpu_suite.py "${SUITE_ARGS[@]}" --budget "$BUDGET" --traceback \
  --out "$OUT/gpu_suite.json" 2>&1 | tee "$OUT/gpu_suite.log"
suite_rc=${PIPESTATUS[0]}

# 2. the GPU tests (skipped without CUDA unless LMSELECT_GPU_DRYRUN=1)
timeout -k 10 "$TEST_TIMEOUT" python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -o addopts="-ra" \
  --junitxml="$OUT/gpu_tests.xml" "${TEST_ARGS[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "gpu_run: suite rc=$suite_rc, tests rc=$tests_rc; files in $OUT:"; ls -la "$OUT"
[ "$suite_rc" = 0 ] && [ "$tests_rc" = 0 ]
