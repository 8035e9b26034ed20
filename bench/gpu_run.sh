#!/usr/bin/env bash
# The benchmark suite on a lent GPU, in one command (BENCHMARKS.md). Two steps:
#
#   bench/gpu_run.sh wheels     # HERE, where pip reaches PyPI: the pure-Python packages the GPU
#                               # image lacks (ml_collections, grain + array_record, portpicker)
#                               # go to .whl/ (add '/.whl/' to .git/info/exclude)
#   bench/gpu_run.sh [PART]     # THERE (device tool: carry [".whl"]): installs .whl/*.whl into
#                               # /tmp/site, runs the suite, writes JSON to $OUT (or bench_out/)
#
# The GPU image has jax/flax/optax/orbax/torch/timm but no TensorFlow, TFDS, clu,
# ml_collections or grain; the benches import none of TF/TFDS/clu.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
  exit 0
fi
out=${OUT:-bench_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
run() {  # name, command...: JSON to $out/name.json, log to $out/name.log; go on after a failure
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$out/$name.json" 2> "$out/$name.log"; then cat "$out/$name.json"; else
    echo "$name failed:"; tail -20 "$out/$name.log"; fi
}
want=${1:-all}  # all | train_step | regularizers | input_ratio | analysis | heads (one per device call if 10 min is short)
[[ $want == all || $want == train_step ]] && run train_step python3 bench/train_step.py --batch 256 --dtype bfloat16
[[ $want == all || $want == regularizers ]] && run regularizers python3 bench/regularizers.py --batch 64 --paper_batch 80 --dtype bfloat16
[[ $want == all || $want == input_ratio ]] && run input_ratio python3 bench/input_ratio.py --model b --batch 256 --dtype bfloat16
[[ $want == all || $want == analysis ]] && run analysis python3 bench/analysis.py --batch 32 --num_batches 10 --top_k 5
[[ $want == all || $want == heads ]] && run heads python3 bench/heads.py --model b16 --batch 256 --skip_command
exit 0
