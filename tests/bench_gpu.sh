#!/usr/bin/env bash
# The GPU preset's throughput figures in one command (about 10 minutes on one H200; each part has its own time
# limit, so one slow part cannot take the others' time):
#   1. greedy decoding, minicai vs transformers' generate, bf16, batch 1/16/64
#   2. training steps, minicai vs TRL vs transformers, bf16 autocast (tests/bench_train.py)
#   3. the Triton attention kernel vs SDPA-flash vs naive (kernels/bench_attention.py), and its GPU check
#   4. the fused log-prob kernel vs naive / compiled / twin (kernels/bench_logprobs.py)
# Every part's output goes to OUT_DIR/<part>.txt (bench_train also writes train.json); OUT_DIR/env.txt holds
# the GPU, driver, versions, commit and date. A failed part is reported and the others still run; the exit
# status is the number of failed parts.
#
#   tests/bench_gpu.sh [OUT_DIR]          # default: $OUT if set, else runs/bench_gpu
#   tests/bench_gpu.sh --dry-run [OUT_DIR] # print the commands only
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-runs/bench_gpu}}
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
failed=0

part() {  # part NAME SECONDS CMD...: run CMD under a time limit, tee its output to OUT_DIR/NAME.txt
  local name=$1 limit=$2; shift 2
  echo "+ [$name, ${limit}s] $*"
  [ "$dry" = 1 ] && return 0
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.txt"
  if [ "$rc" != 0 ]; then echo "!! $name failed (exit $rc; 124 = over its ${limit}s limit)"; failed=$((failed + 1)); fi
}

if [ "$dry" = 0 ]; then
  mkdir -p "$out"
  if ! "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "bench_gpu: no CUDA device"; exit 1
  fi
  { date -u; git rev-parse --short HEAD; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$py" -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'cuda', torch.version.cuda)
for p in ('triton', 'transformers', 'trl'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'not installed')"; } > "$out/env.txt" 2>&1
  cat "$out/env.txt"
fi

part generate 150 "$py" tests/bench_generate.py --device cuda --dtype bfloat16 --batch-sizes 1 16 64 \
  --new-tokens 128 --repeats 3
part train 240 "$py" tests/bench_train.py --device cuda --dtypes bfloat16 --pairs 64 --batch-size 8 --steps 8 \
  --timeout 100 --json "$out/train.json"
part attention 90 "$py" kernels/bench_attention.py
part attention_check 60 "$py" kernels/bench_attention.py --check
part logprobs 50 "$py" kernels/bench_logprobs.py --device cuda
echo "bench_gpu: $failed part(s) failed; outputs in $out"
exit "$failed"
