"""LoRA training throughput: lora-mem against transformers + peft, same config, in one run.

    python -m bench.perf.train_throughput                 # CPU: default model, fp32, seq 512, batch 1, r=8
    python -m bench.perf.train_throughput --setup gpu     # Qwen2.5-1.5B shapes, random init, bf16, seq 2048
    python -m bench.perf.train_throughput --profile       # and where the time goes (torch.profiler)

Timing: on the cpu setup (`--interleave`, its default) every side is built in one worker process and timed in
turns, one step each per round (A B C, B C A, C A B, ...), with the step's floor measured once per round: the
2-core CPUs here change speed by tens of percent over minutes (in bench/results/train_cpu.json the floor, the
same products every round, took from 5.8 to 12.5 s), more than the differences being measured, so sides timed
one after the other compare moments of the machine. A speed-up is then the median over rounds of the paired step ratio. Each side also
runs alone in a fresh subprocess, so its peak memory (CUDA max allocated on GPU, peak RSS on CPU) and its
profile are its own (`step_seconds_alone` records that run's step). The gpu setup times each side alone, one
after the other (`--no-interleave`). Same LoRA targets (q,k,v,o,gate,up,down), rank, alpha, dropout 0,
sequence length, batch, dtype, optimizer (AdamW: lora-mem's own, `lora_mem.lora_core.train.adamw`, fused over a
16-bit model; torch's default for peft) and token ids on both sides (their own seeded generator:
`input_ids`); each side's `first_loss`, before any update, is the base model's loss, and a row's
`first_loss_difference` shows both sides computed the same thing. Writes
bench/results/train_<device>.json. Two more sides are lora-mem before a piece of its speed work:
`lora-mem-full-logits` before its chunked loss (every position's fp32 logits materialised, then cross-entropy),
`lora-mem-sdpa` before its CPU block-causal attention (PyTorch's SDPA kernel, a policy with `cpu_attention="sdpa"`),
`lora-mem-unshared` before it computed a prefix shared by a micro-batch's rows once (`--targets facts`).

Dtypes: a side may name its own dtype, `SIDE:DTYPE` (`--sides lora-mem,lora-mem:bfloat16,peft:bfloat16`): the model's
weights and activations in that dtype, the LoRA weights, their gradients and AdamW's state in fp32 on both engines
(lora-mem's LoRA layers keep fp32 weights; peft keeps its adapters in fp32 by default), the same token ids. The
floor is then measured in each dtype the sides use, each side is set against its own dtype's floor, and a row gets
`dtype_speedups` (a side against the same side in the run's dtype, paired by round). `--dtype` sets the run's
dtype (default: the setup's).

Workloads (`--targets`): `all`, plain text, every next token trained (the LoCoMo experiment's text recipe); `answers`, chat-QA
windows, the last 16 of every 64 positions trained; `facts`, the capacity benchmark's one-fact chat windows
(bench.capacity): 48 tokens whose first 24 are the same in every row (the system turn and the user header),
the last 6 positions trained, at the capacity presets' batch sizes (2 and 8 on cpu, 32 on gpu). There
lora-mem computes the shared 24 tokens once per micro-batch (lora_mem.lora_core.train.hidden_states) and transformers +
peft computes every row's; the floor is not measured (it counts every row's positions).

The floor (`bench.perf.step_floor`): every product the step must compute (base GEMMs forward and input-gradient,
the LM head at the trained positions, the LoRA thin products, causal attention forward + backward), each
timed alone with the same torch kernels in its own subprocess before the sides, summed. Each side's
`step_over_floor` says how far above it the side runs; a row's `speedup_ceiling_vs_peft` (peft's step /
the floor) is the largest speed-up over peft any engine calling these kernels could reach.

`--profile`: after its timed steps (and after its peak memory is read), each side runs
`--profile-steps` more training steps under torch.profiler (CPU activity; CUDA too on a GPU), and
the results file gets a `profile` section per side and batch size: the top ops by self CPU (and
CUDA) time with their share of the total, and the total split into groups (`profile_ops`,
`classify_op`): GEMMs (matmul/linear, fused LoRA kernels), attention (SDPA), elementwise (norms,
RoPE, SiLU, adds, casts and copies), optimizer (everything under `Optimizer.step`/`zero_grad`),
loss (cross-entropy; lora-mem's chunked loss except its GEMMs) and other (embedding, views,
autograd bookkeeping, Python time between ops). The profiled steps are not the timed ones: the
profiler's own overhead is in them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.capacity import PRESETS as CAPACITY_PRESETS
from bench.common import REPO_ROOT, atomic_write_json, device_slug, hf_config, run_info
from bench.perf.step_floor import compare_to_floor, measure_floor
from bench.perf.timing import (  # noqa: F401
    DTYPE_NAMES,
    PROFILE_GROUPS,
    classify_op,
    format_profile,
    model_config,
    peak_rss_bytes,
    profile_ops,
    sync,
)
from bench.perf.timing import SETUPS as MACHINE_SETUPS
from lora_mem.cli import Parser, int_at_least, non_negative_int, positive_int, positive_int_list
from lora_mem.lora_core.inject import LoRAConfig
from lora_mem.lora_core.train import TrainConfig, adamw

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("lora-mem", "lora-mem-sdpa", "lora-mem-full-logits", "lora-mem-unshared", "peft")
# Which positions are trained: "all" (plain text, the experiment's recipe) or "answers" (chat-QA windows, the `qa`
# formats: in every block of ANSWER_BLOCK positions the last ANSWER_SPAN are targets, 25%, as in the LoCoMo qa1
# windows of the default model, where 24.8% of the tokens are answer tokens).
TARGETS_KINDS = ("all", "answers", "facts")
ANSWER_BLOCK, ANSWER_SPAN = 64, 16
# "facts": the capacity benchmark's one-fact chat windows of the default model, in micro-batches of 2 (its cpu
# preset): the rows share a 24-token prefix (system turn + user header; median, 24..27), are 48 tokens long after
# the unlabelled tail is trimmed (median) and train 5.8 answer tokens each (mean). tests/test_bench_train_throughput
# checks these against the real windows.
FACT_PREFIX, FACT_WINDOW, FACT_ANSWER = 24, 48, 6
# The capacity presets' batch sizes (and 8 on cpu: the trend).
FACTS_BATCH_SIZES = {"cpu": [CAPACITY_PRESETS["cpu"]["batch_size"], 8], "gpu": [CAPACITY_PRESETS["gpu"]["batch_size"]]}
FACTS_SIDES = ["lora-mem", "lora-mem-unshared", "peft"]
SETUPS = {
    # interleave: time the sides in turns in one process (a shared CPU's speed drifts by tens of percent over
    # minutes); a GPU is steady, and several 1.5B models with their activations would not fit one at a time.
    # sides: lora-mem-sdpa only where the block-causal attention runs (CPU); on a GPU it would be lora-mem again.
    # lora-mem-unshared only with --targets facts: elsewhere no prefix is shared and it is lora-mem again.
    "cpu": dict(MACHINE_SETUPS["cpu"], interleave=True, sides=[s for s in SIDES if s != "lora-mem-unshared"]),
    "gpu": dict(MACHINE_SETUPS["gpu"], interleave=False, sides=["lora-mem", "lora-mem-full-logits", "peft"]),
}


# ---------------------------------------------------------------------------------------------
# One side, in its own process
# ---------------------------------------------------------------------------------------------

def build_lora_mem(model_name: str, dtype: torch.dtype, device: torch.device, rank: int, full_logits: bool = False,
                   attention: str | None = None, share_prefix: bool = True):
    """lora-mem's training step, the forward of train_lora (lora_mem.lora_core.train.hidden_states); `full_logits`: the step
    before the chunked loss (all positions' fp32 logits materialised, then cross-entropy), kept as the "before" of
    the profile; `attention` = "sdpa": the step before the CPU block-causal attention (the model built with a
    KernelPolicy whose cpu_attention is "sdpa"), None: the engine's default; `share_prefix` False: the step
    before a prefix common to the rows was computed once."""
    from lora_mem.kernels.policy import KernelPolicy
    from lora_mem.lora_core.inject import inject_lora, lora_parameters
    from lora_mem.lora_core.train import chunked_lm_loss, hidden_states
    from lora_mem.model.config import PRESETS
    from lora_mem.model.loader import load_model
    from lora_mem.model.qwen2 import Qwen2ForCausalLM

    policy = KernelPolicy(cpu_attention=attention) if attention else KernelPolicy()
    if model_name.startswith("preset:"):
        with device:
            model = Qwen2ForCausalLM(PRESETS[model_name.split(":", 1)[1]], policy).to(dtype)
        model.init_weights()
        model.requires_grad_(False)
    else:
        model = load_model(model_name, device=device, dtype=dtype, policy=policy).model
    inject_lora(model, LoRAConfig(rank=rank, target_modules=TARGETS))
    model.train()
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)

    def step(x, y):
        hidden, _ = hidden_states(model, x, share_prefix)
        if full_logits:
            logits = model.lm_head(hidden).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        else:
            with torch.profiler.record_function("chunked_lm_loss"):  # a label for the profile; free otherwise
                loss = chunked_lm_loss(hidden, model.lm_head.weight, y)
        loss.backward()
        return loss

    return params, step


def build_peft(model_name: str, dtype: torch.dtype, device: torch.device, rank: int):
    import transformers
    from peft import LoraConfig, get_peft_model

    if model_name.startswith("preset:"):
        with device:
            model = transformers.AutoModelForCausalLM.from_config(hf_config(model_config(model_name))).to(dtype)
    else:
        from lora_mem.model.loader import resolve_checkpoint

        model = transformers.AutoModelForCausalLM.from_pretrained(
            resolve_checkpoint(model_name), dtype=dtype).to(device)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=LoRAConfig(rank=rank).alpha, lora_dropout=0.0,
                                             target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        # HF shifts labels inside: labels[t + 1] is the target of position t, which is y[t]
        labels = torch.cat([torch.full_like(y[:, :1], -100), y[:, :-1]], dim=1)
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        return loss

    return params, step


def next_token_targets(x: torch.Tensor, targets: str = "all") -> torch.Tensor:
    """(B, L) targets for input ids x: y[t] = x[t + 1], -100 at the end and, for "answers", outside the answer spans
    (the last ANSWER_SPAN positions of every ANSWER_BLOCK), for "facts", outside the last FACT_ANSWER positions
    that have a next token."""
    if targets not in TARGETS_KINDS:
        raise ValueError(f"unknown targets {targets!r} (choose from {', '.join(TARGETS_KINDS)})")
    y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
    position = torch.arange(x.shape[1], device=x.device)
    if targets == "answers":
        y = y.masked_fill(~(position % ANSWER_BLOCK >= ANSWER_BLOCK - ANSWER_SPAN), -100)
    elif targets == "facts":
        y = y.masked_fill(position < x.shape[1] - 1 - FACT_ANSWER, -100)
    return y


def input_ids(batch: int, seq_len: int, vocab: int, device: torch.device, targets: str = "all") -> torch.Tensor:
    """The token ids every side trains on: from their own seeded generator, so that building a side (which
    draws its LoRA init from torch's global generator, differently on each side) cannot change them. For "facts"
    the first FACT_PREFIX tokens are row 0's in every row (and row i's next token differs from row 0's), as the
    system turn and user header of one-fact chat windows are."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g)
    if targets == "facts":
        if not FACT_PREFIX < seq_len:
            raise ValueError(f"--targets facts needs --seq-len above its {FACT_PREFIX}-token shared prefix, "
                             f"got {seq_len}")
        x[:, :FACT_PREFIX] = x[0, :FACT_PREFIX]
        x[1:, FACT_PREFIX] = (x[0, FACT_PREFIX] + 1 + torch.arange(batch - 1)) % vocab
    return x.to(device)


def split_side(spec: str, dtype_name: str) -> tuple[str, str]:
    """A side as --sides names it, `SIDE` or `SIDE:DTYPE`, as (side, dtype name); the run's dtype when it names none."""
    side, _, dtype = spec.partition(":")
    return side, dtype or dtype_name


def prepare_side(side: str, model_name: str, dtype: torch.dtype, device: torch.device, rank: int, x, y):
    """(trainable params, one): one training step + AdamW update of `side` on ids x and targets y."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r} (choose from {', '.join(SIDES)})")
    if side == "peft":
        params, step = build_peft(model_name, dtype, device, rank)
    else:
        params, step = build_lora_mem(model_name, dtype, device, rank, full_logits=side == "lora-mem-full-logits",
                                      attention="sdpa" if side == "lora-mem-sdpa" else None,
                                      share_prefix=side != "lora-mem-unshared")
    # lora-mem's sides step as lora-mem trains (lora_mem.lora_core.train.adamw); peft's as torch's default AdamW
    optimizer = (torch.optim.AdamW(params, lr=TrainConfig().lr) if side == "peft"
                 else adamw(params, TrainConfig(), dtype))

    def one():
        loss = step(x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return params, one


def step_inputs(model_name: str, batch: int, seq_len: int, device: torch.device, targets: str):
    x = input_ids(batch, seq_len, model_config(model_name).vocab_size, device, targets)
    return x, next_token_targets(x, targets)  # the same ids and targets on every side


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def timed_step(one, device: torch.device, times: list[float], losses: list[float]) -> None:
    """Run one training step (synchronised); append its wall seconds and its loss."""
    sync(device)
    t0 = time.perf_counter()
    losses.append(float(one()))
    sync(device)
    times.append(time.perf_counter() - t0)


def side_record(side: str, batch: int, seq_len: int, targets: str, params, times: list[float], losses: list[float],
                first_loss: float | None) -> dict:
    """What a results row says of one side's timed steps (the median step; first_loss: before any update, else
    the first timed step's)."""
    median = statistics.median(times)
    return {"side": side, "batch": batch, "seq_len": seq_len, "trained_positions": targets,
            "step_seconds_median": median, "step_seconds_all": times, "steps_per_second": 1 / median,
            "tokens_per_second": batch * seq_len / median, "trainable_params": sum(p.numel() for p in params),
            "first_loss": losses[0] if first_loss is None else first_loss, "losses": losses}


def measure_side(side: str, model_name: str, dtype_name: str, device_name: str, seq_len: int, batch: int,
                 rank: int, steps: int, warmup: int, profile_steps: int = 0, targets: str = "all") -> dict:
    """One side alone in this process: its step times, its peak memory (what only a process of its own can say)
    and, with profile_steps, where its time goes."""
    torch.manual_seed(0)
    device = torch.device(device_name)
    x, y = step_inputs(model_name, batch, seq_len, device, targets)
    name, side_dtype = split_side(side, dtype_name)
    params, one = prepare_side(name, model_name, getattr(torch, side_dtype), device, rank, x, y)
    first_loss = None  # before any optimizer step (B = 0): the base model's loss, the same on every side
    with autocast_for(device):
        for _ in range(warmup):
            loss = float(one())
            first_loss = loss if first_loss is None else first_loss
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(steps):
            timed_step(one, device, times, losses)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
        profile = profile_ops(one, profile_steps, device, label="train_step") if profile_steps > 0 else None
    out = {**side_record(side, batch, seq_len, targets, params, times, losses, first_loss),
           "peak_memory_bytes": peak, "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss"}
    if profile is not None:
        out["profile"] = profile
    return out


def measure_interleaved(sides: list[str], model_name: str, dtype_name: str, device_name: str, seq_len: int,
                        batch: int, rank: int, steps: int, warmup: int, targets: str = "all",
                        floor_repeats: int = 0) -> dict:
    """Every side built in this one process and timed in turns, one step each per round (A B C, B C A, ...), so a
    change in a shared machine's speed hits every side alike; with floor_repeats, the step's floor
    (bench.perf.step_floor) is measured once per round too. A side's speed is its median step; a speed-up is the
    median over rounds of the two sides' step ratio in that round (paired). Sides named `SIDE:DTYPE` run in that
    dtype, and the floor is measured in every dtype the sides use."""
    torch.manual_seed(0)
    device = torch.device(device_name)
    x, y = step_inputs(model_name, batch, seq_len, device, targets)
    prepared = {side: prepare_side(split_side(side, dtype_name)[0], model_name,
                                   getattr(torch, split_side(side, dtype_name)[1]), device, rank, x, y)
                for side in sides}
    first_loss: dict[str, float] = {}
    times: dict[str, list[float]] = {side: [] for side in sides}
    losses: dict[str, list[float]] = {side: [] for side in sides}
    floor_dtypes = list(dict.fromkeys([dtype_name] + [split_side(side, dtype_name)[1] for side in sides]))
    floors: dict[str, list[dict]] = {d: [] for d in floor_dtypes}
    with autocast_for(device):
        for _ in range(warmup):
            for side, (_, one) in prepared.items():
                first_loss.setdefault(side, float(one()))
        for round_index in range(steps):
            # Each round starts one side later (A B C, B C A, C A B, ...): whatever the first step of a round
            # pays (the floor's allocations just freed, caches cold) falls on every side alike.
            first = round_index % len(sides)
            for side in sides[first:] + sides[:first]:
                timed_step(prepared[side][1], device, times[side], losses[side])
            if floor_repeats:
                trained = int((y != -100).sum())
                for d in floor_dtypes:
                    floors[d].append(measure_floor(model_config(model_name), batch, seq_len, rank, getattr(torch, d),
                                                   device, trained_positions=trained, repeats=floor_repeats))
    out = {"method": "interleaved: all sides in one process, one step each per round, in turns",
           "rounds": steps, "sides": {}}
    for side in sides:
        out["sides"][side] = side_record(side, batch, seq_len, targets, prepared[side][0], times[side], losses[side],
                                         first_loss.get(side))
    by_dtype = {}
    for d, measured in floors.items():
        if measured:
            by_time = sorted(measured, key=lambda f: f["floor_seconds"])
            by_dtype[d] = {**by_time[len(by_time) // 2], "floor_seconds_all": [f["floor_seconds"] for f in measured],
                           "rounds": len(measured)}
    if dtype_name in by_dtype:
        out["floor"] = by_dtype[dtype_name]
    if len(by_dtype) > 1:
        out["floors_by_dtype"] = by_dtype
    return out


def paired_ratios(a: dict, b: dict) -> list[float]:
    """b's step / a's step in each round (how much faster a is than b), in round order."""
    return [tb / ta for ta, tb in zip(a["step_seconds_all"], b["step_seconds_all"])]


def paired_speedup(a: dict, b: dict) -> float:
    """Median over rounds of b's step / a's step in the same round."""
    return statistics.median(paired_ratios(a, b))


def run_side_subprocess(argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.perf.train_throughput", "--worker", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_list(text: str) -> str:
    """A comma-separated list of sides out of SIDES, each `SIDE` or `SIDE:DTYPE` (kept as the string the worker
    processes are given)."""
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sides if s.partition(":")[0] not in SIDES
               or (s.partition(":")[2] and s.partition(":")[2] not in DTYPE_NAMES)]
    if unknown or not sides:
        raise argparse.ArgumentTypeError(f"unknown --sides {', '.join(unknown) or repr(text)} (choose from "
                                         f"{', '.join(SIDES)}, each optionally :{'|'.join(DTYPE_NAMES)})")
    return ",".join(sides)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m bench.perf.train_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", choices=sorted(SETUPS), default=None, help="cpu or gpu (default: gpu if CUDA is available)")
    ap.add_argument("--model", default=None, help="override the setup's model (packaged name, dir, or preset:NAME)")
    ap.add_argument("--seq-len", type=int_at_least(2), default=None, help="tokens per window (default: the setup's)")
    ap.add_argument("--batch-sizes", type=positive_int_list, default=None, help="comma-separated, e.g. 1,8")
    ap.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    ap.add_argument("--steps", type=positive_int, default=5, help="timed optimizer steps per side (median reported)")
    ap.add_argument("--warmup", type=non_negative_int, default=2, help="untimed optimizer steps per side first")
    ap.add_argument("--sides", type=side_list, default=None,
                    help="lora-mem; lora-mem-sdpa (lora-mem with PyTorch's SDPA instead of its CPU block-causal "
                         "attention); lora-mem-full-logits (lora-mem before the chunked loss: the profile's "
                         "'before'); lora-mem-unshared (lora-mem computing every row's copy of a shared prefix); "
                         "peft (transformers + peft); each may name its dtype, e.g. lora-mem:bfloat16. Default: all "
                         "but lora-mem-unshared on cpu, no lora-mem-sdpa on gpu; with --targets facts lora-mem, "
                         "lora-mem-unshared and peft")
    ap.add_argument("--profile", action="store_true",
                    help="also run --profile-steps steps of each side under torch.profiler; the results file gets "
                         "a 'profile' section (top ops and grouped shares of self CPU / CUDA time)")
    ap.add_argument("--profile-steps", type=positive_int, default=3, help="profiled steps per side (with --profile)")
    ap.add_argument("--targets", choices=TARGETS_KINDS, default="all",
                    help="trained positions: all (plain text), answers (chat-QA windows: the last 16 of every 64 "
                         "positions, 25%%, as in the qa format's windows; every position is still computed forward) "
                         f"or facts (the capacity benchmark's one-fact chat windows: {FACT_WINDOW} tokens, the first "
                         f"{FACT_PREFIX} shared by every row, the last {FACT_ANSWER} trained; batch 2,8 on cpu, 32 "
                         "on gpu; no floor)")
    ap.add_argument("--out", default=None,
                    help="results file (default bench/results/train_<device>.json, train_<device>_<targets>.json "
                         "with --targets answers or facts)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the step's floor (bench.perf.step_floor: each required product timed alone)")
    ap.add_argument("--floor-repeats", type=positive_int, default=None,
                    help="timed repeats of each product of the floor (default 5; 1 when interleaved, where the floor "
                         "is measured once per round and the median round taken)")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="time all sides in one process in turns, a step each per round (the cpu setup's default), "
                         "and the floor once per round; each side still runs alone too, for its peak memory and "
                         "profile"),
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=positive_int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                    help="the run's dtype (default: the setup's: float32 on cpu, bfloat16 on gpu)")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict | None:
    ap = build_parser()
    args = ap.parse_args(argv)

    if args.worker and args.side == "floor":  # the step's floor (bench.perf.step_floor), one batch size
        x = torch.zeros(args.batch, args.seq_len, dtype=torch.long)
        trained = int((next_token_targets(x, args.targets) != -100).sum())
        r = measure_floor(model_config(args.model), args.batch, args.seq_len, args.rank, getattr(torch, args.dtype),
                          torch.device(args.device), trained_positions=trained, repeats=args.floor_repeats)
        print(json.dumps(r))
        return r
    if args.worker and args.side == "interleaved":  # every side in this process, in turns
        r = measure_interleaved(args.sides.split(","), args.model, args.dtype, args.device, args.seq_len, args.batch,
                                args.rank, args.steps, args.warmup, args.targets,
                                floor_repeats=0 if args.no_floor else args.floor_repeats)
        print(json.dumps(r))
        return r
    if args.worker:  # one side, one batch size: print one JSON line
        r = measure_side(args.side, args.model, args.dtype, args.device, args.seq_len, args.batch, args.rank,
                         args.steps, args.warmup, args.profile_steps if args.profile else 0, args.targets)
        print(json.dumps(r))
        return r

    setup_name = args.setup or ("gpu" if torch.cuda.is_available() else "cpu")
    if SETUPS[setup_name]["device"] == "cuda" and not torch.cuda.is_available():
        ap.error(f"--setup {setup_name}: no CUDA device on this machine")
    setup = dict(SETUPS[setup_name])
    if args.targets == "facts":  # the capacity benchmark's windows and batches; its floor would count every row
        setup.update(seq_len=FACT_WINDOW, batch_sizes=FACTS_BATCH_SIZES[setup_name], sides=FACTS_SIDES)
        args.no_floor = True
    model = args.model or setup["model"]
    seq_len = args.seq_len or setup["seq_len"]
    batch_sizes = args.batch_sizes or setup["batch_sizes"]
    device = torch.device(setup["device"])
    args.sides = args.sides or ",".join(setup["sides"])
    interleave = setup["interleave"] if args.interleave is None else args.interleave
    floor_repeats = args.floor_repeats if args.floor_repeats is not None else (1 if interleave else 5)
    sides = args.sides.split(",")
    dtype_name = args.dtype or setup["dtype"]
    floor_dtypes = list(dict.fromkeys([dtype_name] + [split_side(side, dtype_name)[1] for side in sides]))
    info = run_info(device)  # before the runs: its load average is the one they started under
    common = ["--model", model, "--dtype", dtype_name, "--device", setup["device"], "--seq-len", str(seq_len),
              "--rank", str(args.rank), "--targets", args.targets]
    rows, profiles = [], []
    for batch in batch_sizes:
        row = {"batch": batch}
        timing = {}
        if interleave:
            print(f"[interleaved: {', '.join(sides)}{' + floor' if not args.no_floor else ''}] batch {batch} ...",
                  file=sys.stderr, flush=True)
            timing = run_side_subprocess([
                "--side", "interleaved", "--sides", ",".join(sides), *common, "--batch", str(batch),
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--floor-repeats", str(floor_repeats),
                *(["--no-floor"] if args.no_floor else [])])
            row["timing"] = {k: v for k, v in timing.items() if k not in ("sides", "floor", "floors_by_dtype")}
            if "floor" in timing:
                row["floor"] = timing["floor"]
            if "floors_by_dtype" in timing:
                row["floors_by_dtype"] = timing["floors_by_dtype"]
        elif not args.no_floor:
            print(f"[floor] batch {batch} ...", file=sys.stderr, flush=True)
            by_dtype = {d: run_side_subprocess(["--side", "floor", *common, "--dtype", d, "--batch", str(batch),
                                                "--floor-repeats", str(floor_repeats)]) for d in floor_dtypes}
            row["floor"] = by_dtype[dtype_name]
            if len(by_dtype) > 1:
                row["floors_by_dtype"] = by_dtype
        for side in sides:
            print(f"[{side}] batch {batch} ...", file=sys.stderr, flush=True)
            # Interleaved, a side's own process is for its peak memory and profile: two steps reach the peak.
            steps, warmup = (1, 1) if interleave else (args.steps, args.warmup)
            alone = run_side_subprocess([
                "--side", side, *common, "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
                *(["--profile", "--profile-steps", str(args.profile_steps)] if args.profile else [])])
            if "profile" in alone:
                profiles.append({"side": side, "batch": batch, **alone.pop("profile")})
                print(f"[{side}] batch {batch} profile:\n{format_profile(profiles[-1])}", file=sys.stderr, flush=True)
            if interleave and "sides" in timing and "error" not in alone:
                row[side] = {**timing["sides"][side], "peak_memory_bytes": alone["peak_memory_bytes"],
                             "peak_memory_kind": alone["peak_memory_kind"],
                             "step_seconds_alone": alone["step_seconds_median"]}
            elif interleave and "error" in timing:
                row[side] = {"error": timing["error"]}
            else:
                row[side] = alone
        a, b = row.get("lora-mem", {}), row.get("peft", {})
        if "tokens_per_second" in a and "tokens_per_second" in b:
            row["speedup_tokens_per_second"] = (paired_speedup(a, b) if interleave else
                                                a["tokens_per_second"] / b["tokens_per_second"])
            if interleave:  # the spread says how far to trust the median on this machine
                row["speedup_rounds"] = paired_ratios(a, b)
                row["speedup_ratio_of_medians"] = a["tokens_per_second"] / b["tokens_per_second"]
            # Same ids, targets and (B = 0) function before the first update: the two first losses agree.
            row["first_loss_difference"] = a["first_loss"] - b["first_loss"]
            row["peak_memory_ratio"] = a["peak_memory_bytes"] / b["peak_memory_bytes"]
        floor = row.get("floor", {})
        floors = row.get("floors_by_dtype", {dtype_name: floor})
        for side in sides:  # each side against the floor of its own dtype
            side_floor = floors.get(split_side(side, dtype_name)[1], {})
            if "step_seconds_median" in row[side] and "floor_seconds" in side_floor:
                row[side].update(compare_to_floor(row[side]["step_seconds_median"], side_floor))
        dtype_speedups = {}  # a side in another dtype against the same side in the run's dtype
        for side in sides:
            name, side_dtype = split_side(side, dtype_name)
            if side_dtype != dtype_name and "tokens_per_second" in row[side] and \
                    "tokens_per_second" in row.get(name, {}):
                dtype_speedups[side] = (paired_speedup(row[side], row[name]) if interleave else
                                        row[side]["tokens_per_second"] / row[name]["tokens_per_second"])
        if dtype_speedups:
            row["dtype_speedups"] = dtype_speedups
        if "floor_seconds" in floor:
            if "step_seconds_median" in b:  # no engine on these kernels beats peft by more than this
                row["speedup_ceiling_vs_peft"] = b["step_seconds_median"] / floor["floor_seconds"]
        for before_side, name in (("lora-mem-full-logits", "full_logits"), ("lora-mem-sdpa", "sdpa"),
                                  ("lora-mem-unshared", "unshared")):
            before = row.get(before_side, {})  # what the chunked loss / block attention / shared prefix bought
            if "tokens_per_second" in a and "tokens_per_second" in before:
                row[f"speedup_vs_{name}"] = (paired_speedup(a, before) if interleave else
                                             a["tokens_per_second"] / before["tokens_per_second"])
                if interleave:
                    row[f"speedup_vs_{name}_rounds"] = paired_ratios(a, before)
                row[f"peak_memory_ratio_vs_{name}"] = a["peak_memory_bytes"] / before["peak_memory_bytes"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), file=sys.stderr)

    info["loadavg_end"] = os.getloadavg()
    results = {"benchmark": "lora training throughput, lora-mem vs transformers+peft", "setup": setup_name,
               "model": model, "dtype": dtype_name, "seq_len": seq_len, "rank": args.rank,
               "alpha": LoRAConfig(rank=args.rank).alpha, "targets": TARGETS, "trained_positions": args.targets,
               "trained_positions_note": "all: every next token (plain text); answers: the last "
                                         f"{ANSWER_SPAN} of every {ANSWER_BLOCK} positions (chat-QA windows); facts: "
                                         f"the last {FACT_ANSWER} positions of {FACT_WINDOW}-token rows whose first "
                                         f"{FACT_PREFIX} tokens are the same (one-fact chat windows); same token ids "
                                         "and targets on every side",
               "optimizer": f"AdamW(lr={TrainConfig().lr:g})", "steps": args.steps,
               "timing": "interleaved" if interleave else "each side alone, one after the other",
               "warmup": args.warmup, **info, "rows": rows}
    if args.profile:
        results["profile"] = {
            "method": "torch.profiler (CPU activity; CUDA too on a GPU) over --profile-steps extra training steps "
                      "of each side, after its timed steps and its peak-memory reading; self time per op summed by "
                      "name and by group (bench.perf.train_throughput.classify_op); profiler overhead included",
            "steps": args.profile_steps, "runs": profiles}
    suffix = f"_{args.targets}" if args.targets != "all" else ""
    other_dtypes = [d for d in floor_dtypes if d != SETUPS[setup_name]["dtype"]]
    suffix += "".join(f"_{d}" for d in other_dtypes)  # a run in other dtypes keeps the setup's results file
    out = Path(args.out or Path("bench/results") / f"train_{device_slug(device)}{suffix}.json")
    atomic_write_json(out, results)
    nan = float("nan")
    print(f"{'batch':>5} {'lora-mem tok/s':>15} {'peft tok/s':>11} {'speed-up':>9} {'peak mem ratio':>15} "
          f"{'floor s':>8} {'lora-mem/floor':>15} {'peft/floor':>11}")
    for r in rows:
        a, b = r.get("lora-mem", {}), r.get("peft", {})
        print(f"{r['batch']:>5} {a.get('tokens_per_second', nan):>15.1f} "
              f"{b.get('tokens_per_second', nan):>11.1f} {r.get('speedup_tokens_per_second', nan):>8.2f}x "
              f"{r.get('peak_memory_ratio', nan):>14.2f}x {r.get('floor', {}).get('floor_seconds', nan):>8.3f} "
              f"{a.get('step_over_floor', nan):>14.2f}x {b.get('step_over_floor', nan):>10.2f}x")
    for r in rows:
        for side, speedup in r.get("dtype_speedups", {}).items():
            print(f"batch {r['batch']}: {side} {r[side]['tokens_per_second']:.1f} tok/s, {speedup:.3f}x "
                  f"{split_side(side, dtype_name)[0]} in {dtype_name}"
                  + (f", {r[side]['step_over_floor']:.2f}x its dtype's floor" if "step_over_floor" in r[side] else ""))
    for p in profiles:
        print(f"profile {p['side']} batch {p['batch']} ({p['steps']} steps, self time by group):\n{format_profile(p)}")
    print(f"results: {out}")
    failed = [f"batch {r['batch']} {side}: {r[side]['error']}" for r in rows for side in sides
              if isinstance(r.get(side), dict) and "error" in r[side]]
    if failed:  # the results file is written; the exit status says it is incomplete
        print("failed sides:\n  " + "\n  ".join(failed), file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
