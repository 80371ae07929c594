"""The training loop: chunked LM-head loss against F.cross_entropy, the LR schedule, LM windows, and `train_lora` on a
tiny random model (loss falls, determinism, frozen base, non-finite loss, gradient accumulation weighted by labelled
tokens, the caller's model mode and random generators left as they were)."""

from __future__ import annotations

import math
import os

import torch

# See tests/test_lora.py: without CUDA the Triton interpreter must be on before lora_core imports triton, or
# tests/test_lora_kernels.py, collected later in the same process, cannot run its kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lora_mem.lora_core.train as train_module  # noqa: E402
from lora_mem.kernels.policy import KernelPolicy  # noqa: E402
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules, lora_parameters  # noqa: E402
from lora_mem.lora_core.train import (  # noqa: E402
    IGNORE_INDEX,
    SHARE_PREFIX_MIN_SAVING,
    TrainConfig,
    backward_step,
    chunked_lm_loss,
    hidden_states,
    lr_at,
    make_lm_windows,
    shared_prefix_len,
    train_lora,
    trim_unlabelled_tail,
)
from lora_mem.model.loader import load_model  # noqa: E402
from tests.tiny_models import VOCAB, make_tiny_checkpoint  # noqa: E402


# Every model here takes the PyTorch reference path (also on a GPU machine).
REFERENCE = KernelPolicy(kernels="reference")


# ---------------------------------------------------------------------------------------------------------------------
# chunked_lm_loss
# ---------------------------------------------------------------------------------------------------------------------

DTYPES = [
    pytest.param(torch.float64, 1e-12, 1e-10, id="fp64"),
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
]


def loss_inputs(dtype, batch=3, length=7, channels=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, channels, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, channels, generator=g, dtype=torch.float64) / 2).to(dtype)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    targets[torch.rand(batch, length, generator=g) < 0.3] = IGNORE_INDEX
    targets.view(-1)[4:8] = IGNORE_INDEX  # a whole chunk of 4 with nothing to predict
    return hidden, weight, targets


def reference_loss(hidden, weight, targets):
    return F.cross_entropy(hidden.reshape(-1, hidden.shape[-1]) @ weight.T, targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1024])  # N = 21 rows: 5 does not divide it
def test_chunked_loss_matches_cross_entropy(dtype, atol, rtol, chunk_size):
    hidden, weight, targets = loss_inputs(dtype)
    assert (targets != IGNORE_INDEX).sum() < targets.numel()
    h_ours = hidden.clone().requires_grad_(True)
    h_ref = hidden.clone().requires_grad_(True)
    ours = chunked_lm_loss(h_ours, weight, targets, chunk_size=chunk_size)
    ref = reference_loss(h_ref, weight, targets)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    (ours * 3.7).backward()  # an upstream gradient other than 1
    (ref * 3.7).backward()
    assert h_ours.grad.dtype == dtype and h_ours.grad.shape == hidden.shape
    assert h_ours.grad.abs().max() > 1e-3
    torch.testing.assert_close(h_ours.grad, h_ref.grad, atol=atol, rtol=rtol)
    # rows with an ignored target get no gradient
    assert torch.count_nonzero(h_ours.grad[targets == IGNORE_INDEX]) == 0


# 600 rows: the 16-bit path's own chunks; the worst of many rows is further off (products of 32 bf16 terms)
@pytest.mark.parametrize("length,chunk_size,worst_row", [(8, 5, 5e-2), (300, 1024, 1e-1)])
@pytest.mark.parametrize("margin", [0.0, 12.0])  # 12: the target's probability ~0.9999 (a well-fitted token)
def test_chunked_loss_bfloat16_gradient(margin, length, chunk_size, worst_row):
    """bf16 hidden states and head: loss and gradient within bf16 rounding of an fp64 reference on the same
    inputs, also when softmax - onehot cancels (p_target near 1), where rounding before the subtraction would
    leave nothing of the gradient."""
    hidden, weight, targets = loss_inputs(torch.float64, batch=2, length=length, channels=32, vocab=64)
    labelled = targets != IGNORE_INDEX
    with torch.no_grad():  # push each labelled row's logit of its target `margin` above the others
        w_t = weight[targets.clamp(min=0)]
        hidden += margin * w_t / (w_t * w_t).sum(-1, keepdim=True) * labelled[..., None]
    h16, w16 = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    h_ref = h16.double().requires_grad_(True)
    ref = reference_loss(h_ref, w16.double(), targets)
    ref.backward()
    h_ours = h16.clone().requires_grad_(True)
    ours = chunked_lm_loss(h_ours, w16, targets, chunk_size=chunk_size)
    ours.backward()
    assert ours.dtype == torch.float32 and h_ours.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-2, atol=1e-3)
    g, g_ref = h_ours.grad.double(), h_ref.grad
    assert g_ref[labelled].abs().max() > 0
    rel = (g - g_ref)[labelled].norm(dim=-1) / g_ref[labelled].norm(dim=-1)
    assert rel.max() < worst_row, rel.max()  # bf16 products round to 2^-8; a cancelling formula is off by ~1
    assert rel.median() < 2e-2, rel.median()


def test_chunked_loss_gradcheck_float64():
    hidden, weight, targets = loss_inputs(torch.float64, batch=2, length=5, channels=6, vocab=9)
    hidden.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: chunked_lm_loss(h, weight, targets, chunk_size=3), (hidden,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_loss_all_ignored(dtype):
    hidden, weight, targets = loss_inputs(dtype)
    targets.fill_(IGNORE_INDEX)
    hidden.requires_grad_(True)
    loss = chunked_lm_loss(hidden, weight, targets, chunk_size=4)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.count_nonzero(hidden.grad) == 0


def test_chunked_loss_without_grad():
    hidden, weight, targets = loss_inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(hidden, weight, targets, 4), reference_loss(hidden, weight, targets))


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------------


def test_lr_warmup_then_cosine():
    cfg = TrainConfig(lr=2e-3, warmup_ratio=0.1, min_lr_ratio=0.1)
    total = 100
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    warmup = 10
    # linear rise: lr * (s + 1) / warmup, reaching the peak at the last warm-up step
    for s in range(warmup):
        assert lrs[s] == pytest.approx(cfg.lr * (s + 1) / warmup, rel=1e-12)
    assert max(lrs) == pytest.approx(cfg.lr, rel=1e-12) and lrs[warmup - 1] == pytest.approx(cfg.lr, rel=1e-12)
    # cosine: non-increasing, half-way between peak and floor at half the decay, at the floor at the end
    decay = lrs[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(cfg.lr * (0.1 + 0.9 * 0.5), rel=1e-12)
    assert lr_at(total, total, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-12)
    assert cfg.lr * cfg.min_lr_ratio < lrs[-1] < cfg.lr * cfg.min_lr_ratio * 1.01
    assert lr_at(total + 50, total, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-12)
    assert min(lrs) >= cfg.lr * cfg.min_lr_ratio


def test_lr_without_warmup_starts_at_peak():
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.0, min_lr_ratio=0.0)
    assert lr_at(0, 10, cfg) == pytest.approx(1e-3)
    assert lr_at(10, 10, cfg) == pytest.approx(0.0, abs=1e-15)
    # a warm-up ratio that rounds to less than a step still warms up for one step
    assert lr_at(0, 3, TrainConfig(lr=1e-3, warmup_ratio=0.01)) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# LM windows
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [0, 1, 2, 5, 23, 24, 25, 47, 48, 49, 100])
def test_lm_windows_cover_every_target_once(n_tokens):
    seq_len, pad = 24, 0
    tokens = list(range(1, n_tokens + 1))  # distinct values: a target's value is its position
    ids, labels = make_lm_windows(tokens, seq_len, pad)
    n_windows = math.ceil((n_tokens - 1) / (seq_len - 1)) if n_tokens >= 2 else 0
    assert ids.shape == labels.shape == (n_windows, seq_len)
    assert ids.dtype == labels.dtype == torch.long
    supervised = labels[labels != IGNORE_INDEX]
    assert sorted(supervised.tolist()) == tokens[1:]  # every token after the first, exactly once
    for i in range(n_windows):
        valid = labels[i] != IGNORE_INDEX
        n_valid = int(valid.sum())
        assert valid[:n_valid].all() and not valid[n_valid:].any()  # targets first, then padding
        assert labels[i, -1] == IGNORE_INDEX  # the last position has no next token inside the window
        # each target is the next input token: labels are the inputs shifted by one
        assert torch.equal(labels[i, :n_valid], ids[i, 1:n_valid + 1])
        if i < n_windows - 1:
            assert n_valid == seq_len - 1
            assert ids[i + 1, 0] == ids[i, -1]  # one token of overlap
        else:
            assert (ids[i, n_valid + 1:] == pad).all()  # the last window is right-padded
    if n_windows:
        assert ids[0, 0] == tokens[0]


def test_lm_windows_rejects_short_seq_len():
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        make_lm_windows([1, 2, 3], 1, 0)


# ---------------------------------------------------------------------------------------------------------------------
# train_lora on a tiny model
# ---------------------------------------------------------------------------------------------------------------------

SEQ_LEN = 24


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    make_tiny_checkpoint(d, "qwen2")
    return d


def tiny_lora_model(ckpt_dir, rank=8, dropout=0.0, init_seed=0):
    """The tiny Qwen2 with LoRA. Its LM head is scaled up: with an init std of 0.02 and RMS-normalised hidden states
    the logits of the random checkpoint cannot move by more than about one, so no adapter could make the loss fall.
    """
    model = load_model(str(ckpt_dir), policy=REFERENCE).model
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    inject_lora(model, LoRAConfig(rank=rank, dropout=dropout), generator=torch.Generator().manual_seed(init_seed))
    return model


def repeated_text(n_tokens, period=12, seed=0):
    phrase = torch.randint(4, VOCAB, (period,), generator=torch.Generator().manual_seed(seed)).tolist()
    return (phrase * (n_tokens // period + 1))[:n_tokens]


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def test_train_loss_falls_and_base_is_frozen(qwen_dir):
    model = tiny_lora_model(qwen_dir)
    ids, labels = make_lm_windows(repeated_text(100), SEQ_LEN, pad_id=0)
    assert ids.shape[0] == 5
    before = base_state(model)
    cfg = TrainConfig(epochs=6, lr=1e-2, batch_size=3)
    r = train_lora(model, ids, labels, cfg)
    assert r.error is None
    steps = math.ceil(5 / 3) * cfg.epochs
    assert len(r.losses) == len(r.lrs) == steps and len(r.epochs_loss) == cfg.epochs
    # tokens processed: the windows, less the unlabelled tail a micro-batch ends with (trim_unlabelled_tail)
    unlabelled = int((labels == IGNORE_INDEX).sum())
    assert (ids.numel() - unlabelled) * cfg.epochs <= r.tokens <= ids.numel() * cfg.epochs and r.seconds > 0
    assert all(math.isfinite(x) for x in r.losses)
    assert r.losses[-1] < 0.2 * r.losses[0], r.losses
    assert r.epochs_loss[-1] < r.epochs_loss[0]
    after = base_state(model)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert any(torch.count_nonzero(m.lora_B) for m in lora_modules(model).values())


def test_trimming_the_unlabelled_tail_changes_no_loss_or_gradient(qwen_dir):
    model = tiny_lora_model(qwen_dir)
    for m in lora_modules(model).values():  # a non-zero update, so every LoRA gradient is exercised
        torch.nn.init.normal_(m.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(4, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:9] = ids[0, 4:10]  # a chat-like window: targets on a span, then padding
    labels[1, 5:14] = ids[1, 6:15]
    x, y = trim_unlabelled_tail(ids, labels)
    assert x.shape == y.shape == (2, 14) and torch.equal(x, ids[:, :14])
    grads = []
    for inputs, targets in ((ids, labels), (x, y)):
        loss = chunked_lm_loss(model.model(inputs), model.lm_head.weight, targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (full_loss, full_grads), (trimmed_loss, trimmed_grads) = grads
    torch.testing.assert_close(trimmed_loss, full_loss)
    assert full_grads.keys() == trimmed_grads.keys() and len(full_grads) > 0
    for n in full_grads:
        torch.testing.assert_close(trimmed_grads[n], full_grads[n], atol=1e-6, rtol=1e-5)
    # nothing labelled: one position is kept (a valid, empty loss)
    x, y = trim_unlabelled_tail(ids, torch.full_like(ids, IGNORE_INDEX))
    assert x.shape == (2, 1)


def test_train_is_deterministic_for_a_seed(qwen_dir):
    ids, labels = make_lm_windows(repeated_text(100), SEQ_LEN, pad_id=0)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=2, seed=3)
    runs = []
    for seed in (3, 3, 4):
        model = tiny_lora_model(qwen_dir, dropout=0.1)  # dropout draws random masks: the seed must cover them too
        torch.manual_seed(1000 + len(runs))  # whatever state the caller left the global generator in
        r = train_lora(model, ids, labels, TrainConfig(**{**cfg.to_dict(), "seed": seed}))
        assert r.error is None
        runs.append((r.losses, lora_state(model)))
    (l1, w1), (l2, w2), (l3, _) = runs
    assert l1 == l2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert l1 != l3  # another seed, another order: the comparison above could fail


def test_nan_weight_stops_training_without_raising(qwen_dir):
    model = tiny_lora_model(qwen_dir)
    with torch.no_grad():
        # In an MLP's B, which writes straight into the residual stream: B starts at zero, and whether NaN * 0 stays
        # NaN through a GEMM, or a NaN query through SDPA's CPU kernels, depends on the kernel chosen for the shape.
        mlp = [m for name, m in lora_modules(model).items() if name.endswith("mlp.down_proj")]
        mlp[0].lora_B[0, 0] = float("nan")
    ids, labels = make_lm_windows(repeated_text(60), SEQ_LEN, pad_id=0)
    r = train_lora(model, ids, labels, TrainConfig(epochs=2, lr=1e-2, batch_size=1))
    assert r.error is not None and "non-finite loss" in r.error and "step 0" in r.error
    assert r.losses == []
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_nan_loss_mid_training_stops_at_that_step(qwen_dir, monkeypatch):
    model = tiny_lora_model(qwen_dir)
    ids, labels = make_lm_windows(repeated_text(100), SEQ_LEN, pad_id=0)
    calls = []
    real = train_module.chunked_lm_loss

    def nan_on_third_call(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "chunked_lm_loss", nan_on_third_call)
    r = train_lora(model, ids, labels, TrainConfig(epochs=3, lr=1e-2, batch_size=5))  # one micro-batch per step
    assert r.error is not None and "step 2" in r.error and "epoch" in r.error
    assert len(r.losses) == 2 and all(math.isfinite(x) for x in r.losses)
    assert len(calls) == 3


def test_grad_accumulation_matches_a_larger_batch(qwen_dir, monkeypatch):
    """batch 2 x accumulation 1 and batch 1 x accumulation 2 see the same two windows in the first step (same seed,
    same order) and, with full windows and no dropout, must form the same gradient and the same update."""
    ids, labels = make_lm_windows(repeated_text(1 + 2 * (SEQ_LEN - 1)), SEQ_LEN, pad_id=0)
    assert ids.shape[0] == 2 and (labels[:, :-1] != IGNORE_INDEX).all()  # equal token counts per window

    captured = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def capturing_clip(params, *args, **kwargs):
        params = list(params)
        captured.append([p.grad.clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capturing_clip)
    results = []
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        model = tiny_lora_model(qwen_dir)
        with torch.no_grad():  # a non-zero B, so that A gets a gradient in the first step too
            for p in lora_parameters(model)[1::2]:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        r = train_lora(model, ids, labels, TrainConfig(epochs=1, lr=1e-2, batch_size=batch_size,
                                                       grad_accum=grad_accum))
        assert r.error is None and len(r.losses) == 1
        results.append((r.losses[0], captured[-1], lora_state(model)))
    assert len(captured) == 2
    (loss_a, grads_a, w_a), (loss_b, grads_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        assert ga.abs().max() > 1e-6
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4 * ga.abs().max().item())
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=0, atol=1e-5)  # Adam moves each by ~lr = 1e-2


def unequal_windows(seed=5):
    """Three windows with 18, 3 and 4 labelled positions."""
    ids = torch.randint(4, VOCAB, (3, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (start, end) in enumerate(((2, 20), (5, 8), (10, 14))):
        labels[row, start:end] = ids[row, start + 1:end + 1]
    return ids, labels


def test_grad_accumulation_weights_micro_batches_by_labelled_tokens(qwen_dir):
    """Micro-batches holding different numbers of labelled tokens accumulate the loss and gradient of one batch
    holding them all: the mean over every labelled token of the step (fp64: only the order of the sums differs)."""
    model = with_nonzero_lora_b(tiny_lora_model(qwen_dir)).double()
    model.train()
    ids, labels = unequal_windows()
    cfg = TrainConfig(share_prefix=False)

    def loss_and_grads(micro_batches):
        loss, tokens, _ = backward_step(model, micro_batches, cfg)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss, tokens, grads

    one_loss, one_tokens, one = loss_and_grads([(ids, labels)])
    split_loss, split_tokens, split = loss_and_grads([(ids[:1], labels[:1]), (ids[1:], labels[1:])])  # 18 and 7
    assert split_loss == pytest.approx(one_loss, rel=1e-12)
    assert one_tokens == 3 * 20 and split_tokens == 20 + 2 * 14  # each micro-batch trimmed after its last label
    assert one.keys() == split.keys() and len(one) == 2 * len(lora_modules(model))
    for n in one:
        assert one[n].abs().max() > 0, n
        torch.testing.assert_close(split[n], one[n], rtol=1e-10, atol=1e-13)
    # the mean of the two micro-batches' means is another objective, so the comparison above could fail
    with torch.no_grad():
        means = [chunked_lm_loss(model.model(x), model.lm_head.weight, y).item()
                 for x, y in ((ids[:1], labels[:1]), (ids[1:], labels[1:]))]
    assert abs(sum(means) / 2 - one_loss) > 1e-3


def test_grad_accumulation_over_unequal_windows_trains_as_one_batch(qwen_dir):
    """train_lora with batch 1 x accumulation 3 and batch 3 x accumulation 1 over windows with 18, 3 and 4 labelled
    tokens: the same step losses and the same adapter (fp64)."""
    ids, labels = unequal_windows()
    runs = []
    for batch_size, grad_accum in ((3, 1), (1, 3)):
        model = with_nonzero_lora_b(tiny_lora_model(qwen_dir)).double()
        r = train_lora(model, ids, labels, TrainConfig(epochs=2, lr=1e-2, batch_size=batch_size,
                                                       grad_accum=grad_accum, share_prefix=False))
        assert r.error is None and len(r.losses) == 2
        runs.append((r.losses, lora_state(model)))
    (l1, w1), (l2, w2) = runs
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=0)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-9, atol=1e-12)


def test_chunked_loss_refuses_a_head_that_requires_grad():
    hidden, weight, targets = loss_inputs(torch.float32)
    with pytest.raises(ValueError, match="LM head weight requires grad"):
        chunked_lm_loss(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets)
    # the Function itself, called directly, refuses in backward: it never leaves the head without its gradient
    loss = train_module.ChunkedLMHeadLoss.apply(hidden.reshape(-1, 16), weight.clone().requires_grad_(),
                                                targets.reshape(-1), 4)
    with pytest.raises(ValueError, match="LM head weight requires grad"):
        loss.backward()
    with torch.no_grad():  # nothing needs a gradient: the loss alone is fine
        torch.testing.assert_close(chunked_lm_loss(hidden, weight.clone().requires_grad_(), targets),
                                   reference_loss(hidden, weight, targets))


def test_train_leaves_the_model_mode_checkpointing_and_random_generators_as_they_were(qwen_dir):
    ids, labels = make_lm_windows(repeated_text(60), SEQ_LEN, pad_id=0)
    model = tiny_lora_model(qwen_dir, dropout=0.1)  # dropout draws masks: the run uses random numbers
    for training, checkpointing in ((False, False), (True, True)):
        model.train(training)
        model.model.gradient_checkpointing = checkpointing
        torch.manual_seed(123)
        state = torch.get_rng_state()
        expected = torch.rand(4)  # what the caller's next draws are
        torch.set_rng_state(state)
        r = train_lora(model, ids, labels, TrainConfig(epochs=1, lr=1e-2, batch_size=2))
        assert r.error is None
        assert all(m.training == training for m in model.modules())
        assert model.model.gradient_checkpointing == checkpointing
        assert torch.equal(torch.rand(4), expected)


def test_train_without_lora_layers_is_an_error(qwen_dir):
    model = load_model(str(qwen_dir), policy=REFERENCE).model
    ids, labels = make_lm_windows(repeated_text(30), SEQ_LEN, pad_id=0)
    with pytest.raises(ValueError, match="no LoRA parameters"):
        train_lora(model, ids, labels, TrainConfig(epochs=1))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_training(qwen_dir, monkeypatch, dropout):
    """Recomputing layers in backward changes memory, not the numbers; with LoRA dropout too (a recomputed layer
    must draw the masks its forward drew)."""
    ids, labels = make_lm_windows(repeated_text(100), SEQ_LEN, pad_id=0)
    seen = []
    real = train_module.hidden_states
    monkeypatch.setattr(train_module, "hidden_states",
                        lambda model, *a: seen.append(model.model.gradient_checkpointing) or real(model, *a))
    runs = []
    for checkpointing in (False, True):
        model = tiny_lora_model(qwen_dir, dropout=dropout)
        seen.clear()
        r = train_lora(model, ids, labels, TrainConfig(epochs=1, lr=1e-2, batch_size=2,
                                                       gradient_checkpointing=checkpointing))
        assert r.error is None and set(seen) == {checkpointing}  # on while training ...
        assert model.model.gradient_checkpointing is False  # ... and the model's own setting again after
        runs.append((r.losses, lora_state(model)))
    (l1, w1), (l2, w2) = runs
    assert len(l1) > 1
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# A prefix shared by every row, computed once (Qwen2Model.forward_shared_prefix, hidden_states)
# ---------------------------------------------------------------------------------------------------------------------

def chat_like_batch(rows=3, prefix=9, length=SEQ_LEN, answer=4, seed=0):
    """Windows like one-fact chat windows: the same `prefix` tokens (a system turn), then each row's own question
    and, on its last `answer` positions, targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=g)
    ids[:, :prefix] = ids[0, :prefix]
    ids[1:, prefix] = (ids[0, prefix] + 1 + torch.arange(rows - 1)) % VOCAB  # every row differs right after it
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer - 1:-1] = ids[:, -answer:]
    return ids, labels


def test_shared_prefix_len():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 1]])
    assert shared_prefix_len(ids) == 2
    assert shared_prefix_len(ids[:, 2:]) == 0  # the rows differ at once
    assert shared_prefix_len(ids[:1]) == 0  # one row: nothing to share
    assert shared_prefix_len(ids[[0, 0]]) == 3  # identical rows keep one token of their own


def with_nonzero_lora_b(model, seed=1):
    for m in lora_modules(model).values():  # a non-zero update, so that every LoRA gradient is exercised
        torch.nn.init.normal_(m.lora_B, std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_shared_prefix_gives_the_hidden_states_loss_and_gradients_of_one_pass(tmp_path, kind, checkpointing):
    make_tiny_checkpoint(tmp_path, kind)
    model = with_nonzero_lora_b(tiny_lora_model(tmp_path))
    model.train()
    model.model.gradient_checkpointing = checkpointing
    ids, labels = chat_like_batch()
    labels[:, 3:6] = ids[:, 4:7]  # targets inside the shared prefix too: each row's copy of it gets its own gradient
    assert shared_prefix_len(ids) == 9
    results = []
    for shared in (False, True):
        hidden = model.model.forward_shared_prefix(ids, 9) if shared else model.model(ids)
        loss = chunked_lm_loss(hidden, model.lm_head.weight, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((hidden.detach(), loss.detach(), grads))
    (h1, l1, g1), (h2, l2, g2) = results
    assert h2.shape == h1.shape == (3, SEQ_LEN, 64)
    torch.testing.assert_close(h2, h1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) == 2 * len(lora_modules(model))
    for n in g1:
        assert g1[n].abs().max() > 0, n
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-4)


def test_shared_prefix_rejects_rows_that_do_not_share_it(qwen_dir):
    model = tiny_lora_model(qwen_dir)
    ids, _ = chat_like_batch(prefix=5)
    with pytest.raises(ValueError, match="do not all start with the same 6 tokens"):
        model.model.forward_shared_prefix(ids, 6)
    for bad in (0, SEQ_LEN):
        with pytest.raises(ValueError, match="prefix_len must be in 1..23"):
            model.model.forward_shared_prefix(ids, bad)


def test_hidden_states_shares_a_prefix_only_where_it_saves_enough(qwen_dir, monkeypatch):
    model = tiny_lora_model(qwen_dir)
    calls = []
    real = model.model.forward_shared_prefix
    model.model.forward_shared_prefix = lambda ids, p: calls.append(p) or real(ids, p)
    ids, _ = chat_like_batch(rows=2, prefix=9)  # saves 9 of 48 positions: 19%
    assert (2 - 1) * 9 >= SHARE_PREFIX_MIN_SAVING * ids.numel()
    _, computed = hidden_states(model, ids)
    assert calls == [9] and computed == 9 + 2 * (SEQ_LEN - 9)
    _, computed = hidden_states(model, ids, share_prefix=False)
    assert calls == [9] and computed == ids.numel()
    ids, _ = chat_like_batch(rows=2, prefix=4)  # saves 4 of 48: under the threshold, one plain pass
    assert (2 - 1) * 4 < SHARE_PREFIX_MIN_SAVING * ids.numel()
    _, computed = hidden_states(model, ids)
    assert calls == [9] and computed == ids.numel()
    # a shared layout longer than SHARE_PREFIX_MAX_POSITIONS (its attention is quadratic in it): one plain pass
    monkeypatch.setattr(train_module, "SHARE_PREFIX_MAX_POSITIONS", 9 + 2 * (SEQ_LEN - 9) - 1)
    ids, _ = chat_like_batch(rows=2, prefix=9)
    _, computed = hidden_states(model, ids)
    assert calls == [9] and computed == ids.numel()


def test_training_with_a_shared_prefix_is_training_without_it(qwen_dir, monkeypatch):
    """Same windows, same seed: the losses and the trained adapter agree with sharing on and off, and sharing
    computes fewer positions (TrainResult.tokens_computed) for the same windows' tokens."""
    batches = [chat_like_batch(rows=4, seed=s) for s in range(2)]  # two groups of 4 rows, each with its own prefix
    ids = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    # batch_size 4 with the windows in order: an identity permutation keeps each micro-batch one group
    monkeypatch.setattr(train_module.torch, "randperm", lambda n, generator=None: torch.arange(n))
    runs = []
    for share in (False, True):
        model = tiny_lora_model(qwen_dir).double()  # fp64: Adam's normalised steps would amplify fp32 rounding
        r = train_lora(model, ids, labels, TrainConfig(epochs=3, lr=1e-2, batch_size=4, share_prefix=share))
        assert r.error is None
        runs.append((r, lora_state(model)))
    (r1, w1), (r2, w2) = runs
    length = SEQ_LEN - 1  # the last position has no target: trim_unlabelled_tail drops it
    assert r1.tokens == r2.tokens == 3 * 8 * length
    assert r1.tokens_computed == r1.tokens
    assert r2.tokens_computed == 3 * 2 * (9 + 4 * (length - 9))  # epochs x micro-batches x (prefix + 4 rows' own)
    torch.testing.assert_close(r2.losses, r1.losses, atol=1e-10, rtol=1e-10)
    assert r1.losses[-1] < r1.losses[0]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-9, rtol=1e-9)
