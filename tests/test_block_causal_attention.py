"""Block-causal attention (lora_mem/kernels/block_causal_attention.py) against its reference, causal SDPA: forward and the
gradients of q, k and v, over shapes (odd lengths, a last block shorter than the others, one block, blocks of one
row), grouped-query layouts and dtypes; gradcheck in float64; the model's dispatch (CPU training only) and a tiny
model's loss and LoRA gradients with and without it."""

import pytest
import torch
import torch.nn.functional as F

from lora_mem.kernels.block_causal_attention import (
    BLOCK_CAUSAL_MAX_T,
    BLOCK_CAUSAL_MIN_T,
    block_causal_attention,
    causal_bias,
    grouped_causal_bias,
)
from tests.kernel_testing import assert_close_scaled

# (dtype, atol relative to the largest entry, rtol), against SDPA evaluated in float64 on the same rounded inputs.
DTYPE_TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 1.6e-2, 3e-2, id="bf16"),
]


def reference(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def forward_backward(fn, q, k, v, grad, dtype, **kwargs):
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(dtype))
    return [out.double()] + [t.grad.double() for t in leaves]


def random_qkv(B, H, Hkv, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in
            [(B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, H, T, D)]]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("B, H, Hkv, T, D, block", [
    (1, 9, 3, 512, 64, 128),  # the default model's training shape, four blocks
    (2, 4, 2, 37, 16, 8),     # odd length: the last block has 5 rows
    (1, 6, 6, 23, 8, 32),     # one block longer than the sequence; no GQA
    (3, 2, 1, 11, 4, 1),      # one query per block
    (1, 12, 2, 64, 32, 16),   # Qwen2.5's 6 query heads per KV head
])
def test_matches_sdpa(B, H, Hkv, T, D, block, dtype, atol, rtol):
    q, k, v, grad = random_qkv(B, H, Hkv, T, D, seed=T + H)
    got = forward_backward(block_causal_attention, q, k, v, grad, dtype, block=block)
    # The reference in float64 on the inputs rounded to dtype: only our own rounding is measured.
    rounded = [t.to(dtype).double() for t in (q, k, v, grad)]
    expected = forward_backward(reference, *rounded[:3], rounded[3], torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert_close_scaled(a, b, atol, rtol, name=name)


def test_gradcheck_float64():
    q, k, v, _ = random_qkv(1, 4, 2, 9, 4, seed=0)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: block_causal_attention(a, b, c, block=4), leaves)


def test_future_keys_do_not_matter():
    """Causality: changing the last position's key and value changes no earlier output."""
    q, k, v, _ = random_qkv(1, 4, 2, 20, 8, seed=1)
    before = block_causal_attention(q, k, v, block=6)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] -= 3.0
    after = block_causal_attention(q, k2, v2, block=6)
    torch.testing.assert_close(after[:, :, :-1], before[:, :, :-1], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, -1], before[:, :, -1])


def test_causal_bias():
    bias = causal_bias(3, 2, 5, torch.float32, "cpu")  # queries 2, 3, 4 over keys 0..4
    expected = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(torch.isinf(bias), expected.bool())
    assert torch.all(bias[~expected] == 0)


def test_grouped_causal_bias_is_one_tensor_per_block_shape():
    bias = grouped_causal_bias(3, 2, 5, 2, torch.float32, torch.device("cpu"))
    assert torch.equal(bias, causal_bias(3, 2, 5, torch.float32, "cpu").repeat(2, 1))
    assert grouped_causal_bias(3, 2, 5, 2, torch.float32, torch.device("cpu")) is bias  # every layer reads the same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 384, 512), (2, 7, 33), (1, 1, 1)])
def test_softmax_16bit_is_fp32_rounded(dtype, shape):
    # the forward's softmax of 16-bit scores relies on the CPU kernel accumulating in fp32
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(*shape, generator=g) * 8).to(dtype)
    scores[..., 1::5] = float("-inf")
    scores[..., 0] = 0.0  # every row keeps a finite entry, as the causal diagonal does
    assert torch.equal(torch.softmax(scores, dim=-1), torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype))


@pytest.mark.parametrize("shapes, match", [
    (((1, 4, 8, 4), (1, 3, 8, 4), (1, 3, 8, 4)), "multiple of Hkv"),
    (((1, 4, 8, 4), (1, 2, 7, 4), (1, 2, 7, 4)), "q \\(1, 4, 8, 4\\)"),
])
def test_bad_shapes_name_them(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        block_causal_attention(q, k, v)


def test_model_uses_it_for_cpu_training_only(monkeypatch):
    """The decoder takes the block path on CPU when attention needs gradients and BLOCK_CAUSAL_MIN_T <= T <=
    BLOCK_CAUSAL_MAX_T, SDPA otherwise (and everywhere with a kernel policy whose cpu_attention is "sdpa"); a tiny
    model's loss and every LoRA gradient are the same either way; a bad switch value is named."""
    from lora_mem.kernels.policy import KernelPolicy
    from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_parameters
    from lora_mem.model import qwen2
    from lora_mem.model.config import ModelConfig

    calls = []
    real = qwen2.block_causal_attention
    monkeypatch.setattr(qwen2, "block_causal_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                      max_position_embeddings=128, tie_word_embeddings=True, qkv_bias=False, o_bias=False)
    model = qwen2.Qwen2ForCausalLM(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.requires_grad_(False)
    inject_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in lora_parameters(model):
        p.requires_grad_(True)
        with torch.no_grad():
            p.normal_(std=0.05)  # B != 0, so every adapter's gradient flows through attention
    ids = torch.randint(0, model.config.vocab_size, (2, BLOCK_CAUSAL_MIN_T + 3), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(use_blocks):
        model.model.policy = KernelPolicy(cpu_attention="blocks" if use_blocks else "sdpa")
        for p in lora_parameters(model):
            p.grad = None
        calls.clear()
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora_parameters(model)], len(calls)

    loss_b, grads_b, calls_b = loss_and_grads(True)
    loss_s, grads_s, calls_s = loss_and_grads(False)
    assert calls_b == model.config.num_hidden_layers and calls_s == 0
    torch.testing.assert_close(loss_b, loss_s, rtol=1e-5, atol=1e-6)
    for gb, gs in zip(grads_b, grads_s):
        assert_close_scaled(gb, gs, 1e-5, 1e-4)

    model.model.policy = KernelPolicy()  # blocks, the default
    calls.clear()
    with torch.no_grad():  # inference (prefill) keeps SDPA: no gradients, nothing to win
        model(ids)
    assert calls == []
    for T in (BLOCK_CAUSAL_MIN_T - 1, BLOCK_CAUSAL_MAX_T + 1):  # one block has nothing to skip; past the maximum
        x = model.model.embed_tokens(torch.zeros(1, T, dtype=torch.long))  # the saved probabilities cost too much
        model.model.layers[0](x, *model.model.rotary_emb(torch.arange(T)[None], torch.float32), None, None, 0)
    assert calls == []
    model.model.layers[0](x[:, :BLOCK_CAUSAL_MAX_T], *model.model.rotary_emb(
        torch.arange(BLOCK_CAUSAL_MAX_T)[None], torch.float32), None, None, 0)
    assert calls == [1]
    calls.clear()
    with pytest.raises(ValueError, match="LORA_MEM_CPU_ATTENTION"):
        KernelPolicy.from_env({"LORA_MEM_CPU_ATTENTION": "flash"})
    with pytest.raises(ValueError, match="cpu_attention"):
        KernelPolicy(cpu_attention="flash")
