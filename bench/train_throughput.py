"""LoRA training throughput: lora-mem against transformers + peft, same config, in one run.

    python -m bench.train_throughput                 # CPU: default model, fp32, seq 512, batch 1, r=8
    python -m bench.train_throughput --setup gpu     # Qwen2.5-1.5B shapes, random init, bf16, seq 2048

Each side runs in a fresh subprocess, one after the other, so its peak memory (CUDA max allocated on
GPU, peak RSS on CPU) is its own. Same LoRA targets (q,k,v,o,gate,up,down), rank, alpha, dropout 0,
sequence length, batch, dtype, optimizer (AdamW) and token ids on both sides. Writes
bench/results/train_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import atomic_write_json, device_slug, run_info

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = {
    "cpu": dict(model="smollm2-135m-instruct", dtype="float32", seq_len=512, batch_sizes=[1], device="cpu"),
    "gpu": dict(model="preset:qwen2.5-1.5b", dtype="bfloat16", seq_len=2048, batch_sizes=[1, 4, 8], device="cuda"),
}


# ---------------------------------------------------------------------------------------------
# One side, in its own process
# ---------------------------------------------------------------------------------------------

def build_lora_mem(model_name: str, dtype: torch.dtype, device: torch.device, rank: int):
    from lora_core.inject import LoRAConfig, inject_lora, lora_parameters
    from lora_core.train import chunked_lm_loss
    from model.config import PRESETS
    from model.loader import load_model
    from model.qwen2 import Qwen2ForCausalLM

    if model_name.startswith("preset:"):
        with device:
            model = Qwen2ForCausalLM(PRESETS[model_name.split(":", 1)[1]]).to(dtype)
        model.init_weights()
        model.requires_grad_(False)
    else:
        model = load_model(model_name, device=device, dtype=dtype).model
    inject_lora(model, LoRAConfig(rank=rank, alpha=2 * rank, target_modules=TARGETS))
    model.train()
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)

    def step(x, y):
        hidden = model.model(x)
        loss = chunked_lm_loss(hidden, model.lm_head.weight, y)
        loss.backward()
        return loss

    return params, step


def build_peft(model_name: str, dtype: torch.dtype, device: torch.device, rank: int):
    import transformers
    from peft import LoraConfig, get_peft_model

    if model_name.startswith("preset:"):
        c = model_config(model_name)
        cfg = transformers.Qwen2Config(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings)
        with device:
            model = transformers.Qwen2ForCausalLM(cfg).to(dtype)
    else:
        from model.loader import resolve_checkpoint

        model = transformers.AutoModelForCausalLM.from_pretrained(
            resolve_checkpoint(model_name), dtype=dtype).to(device)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        loss = model(input_ids=x, labels=x).loss  # HF shifts labels inside
        loss.backward()
        return loss

    return params, step


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM rather than ru_maxrss, which Linux carries over
    execve from the parent that spawned us."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_config(model_name: str):
    from model.config import PRESETS, ModelConfig
    from model.loader import resolve_checkpoint

    if model_name.startswith("preset:"):
        return PRESETS[model_name.split(":", 1)[1]]
    return ModelConfig.from_file(resolve_checkpoint(model_name) / "config.json")


def measure_side(side: str, model_name: str, dtype_name: str, device_name: str, seq_len: int, batch: int,
                 rank: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    build = build_lora_mem if side == "lora-mem" else build_peft
    params, step = build(model_name, dtype, device, rank)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model_config(model_name).vocab_size
    x = torch.randint(0, vocab, (batch, seq_len), device=device)
    y = torch.cat([x[:, 1:], torch.full((batch, 1), -100, device=device)], dim=1)  # next-token targets

    def one():
        loss = step(x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        for _ in range(warmup):
            one()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(float(one()))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return {"side": side, "batch": batch, "seq_len": seq_len, "step_seconds_median": median,
            "steps_per_second": 1 / median, "tokens_per_second": batch * seq_len / median,
            "peak_memory_bytes": peak, "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
            "trainable_params": sum(p.numel() for p in params), "losses": losses}


def run_side_subprocess(argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.train_throughput", "--worker", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--setup", choices=sorted(SETUPS), default=None, help="cpu or gpu (default: gpu if CUDA is available)")
    ap.add_argument("--model", default=None, help="override the setup's model (packaged name, dir, or preset:NAME)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 1,8")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per side (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sides", default="lora-mem,peft")
    ap.add_argument("--out", default=None, help="results file (default bench/results/train_<device>.json)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # one side, one batch size: print one JSON line
        r = measure_side(args.side, args.model, args.dtype, args.device, args.seq_len, args.batch, args.rank,
                         args.steps, args.warmup)
        print(json.dumps(r))
        return r

    setup_name = args.setup or ("gpu" if torch.cuda.is_available() else "cpu")
    setup = dict(SETUPS[setup_name])
    model = args.model or setup["model"]
    seq_len = args.seq_len or setup["seq_len"]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else setup["batch_sizes"]
    device = torch.device(setup["device"])
    rows = []
    for batch in batch_sizes:
        row = {"batch": batch}
        for side in args.sides.split(","):
            print(f"[{side}] batch {batch} ...", file=sys.stderr, flush=True)
            row[side] = run_side_subprocess([
                "--side", side, "--model", model, "--dtype", setup["dtype"], "--device", setup["device"],
                "--seq-len", str(seq_len), "--batch", str(batch), "--rank", str(args.rank),
                "--steps", str(args.steps), "--warmup", str(args.warmup)])
        a, b = row.get("lora-mem", {}), row.get("peft", {})
        if "tokens_per_second" in a and "tokens_per_second" in b:
            row["speedup_tokens_per_second"] = a["tokens_per_second"] / b["tokens_per_second"]
            row["peak_memory_ratio"] = a["peak_memory_bytes"] / b["peak_memory_bytes"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), file=sys.stderr)

    info = run_info(device)
    info["loadavg_end"] = __import__("os").getloadavg()
    results = {"benchmark": "lora training throughput, lora-mem vs transformers+peft", "setup": setup_name,
               "model": model, "dtype": setup["dtype"], "seq_len": seq_len, "rank": args.rank,
               "alpha": 2 * args.rank, "targets": TARGETS, "optimizer": "AdamW(lr=1e-4)", "steps": args.steps,
               "warmup": args.warmup, **info, "rows": rows}
    out = Path(args.out or Path("bench/results") / f"train_{device_slug(device)}.json")
    atomic_write_json(out, results)
    print(f"{'batch':>5} {'lora-mem tok/s':>15} {'peft tok/s':>11} {'speed-up':>9} {'peak mem ratio':>15}")
    for r in rows:
        a, b = r.get("lora-mem", {}), r.get("peft", {})
        print(f"{r['batch']:>5} {a.get('tokens_per_second', float('nan')):>15.1f} "
              f"{b.get('tokens_per_second', float('nan')):>11.1f} {r.get('speedup_tokens_per_second', float('nan')):>8.2f}x "
              f"{r.get('peak_memory_ratio', float('nan')):>14.2f}x")
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
