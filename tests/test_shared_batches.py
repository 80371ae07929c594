"""Decoding paths that share work across rows must give each row exactly what it gets alone:
a long shared prefix attended in place (cascade attention), and many adapters in one batch."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lora_mem.kernels.policy import KernelPolicy
from lora_mem.lora_core.adapter_io import AdapterError, load_adapter, save_adapter
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_disabled, lora_modules
from lora_mem.lora_core.lora import LoRALinear
from lora_mem.lora_core.multi_adapter import multi_lora_modules, stack_adapters, unstack_adapters
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


REFERENCE = KernelPolicy(kernels="reference")


@pytest.mark.parametrize("ranks", [None, [2, 4, 8]])
def test_shared_batches_of_many_adapters_equal_one_adapter_at_a_time(tiny_dir, tmp_path, ranks):
    dirs = make_adapters(tiny_dir, tmp_path, 3, ranks)
    g = torch.Generator().manual_seed(3)
    head = rand_tokens(6, g)  # a shared system prompt: its KV differs per adapter
    prompts = [head + rand_tokens(n, g) for n in (3, 1, 8, 5, 2, 7, 4, 6, 9)]
    owner = [0, 1, 2, 2, 0, 1, 1, 2, 0]
    stop = [5, 17]
    expected = [None] * len(prompts)
    for a, d in enumerate(dirs):
        single = load_model(str(tiny_dir), policy=REFERENCE)  # a fresh model per adapter: ranks may differ
        load_adapter(single.model, d)
        mine = [i for i in range(len(prompts)) if owner[i] == a]
        for i, o in zip(mine, generate(single.model, [prompts[i] for i in mine], 8, stop, pad_id=0)):
            expected[i] = o
    shared = load_model(str(tiny_dir), policy=REFERENCE)
    stack_adapters(shared.model, dirs)
    got = generate(shared.model, prompts, 8, stop, pad_id=0, batch_size=4, adapter_ids=owner)
    assert got == expected
    # the adapters matter (otherwise the test above proves nothing) ...
    base = generate(load_model(str(tiny_dir)).model, prompts, 8, stop, pad_id=0)
    assert sum(a != b for a, b in zip(base, expected)) >= 3
    # ... and no row adapter is left set after generation (the rows' adapters are an argument of each forward, not
    # the model's state): the model answers as before, here with the LoRA layers stacking injected (B = 0: the base)
    assert not any(hasattr(m, "row_adapter_ids") for m in shared.model.modules())
    assert generate(shared.model, prompts, 8, stop, pad_id=0) == base
    unstack_adapters(shared.model)
    assert not multi_lora_modules(shared.model)
    assert all(type(m) is LoRALinear and not name.endswith("base_layer")
               for name, m in lora_modules(shared.model).items())


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
    lm = load_model(str(tiny_dir))
    inject_lora(lm.model, LoRAConfig(rank=2))
    with pytest.raises(RuntimeError, match="stacked adapters"):
        lm.model(torch.tensor([[5, 6, 7]]), adapter_ids=torch.tensor([0]))


def test_model_imports_nothing_from_lora_core_or_bench():
    """The decoder and its decoding loop know nothing of LoRA: adapters reach them as modules and as an argument."""
    import ast
    from pathlib import Path

    import lora_mem.model

    for path in sorted(Path(lora_mem.model.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("lora_mem.lora_core", "bench")), f"{path.name} imports {name}"


def test_a_stacked_layer_without_rows_is_the_layer_it_wraps(tiny_dir, tmp_path):
    """Stacking wraps each LoRA layer; without adapter_ids the model answers with the adapter it had, and unstacking
    puts the very same layers back. Stacking again replaces the stacks (no wrapper inside a wrapper)."""
    dirs = make_adapters(tiny_dir, tmp_path, 3)
    ids = torch.tensor([[5, 9, 14, 3, 7], [6, 2, 11, 8, 4]])
    logits = {}
    for i, d in enumerate(dirs):
        single = load_model(str(tiny_dir), device="cpu", policy=REFERENCE)
        load_adapter(single.model, d)
        with torch.no_grad():
            logits[i] = single.model(ids)
    lm = load_model(str(tiny_dir), device="cpu", policy=REFERENCE)
    load_adapter(lm.model, dirs[0])
    layers = lora_modules(lm.model)
    stack_adapters(lm.model, dirs[1:])
    stack_adapters(lm.model, dirs[1:])
    assert len(multi_lora_modules(lm.model)) == len(layers)
    assert all(m.base_layer is layers[name] for name, m in multi_lora_modules(lm.model).items())
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), logits[0], rtol=0, atol=0)
        rows = lm.model(ids, adapter_ids=torch.tensor([1, -1]))
    torch.testing.assert_close(rows[0], logits[2][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1], load_model(str(tiny_dir), device="cpu").model(ids)[1].detach(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unstack"), lora_disabled(lm.model):
        pass
    unstack_adapters(lm.model)
    assert lora_modules(lm.model) == layers
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), logits[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_rows_are_planned_once_per_forward(tiny_dir, tmp_path, monkeypatch):
    """On the kernels, the rows' sort by adapter is made once per forward pass and handed to every multi-adapter
    layer (14 here), and the logits are the reference path's."""
    from lora_mem.kernels import multi_lora_linear as mll

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dirs = make_adapters(tiny_dir, tmp_path, 2)
    lm = load_model(str(tiny_dir), device=device, dtype="float32", policy=REFERENCE)
    stack_adapters(lm.model, dirs)
    ids = torch.tensor([[5, 9, 14, 3, 7], [6, 2, 11, 8, 4], [1, 2, 3, 4, 5]], device=device)
    adapter_ids = torch.tensor([1, -1, 0], device=device)
    with torch.no_grad():
        expected = lm.model(ids, adapter_ids=adapter_ids)
    plans, kernels = [], []
    real_plan, real_kernel = mll.plan_adapter_rows, mll.multi_lora_linear_triton
    monkeypatch.setattr(mll, "plan_adapter_rows", lambda *a, **k: plans.append(1) or real_plan(*a, **k))
    monkeypatch.setattr(mll, "multi_lora_linear_triton",
                        lambda *a, **k: kernels.append(k["plan"]) or real_kernel(*a, **k))
    lm.model.model.policy = KernelPolicy(kernels="triton")
    with torch.no_grad():
        got = lm.model(ids, adapter_ids=adapter_ids)
    assert len(plans) == 1 and len(kernels) == len(multi_lora_modules(lm.model)) == 14
    assert all(plan is kernels[0] for plan in kernels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
