#!/usr/bin/env bash
# The speed figures that need a GPU, in one run: AMG vs E-SAM (`esam bench`) with the masks and
# the post-processing on the device, for the SAM-behaviour simulator and the scene backend
# (realistic mask sets, both configs) and for real-size models with random weights (timing only).
# Runs from a source tree with a plain python3 that has torch (CUDA), numpy, opencv, scikit-image,
# scipy and PyYAML; no ROS. Wheels in .whl/ (e.g. `pip download --no-deps segment-anything==1.0
# -d .whl`) are installed first into /tmp/site, for a machine that cannot fetch packages.
#
# Usage: scripts/gpu_bench.sh [OUT_DIR]   (default out/gpu; writes gpu_bench.txt and one .json per run)
# Environment: PYTHON (python3), DEVICE (cuda), REPEAT (5), GRIDS (32/64),
#              MODELS ("vit_h sam2.1_hiera_b+"; a model whose package is missing is skipped, visibly)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$out"
log="$out/gpu_bench.txt"
: >"$log"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } | tee -a "$log"

failed=0
bench() {  # bench NAME ARGS...: one `esam bench` run, its figures in the log and NAME.json
  local name=$1
  shift
  echo "== $name: esam bench $*" | tee -a "$log"
  "$py" -m esam_ros.cli bench --device "$device" --grids "${GRIDS:-32/64}" \
    --repeat "${REPEAT:-5}" --json "$out/$name.json" "$@" 2>&1 | tee -a "$log" || failed=1
}

bench simulator --backend simulator
bench simulator_fast --backend simulator --config config/esam_fast.yaml
bench scene --backend scene
for model in ${MODELS-vit_h sam2.1_hiera_b+}; do
  package=$([[ $model == sam2* ]] && echo sam2 || echo segment_anything)
  if "$py" -c "import $package" 2>/dev/null; then
    bench "$model" --random-weights "$model"
  else
    echo "== $model skipped: python package $package is not installed" | tee -a "$log"
  fi
done
echo "== summaries" | tee -a "$log"
grep '^summary' "$log"
exit $failed
