"""Decoding paths that share work across rows must give each row exactly what it gets alone:
a long shared prefix attended in place (cascade attention), and many adapters in one batch."""

from __future__ import annotations

import math

import pytest
import torch

from lora_mem.lora_core.adapter_io import AdapterError, load_adapter, save_adapter
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules
from lora_mem.lora_core.multi_adapter import stack_adapters, unstack_adapters
from lora_mem.model.generate import compute_prefix, generate, generate_batch
from lora_mem.model.loader import load_model
from lora_mem.model.qwen2 import cascade_attention
from tests.tiny_models import VOCAB, make_tiny_checkpoint


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(d, request.param)
    return d


def rand_tokens(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(4, VOCAB, (n,), generator=g).tolist()


@pytest.mark.parametrize("masked", [False, True])
def test_cascade_attention_equals_attention_over_concatenated_keys(masked):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, P, S, D = 3, 4, 2, 5, 7, 9, 8
    q = torch.randn(B, H, T, D, generator=g)
    pk, pv = torch.randn(1, Hkv, P, D, generator=g), torch.randn(1, Hkv, P, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    own = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].expand(B, 1, T, S).clone()
    if masked:
        own[1, :, :, :3] = False  # row 1 has three pad slots
    full_k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    full_v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    full_mask = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), own], dim=-1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask,
                                                                enable_gqa=True)
    got = cascade_attention(q, pk, pv, k, v, own if masked else None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cascade_prefix_decodes_as_each_prompt_alone(tiny_dir):
    """A context shared by every question, computed once and attended in place by all batches."""
    lm = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(1)
    context = rand_tokens(40, g)
    prompts = [context + rand_tokens(n, g) for n in (1, 5, 3, 9, 2, 6)]
    alone = [generate_batch(lm.model, [p], 8, [], pad_id=0)[0] for p in prompts]
    prefix = compute_prefix(lm.model, context, cascade_min_tokens=1)
    assert prefix.cascade
    assert generate_batch(lm.model, prompts, 8, [], pad_id=0, prefix=prefix) == alone
    # rows that stop early leave the batch while the prefix stays shared
    stop = sorted({alone[0][1], alone[3][0]})
    alone_stop = [generate_batch(lm.model, [p], 8, stop, pad_id=0)[0] for p in prompts]
    assert sum(len(a) < 8 for a in alone_stop) >= 2
    assert generate_batch(lm.model, prompts, 8, stop, pad_id=0, prefix=prefix) == alone_stop


def test_generate_uses_a_cascade_prefix_for_long_shared_contexts(tiny_dir, monkeypatch):
    import lora_mem.model.generate as gen

    lm = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(2)
    context = rand_tokens(30, g)
    prompts = [context + rand_tokens(n, g) for n in (2, 4, 7, 1, 3)]
    expected = generate(lm.model, prompts, 6, [], pad_id=0, batch_size=2)  # short prefix: copied into rows
    seen = []
    real = gen.compute_prefix

    def spy(*args, **kwargs):
        p = real(*args, **{**kwargs, "cascade_min_tokens": 16})
        seen.append(p)
        return p

    monkeypatch.setattr(gen, "compute_prefix", spy)
    assert generate(lm.model, prompts, 6, [], pad_id=0, batch_size=2) == expected
    assert len(seen) == 1 and seen[0].cascade and len(seen[0]) >= 30  # once per call, not per batch


def make_adapters(tiny_dir, tmp_path, n: int, ranks=None) -> list:
    """n saved adapters with different non-zero weights (and ranks, if given)."""
    dirs = []
    for i in range(n):
        lm = load_model(str(tiny_dir))
        cfg = LoRAConfig(rank=(ranks or [4] * n)[i], alpha=8.0 + i)
        inject_lora(lm.model, cfg)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for m in lora_modules(lm.model).values():
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / math.sqrt(m.in_features))
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
        dirs.append(save_adapter(lm.model, tmp_path / f"adapter{i}", cfg, base_model=str(tiny_dir)))
    return dirs


@pytest.mark.parametrize("ranks", [None, [2, 4, 8]])
def test_shared_batches_of_many_adapters_equal_one_adapter_at_a_time(tiny_dir, tmp_path, ranks, monkeypatch):
    monkeypatch.setenv("LORA_MEM_KERNELS", "reference")
    dirs = make_adapters(tiny_dir, tmp_path, 3, ranks)
    g = torch.Generator().manual_seed(3)
    head = rand_tokens(6, g)  # a shared system prompt: its KV differs per adapter
    prompts = [head + rand_tokens(n, g) for n in (3, 1, 8, 5, 2, 7, 4, 6, 9)]
    owner = [0, 1, 2, 2, 0, 1, 1, 2, 0]
    stop = [5, 17]
    expected = [None] * len(prompts)
    for a, d in enumerate(dirs):
        single = load_model(str(tiny_dir))  # a fresh model per adapter: ranks may differ
        load_adapter(single.model, d)
        mine = [i for i in range(len(prompts)) if owner[i] == a]
        for i, o in zip(mine, generate(single.model, [prompts[i] for i in mine], 8, stop, pad_id=0)):
            expected[i] = o
    shared = load_model(str(tiny_dir))
    stack_adapters(shared.model, dirs)
    got = generate(shared.model, prompts, 8, stop, pad_id=0, batch_size=4, adapter_ids=owner)
    assert got == expected
    # the adapters matter (otherwise the test above proves nothing) ...
    base = generate(load_model(str(tiny_dir)).model, prompts, 8, stop, pad_id=0)
    assert sum(a != b for a, b in zip(base, expected)) >= 3
    # ... and no row adapter is left set after generation: the model answers as before
    assert all(m.row_adapter_ids is None for m in lora_modules(shared.model).values())
    unstack_adapters(shared.model)
    assert all(m.lora_A_stack is None for m in lora_modules(shared.model).values())


def test_stacking_rejects_adapters_of_another_model(tiny_dir, tmp_path):
    dirs = make_adapters(tiny_dir, tmp_path, 1)
    other = tmp_path / "other"
    make_tiny_checkpoint(other, "qwen2", seed=1)
    lm = load_model(str(other))
    inject_lora(lm.model, LoRAConfig(rank=4, target_modules=["q_proj"]))  # other targets than the adapter
    with pytest.raises(AdapterError, match="does not fit"):
        stack_adapters(lm.model, dirs)
    with pytest.raises(AdapterError, match="no adapters"):
        stack_adapters(lm.model, [])


def test_row_adapters_without_stacks_is_a_clear_error(tiny_dir):
    from lora_mem.model.generate import set_row_adapters

    lm = load_model(str(tiny_dir))
    inject_lora(lm.model, LoRAConfig(rank=2))
    set_row_adapters(lm.model, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="stacked adapters"):
        lm.model(torch.tensor([[5, 6, 7]]))
