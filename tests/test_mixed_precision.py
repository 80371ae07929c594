"""The bf16 CPU path. The kernel policy builds a CPU model in bf16 where the CPU has bf16 instructions (here forced
on, as on a machine that has them: it must work, if slowly, anywhere): base weights, activations and the KV cache in
bf16; the LoRA A/B, their gradients, AdamW's state and the loss reductions in fp32. An explicit fp32 dtype runs the
fp32 path bit for bit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench import locomo
from bench.common import RunConfigMismatch, check_or_write_run_config, read_jsonl
from lora_mem.kernels.policy import FIELDS_ADDED_LATER, KernelPolicy, add_kernel_args
from lora_mem.kernels.policy import cpu_bf16_instructions as real_cpu_bf16_instructions
from lora_mem.lora_core.inject import (
    LoRAConfig,
    inject_lora,
    lora_disabled,
    lora_modules,
    lora_parameters,
)
from lora_mem.lora_core.train import TrainConfig, chunked_lm_loss, train_lora
from lora_mem.model.generate import generate
from lora_mem.model.loader import load_model
from tests.tiny_models import VOCAB, make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"
CPU = torch.device("cpu")
BF16_ON = KernelPolicy(cpu_bf16=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    make_tiny_checkpoint(d, "qwen2")
    return d


def test_the_policy_follows_the_cpus_bf16_instructions(monkeypatch):
    from lora_mem.kernels import policy

    monkeypatch.setattr(policy, "cpu_bf16_instructions", lambda: ("avx512_bf16",))
    # a policy that leaves cpu_bf16 unsaid reads LORA_MEM_CPU_BF16 when a dtype is chosen, as command lines do
    # (the tests set it off), and not when it is built
    unsaid = KernelPolicy()
    assert unsaid.cpu_bf16 is None and not unsaid.bf16_on_cpu() and not KernelPolicy.from_env().cpu_bf16
    monkeypatch.delenv("LORA_MEM_CPU_BF16")
    assert unsaid.bf16_on_cpu() and KernelPolicy.from_env({}).cpu_bf16 is True
    assert unsaid.default_dtype(CPU) == torch.bfloat16 and unsaid.to_dict()["cpu_bf16"] is True
    assert not KernelPolicy.from_env({"LORA_MEM_CPU_BF16": "off"}).cpu_bf16
    assert not unsaid.bf16_on_cpu({"LORA_MEM_CPU_BF16": "off"})
    monkeypatch.setenv("LORA_MEM_CPU_BF16", "yes")
    unsaid_bad = KernelPolicy()  # built without reading the variable; choosing a dtype names it
    with pytest.raises(ValueError, match="LORA_MEM_CPU_BF16 must be one of auto, on, off, got 'yes'"):
        unsaid_bad.default_dtype(CPU)
    monkeypatch.delenv("LORA_MEM_CPU_BF16")
    monkeypatch.setattr(policy, "cpu_bf16_instructions", lambda: ())
    assert not unsaid.bf16_on_cpu() and unsaid.default_dtype(CPU) == torch.float32
    assert KernelPolicy.from_env({"LORA_MEM_CPU_BF16": " On"}).cpu_bf16  # forced on where it would be slow
    assert KernelPolicy(cpu_bf16=False).default_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="LORA_MEM_CPU_BF16"):
        KernelPolicy.from_env({"LORA_MEM_CPU_BF16": "yes"})
    assert KernelPolicy(cpu_bf16=False).to_dict()["cpu_bf16"] is False and BF16_ON.to_dict()["cpu_bf16"] is True

    ap = argparse.ArgumentParser()
    add_kernel_args(ap)
    assert KernelPolicy.from_args(ap.parse_args(["--cpu-bf16", "on"]), environ={"LORA_MEM_CPU_BF16": "off"}).cpu_bf16
    assert not KernelPolicy.from_args(ap.parse_args(["--cpu-bf16", "auto"]), environ={"LORA_MEM_CPU_BF16": "on"}).cpu_bf16
    with pytest.raises(SystemExit):
        ap.parse_args(["--cpu-bf16", "maybe"])


def test_the_instructions_are_torchs_cpuinfo(monkeypatch):
    real_cpu_bf16_instructions.cache_clear()
    try:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
        assert real_cpu_bf16_instructions() == ("amx",)
        real_cpu_bf16_instructions.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert real_cpu_bf16_instructions() == ("avx512_bf16",)
    finally:
        real_cpu_bf16_instructions.cache_clear()


def test_the_model_dtype_follows_the_policy_unless_one_is_asked_for(tiny_dir):
    assert load_model(str(tiny_dir), policy=BF16_ON).model.lm_head.weight.dtype == torch.bfloat16
    fp32 = load_model(str(tiny_dir), dtype="float32", policy=BF16_ON).model
    default = load_model(str(tiny_dir)).model  # the tests' CPU has no bf16 instructions (conftest)
    assert fp32.lm_head.weight.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), default.state_dict().values()))


def train_once(tiny_dir, policy: KernelPolicy, monkeypatch):
    """A seeded adapter trained for a few steps; returns (model, result, optimizer, gradient dtypes seen)."""
    lm = load_model(str(tiny_dir), policy=policy)
    inject_lora(lm.model, LoRAConfig(rank=4), generator=torch.Generator().manual_seed(0))
    grads = []
    for p in lora_parameters(lm.model):
        p.register_hook(lambda g: grads.append(g.dtype))
    made = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(real_adamw(*a, **k)) or made[-1])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (6, 48), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((6, 1), -100)], dim=1)
    result = train_lora(lm.model, ids, labels, TrainConfig(epochs=2, batch_size=2, lr=5e-3))
    monkeypatch.setattr(torch.optim, "AdamW", real_adamw)
    return lm, result, made[0], grads


def test_mixed_training_keeps_the_adapter_and_optimizer_in_fp32(tiny_dir, monkeypatch):
    mixed, mixed_result, optimizer, grads = train_once(tiny_dir, BF16_ON, monkeypatch)
    assert mixed.model.lm_head.weight.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.bfloat16 for m in lora_modules(mixed.model).values())
    assert {p.dtype for p in lora_parameters(mixed.model)} == {torch.float32}
    assert grads and set(grads) == {torch.float32}
    state = [s for s in optimizer.state.values()]
    assert state and {s["exp_avg"].dtype for s in state} | {s["exp_avg_sq"].dtype for s in state} == {torch.float32}
    assert optimizer.defaults["fused"] is True  # one pass over all the adapter's tensors, over a 16-bit model

    ref, ref_result, ref_optimizer, _ = train_once(tiny_dir, KernelPolicy(), monkeypatch)
    assert ref.model.lm_head.weight.dtype == torch.float32
    assert not ref_optimizer.defaults["fused"]  # fp32 keeps torch's per-tensor loop, and its numbers
    # bf16 products change the numbers (it ran in bf16), by little: the loss curve follows fp32's (here within
    # 1e-4, where training moves it by 0.04) and so does every layer's update (here within 5%; an untrained or
    # wrongly trained adapter is off by about 100%)
    losses, ref_losses = torch.tensor(mixed_result.losses), torch.tensor(ref_result.losses)
    assert not torch.equal(losses, ref_losses)
    assert (losses - ref_losses).abs().max() < 3e-3
    assert ref_losses[-1] < ref_losses[0] - 0.02 and losses[-1] < losses[0] - 0.02  # both learned
    with torch.no_grad():
        for name, m in lora_modules(mixed.model).items():
            ref_delta = lora_modules(ref.model)[name].delta_weight()
            assert (m.delta_weight() - ref_delta).norm() < 0.2 * ref_delta.norm(), name


def test_the_loss_reduces_in_fp32():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(40, 16, generator=g), torch.randn(VOCAB, 16, generator=g)
    targets = torch.randint(0, VOCAB, (40,), generator=g)
    ref = chunked_lm_loss(hidden, weight, targets, chunk_size=7)
    mixed = chunked_lm_loss(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=7)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, ref, rtol=2e-2, atol=0)


def test_mixed_answering_keeps_the_adapter_in_fp32(tiny_dir, monkeypatch):
    mixed, _, _, _ = train_once(tiny_dir, BF16_ON, monkeypatch)
    ref = load_model(str(tiny_dir))
    inject_lora(ref.model, LoRAConfig(rank=4))
    ref.model.load_state_dict({k: v.float() for k, v in mixed.model.state_dict().items()})
    assert mixed.model.new_kv_caches(1, 4)[0].k.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 12, 4)]
    with torch.no_grad():
        for p in prompts:
            logits = mixed.model(torch.tensor([p])).float()
            ref_logits = ref.model(torch.tensor([p]))
            with lora_disabled(ref.model):
                adapter_effect = (ref_logits - ref.model(torch.tensor([p]))).abs().max()
            # bf16's error (here 0.003) is small beside what the adapter changes (here 0.3)
            assert (logits - ref_logits).abs().max() < 0.05 * adapter_effect
    answers = generate(mixed.model, prompts, 5, [], pad_id=0)
    assert [len(a) for a in answers] == [5, 5, 5]
    assert {p.dtype for p in lora_parameters(mixed.model)} == {torch.float32}  # answered unmerged, A/B as trained
    assert not any(m.merged for m in lora_modules(mixed.model).values())


def run_locomo(ckpt, out, *extra):
    return locomo.main(["--model", str(ckpt), "--data", str(FIXTURE), "--out", str(out), "--quiet",
                        "--conversations", "tiny-1", "--max-questions", "3", "--epochs", "1", "--seq-len", "64",
                        "--batch-size", "2", "--max-new-tokens", "5", "--rank", "4", *extra])


def test_an_explicit_float32_runs_the_fp32_path_bit_for_bit(tiny_dir, tmp_path):
    """bench.locomo with --dtype float32 under a policy that turns bf16 on: the losses, adapter and predictions
    of the fp32 path, exactly; without --dtype that policy runs bf16, and every run records what it ran."""
    fp32 = run_locomo(tiny_dir, tmp_path / "fp32")
    forced = run_locomo(tiny_dir, tmp_path / "forced", "--dtype", "float32", "--cpu-bf16", "on")
    for name in ("predictions.jsonl",):
        assert read_jsonl(tmp_path / "forced" / name) == read_jsonl(tmp_path / "fp32" / name)
    train = [json.loads((tmp_path / run / "conversations" / "tiny-1" / "train.json").read_text())
             for run in ("fp32", "forced")]
    assert train[0]["losses"] == train[1]["losses"] and train[0]["epochs_loss"] == train[1]["epochs_loss"]
    adapter = "adapters/tiny-1/adapter_model.safetensors"
    assert (tmp_path / "fp32" / adapter).read_bytes() == (tmp_path / "forced" / adapter).read_bytes()
    assert fp32["dtype"] == forced["dtype"] == "float32"
    assert fp32["kernel_policy"]["cpu_bf16"] is False and forced["kernel_policy"]["cpu_bf16"] is True

    mixed = run_locomo(tiny_dir, tmp_path / "mixed", "--cpu-bf16", "on")
    assert mixed["dtype"] == "bfloat16" and mixed["kernel_policy"]["cpu_bf16"] is True
    settings = json.loads((tmp_path / "mixed" / "run_config.json").read_text())
    assert settings["kernel_policy"]["cpu_bf16"] is True
    with pytest.raises(RunConfigMismatch, match="kernel_policy"):  # a resume in another dtype is refused
        run_locomo(tiny_dir, tmp_path / "mixed", "--cpu-bf16", "off")


def test_a_run_recorded_before_the_bf16_policy_resumes_in_fp32(tmp_path):
    old = {"method": "lora", "kernel_policy": {"kernels": "auto", "fused_ops": False, "cpu_attention": "blocks",
                                                "tf32": False}}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    keys, added = ("method", "kernel_policy"), {"kernel_policy": FIELDS_ADDED_LATER}
    now = {"method": "lora", "kernel_policy": KernelPolicy(cpu_bf16=False).to_dict()}
    check_or_write_run_config(tmp_path, now, keys, added, write=False)
    bf16 = {"method": "lora", "kernel_policy": KernelPolicy(cpu_bf16=True).to_dict()}
    with pytest.raises(RunConfigMismatch, match="kernel_policy"):
        check_or_write_run_config(tmp_path, bf16, keys, added, write=False)
    assert locomo.SETTINGS_ADDED_LATER["kernel_policy"] == FIELDS_ADDED_LATER
