"""bench.perf.step_floor: the products a LoRA training step must compute, checked against the GEMMs lora-mem's
step really runs (recorded at the dispatcher), and the floor's bookkeeping."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.perf.step_floor import (
    LINEARS,
    Product,
    compare_to_floor,
    count_products,
    gemm_layout,
    gemm_operands,
    linear_shapes,
    measure_floor,
    step_products,
)
from bench.perf.train_throughput import build_lora_mem, model_config, next_token_targets
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2_floor")
    make_tiny_checkpoint(d, "qwen2")
    return d


class RecordGemms(TorchDispatchMode):
    """Every mm / addmm / addmm_ / bmm the dispatcher sees, as ((m, k, n), layout) (a bmm counts once per batch entry)."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])  # addmm(_)(input, a, b)
            self.shapes[((a.shape[0], a.shape[1], b.shape[1]), gemm_layout(a, b))] += 1
        elif name == "bmm":
            a, b = args[0], args[1]
            self.shapes[((a.shape[1], a.shape[2], b.shape[2]), gemm_layout(a[0], b[0]))] += a.shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("targets", ["all", "answers"])
def test_lora_mem_step_computes_exactly_the_floor_gemms(ckpt, targets):
    """The floor's GEMM list is what lora-mem's training step runs, product for product: none missing (the
    list is not too generous) and none extra (lora-mem computes no GEMM the step does not need: no LM head at
    untrained positions, no input gradient into layer 0's frozen embeddings). Attention is one product of the
    floor, timed as a whole (the fastest of SDPA and the block-causal GEMMs); here it runs through SDPA so that
    the recorder sees the linear layers' GEMMs alone (test_attention_gemms_are_the_block_path_s has the rest)."""
    cfg = model_config(str(ckpt))
    batch, seq_len, rank = 2, 64, 4
    _, step = build_lora_mem(str(ckpt), torch.float32, torch.device("cpu"), rank, attention="sdpa")
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    y = next_token_targets(x, targets)
    n_trained = int((y != -100).sum())
    with RecordGemms() as rec:
        step(x, y)
    expected = count_products(step_products(cfg, batch, seq_len, rank, trained_positions=n_trained))
    assert rec.shapes == expected


def test_attention_gemms_are_the_block_path_s(ckpt):
    """With the CPU block-causal attention on (the default), the step's GEMMs are the floor's list plus exactly the
    block path's batched products (per layer and query block of `rows` queries seeing `end` keys, B*Hkv of each:
    scores, P V, and in backward dV, dP, dQ, dK): nothing else changes."""
    from lora_mem.kernels.block_causal_attention import DEFAULT_BLOCK

    class RecordWithBaddbmm(RecordGemms):  # the scores' product is a baddbmm (scale and causal bias inside)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("baddbmm", "baddbmm_"):  # and dK, dV accumulate with baddbmm_
                a, b = args[1], args[2]
                self.shapes[((a.shape[1], a.shape[2], b.shape[2]), "baddbmm")] += a.shape[0]
            return super().__torch_dispatch__(func, types, args, kwargs)

    cfg = model_config(str(ckpt))
    batch, seq_len, rank = 1, 2 * DEFAULT_BLOCK + 22, 4  # three query blocks: 128, 128 and 22 rows
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    y = next_token_targets(x, "all")
    recorded = {}
    for mode in ("sdpa", "blocks"):
        _, step = build_lora_mem(str(ckpt), torch.float32, torch.device("cpu"), rank, attention=mode)
        with RecordWithBaddbmm() as rec:
            step(x, y)
        recorded[mode] = Counter()
        for (shape, _), n in rec.shapes.items():  # shapes; layouts aside
            recorded[mode][shape] += n
    assert recorded["sdpa"] - recorded["blocks"] == Counter()  # every linear-layer GEMM is still there
    D, g = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    each = batch * cfg.num_key_value_heads * cfg.num_hidden_layers
    expected = Counter()
    for start in range(0, seq_len, DEFAULT_BLOCK):
        rows = min(DEFAULT_BLOCK, seq_len - start) * g
        end = min(start + DEFAULT_BLOCK, seq_len)
        # S = Q K^T, O = P V; backward dV += P^T dO, dP = dO V^T, dQ = dS K, dK += dS^T Q
        for shape in [(rows, D, end), (rows, end, D), (end, rows, D), (rows, D, end), (rows, end, D), (end, rows, D)]:
            expected[shape] += each
    assert recorded["blocks"] - recorded["sdpa"] == expected


def test_products_count_by_hand(ckpt):
    cfg = model_config(str(ckpt))  # hidden 64, intermediate 96, 2 layers, 4 heads / 2 kv heads, head_dim 16
    products = step_products(cfg, batch=1, seq_len=8, rank=2)
    L = cfg.num_hidden_layers
    by_group = Counter()
    for p in products:
        by_group[p.group] += p.count
    assert by_group["base_gemm"] == 7 * L + (7 * L - 3)  # forward + input grads, none for layer 0's q/k/v
    assert by_group["lora"] == 5 * 7 * L + (7 * L - 3)  # x A^T, t B^T, dY B, dB, dA everywhere; dt A but layer 0 qkv
    assert by_group["lm_head"] == 2 and by_group["attention"] == L
    head = [p for p in products if p.group == "lm_head"]
    assert {p.shape for p in head} == {(7, 64, cfg.vocab_size), (7, cfg.vocab_size, 64)}  # 7 of 8 positions trained
    assert linear_shapes(cfg)["k_proj"] == (64, 2 * cfg.head_dim)


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_gemm_operands_have_the_layout(layout):
    a, b = gemm_operands((3, 5, 7), layout, torch.float32, torch.device("cpu"))
    assert a.shape == (3, 5) and b.shape == (5, 7)
    assert gemm_layout(a, b) == layout


def test_flops_of_products():
    assert Product("base_gemm", "x", (3, 5, 7), 4).flops == 2 * 3 * 5 * 7
    attn = Product("attention", "a", (2, 4, 2, 10, 8), 1)  # B=2, H=4, T=10, D=8
    assert attn.flops == 3 * (2 * 2 * 2 * 4 * 10 * 10 * 8 / 2)


def test_unknown_target_is_named(ckpt):
    with pytest.raises(ValueError, match="qkv_proj"):
        step_products(model_config(str(ckpt)), 1, 8, 2, targets=("q_proj", "qkv_proj"))
    assert set(LINEARS) == set(linear_shapes(model_config(str(ckpt))))


def test_no_trained_position_drops_the_head(ckpt):
    products = step_products(model_config(str(ckpt)), 1, 8, 2, trained_positions=0)
    assert not [p for p in products if p.group == "lm_head"]


def test_measure_floor_adds_up(ckpt):
    cfg = model_config(str(ckpt))
    floor = measure_floor(cfg, batch=1, seq_len=16, rank=2, dtype=torch.float32, device=torch.device("cpu"), repeats=2)
    rows = floor["products"]
    assert floor["floor_seconds"] > 0
    assert floor["floor_seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
    assert sum(g["share"] for g in floor["groups"].values()) == pytest.approx(1.0)
    assert floor["model_flops"] == pytest.approx(sum(p.flops * p.count for p in step_products(cfg, 1, 16, 2)))
    assert floor["attention_variant"] in ("enable_gqa", "repeat_kv")
    for r in rows:  # every product of one shape got the same timing
        assert r["seconds"] == pytest.approx(r["seconds_each"] * r["count"])
    cmp = compare_to_floor(2 * floor["floor_seconds"], floor)
    assert cmp["step_over_floor"] == pytest.approx(2.0)
    assert cmp["model_flops_per_second"] == pytest.approx(floor["floor_flops_per_second"] / 2)
