#!/usr/bin/env bash
# The GPU checks, as one prepared command for a lent GPU machine (the `device` tool's `run`), from the repository root,
# uninstalled (the machine has torch, triton, transformers and peft, no weights and no pip):
#
#     bash bench/perf/gpu_suite.sh [OUT_DIR]            # results into OUT_DIR, else $OUT (the device tool's return
#                                                       # folder), else runs/gpu-suite
#     bash bench/perf/gpu_suite.sh --dry-run OUT_DIR    # every step on the CPU with tiny shapes (CI runs this:
#                                                       # tests/test_gpu_suite.py), so the suite cannot rot
#
# In this order: 1. the kernel tests on CUDA (all dtypes); 2. the kernel micro-benchmark (fused vs unfused vs the base
# GEMM floor, each Qwen2.5-1.5B projection, r=8 and 16); 3. training throughput against transformers + peft (bf16,
# Qwen2.5-1.5B shapes, random weights); 4. one capacity cell (on a random-weight checkpoint of the default model's
# shapes, written before the checks); then 5. LoCoMo-shaped answering speed, 6. the full experiment projected
# from the measured rates, and 7. the host CPU's bf16 against fp32 (GEMMs, then the default model's training step
# fp32 / bf16 / peft bf16): the CPU path's bf16 goals need a CPU with avx512_bf16 or AMX, which the 2-core machines
# lack and a GPU host may have.
# Each step has its own time limit and the suite goes on after a failure; each results file is written when its step
# ends, so a suite cut short still returns what finished. suite.log has every step's output, suite.json each step's
# exit status and seconds. The Triton cache (compiled kernels and autotune choices) stays in $TRITON_CACHE_DIR
# (default ~/.triton/cache) across the steps: only the first step to launch a kernel compiles and tunes it.
#
# Budget: a lent machine has 15 minutes of device time in all, start included, and 10 minutes a command; the steps'
# limits add up to 600 s (SUITE_SCALE=0.5 halves them).
set -u
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
if [ $# -gt 1 ]; then echo "usage: bash bench/perf/gpu_suite.sh [--dry-run] [OUT_DIR]" >&2; exit 2; fi
OUT="${1:-${OUT:-runs/gpu-suite}}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lora-mem-gpu-suite.XXXXXX")"  # the random checkpoint: large, never returned
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/suite.log"
SCALE="${SUITE_SCALE:-1}"
export PYTHONUNBUFFERED=1
STEPS_JSON=""

# The dry run's options, appended to a step's own (for options given twice the last one counts): the CPU, tiny shapes,
# one repeat. The GPU options stay in the command lines below, which tests/test_gpu_suite.py parses.
declare -A DRY=(
    [kernel-tests]="--collect-only"
    [bench-kernels]="--device cpu --shapes kv --tokens 64 --ranks 8 --op-tokens 64 --warmup 0 --repeats 1"
    [train-throughput]="--setup cpu --model $WORK/smollm2-random --seq-len 32 --batch-sizes 2 --steps 1 --warmup 1
                        --no-interleave --floor-repeats 1 --profile-steps 1"
    [random-checkpoint]="--layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --head-dim 16 --vocab 512
                         --dtype float32"
    [capacity-cell]="--preset cpu --facts 4 --epochs 1 --min-steps 2 --batch-size 2 --seq-len 64
                     --answer-batch-size 4 --max-new-tokens 4 --device cpu"
    [decode-synthetic]="--model $WORK/smollm2-random --device cpu --synthetic-questions 4 --synthetic-prompt-tokens 8-12
                        --synthetic-new-tokens 4 --batch-size 2 --hf-bs1-questions 2"
    [project-locomo]=""
    [cpu-bf16-gemm]="--tokens 64 --repeats 1"
    [cpu-bf16-train]="--seq-len 32 --steps 1 --warmup 1 --floor-repeats 1"
)

step() {  # step <seconds> <name> <command...>: run with a time limit, log output and exit status, never abort
    local limit name rc start extra=()
    limit=$(python -c "print(max(30, int($1 * $SCALE)))"); name=$2; shift 2
    if [ "$DRY_RUN" = 1 ]; then read -r -a extra <<< "$(echo ${DRY[$name]})"; limit=300; fi
    start=$(date +%s)
    echo "=== $(date -u +%T) $name (limit ${limit}s): $* ${extra[*]}" | tee -a "$LOG"
    timeout "$limit" "$@" "${extra[@]}" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$LOG"
    STEPS_JSON="$STEPS_JSON{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))},"
    echo "{\"dry_run\": $([ "$DRY_RUN" = 1 ] && echo true || echo false), \"steps\": [${STEPS_JSON%,}]}" \
        > "$OUT/suite.json"
}

{
    echo "gpu suite at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)$([ "$DRY_RUN" = 1 ] && echo ', dry run on the CPU')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1

# 0. A random-weight checkpoint of the default model's shapes, with a small chat tokenizer, for the capacity cell
#    (nothing can be downloaded there); in the dry run tiny, for every step that loads a model.
step 30 random-checkpoint python -m bench.perf.random_checkpoint --preset smollm2-135m --out "$WORK/smollm2-random"
# 1. The kernel triplets on the real GPU: Triton against the PyTorch references, forward and backward, all dtypes.
step 130 kernel-tests python -m pytest -q -x -p no:cacheprovider --durations=10 tests/test_lora_kernels.py \
    tests/test_fused_kernels.py tests/test_multi_lora.py tests/test_model.py
# 2. The fused LoRA linear against PEFT's unfused path and the base GEMM alone (the floor), each projection of
#    Qwen2.5-1.5B, ranks 8 and 16, 8192 tokens; then RMSNorm, RoPE and SwiGLU against their references.
step 80 bench-kernels python -m bench.perf.kernels --shapes qo,kv,gate_up,down --ranks 8,16 --tokens 8192 \
    --op-tokens 8192 --out "$OUT/kernels_cuda.json"
# 3. Training throughput against transformers + peft, Qwen2.5-1.5B shapes, bf16, seq 2048, batch 1 and 8, with the
#    step's floor (bench.perf.step_floor) and a profile of each side.
step 125 train-throughput python -m bench.perf.train_throughput --setup gpu --batch-sizes 1,8 --sides lora-mem,peft \
    --profile --profile-steps 2 --out "$OUT/train_cuda.json"
# 4. One capacity cell (100 facts at r=8, the gpu preset's training) on the random-weight checkpoint of the default
#    model's shapes: its time and the path on CUDA; recall from random weights means nothing.
step 75 capacity-cell python -m bench.capacity --preset gpu --model "$WORK/smollm2-random" --ranks 8 --facts 100 \
    --no-base --quiet --out "$OUT/capacity-cell"
# 5. LoCoMo-shaped answering with an adapter, Qwen2.5-1.5B shapes (random weights, random prompt ids, every answer
#    32 tokens): questions/s against transformers+peft at batch 1 (32 questions) and at batch 64.
step 55 decode-synthetic python -m bench.perf.decode --model preset:qwen2.5-1.5b --workloads synthetic \
    --synthetic-questions 768 --batch-size 64 --hf-bs1-questions 32 --out "$OUT/decode_cuda_synthetic.json"
# 6. The full LoCoMo experiment (base + r=8) projected from the two measured rates (the goal: under 5 minutes).
step 30 project-locomo python -m bench.perf.project_locomo --train "$OUT/train_cuda.json" \
    --decode "$OUT/decode_cuda_synthetic.json" --out "$OUT/locomo_projection_cuda.json"
# 7. The host CPU (every core): its bf16 instructions, what the kernel policy chose, fp32 against bf16 torch.mm at the
#    default model's projection shapes; then the default model's shapes (random weights) training a LoRA in fp32, in
#    bf16 (base bf16, LoRA and AdamW fp32) and peft in bf16, in turns, each against its dtype's step floor.
step 30 cpu-bf16-gemm python -m bench.perf.cpu_bf16 --tokens 512,2048 --repeats 5 --out "$OUT/cpu_bf16_host.json"
step 45 cpu-bf16-train python -m bench.perf.train_throughput --setup cpu --model "$WORK/smollm2-random" \
    --sides lora-mem,lora-mem:bfloat16,peft:bfloat16 --batch-sizes 1 --steps 3 --warmup 1 --floor-repeats 1 \
    --out "$OUT/train_cpu_host_bf16.json"
echo "gpu suite done: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
