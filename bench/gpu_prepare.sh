#!/usr/bin/env bash
# Issue 23, the prepared device check, step 1 of 2 (here, on the CPU): then ONE call of the device tool.
#
#   bash bench/gpu_prepare.sh prepare [REPO]   # here: wheels for what the GPU image lacks (lm-eval & co.) into
#                                              # REPO/.whl (git-ignored, ~16 MB), then the CPU mode of the device
#                                              # script (bench/gpu_run.sh --cpu, ~2 min on a shared 2-core box)
#   bash bench/gpu_prepare.sh cpu [REPO]       # only the CPU mode
#   bash bench/gpu_prepare.sh show             # print the device call
#
# REPO = the checkout the session was started in (what `run` sends; default: the checkout this script is in). The device
# call (the `run` tool, not a shell command):
#
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# It runs bench/gpu_suite.py with a 360 s budget (core figures first, then compile / speed choices / pythia-1b; what
# would not fit is recorded as skipped), then `pytest -m gpu tests/gpu` (160 s cap): at most ~9.5 min. What comes
# back, under files_at: gpu_suite.json (the record), gpu_suite.log (the table), gpu_tests.log, gpu_tests.xml,
# env.txt (nvidia-smi, torch / transformers / lm_eval versions). The session's 15 device minutes hold the machine's
# start (1-2 min) and this one call; a second full call does not fit. If the call fails within a minute (an import
# error, say), fix and rerun at once while the machine is warm (30 s), with a smaller budget:
#   run(command="BUDGET=240 TEST_TIMEOUT=120 bash bench/gpu_run.sh", carry=[".whl"], timeout_s=420)
# otherwise give_back. Then: copy gpu_suite.json and the table, the GPU's name, the commit and the command into a dated
# results file, benchmarks/results/YYYY-MM-gpu-suite.md (header as in benchmarks/results/README.md).
set -euo pipefail
MODE=${1:-show}
REPO=${2:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$REPO"
[ -f bench/gpu_run.sh ] || { echo "gpu_run: $REPO has no bench/gpu_run.sh (not an lmselect checkout)"; exit 2; }

wheels() {
  # packages lm-eval needs at import that the GPU image (python 3.12, torch 2.11) lacks; --no-deps: only these
  grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
    || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 zstandard==0.25.0 chardet==6.0.0.post1
  ls -la .whl; du -sh .whl
}

case "$MODE" in
  prepare) wheels; OUT=/tmp/gpu_run_cpu BUDGET=200 TEST_TIMEOUT=600 bash bench/gpu_run.sh --cpu ;;
  cpu) OUT=/tmp/gpu_run_cpu BUDGET=200 TEST_TIMEOUT=600 bash bench/gpu_run.sh --cpu ;;
  show) grep -m2 '#   run(command=' "$0" | sed 's/^#   //' ;;
  *) echo "usage: $0 prepare|cpu|show [REPO]"; exit 2 ;;
esac
