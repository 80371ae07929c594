"""The floor under a LoRA training step: the products it must compute, each timed alone on this device.

Whatever engine runs it, one training step of a frozen decoder with LoRA adapters on its linear layers has
to compute, for M = batch x sequence tokens:

  base GEMMs   every adapted linear layer forward, x W^T (M x in x out), and its input gradient dY W (M x out
               x in) in backward, except where the input needs no gradient: q/k/v of layer 0 read the normed
               embeddings, which are frozen (autograd skips that product on both sides);
  LM head      hidden W_head^T and its input gradient, at the trained positions only (lora-mem's chunked loss
               skips the others; a full-logits loss computes them all, which is extra work, not floor);
  attention    causal attention forward and backward (query, key and value gradients), once per layer;
  LoRA         the thin products: x A^T and t B^T forward; dY B, dY^T t (dB), dt^T x (dA), dt A backward
               (the last one not in layer 0's q/k/v).

`measure_floor` times each distinct product with the device's own torch kernels (torch.mm; for attention the
fastest of SDPA with GQA given to the kernel, SDPA with the key/value heads repeated, and lora-mem's
block-causal GEMMs, lora_mem.kernels.block_causal_attention, which on CPU beat SDPA), alone, on random data, and
sums count x median time. Not counted: norms, RoPE, SiLU, residual adds, the loss's softmax, the optimizer:
the floor is below any real step. It is not a hard lower bound for every possible engine (a faster GEMM
library, or a kernel fusing several of these products, could go under it), but it is one for any engine that
calls these kernels, as lora-mem and transformers + peft both do. A step's time over the floor is what
engineering can still win; a speed-up over another engine larger than that engine's step / floor is out of
reach with these kernels.

    python -m bench.perf.step_floor                      # the CPU setup of bench.perf.train_throughput
    python -m bench.perf.step_floor --setup gpu          # Qwen2.5-1.5B shapes, bf16, seq 2048
    python -m bench.perf.step_floor --dtype bfloat16     # the CPU setup's floor in bf16

`bench.perf.train_throughput` measures the floor in the same run as the steps and reports each side against it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.perf.timing import DTYPE_NAMES, SETUPS, median_seconds, model_config
from lora_mem.kernels.block_causal_attention import block_causal_attention
from lora_mem.model.config import ModelConfig

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The linears whose input is the layer's normed input: in layer 0 that is the frozen embedding, so no gradient.
READS_LAYER_INPUT = ("q_proj", "k_proj", "v_proj")


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    return {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C),
            "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}


@dataclass(frozen=True)
class Product:
    """One kind of product of a training step, done `count` times: a GEMM (m x k) @ (k x n), or attention."""

    group: str  # base_gemm, lm_head, lora, attention
    what: str  # e.g. "q_proj forward", "lm_head input grad"
    shape: tuple[int, ...]  # (m, k, n) for GEMMs; (batch, heads, kv_heads, seq, head_dim) for attention
    count: int
    # Memory layout of the GEMM's operands, as the step holds them ("n": row-major as written, "t": the
    # transpose of a row-major tensor): x W^T reads W (out, in) transposed ("nt"), dY W reads it as stored
    # ("nn"), dB = dY^T t reads dY transposed ("tn"). GEMM libraries run the layouts at different speeds.
    layout: str = "nn"

    @property
    def flops(self) -> float:
        """Multiply-adds x 2 of one product. Causal attention: half the full score matrix, forward (QK^T, PV)
        plus backward (dP, dV, dQ, dK: twice the forward); flash kernels' recomputation is not counted."""
        if self.group == "attention":
            B, H, _, T, D = self.shape
            forward = 2 * 2 * B * H * T * T * D / 2
            return 3 * forward
        m, k, n = self.shape
        return 2.0 * m * k * n


def step_products(cfg: ModelConfig, batch: int, seq_len: int, rank: int, trained_positions: int | None = None,
                  targets: tuple[str, ...] = LINEARS) -> list[Product]:
    """The products one LoRA training step must compute (see the module docstring). `trained_positions`: tokens
    with a target over the whole batch (default all but the last of each sequence)."""
    unknown = [t for t in targets if t not in LINEARS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown} (choose from {', '.join(LINEARS)})")
    M, L, r = batch * seq_len, cfg.num_hidden_layers, rank
    n_trained = batch * (seq_len - 1) if trained_positions is None else trained_positions
    shapes = linear_shapes(cfg)
    products: list[Product] = []
    for name, (k_in, n_out) in shapes.items():
        adapted = name in targets
        # Layer 0's q/k/v input is frozen, so no input gradient there; elsewhere the gradient flows through every
        # layer (each layer above holds trainable adapters).
        grad_layers = L - 1 if name in READS_LAYER_INPUT else L
        products.append(Product("base_gemm", f"{name} forward", (M, k_in, n_out), L, "nt"))
        products.append(Product("base_gemm", f"{name} input grad", (M, n_out, k_in), grad_layers, "nn"))
        if adapted:
            products += [
                Product("lora", f"{name} x A^T", (M, k_in, r), L, "nt"),
                Product("lora", f"{name} t B^T", (M, r, n_out), L, "nt"),
                Product("lora", f"{name} dY B", (M, n_out, r), L, "nn"),
                Product("lora", f"{name} dB = dY^T t", (n_out, M, r), L, "tn"),
                Product("lora", f"{name} dA = dt^T x", (r, M, k_in), L, "tn"),
                Product("lora", f"{name} dt A", (M, r, k_in), grad_layers, "nn"),
            ]
    if n_trained > 0:
        C, V = cfg.hidden_size, cfg.vocab_size
        products.append(Product("lm_head", "lm_head forward", (n_trained, C, V), 1, "nt"))
        products.append(Product("lm_head", "lm_head input grad", (n_trained, V, C), 1, "nn"))
    products.append(Product("attention", "causal attention forward + backward",
                            (batch, cfg.num_attention_heads, cfg.num_key_value_heads, seq_len, cfg.head_dim), L))
    return [p for p in products if p.count > 0]


def gemm_operands(shape: tuple[int, int, int], layout: str, dtype: torch.dtype, device: torch.device):
    """Random (m, k) and (k, n) operands in `layout` ("nn", "nt", "tn": see Product.layout)."""
    m, k, n = shape
    a = torch.randn(m, k, dtype=dtype, device=device) if layout[0] == "n" else \
        torch.randn(k, m, dtype=dtype, device=device).t()
    b = torch.randn(k, n, dtype=dtype, device=device) if layout[1] == "n" else \
        torch.randn(n, k, dtype=dtype, device=device).t()
    return a, b


def gemm_layout(a: torch.Tensor, b: torch.Tensor) -> str:
    """The layout of two 2-D operands: "n" row-major, "t" the transpose of a row-major tensor."""
    def one(t):
        return "n" if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else "t"
    return one(a) + one(b)


def time_gemm(shape: tuple[int, int, int], layout: str, dtype: torch.dtype, device: torch.device,
              repeats: int) -> float:
    a, b = gemm_operands(shape, layout, dtype, device)
    return median_seconds(lambda: torch.mm(a, b), device, repeats)


def time_attention(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, repeats: int) -> tuple[float, str]:
    """Causal attention forward + backward; the fastest of SDPA with GQA inside the kernel, SDPA with repeated
    key/value heads and, on CPU, lora-mem's block-causal GEMMs (lora_mem.kernels.block_causal_attention)."""
    B, H, Hkv, T, D = shape
    q = torch.randn(B, H, T, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(B, H, T, D, dtype=dtype, device=device)

    def gqa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv).backward(grad)

    def repeated():
        g = H // Hkv
        F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                       is_causal=True).backward(grad)

    def blocks():  # lora-mem's CPU training path (lora_mem.kernels.block_causal_attention)
        block_causal_attention(q, k, v).backward(grad)

    variants = {"enable_gqa": gqa} if H == Hkv else {"enable_gqa": gqa, "repeat_kv": repeated}
    if device.type == "cpu":  # where the model runs it; on CUDA training stays on SDPA's flash kernels
        variants["block_causal"] = blocks
    timed = {name: median_seconds(fn, device, repeats) for name, fn in variants.items()}
    best = min(timed, key=timed.get)
    return timed[best], best


def measure_floor(cfg: ModelConfig, batch: int, seq_len: int, rank: int, dtype: torch.dtype, device: torch.device,
                  trained_positions: int | None = None, repeats: int = 5) -> dict:
    """Time every distinct product of `step_products` alone; the floor is sum(count x median seconds)."""
    products = step_products(cfg, batch, seq_len, rank, trained_positions)
    seconds_by_shape: dict[tuple, float] = {}
    attention_variant = None
    rows = []
    for p in products:
        key = (p.group == "attention", p.shape, p.layout)
        if key not in seconds_by_shape:
            if p.group == "attention":
                seconds_by_shape[key], attention_variant = time_attention(p.shape, dtype, device, repeats)
            else:
                seconds_by_shape[key] = time_gemm(p.shape, p.layout, dtype, device, repeats)
        s = seconds_by_shape[key]
        rows.append({"group": p.group, "what": p.what, "shape": list(p.shape),
                     **({} if p.group == "attention" else {"layout": p.layout}), "count": p.count,
                     "seconds_each": s, "seconds": s * p.count, "flops": p.flops * p.count})
    groups: dict[str, dict] = {}
    for row in rows:
        g = groups.setdefault(row["group"], {"seconds": 0.0, "flops": 0.0, "products": 0})
        g["seconds"] += row["seconds"]
        g["flops"] += row["flops"]
        g["products"] += row["count"]
    total_s = sum(g["seconds"] for g in groups.values())
    total_flops = sum(g["flops"] for g in groups.values())
    for g in groups.values():
        g["share"] = g["seconds"] / total_s
        g["flops_per_second"] = g["flops"] / g["seconds"] if g["seconds"] else None
    return {
        "method": "bench.perf.step_floor: every product a LoRA training step must compute (base GEMMs forward and "
                  "input-gradient, LM head at the trained positions, LoRA thin products, causal attention forward + "
                  "backward), each distinct shape timed alone (median of `repeats`) with torch.mm / the fastest of "
                  "SDPA and block-causal GEMMs on random "
                  "data, summed count x median; norms, RoPE, SiLU, adds, the loss's softmax and the optimizer "
                  "not counted",
        "batch": batch, "seq_len": seq_len, "rank": rank, "dtype": str(dtype).removeprefix("torch."),
        "trained_positions": batch * (seq_len - 1) if trained_positions is None else trained_positions,
        "repeats": repeats, "attention_variant": attention_variant,
        "floor_seconds": total_s, "model_flops": total_flops, "floor_flops_per_second": total_flops / total_s,
        "groups": groups, "products": rows,
    }


def compare_to_floor(step_seconds: float, floor: dict) -> dict:
    """A measured step against the floor of the same shapes: how far above it, and the rate it achieves."""
    return {"step_over_floor": step_seconds / floor["floor_seconds"],
            "model_flops_per_second": floor["model_flops"] / step_seconds}


def count_products(products: list[Product]) -> Counter:
    """Multiset of GEMMs ((m, k, n), layout) -> how many times a step computes them (attention left out)."""
    c: Counter = Counter()
    for p in products:
        if p.group != "attention":
            c[(p.shape, p.layout)] += p.count
    return c


def main(argv: list[str] | None = None) -> dict:
    from lora_mem.cli import Parser, positive_int

    ap = Parser(prog="python -m bench.perf.step_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", choices=sorted(SETUPS), default=None, help="cpu or gpu (default: gpu if CUDA is available)")
    ap.add_argument("--batch", type=positive_int, default=1, help="windows per step")
    ap.add_argument("--seq-len", type=positive_int, default=None, help="tokens per window (default: the setup's)")
    ap.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    ap.add_argument("--repeats", type=positive_int, default=5, help="timed repeats of each product (median reported)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                    help="the products' dtype (default: the setup's: float32 on cpu, bfloat16 on gpu)")
    args = ap.parse_args(argv)
    if args.setup == "gpu" and not torch.cuda.is_available():
        ap.error("--setup gpu: no CUDA device on this machine")
    setup = SETUPS[args.setup or ("gpu" if torch.cuda.is_available() else "cpu")]
    cfg = model_config(setup["model"])
    floor = measure_floor(cfg, args.batch, args.seq_len or setup["seq_len"], args.rank,
                          getattr(torch, args.dtype or setup["dtype"]), torch.device(setup["device"]),
                          repeats=args.repeats)
    for name, g in floor["groups"].items():
        print(f"{name:<10} {g['seconds']:8.3f} s  {g['share']:6.1%}  {g['flops_per_second'] / 1e9:9.1f} GFLOP/s")
    print(f"floor      {floor['floor_seconds']:8.3f} s per step, {floor['floor_flops_per_second'] / 1e9:.1f} GFLOP/s")
    print(json.dumps({k: v for k, v in floor.items() if k not in ("products", "groups", "method")}))
    return floor


if __name__ == "__main__":
    main()
