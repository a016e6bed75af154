#!/usr/bin/env bash
# The GPU check: each training script for a few steps in bf16 on CUDA (offline defaults, small
# samples), --quantize nf4 (QLoRA), a one-GPU torchrun with nccl, and bench.py's training-step
# ratios and fp32/bf16/nf4 memory on CUDA. One line per check; exits non-zero if any check failed.
# Under 5 minutes on one GPU (estimated: it has not run on a GPU yet). Needs the offline setup
# (bash scripts/setup_offline.sh requirements-dev.txt). Logs and run folders stay in $CHECK_DIR.
#   bash scripts/check_cuda.sh
#   DEVICE=cpu SLOW=4 bash scripts/check_cuda.sh   # the same commands on CPU (fp32 weights, gloo), 4× the time limits
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
SLOW=${SLOW:-1}
CHECK_DIR=${CHECK_DIR:-$(mktemp -d /tmp/check_cuda.XXXXXX)}
mkdir -p "$CHECK_DIR"
if [ "$DEVICE" = cuda ]; then DTYPE=bf16; else DTYPE=fp32; fi
failed=0

# check NAME SECONDS COMMAND...: runs COMMAND with a time limit, prints one line, keeps its log
check() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if timeout $((limit * SLOW)) "$@" >"$CHECK_DIR/$name.log" 2>&1; then
    printf 'ok    %-14s %4ss  %s\n' "$name" $((SECONDS - t0)) "$(summary "$name")"
  else
    printf 'FAIL  %-14s %4ss  rc=%s, last line: %s (log: %s)\n' "$name" $((SECONDS - t0)) "$?" \
      "$(tail -n 1 "$CHECK_DIR/$name.log")" "$CHECK_DIR/$name.log"
    failed=1
  fi
}

# summary NAME: what the run's metrics.json says, or the last line of its log
summary() {
  local metrics=$CHECK_DIR/$1/metrics.json
  if [ -f "$metrics" ]; then
    python3 -c "import json, sys; m = json.load(open(sys.argv[1])); q = m.get('quantization') or {}
print(f\"accuracy {m['accuracy']:.3f}, merged {m['merged_accuracy']:.3f}, world {m['world_size']}\"
      + (f\", {q['linear4bit_layers']} NF4 layers, base {q['base_weight_bytes'] / 2**20:.0f} MiB\" if q else ''))" "$metrics"
  else
    tail -n 1 "$CHECK_DIR/$1.log"
  fi
}

if [ "$DEVICE" = cuda ] && ! python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "FAIL  cuda           torch sees no CUDA device"
  exit 1
fi
LLAMA=(--train-samples 32 --eval-samples 32 --batch-size 8 --generations 1 --device "$DEVICE" --dtype "$DTYPE")
LLAVA=(--train-samples 32 --eval-samples 16 --batch-size 8 --device "$DEVICE" --dtype "$DTYPE")

check vit 120 python3 train_vit.py --rank 2 --shots-per-class 8 --epochs 1 --batch-size 20 --test-samples 256 \
  --merged-eval-samples 256 --device "$DEVICE" --out "$CHECK_DIR/vit"
check llama 120 python3 train_llama.py "${LLAMA[@]}" --out "$CHECK_DIR/llama"
check llama-nf4 120 python3 train_llama.py "${LLAMA[@]}" --quantize nf4 --save-merged --out "$CHECK_DIR/llama-nf4"
check llava 120 python3 train_llava.py "${LLAVA[@]}" --out "$CHECK_DIR/llava"
check llava-nf4 120 python3 train_llava.py "${LLAVA[@]}" --quantize nf4 --out "$CHECK_DIR/llava-nf4"
check torchrun 120 python3 -m torch.distributed.run --standalone --nproc_per_node 1 train_llama.py "${LLAMA[@]}" \
  --method lora --out "$CHECK_DIR/torchrun"
check bench-steps 240 python3 -m experiments.bench --models vit,llama --variants lora,structlora --pairs 10 \
  --skip memory,sharding,eval,inference,scaling --device "$DEVICE" --out "$CHECK_DIR/bench"
check bench-nf4 180 python3 -m experiments.bench --quantization --device "$DEVICE" --out "$CHECK_DIR/bench"
if [ -f "$CHECK_DIR/bench/bench.md" ]; then
  grep -E '^\| (vit|llama) \| structlora \|' "$CHECK_DIR/bench/bench.md" | sed 's/^/      step ratio /'
fi
if [ -f "$CHECK_DIR/bench/quantization.md" ]; then
  grep -E '^\| (fp32|bf16|nf4) \|' "$CHECK_DIR/bench/quantization.md" | sed 's/^/      memory /'
fi
echo "logs and runs in $CHECK_DIR"
exit $failed
