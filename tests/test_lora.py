"""LoRA layers, injection and PEFT-format adapters.

Invariants (B = 0 is the base model, only A/B train, merged == unmerged, rsLoRA scaling), the whole injected model on
the fused kernels (Triton's CPU interpreter) against the PyTorch reference, and adapters moving both ways between
lora-mem and `peft` (test-only reference) on tiny random checkpoints built inside the tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

# triton decides compiled vs interpreted when triton.language and the kernels are first imported, so without CUDA
# the interpreter must be switched on before lora_core (-> lora_mem.kernels.lora_linear -> triton) is imported by any test
# module; tests/test_lora_kernels.py does the same. The dispatcher still uses the reference on CPU unless a kernel
# policy says kernels="triton".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from lora_mem.kernels import lora_linear as lora_linear_module  # noqa: E402
from lora_mem.kernels.policy import KernelPolicy  # noqa: E402
from lora_mem.lora_core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter, save_adapter  # noqa: E402
from lora_mem.lora_core.inject import (  # noqa: E402
    DEFAULT_TARGETS,
    LoRAConfig,
    inject_lora,
    lora_modules,
    lora_parameters,
    trainable_summary,
)
from lora_mem.lora_core.inject import lora_disabled, remove_lora  # noqa: E402
from lora_mem.lora_core.lora import LoRALinear  # noqa: E402
from lora_mem.lora_core.train import chunked_lm_loss  # noqa: E402
from lora_mem.model import loader  # noqa: E402
from tests.tiny_models import VOCAB, make_tiny_checkpoint, tiny_tokenizer  # noqa: E402

# Every test here is fp32 and must take the reference path unless it asks for the kernels itself.
REFERENCE = KernelPolicy(kernels="reference")


def load_model(path):
    return loader.load_model(path, policy=REFERENCE)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    make_tiny_checkpoint(d, "qwen2")
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint(d, "llama")
    return d


@pytest.fixture(scope="module")
def narrow_llama_dir(tmp_path_factory):
    """A Llama with hidden size 32 (the tiny checkpoints have 64): same module names, other shapes."""
    import transformers

    d = tmp_path_factory.mktemp("llama32")
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save(str(d / "tokenizer.json"))
    return d


def tiny_ids(batch=2, length=9, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_lora(model: nn.Module, seed: int = 0, b_std: float = 0.1) -> None:
    """A trained-looking adapter: A as initialised, B non-zero, so the LoRA branch changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / math.sqrt(m.in_features))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * b_std)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# ---------------------------------------------------------------------------------------------------------------------
# LoRALinear invariants
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_zero_B_is_exactly_the_base_layer(bias, training):
    torch.manual_seed(0)
    base = nn.Linear(37, 23, bias=bias)
    expected_layer = nn.Linear(37, 23, bias=bias)
    expected_layer.load_state_dict(base.state_dict())
    lora = LoRALinear(base, rank=4, alpha=8, dropout=0.3).train(training)
    assert lora.weight is base.weight and (lora.bias is base.bias)
    assert torch.count_nonzero(lora.lora_A) > 0 and torch.count_nonzero(lora.lora_B) == 0
    x = torch.randn(3, 5, 37)
    torch.testing.assert_close(lora(x), expected_layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_zero_B_injected_model_logits_equal_base(kind, qwen_dir, llama_dir):
    d = qwen_dir if kind == "qwen2" else llama_dir
    plain, injected = load_model(str(d)).model, load_model(str(d)).model
    names = inject_lora(injected, LoRAConfig(rank=4), generator=torch.Generator().manual_seed(0))
    assert len(names) == 7 * plain.config.num_hidden_layers
    ids = tiny_ids()
    with torch.no_grad():
        torch.testing.assert_close(injected(ids), plain(ids), rtol=0, atol=0)


def test_default_targets_and_lm_head_never_wrapped(qwen_dir):
    assert set(DEFAULT_TARGETS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = load_model(str(qwen_dir)).model
    names = inject_lora(model, LoRAConfig(rank=2))
    expected = {f"model.layers.{i}.{part}.{t}" for i in range(model.config.num_hidden_layers)
                for part, ts in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 ("mlp", ("gate_proj", "up_proj", "down_proj"))) for t in ts}
    assert set(names) == expected == set(lora_modules(model))
    assert type(model.lm_head) is nn.Linear
    # Not even when asked for by name or by a regex that matches every module.
    for targets in (["lm_head", "q_proj"], r".*"):
        m = load_model(str(qwen_dir)).model
        wrapped = inject_lora(m, LoRAConfig(rank=2, target_modules=targets))
        assert type(m.lm_head) is nn.Linear and "lm_head" not in wrapped
        assert len(wrapped) == (2 if isinstance(targets, list) else 14)


def test_regex_and_list_targets(qwen_dir):
    model = load_model(str(qwen_dir)).model
    names = inject_lora(model, LoRAConfig(rank=2, target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="no linear module matches"):
        inject_lora(load_model(str(qwen_dir)).model, LoRAConfig(rank=2, target_modules=["nope_proj"]))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_trainable_summary_counts_exactly_the_lora_parameters(kind, qwen_dir, llama_dir):
    d = qwen_dir if kind == "qwen2" else llama_dir
    lm = load_model(str(d))
    cfg, model, r = lm.config, lm.model, 8
    base_total = sum(p.numel() for p in model.parameters())
    inject_lora(model, LoRAConfig(rank=r))
    # From the config's shapes alone: r * (in + out) for each wrapped (in -> out) projection.
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv, o = cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.num_attention_heads * D
    per_layer = r * ((C + q) + 2 * (C + kv) + (o + C) + 2 * (C + I) + (I + C))
    n_lora = cfg.num_hidden_layers * per_layer
    assert n_lora == 2 * r * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 96) + (96 + 64)) == 14848
    assert sum(p.numel() for p in lora_parameters(model)) == n_lora
    total = base_total + n_lora
    line = trainable_summary(model)
    assert line == f"trainable params: {n_lora:,d} || all params: {total:,d} || trainable%: {100 * n_lora / total:.4f}"
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", line)
    assert m and int(m[1].replace(",", "")) == n_lora and int(m[2].replace(",", "")) == total
    # peft counts the same model the same way.
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(d)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(DEFAULT_TARGETS)))
    assert pm.get_nb_trainable_parameters() == (n_lora, total)


def test_optimizer_step_changes_only_lora(qwen_dir):
    model = load_model(str(qwen_dir)).model
    inject_lora(model, LoRAConfig(rank=4, dropout=0.1), generator=torch.Generator().manual_seed(0))
    lora_ids = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in lora_ids), name
    before_base = base_state(model)
    before_lora = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in lora_ids}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all params: frozen ones must not move
    model.train()
    ids = tiny_ids(seed=1)
    for _ in range(2):  # the first step moves B only (dL/dA = 0 while B = 0), the second moves A too
        loss = chunked_lm_loss(model.model(ids[:, :-1]), model.lm_head.weight, ids[:, 1:])
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in lora_ids), name
        opt.step()
        opt.zero_grad()
    after_base = base_state(model)
    assert after_base.keys() == before_base.keys()
    for k in before_base:
        assert torch.equal(after_base[k], before_base[k]), k
    for n, p in model.named_parameters():
        if id(p) in lora_ids:
            assert not torch.equal(p, before_lora[n]), f"{n} did not train"


# ---------------------------------------------------------------------------------------------------------------------
# merge / unmerge, scaling
# ---------------------------------------------------------------------------------------------------------------------


def make_trained_layer(seed=0, rank=4, alpha=8.0, use_rslora=False, bias=True):
    torch.manual_seed(seed)
    lora = LoRALinear(nn.Linear(48, 40, bias=bias), rank=rank, alpha=alpha, use_rslora=use_rslora)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.2)
    return lora.eval()


def test_merge_equals_unmerged_and_is_idempotent_and_unmerge_restores():
    lora = make_trained_layer()
    w0 = lora.weight.detach().clone()
    x = torch.randn(6, 48)
    y_unmerged = lora(x)
    y_base = torch.nn.functional.linear(x, w0, lora.bias)
    assert (y_unmerged - y_base).abs().max() > 0.1  # the update is visible, so the checks below can fail
    lora.merge()
    assert lora.merged
    w_merged = lora.weight.detach().clone()
    torch.testing.assert_close(w_merged, w0 + lora.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(lora(x), y_unmerged, rtol=1e-5, atol=1e-5)
    lora.merge()  # a no-op
    assert torch.equal(lora.weight, w_merged)
    torch.testing.assert_close(lora(x), y_unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    assert not lora.merged
    torch.testing.assert_close(lora.weight, w0, rtol=0, atol=1e-6)
    lora.unmerge()  # a no-op too
    torch.testing.assert_close(lora.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(lora(x), y_unmerged, rtol=1e-5, atol=1e-5)


def test_merged_model_equals_unmerged_model(qwen_dir):
    model = load_model(str(qwen_dir)).model
    inject_lora(model, LoRAConfig(rank=4))
    randomise_lora(model)
    ids = tiny_ids()
    with torch.no_grad():
        unmerged = model(ids)
        for m in lora_modules(model).values():
            m.merge()
        merged = model(ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank,alpha", [(4, 8.0), (16, 8.0), (9, 3.0)])
def test_rslora_scaling(rank, alpha):
    plain = make_trained_layer(rank=rank, alpha=alpha, use_rslora=False, bias=False)
    rs = make_trained_layer(rank=rank, alpha=alpha, use_rslora=True, bias=False)
    assert plain.scaling == pytest.approx(alpha / rank)
    assert rs.scaling == pytest.approx(alpha / math.sqrt(rank))
    # The branch is scaled by exactly that factor: same A, B (same seed) in both layers.
    x = torch.randn(5, 48)
    branch = (x @ plain.lora_A.T) @ plain.lora_B.T  # (5, 40), unscaled
    base = x @ plain.weight.T
    torch.testing.assert_close(plain(x) - base, branch * (alpha / rank), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rs(x) - base, branch * (alpha / math.sqrt(rank)), rtol=1e-4, atol=1e-5)
    model_cfg = LoRAConfig(rank=rank, alpha=alpha, use_rslora=True)
    m = nn.Sequential()
    m.add_module("q_proj", nn.Linear(8, 8))
    inject_lora(m, model_cfg)
    assert m.q_proj.scaling == pytest.approx(alpha / math.sqrt(rank))


def test_default_alpha_is_twice_the_rank():
    assert LoRAConfig(rank=8).alpha == 16.0
    assert LoRAConfig(rank=8, alpha=4).alpha == 4


# ---------------------------------------------------------------------------------------------------------------------
# One adapter per layer; the base model alone; the kernel policy
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_linear_serves_one_adapter():
    """Per-row adapters are not this layer's job: it says where they are served (stacked adapters)."""
    from lora_mem.kernels.multi_lora_linear import AdapterRows

    lora = make_trained_layer()
    rows = AdapterRows(torch.tensor([0]), None)
    with pytest.raises(RuntimeError, match="stack_adapters"):
        lora(torch.randn(1, 3, 48), REFERENCE, rows)
    assert not any(hasattr(lora, a) for a in ("disabled", "row_adapter_ids", "lora_A_stack"))


@pytest.mark.skipif(not lora_linear_module.HAS_TRITON, reason="needs triton")
def test_lora_linear_takes_the_kernels_its_policy_names(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real_triton, real_reference = lora_linear_module.lora_linear_triton, lora_linear_module.lora_linear_reference
    monkeypatch.setattr(lora_linear_module, "lora_linear_triton",
                        lambda *a, **k: calls.append("triton") or real_triton(*a, **k))
    monkeypatch.setattr(lora_linear_module, "lora_linear_reference",
                        lambda *a, **k: calls.append("reference") or real_reference(*a, **k))
    lora = make_trained_layer()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref = lora(x, REFERENCE)
        kern = lora(x, KernelPolicy(kernels="triton"))
        default = lora(x)  # CPU tensors: the reference
    assert calls == ["reference", "triton", "reference"]
    torch.testing.assert_close(kern, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(default, ref)


def test_lora_disabled_swaps_in_the_base_layers_and_back(qwen_dir):
    model = load_model(str(qwen_dir)).model
    ids = tiny_ids()
    with torch.no_grad():
        base = model(ids)
    inject_lora(model, LoRAConfig(rank=4))
    randomise_lora(model)
    layers = lora_modules(model)
    next(iter(layers.values())).merge()  # a merged layer too: its merge is undone first
    with torch.no_grad():
        adapted = model(ids)
        with lora_disabled(model):
            assert not lora_modules(model)
            linear = model.get_submodule(next(iter(layers)))
            assert type(linear) is nn.Linear and linear.weight is next(iter(layers.values())).weight
            disabled = model(ids)
        after = model(ids)
        with pytest.raises(KeyError), lora_disabled(model):
            raise KeyError("the layers come back after an error too")
    assert lora_modules(model) == layers  # the same modules, adapters and all
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(disabled, base, rtol=0, atol=1e-6)  # the merge undone: fp32 rounding of W
    torch.testing.assert_close(after, adapted, rtol=1e-5, atol=1e-5)
    remove_lora(model)
    assert not lora_modules(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The whole model on the fused kernels (Triton interpreter on CPU) vs the PyTorch reference
# ---------------------------------------------------------------------------------------------------------------------


REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_DROPOUTS = (0.0, 0.2)


def loss_and_lora_grads(model, ids, dropout_seed):
    torch.manual_seed(dropout_seed)  # the dropout masks come from the default generator, drawn in the same order
    hidden = model.model(ids[:, :-1])
    loss = chunked_lm_loss(hidden, model.lm_head.weight, ids[:, 1:], chunk_size=5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def kernel_vs_reference_worker(ckpt_dir: str, out_file: str) -> None:
    """Run in a fresh interpreter with TRITON_INTERPRET=1 set before triton is imported: the whole injected tiny
    model, loss and every LoRA gradient, once on the reference and once on the kernels, for each dropout."""
    results = {}
    for dropout in KERNEL_DROPOUTS:
        model = load_model(ckpt_dir).model  # Qwen2: q/k/v carry a bias, so the bias epilogue runs too
        inject_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout), generator=torch.Generator().manual_seed(0))
        randomise_lora(model, seed=3)
        model.train()
        ids = tiny_ids(batch=2, length=10, seed=4)
        calls = []
        real_triton = lora_linear_module.lora_linear_triton

        def counting_triton(*args, **kwargs):
            calls.append(1)
            return real_triton(*args, **kwargs)

        lora_linear_module.lora_linear_triton = counting_triton
        model.model.policy = REFERENCE
        ref = loss_and_lora_grads(model, ids, dropout_seed=5)
        ref_calls = len(calls)
        model.model.policy = KernelPolicy(kernels="triton", fused_ops=True)  # every kernel of the model
        kern = loss_and_lora_grads(model, ids, dropout_seed=5)
        lora_linear_module.lora_linear_triton = real_triton
        results[dropout] = {"ref": ref, "kern": kern, "ref_calls": ref_calls, "kern_calls": len(calls) - ref_calls}
    torch.save(results, out_file)


@pytest.mark.skipif(not lora_linear_module.HAS_TRITON, reason="needs triton")
def test_injected_model_kernels_match_reference(qwen_dir, tmp_path):
    out = tmp_path / "kernel_vs_reference.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    code = "import sys; from tests.test_lora import kernel_vs_reference_worker as w; w(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(qwen_dir), str(out)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    assert set(results) == set(KERNEL_DROPOUTS)
    for dropout, r in results.items():
        # 14 wrapped layers: the reference run must not touch the kernels, the kernel run must take them all.
        assert (r["ref_calls"], r["kern_calls"]) == (0, 14), dropout
        (ref_loss, ref_grads), (kern_loss, kern_grads) = r["ref"], r["kern"]
        assert len(ref_grads) == 28 and ref_grads.keys() == kern_grads.keys()
        torch.testing.assert_close(kern_loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name, g in ref_grads.items():
            assert g.abs().max() > 1e-5, f"{name}: zero gradient, the comparison would check nothing"
            torch.testing.assert_close(kern_grads[name], g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, p=dropout: f"dropout={p} {n}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# PEFT round trips
# ---------------------------------------------------------------------------------------------------------------------


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind,use_rslora", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_our_adapter_loads_in_peft(kind, use_rslora, qwen_dir, llama_dir, tmp_path):
    import peft
    import transformers

    d = qwen_dir if kind == "qwen2" else llama_dir
    model = load_model(str(d)).model
    cfg = LoRAConfig(rank=4, alpha=8, use_rslora=use_rslora)
    inject_lora(model, cfg)
    randomise_lora(model, seed=7)
    adapter = save_adapter(model, tmp_path / "adapter", cfg, base_model=str(d))
    ids = tiny_ids(seed=8)
    with torch.no_grad():
        ours = model(ids)

    base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    base_logits = hf_logits(base, ids)
    theirs_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert theirs_model.peft_config["default"].use_rslora == use_rslora
    theirs = hf_logits(theirs_model, ids)
    assert (theirs - base_logits).abs().max() > 1e-2  # the adapter did load and does something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora,targets", [
    (False, list(DEFAULT_TARGETS)),
    (True, ["q_proj", "v_proj", "down_proj"]),
])
def test_peft_adapter_loads_in_ours(use_rslora, targets, qwen_dir, tmp_path):
    import peft
    import transformers

    torch.manual_seed(11)
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft_adapter")
    assert {CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(tmp_path / "peft_adapter"))  # peft adds a README.md
    ids = tiny_ids(seed=12)
    theirs = hf_logits(pm, ids)

    model = load_model(str(qwen_dir)).model
    with torch.no_grad():
        base_ours = model(ids)
    cfg = load_adapter(model, tmp_path / "peft_adapter")
    assert (cfg.rank, cfg.alpha, cfg.use_rslora) == (4, 8.0, use_rslora)
    assert {n.rsplit(".", 1)[1] for n in lora_modules(model)} == set(targets)
    assert len(lora_modules(model)) == 2 * len(targets)
    with torch.no_grad():
        ours = model(ids)
    assert (ours - base_ours).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_load_into_a_merged_model_replaces_the_adapter(qwen_dir, tmp_path):
    model = load_model(str(qwen_dir)).model
    cfg = LoRAConfig(rank=3, alpha=5, use_rslora=True)
    inject_lora(model, cfg)
    w0 = base_state(model)
    randomise_lora(model, seed=2)
    ids = tiny_ids()
    with torch.no_grad():
        expected = model(ids)
    save_adapter(model, tmp_path / "a", cfg, base_model="tiny")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    # Another adapter, merged into W (as after answering questions), then the saved one is loaded back.
    randomise_lora(model, seed=3)
    for m in lora_modules(model).values():
        m.merge()
    load_adapter(model, tmp_path / "a")
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert torch.equal(p, saved[n]), n
    assert all(not m.merged and m.scaling == pytest.approx(5 / math.sqrt(3)) for m in lora_modules(model).values())
    w1 = base_state(model)
    for k in w0:  # the other adapter's merge was undone (up to fp32 rounding)
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Adapters that do not fit
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_adapter(qwen_dir, tmp_path_factory):
    model = load_model(str(qwen_dir)).model
    cfg = LoRAConfig(rank=4, alpha=8)
    inject_lora(model, cfg)
    randomise_lora(model)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", cfg, base_model=str(qwen_dir))


def copy_adapter(src: Path, dst: Path, edit=None) -> Path:
    dst.mkdir(parents=True)
    (dst / WEIGHTS_NAME).write_bytes((src / WEIGHTS_NAME).read_bytes())
    raw = json.loads((src / CONFIG_NAME).read_text())
    if edit:
        edit(raw)
    (dst / CONFIG_NAME).write_text(json.dumps(raw))
    return dst


def test_adapter_for_other_base_shapes(qwen_adapter, narrow_llama_dir):
    model = load_model(str(narrow_llama_dir)).model
    with pytest.raises(AdapterError, match=r"does not fit the model") as e:
        load_adapter(model, qwen_adapter)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.lora_A: file [4, 64] vs model [4, 32]" in msg
    assert "other base model?" in msg
    assert not lora_modules(model), "a failed load must leave the model as it was"


def test_adapter_rank_differs_from_config(qwen_adapter, qwen_dir, tmp_path):
    bad = copy_adapter(qwen_adapter, tmp_path / "r8", lambda c: c.update(r=8))
    fresh = load_model(str(qwen_dir)).model
    with pytest.raises(AdapterError, match=r"lora_A: file \[4, 64\] vs model \[8, 64\] \(rank r=8 in config"):
        load_adapter(fresh, bad)
    assert not lora_modules(fresh)
    load_adapter(fresh, qwen_adapter)  # the model is still usable with the right adapter
    assert all(m.rank == 4 for m in lora_modules(fresh).values())
    # A model injected with rank 4 is told the config's rank is not its own.
    with pytest.raises(AdapterError, match=r"model has rank 4, adapter config r=8"):
        load_adapter(fresh, bad)


def test_adapter_without_config(qwen_adapter, qwen_dir, tmp_path):
    d = tmp_path / "noconf"
    d.mkdir()
    (d / WEIGHTS_NAME).write_bytes((qwen_adapter / WEIGHTS_NAME).read_bytes())
    with pytest.raises(AdapterError, match=r"no adapter_config\.json \(not a PEFT adapter directory\)"):
        load_adapter(load_model(str(qwen_dir)).model, d)


@pytest.mark.parametrize("peft_type", ["IA3", "PREFIX_TUNING"])
def test_adapter_not_lora(peft_type, qwen_adapter, qwen_dir, tmp_path):
    bad = copy_adapter(qwen_adapter, tmp_path / "ia3", lambda c: c.update(peft_type=peft_type))
    with pytest.raises(AdapterError, match=rf"peft_type '{peft_type}' is not LORA"):
        load_adapter(load_model(str(qwen_dir)).model, bad)


def test_adapter_with_weights_for_modules_its_config_does_not_target(qwen_adapter, qwen_dir, tmp_path):
    bad = copy_adapter(qwen_adapter, tmp_path / "more", lambda c: c.update(target_modules=["q_proj", "lm_head"]))
    model = load_model(str(qwen_dir)).model
    with pytest.raises(AdapterError, match=r"weights for modules target_modules does not select: "
                                           r"model\.layers\.0\.mlp\.down_proj") as e:
        load_adapter(model, bad)
    assert "target_modules 'lm_head' select no linear layer of the model" in str(e.value)
    assert not lora_modules(model)


# ---------------------------------------------------------------------------------------------------------------------
# Writing adapters
# ---------------------------------------------------------------------------------------------------------------------


def test_save_adapter_files_are_peft_names_and_no_temp_files(qwen_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import lora_mem.lora_core.adapter_io as adapter_io

    model = load_model(str(qwen_dir)).model
    cfg = LoRAConfig(rank=2)
    inject_lora(model, cfg)
    out = tmp_path / "adapter"
    save_adapter(model, out, cfg, base_model="tiny")
    save_adapter(model, out, cfg, base_model="tiny")  # overwriting leaves nothing behind either
    assert [CONFIG_NAME, WEIGHTS_NAME] == ["adapter_config.json", "adapter_model.safetensors"]  # PEFT's names
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    raw = json.loads((out / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 2 and raw["lora_alpha"] == 4.0
    keys = set(load_file(out / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 28
    old = (out / WEIGHTS_NAME).read_bytes()

    # A write that fails half-way leaves the previous adapter intact and no temporary file.
    def failing_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", failing_save_file)
    randomise_lora(model)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, out, cfg, base_model="tiny")
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (out / WEIGHTS_NAME).read_bytes() == old


def test_save_adapter_without_lora_layers(qwen_dir, tmp_path):
    with pytest.raises(AdapterError, match="no LoRA layers"):
        save_adapter(load_model(str(qwen_dir)).model, tmp_path / "a", LoRAConfig(), base_model="tiny")
