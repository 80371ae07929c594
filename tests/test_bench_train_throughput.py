"""bench.perf.train_throughput's profile: ops grouped by kind, groups adding up to the total, on a tiny model;
and the benchmark end to end (one side, --profile) writing its profile section."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from bench.perf.train_throughput import (
    FACT_ANSWER,
    FACT_PREFIX,
    FACT_WINDOW,
    PROFILE_GROUPS,
    input_ids,
    measure_side,
    build_lora_mem,
    build_peft,
    classify_op,
    main,
    next_token_targets,
    profile_ops,
)
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_checkpoint(d, "qwen2")
    return d


@pytest.mark.parametrize("names, group", [
    (["aten::mm", "aten::linear", "train_step"], "gemm"),
    (["aten::t", "aten::linear"], "gemm"),  # what runs inside a linear counts as the linear
    (["aten::mm", "MmBackward0", "autograd::engine::evaluate_function: MmBackward0"], "gemm"),
    (["aten::mul_", "Optimizer.step#AdamW.step", "train_step"], "optimizer"),
    (["aten::_foreach_addcdiv_"], "optimizer"),
    (["aten::bmm", "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention"], "attention"),
    (["aten::_scaled_dot_product_flash_attention_for_cpu_backward"], "attention"),
    (["aten::logsumexp", "chunked_lm_loss"], "loss"),
    (["aten::sub", "chunked_lm_loss"], "loss"),
    (["aten::mm", "chunked_lm_loss"], "gemm"),  # the LM head's matmul in the loss is a GEMM
    (["autograd::engine::evaluate_function: NllLossBackward0"], "loss"),
    (["aten::_log_softmax", "aten::log_softmax", "aten::cross_entropy_loss"], "loss"),
    (["aten::rsqrt", "train_step"], "elementwise"),
    (["autograd::engine::evaluate_function: SiluBackward0"], "elementwise"),
    (["aten::copy_", "aten::_to_copy", "aten::to"], "elementwise"),
    (["aten::embedding", "train_step"], "other"),
    (["train_step"], "other"),
    (["autograd::engine::evaluate_function: torch::autograd::AccumulateGrad"], "other"),
    (["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "aten::mm"], "gemm"),
    (["_fused_lora_matmul_kernel", "train_step"], "gemm"),
    (["_rms_norm_fwd_kernel", "train_step"], "elementwise"),  # fused Triton kernels of kernels/
    (["_swiglu_bwd_kernel", "autograd::engine::evaluate_function: SwiGLUFunctionBackward"], "elementwise"),
    (["autograd::engine::evaluate_function: RotaryFunctionBackward"], "elementwise"),
    (["void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "aten::add"],
     "elementwise"),
])
def test_classify_op(names, group):
    assert classify_op(names) == group


def test_profile_of_training_steps(ckpt):
    torch.manual_seed(0)
    params, step = build_lora_mem(str(ckpt), torch.float32, torch.device("cpu"), rank=4)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 320, (1, 48))
    y = torch.cat([x[:, 1:], torch.full((1, 1), -100)], dim=1)

    def one():
        step(x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one()  # warm-up
    p = profile_ops(one, 2, torch.device("cpu"), top=15, label="train_step")
    assert p["steps"] == 2 and p["activities"] == ["cpu"] and p["wall_seconds"] > 0
    groups = p["groups_cpu"]
    assert list(groups) == list(PROFILE_GROUPS)
    assert sum(g["percent"] for g in groups.values()) == pytest.approx(100, abs=0.1)
    assert sum(g["ms"] for g in groups.values()) == pytest.approx(p["self_cpu_total_ms"], rel=1e-3)
    for g in PROFILE_GROUPS:  # a LoRA training step has every kind of work
        assert groups[g]["ms"] > 0, g
    top = p["top_cpu"]
    assert len(top) == 15
    assert [r["self_ms"] for r in top] == sorted((r["self_ms"] for r in top), reverse=True)
    assert sum(r["percent"] for r in top) <= 100.01 and all(r["group"] in PROFILE_GROUPS for r in top)
    assert "groups_cuda" not in p
    assert any(r["op"] == "aten::mm" and r["group"] == "gemm" for r in top)


def test_train_throughput_with_profile_end_to_end(ckpt, tmp_path):
    out = tmp_path / "train.json"
    r = main(["--setup", "cpu", "--model", str(ckpt), "--seq-len", "32", "--batch-sizes", "1", "--rank", "4",
              "--steps", "1", "--warmup", "1", "--sides", "lora-mem", "--profile", "--profile-steps", "1",
              "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(r))
    row = saved["rows"][0]["lora-mem"]
    assert "error" not in row, row
    assert row["tokens_per_second"] > 0 and "profile" not in row  # moved to the top-level section
    (run,) = saved["profile"]["runs"]
    assert run["side"] == "lora-mem" and run["batch"] == 1 and run["steps"] == 1
    assert sum(g["percent"] for g in run["groups_cpu"].values()) == pytest.approx(100, abs=0.1)
    assert run["groups_cpu"]["optimizer"]["ms"] > 0 and run["groups_cpu"]["loss"]["ms"] > 0
    # The step's floor ran in the same invocation, and the side is reported against it.
    floor = saved["rows"][0]["floor"]
    assert "error" not in floor, floor
    assert floor["batch"] == 1 and floor["seq_len"] == 32 and floor["trained_positions"] == 31
    assert set(floor["groups"]) == {"base_gemm", "lora", "lm_head", "attention"}
    assert row["step_over_floor"] == pytest.approx(row["step_seconds_median"] / floor["floor_seconds"])
    assert "speedup_ceiling_vs_peft" not in saved["rows"][0]  # no peft side in this run


def test_no_floor_skips_it(ckpt, tmp_path):
    out = tmp_path / "train.json"
    main(["--setup", "cpu", "--model", str(ckpt), "--seq-len", "16", "--batch-sizes", "1", "--rank", "2",
          "--steps", "1", "--warmup", "0", "--sides", "lora-mem", "--no-floor", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert "floor" not in row and "step_over_floor" not in row["lora-mem"]


def lora_mem_with_nonzero_b(ckpt, **kwargs):
    """lora-mem's step (build_lora_mem, r=4) with a non-zero B, so that every LoRA gradient is non-zero."""
    torch.manual_seed(0)
    params, step = build_lora_mem(str(ckpt), torch.float32, torch.device("cpu"), rank=4, **kwargs)
    for p in params:
        if p.shape[1] == 4:  # the B matrices (out, r)
            torch.nn.init.normal_(p, std=0.1)
    return params, step


def test_full_logits_side_computes_the_same_loss_and_gradients(ckpt):
    """The profile's "before" side (all logits, then cross-entropy) trains exactly what the chunked loss does."""
    x = torch.randint(0, 320, (2, 40))
    y = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    results = []
    for full in (False, True):
        params, step = lora_mem_with_nonzero_b(ckpt, full_logits=full)
        loss = step(x, y)
        results.append((float(loss), [p.grad.clone() for p in params]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
        assert ga.abs().sum() > 0


def test_unknown_side_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--sides", "lora-mem,pfet"])
    assert "unknown --sides pfet" in capsys.readouterr().err


def test_answer_targets_train_the_same_loss_on_every_side(ckpt):
    """--targets answers: a quarter of the positions are targets, and lora-mem (chunked loss over those rows only),
    its full-logits side and transformers + peft (labels shifted inside HF) compute the same loss (B = 0 at init on
    both, so it is the base model's loss on those positions)."""
    x = torch.randint(0, 320, (2, 128), generator=torch.Generator().manual_seed(0))
    y = next_token_targets(x, "answers")
    labelled = y != -100
    assert labelled.sum() == 2 * (2 * 16 - 1)  # 16 of every 64, the last position has no next token
    assert torch.equal(y[labelled], torch.cat([x[:, 1:], x[:, :1]], dim=1)[labelled])
    assert torch.equal(next_token_targets(x)[:, :-1], x[:, 1:])
    losses = {}
    for side in ("lora-mem", "lora-mem-full-logits", "peft"):
        torch.manual_seed(0)
        build = build_peft if side == "peft" else build_lora_mem
        kwargs = {} if side == "peft" else {"full_logits": side == "lora-mem-full-logits"}
        _, step = build(str(ckpt), torch.float32, torch.device("cpu"), rank=4, **kwargs)
        losses[side] = float(step(x, y))
    assert losses["lora-mem"] == pytest.approx(losses["peft"], rel=1e-5)
    assert losses["lora-mem-full-logits"] == pytest.approx(losses["peft"], rel=1e-5)
    all_targets_loss = float(build_lora_mem(str(ckpt), torch.float32, torch.device("cpu"), rank=4)[1](
        x, next_token_targets(x)))
    assert all_targets_loss != pytest.approx(losses["lora-mem"], rel=1e-5)  # the targets did change what is trained
    with pytest.raises(ValueError, match="unknown targets"):
        next_token_targets(x, "some")


def test_sides_train_on_the_same_ids(ckpt):
    """Building a side draws its LoRA init from torch's global generator (differently for lora-mem and peft); the
    token ids come from their own generator, so both sides' first loss (before any update, B = 0: the base
    model's) is the same number."""
    first = {side: measure_side(side, str(ckpt), "float32", "cpu", seq_len=24, batch=2, rank=4, steps=1, warmup=1)
             for side in ("lora-mem", "peft")}
    assert first["lora-mem"]["first_loss"] == pytest.approx(first["peft"]["first_loss"], rel=1e-5)
    assert torch.equal(input_ids(2, 24, 320, torch.device("cpu")), input_ids(2, 24, 320, torch.device("cpu")))
    torch.manual_seed(123)  # the global generator's state does not matter
    a = input_ids(2, 24, 320, torch.device("cpu"))
    torch.manual_seed(7)
    assert torch.equal(a, input_ids(2, 24, 320, torch.device("cpu")))


def test_interleaved_timing_end_to_end(ckpt, tmp_path):
    """--interleave: the sides are timed in turns in one process (a step each per round) with the floor measured
    every round; each side's peak memory still comes from a process of its own; the speed-ups are paired
    per-round ratios, and the sdpa side's first loss is lora-mem's (same function, other attention kernel)."""
    out = tmp_path / "train.json"
    r = main(["--setup", "cpu", "--model", str(ckpt), "--seq-len", "24", "--batch-sizes", "1", "--rank", "2",
              "--steps", "3", "--warmup", "1", "--sides", "lora-mem,lora-mem-sdpa,peft", "--interleave",
              "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(r)) and saved["timing"] == "interleaved"
    row = saved["rows"][0]
    for side in ("lora-mem", "lora-mem-sdpa", "peft"):
        assert "error" not in row[side], row[side]
        assert len(row[side]["step_seconds_all"]) == 3 and row[side]["peak_memory_bytes"] > 0
        assert row[side]["step_seconds_alone"] > 0
        assert row[side]["step_seconds_median"] == pytest.approx(statistics.median(row[side]["step_seconds_all"]))
    a, b = row["lora-mem"]["step_seconds_all"], row["peft"]["step_seconds_all"]
    assert row["speedup_rounds"] == pytest.approx([tb / ta for ta, tb in zip(a, b)])
    assert row["speedup_tokens_per_second"] == pytest.approx(statistics.median(row["speedup_rounds"]))
    assert row["speedup_ratio_of_medians"] == pytest.approx(statistics.median(b) / statistics.median(a))
    assert row["lora-mem"]["first_loss"] == pytest.approx(row["lora-mem-sdpa"]["first_loss"], rel=1e-6)
    assert row["lora-mem"]["first_loss"] == pytest.approx(row["peft"]["first_loss"], rel=1e-5)
    assert len(row["floor"]["floor_seconds_all"]) == 3 and row["floor"]["repeats"] == 1
    assert row["floor"]["floor_seconds"] == statistics.median(row["floor"]["floor_seconds_all"])
    assert "speedup_vs_sdpa" in row and "speedup_ceiling_vs_peft" in row


def test_sdpa_side_trains_the_same_step(ckpt):
    """lora-mem-sdpa is lora-mem with PyTorch's SDPA in place of the CPU block-causal attention: the same loss and
    LoRA gradients up to rounding, and the attention it ran is the one it names."""
    from lora_mem.kernels import block_causal_attention as bca

    x = torch.randint(0, 320, (1, 260), generator=torch.Generator().manual_seed(3))  # >= BLOCK_CAUSAL_MIN_T
    y = next_token_targets(x)
    results = {}
    for attention in (None, "sdpa"):
        params, step = lora_mem_with_nonzero_b(ckpt, attention=attention)
        calls = []
        real = bca.BlockCausalAttention.apply
        bca.BlockCausalAttention.apply = lambda *a: calls.append(1) or real(*a)
        try:
            loss = step(x, y)
        finally:
            bca.BlockCausalAttention.apply = real
        results[attention] = (float(loss), [p.grad.clone() for p in params], len(calls))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results[None], results["sdpa"]
    assert calls_a > 0 and calls_b == 0
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_interleaved_rounds_rotate_the_order(ckpt, monkeypatch):
    """Round r starts with side r mod n, so whatever a round's first step pays falls on every side alike."""
    import bench.perf.train_throughput as tt

    order = []

    def fake_side(side, *args):
        def one():
            order.append(side)
            return torch.tensor(1.0)
        return [torch.zeros(1)], one

    monkeypatch.setattr(tt, "prepare_side", fake_side)
    r = tt.measure_interleaved(["a", "b", "c"], str(ckpt), "float32", "cpu", seq_len=8, batch=1, rank=2, steps=4,
                               warmup=1)
    assert order == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [len(r["sides"][s]["step_seconds_all"]) for s in "abc"] == [4, 4, 4]


def test_facts_workload_is_one_fact_windows_with_a_shared_prefix():
    x = input_ids(3, FACT_WINDOW, 320, torch.device("cpu"), "facts")
    assert (x[:, :FACT_PREFIX] == x[0, :FACT_PREFIX]).all()
    assert len(set(x[:, FACT_PREFIX].tolist())) == 3  # every row its own from there
    y = next_token_targets(x, "facts")
    labelled = (y != -100).nonzero()[:, 1].unique().tolist()
    assert labelled == list(range(FACT_WINDOW - 1 - FACT_ANSWER, FACT_WINDOW - 1))
    assert torch.equal(y[:, labelled], x[:, [i + 1 for i in labelled]])
    with pytest.raises(ValueError, match="above its 24-token shared prefix"):
        input_ids(2, FACT_PREFIX, 320, torch.device("cpu"), "facts")


@pytest.mark.slow
def test_facts_workload_matches_the_capacity_windows_of_the_default_model():
    """FACT_PREFIX / FACT_WINDOW / FACT_ANSWER are what bench.capacity's one-fact windows of the default model are in
    micro-batches of two (its cpu preset): the median shared prefix and trimmed length, the mean answer tokens."""
    from bench.capacity import generate_facts, training_windows
    from lora_mem.lora_core.train import shared_prefix_len, trim_unlabelled_tail
    from lora_mem.model.loader import load_model

    ids, targets = training_windows(generate_facts(400, seed=0), load_model("smollm2-135m-instruct"), "qa", 128)
    pairs = [trim_unlabelled_tail(ids[i:i + 2], targets[i:i + 2]) for i in range(0, len(ids), 2)]
    assert statistics.median(shared_prefix_len(x) for x, _ in pairs) == FACT_PREFIX
    assert statistics.median(x.shape[1] for x, _ in pairs) == FACT_WINDOW
    assert round(float((targets != -100).sum()) / len(ids)) == FACT_ANSWER


def test_unshared_side_trains_the_same_step_on_facts(ckpt):
    """lora-mem computes the rows' shared prefix once, lora-mem-unshared every row's copy: the same loss and LoRA
    gradients up to rounding."""
    x = input_ids(4, FACT_WINDOW, 320, torch.device("cpu"), "facts")
    y = next_token_targets(x, "facts")
    results = {}
    for share in (True, False):
        params, step = lora_mem_with_nonzero_b(ckpt, share_prefix=share)
        results[share] = (float(step(x, y)), [p.grad.clone() for p in params])
    (loss_a, grads_a), (loss_b, grads_b) = results[True], results[False]
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        assert ga.abs().sum() > 0
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_facts_workload_end_to_end(ckpt, tmp_path):
    out = tmp_path / "train_facts.json"
    main(["--setup", "cpu", "--model", str(ckpt), "--targets", "facts", "--batch-sizes", "2", "--rank", "2",
          "--steps", "2", "--warmup", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["seq_len"] == FACT_WINDOW and saved["trained_positions"] == "facts"
    row = saved["rows"][0]
    assert "floor" not in row  # it would count every row's positions
    assert {"lora-mem", "lora-mem-unshared", "peft"} <= row.keys() and "lora-mem-sdpa" not in row
    for side in ("lora-mem", "lora-mem-unshared", "peft"):
        assert "error" not in row[side], row[side]
    assert "speedup_vs_unshared" in row and len(row["speedup_vs_unshared_rounds"]) == 2
    assert row["lora-mem"]["first_loss"] == pytest.approx(row["peft"]["first_loss"], rel=1e-5)
    assert row["lora-mem"]["first_loss"] == pytest.approx(row["lora-mem-unshared"]["first_loss"], rel=1e-5)
