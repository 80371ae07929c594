#!/usr/bin/env bash
# The GPU checks, as one prepared command for a lent GPU machine (the `device` tool's `run`), from the repo root:
#
#     bash bench/perf/gpu_suite.sh            # writes into $OUT (the device tool's return folder), else runs/gpu-suite
#
# No installing and no model download there: the kernel tests run the Triton kernels for real (no interpreter),
# and the benchmarks use randomly initialised Qwen2.5-1.5B shapes (speed does not depend on the values). Each step
# has its own time limit and the suite goes on after a failure; every step's output and exit status is in
# suite.log. Six files come back from $OUT: suite.log and the five results files below.
#
# Budget: a lent machine has 15 minutes of device time in all, start included; the steps' limits add up to
# 580 s (SUITE_SCALE=0.5 halves them), under the device tool's 10 minutes a command.
set -u
OUT="${OUT:-runs/gpu-suite}"
mkdir -p "$OUT"
LOG="$OUT/suite.log"
SCALE="${SUITE_SCALE:-1}"
export PYTHONUNBUFFERED=1

step() {  # step <seconds> <name> <command...>: run with a time limit, log output and exit status, never abort
    local limit name rc start
    limit=$(python -c "print(max(30, int($1 * $SCALE)))"); name=$2; shift 2
    start=$(date +%s)
    echo "=== $(date -u +%T) $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$LOG"
}

{
    echo "gpu suite at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1

# 1. The kernel triplets on the real GPU: Triton against the PyTorch references, forward and backward, all dtypes.
step 130 kernel-tests python -m pytest -q -x tests/test_lora_kernels.py tests/test_fused_kernels.py \
    tests/test_multi_lora.py tests/test_model.py
# 2. Kernel micro-benchmarks: fused LoRA linear (and RMSNorm, RoPE, SwiGLU) against the references.
step 80 bench-kernels python -m bench.perf.kernels --out "$OUT/kernels_cuda.json"
# 3. Training throughput against transformers + peft, Qwen2.5-1.5B shapes, bf16, seq 2048, batch 1/4/8, profiles,
#    and the step floor (bench.perf.step_floor) per batch size.
step 180 train-throughput python -m bench.perf.train_throughput --setup gpu --profile --out "$OUT/train_cuda.json"
# 4. LoCoMo-shaped answering with an adapter, Qwen2.5-1.5B shapes (random weights, random prompt ids, every answer
#    32 tokens): questions/s against transformers+peft at batch 1 (32 questions) and at batch 64.
step 100 decode-synthetic python -m bench.perf.decode --model preset:qwen2.5-1.5b --workloads synthetic \
    --synthetic-questions 768 --batch-size 64 --hf-bs1-questions 32 --out "$OUT/decode_cuda_synthetic.json"
# 5. The full LoCoMo experiment (base + r=8) projected from the two measured rates (the goal: under 5 minutes).
step 30 project-locomo python -m bench.perf.project_locomo --train "$OUT/train_cuda.json" \
    --decode "$OUT/decode_cuda_synthetic.json" --out "$OUT/locomo_projection_cuda.json"
# 6. The chat-QA workload (25% of positions trained), batch 1 and 8.
step 60 train-throughput-answers python -m bench.perf.train_throughput --setup gpu --targets answers --batch-sizes 1,8 \
    --out "$OUT/train_cuda_answers.json"
echo "gpu suite done: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
