#!/usr/bin/env bash
# The benchmark suite on a lent GPU, in one command (BENCHMARKS.md). Two steps:
#
#   bench/gpu_run.sh wheels     # HERE, where pip reaches PyPI: the pure-Python packages the GPU
#                               # image lacks (ml_collections, grain + array_record, portpicker)
#                               # go to .whl/ (add '/.whl/' to .git/info/exclude)
#   bench/gpu_run.sh [PART]     # THERE (device tool: carry [".whl"]): installs .whl/*.whl into
#                               # /tmp/site, runs the suite, writes JSON to $OUT (or bench_out/)
#   bench/gpu_run.sh --dry_run [PART]   # anywhere: lists the commands PART would run, runs none
#
# PART: all (default) | train_step | regularizers | input_ratio | analysis | heads (one per
# device call if 10 min is short) | smoke (every script above in its seconds-long --smoke mode:
# run it first on a fresh machine, so a script that cannot start costs seconds, not a lease).
# The GPU image has jax/flax/optax/orbax/torch/timm but no TensorFlow, TFDS, clu or
# ml_collections; the benches import none of TF/TFDS/clu.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry_run" ]]; then dry=1; shift; fi
want=${1:-all}
case $want in
  all|train_step|regularizers|input_ratio|analysis|heads|smoke|wheels) ;;
  *) echo "gpu_run.sh: unknown part '$want'; valid: all train_step regularizers input_ratio" \
       "analysis heads smoke wheels" >&2; exit 2 ;;
esac
out=$(realpath -m "${OUT:-bench_out}")  # Before the cd: a relative OUT means the caller's folder.
cd "$(dirname "$0")/.."
if [[ $want == wheels ]]; then
  ((dry)) && { echo "== wheels: pip download -d .whl ml_collections grain array_record portpicker"; exit 0; }
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
  exit 0
fi
if ((!dry)); then
  mkdir -p "$out"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
fi
run() {  # name, command...: JSON to $out/name.json, log to $out/name.log; go on after a failure
  local name=$1; shift
  echo "== $name: $*"
  ((dry)) && return 0
  if "$@" > "$out/$name.json" 2> "$out/$name.log"; then cat "$out/$name.json"; else
    echo "$name failed:"; tail -20 "$out/$name.log"; fi
}
part() { [[ $want == all || $want == "$1" ]]; }
part train_step && run train_step python3 bench/train_step.py --batch 256 --dtype bfloat16
part regularizers && run regularizers python3 bench/regularizers.py --batch 64 --paper_batch 80 --dtype bfloat16
part input_ratio && run input_ratio python3 bench/input_ratio.py --model b --batch 256 --dtype bfloat16
part analysis && run analysis python3 bench/analysis.py --batch 32 --num_batches 10 --top_k 5
part heads && run heads python3 bench/heads.py --model b16 --batch 256 --skip_command
if [[ $want == smoke ]]; then
  for script in train_step regularizers input_ratio analysis; do
    run "smoke_$script" python3 "bench/$script.py" --smoke
  done
  run smoke_heads python3 bench/heads.py --smoke --skip_command
fi
exit 0
