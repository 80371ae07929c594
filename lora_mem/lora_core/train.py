"""The LoRA training loop: AdamW on the adapter only, warm-up then cosine decay, clipping, accumulation.

The objective of an optimizer step is the mean next-token loss over every labelled position of its windows, however
they are split into micro-batches (`backward_step`). The loss never materialises full-vocabulary logits for every
position: `chunked_lm_loss` computes the cross-entropy and its gradient with respect to the final hidden states chunk
by chunk (the LM head is frozen, so that gradient is all backward needs). A prefix that every window of a
micro-batch starts with (the chat system turn of one-fact windows) is computed once (`hidden_states`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch

from lora_mem.lora_core.inject import lora_parameters
from lora_mem.lora_core.losses import IGNORE_INDEX, SoftTargets, soft_target_loss

# Compute a prefix shared by every row of a micro-batch once only when that saves at least this fraction of
# the micro-batch's token positions: below it the masked attention over the longer shared layout and its copies
# may cost more than the positions saved (one-fact capacity windows at batch 2 save 24 of 96 positions, packed
# 512-token QA windows ~2%).
SHARE_PREFIX_MIN_SAVING = 0.1
# ... and only while the shared layout (prefix + every row's own tokens as one sequence) has at most this many
# positions: its attention is one masked product, quadratic in that length (2048: 9 heads' fp32 scores of one
# layer are 151 MB).
SHARE_PREFIX_MAX_POSITIONS = 2048
# A LoRA weight larger than this in magnitude is divergence, not learning. AdamW moves a weight by about lr per step,
# so after S steps it lies within about lr * S of its initialisation (|A| <= 1/sqrt(in) at the start, B = 0): a few
# units at the defaults (lr 2e-3, a thousand steps). 1e3 is far beyond any run that learns, and far below where
# products of such weights overflow 16-bit floats.
MAX_LORA_WEIGHT = 1e3


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight^T` against `targets`, computed in row chunks.

    Only the rows that have a target go through the LM head: in chat-QA windows most positions are
    questions and chat markup (IGNORE_INDEX), and the head (vocab x hidden) is a fifth of a small model's
    FLOPs, so their logits are never computed. Forward computes, per chunk c of those rows, the loss
    sum(lse(logits_c) - logits_c[target]) and already the gradient dL/dh_c = (softmax(logits_c) - onehot(target)) W / n,
    since W is frozen. Only dL/dh (same size as h) is kept for backward, never a (tokens x vocab) tensor;
    unlabelled rows get a zero gradient. A head weight that requires a gradient is refused: this loss has none to
    give it. The (chunk x vocab) logits are the one large buffer (`_wide_chunk`, `_narrow_chunk`).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        # hidden: (N, C), weight: (V, C), targets: (N,) with IGNORE_INDEX for unsupervised positions
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) the labelled positions
        n_valid = max(len(rows), 1)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for 16-bit input, fp64 stays fp64
        narrow = acc_dtype != hidden.dtype
        chunk_loss, rows_per_chunk = ((_narrow_chunk, min(chunk_size, NARROW_LOSS_CHUNK_ROWS)) if narrow
                                      else (_wide_chunk, chunk_size))
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        for start in range(0, len(rows), rows_per_chunk):
            r = rows[start:start + rows_per_chunk]
            loss_sum, g = chunk_loss(hidden[r], weight, targets[r], n_valid, grad_hidden is not None)
            total += loss_sum
            if g is not None:
                grad_hidden[r] = g.to(hidden.dtype)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.needs_input_grad[1]:
            raise ValueError(HEAD_REQUIRES_GRAD)
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


# Rows per chunk of the loss when the logits are 16-bit: a 128 x 49,152 bf16 buffer (12 MB) stays in cache
# through its passes; at 1,024 rows each pass goes to memory.
NARROW_LOSS_CHUNK_ROWS = 128
EXP_BLOCK_ROWS = 16  # rows of a 16-bit chunk whose softmax is made in fp32 at a time (3 MB at a 49k vocabulary)


def _wide_chunk(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, n_valid: int, want_grad: bool):
    """(summed loss, dL/dh or None) of one chunk whose logits are made in fp32 (fp64 for fp64 input).

    exp(logits - row max) is made in the buffer in place, and the row sums give both the log-sum-exp and
    the softmax's normalisation, which (like the mean's 1/n) is applied to the (chunk x hidden) product instead:
    four passes over the buffer, two of them reads, and no other (chunk x vocab) tensor."""
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    logits = (h @ weight.T).to(acc_dtype)  # (n, V)
    target_logit = logits.gather(1, t[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()  # in place: exp(logits - max)
    row_sum = probs.sum(dim=-1, keepdim=True)
    lse = row_max.squeeze(1) + row_sum.squeeze(1).log()
    loss_sum = (lse - target_logit).sum()
    if not want_grad:
        return loss_sum, None
    # (softmax - onehot) W = ((exp(logits - max) - row_sum * onehot) W) / row_sum: the one-hot is n scattered
    # writes into the buffer (where the cancellation p_t - 1 stays elementwise, before any 16-bit rounding).
    probs[torch.arange(len(t), device=t.device), t] -= row_sum.squeeze(1)
    return loss_sum, (probs.to(h.dtype) @ weight).to(acc_dtype) / (row_sum * n_valid)


def _narrow_chunk(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, n_valid: int, want_grad: bool):
    """(summed loss in fp32, dL/dh in fp32 or None) of one chunk of 16-bit input, whose logits stay 16-bit.

    exp(logits - row max) is made in fp32 a few rows at a time (cache-sized) and stored back into the 16-bit
    buffer, rounded once as the gradient's product needs it: no (chunk x vocab) fp32 tensor. The target's term
    p_t - 1 cancels when p_t nears 1, so it is taken out of the buffer and formed in fp32 on the (chunk x hidden)
    side: 16-bit rounding before that subtraction would leave nothing of the gradient of a well-fitted token."""
    logits = h @ weight.T  # (n, V) 16-bit
    rows = torch.arange(len(t), device=t.device)
    target_logit = logits[rows, t].float()
    row_max = logits.amax(dim=-1, keepdim=True).float()
    row_sum = torch.empty_like(row_max)
    for block in range(0, len(t), EXP_BLOCK_ROWS):
        b = slice(block, block + EXP_BLOCK_ROWS)
        e = logits[b].float().sub_(row_max[b]).exp_()
        row_sum[b] = e.sum(dim=-1, keepdim=True)
        logits[b] = e
    probs = logits  # exp(logits - max), 16-bit
    lse = row_max.squeeze(1) + row_sum.squeeze(1).log()
    loss_sum = (lse - target_logit).sum()
    if not want_grad:
        return loss_sum, None
    p_target = (target_logit - lse).exp()
    probs[rows, t] = 0
    others = (probs @ weight).float() / (row_sum * n_valid)
    return loss_sum, others + ((p_target - 1) / n_valid)[:, None] * weight[t].float()


HEAD_REQUIRES_GRAD = ("chunked_lm_loss: the LM head weight requires grad, but this loss gives it no gradient (it "
                      "assumes a frozen head); freeze it, or use a full cross-entropy to train it")


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024):
    """Mean next-token cross-entropy over positions whose target is not IGNORE_INDEX. Raises ValueError, before any
    work, if autograd would want a gradient for the head `weight` (ChunkedLMHeadLoss's backward would raise it)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError(HEAD_REQUIRES_GRAD)
    return ChunkedLMHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size)


@dataclass
class TrainConfig:
    """How an adapter is trained. The defaults are the LoRA-Mem experiment's (2 epochs at peak lr 2e-3)."""

    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 2  # windows per optimizer step = batch_size * grad_accum
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0  # window order and LoRA dropout masks (train_lora leaves the caller's generators as they were)
    loss_chunk_size: int = 1024
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (saves memory)
    share_prefix: bool = True  # a prefix common to a micro-batch's rows computed once (hidden_states)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    lrs: list[float] = field(default_factory=list)
    epochs_loss: list[float] = field(default_factory=list)  # mean loss of each epoch
    tokens: int = 0  # supervised + context tokens processed (all positions of all windows, every epoch)
    tokens_computed: int = 0  # positions the model ran: `tokens` less the shared prefixes' repeats
    seconds: float = 0.0
    error: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        return d


class Diverged(RuntimeError):
    """Training stopped making sense: a non-finite loss, or LoRA weights non-finite or beyond MAX_LORA_WEIGHT."""


class NonFiniteLoss(Diverged):
    pass


def lora_weights_problem(params: list[torch.Tensor]) -> str | None:
    """Why these LoRA weights are not an adapter (a value non-finite or beyond MAX_LORA_WEIGHT), or None."""
    largest = float(torch.stack([p.detach().abs().amax().float() for p in params]).amax()) if params else 0.0
    if not math.isfinite(largest):
        return f"a LoRA weight is non-finite ({largest})"
    if largest > MAX_LORA_WEIGHT:
        return f"a LoRA weight reached {largest:.3g} (beyond {MAX_LORA_WEIGHT:g}: diverged)"
    return None


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio > 0 else 0
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def adamw(params: list[torch.nn.Parameter], cfg: TrainConfig, base_dtype: torch.dtype) -> torch.optim.AdamW:
    """The adapter's optimizer (its learning rate is set by the schedule at every step). Fused, one pass over all
    the parameters, where the base model is 16-bit (the per-tensor loop pays a few hundred small tensors' dispatch
    every step); over an fp32 model torch's per-tensor loop, whose numbers earlier fp32 runs give."""
    fused = True if base_dtype.itemsize < 4 else None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused)


def train_lora(
    model,
    input_ids: torch.Tensor,  # (N, L) windows
    labels: torch.Tensor,  # (N, L) next-token targets aligned with input_ids, IGNORE_INDEX where unsupervised
    cfg: TrainConfig,
    progress: bool = False,
    desc: str = "training",
    soft_targets: tuple[SoftTargets, float, float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train the model's LoRA parameters in place. A non-finite loss, or an optimizer step that leaves a LoRA weight
    non-finite or beyond MAX_LORA_WEIGHT, stops training and is recorded in `result.error` (the caller decides what
    to do with the run). The model's mode (train / eval) and its
    activation checkpointing are as they were on return, and so is every random generator of torch's.
    ``soft_targets``: (targets aligned with the windows, temperature, hard-label weight): the loss is then
    `losses.soft_target_loss` (context distillation) instead of the cross-entropy. ``optimizer``: one made by
    :func:`adamw` over these parameters whose state goes on (a memory that keeps training); default a fresh one."""
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA parameters to train (inject_lora first)")
    if input_ids.shape[0] == 0:
        raise ValueError("no training windows: nothing to train on")
    for p in params:
        p.requires_grad_(True)
    optimizer = optimizer if optimizer is not None else adamw(params, cfg, model.lm_head.weight.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)  # the window order
    n = input_ids.shape[0]
    micro_per_epoch = math.ceil(n / cfg.batch_size)
    accum = min(cfg.grad_accum, micro_per_epoch)  # a step never takes more micro-batches than an epoch has
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = steps_per_epoch * cfg.epochs
    result = TrainResult()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=desc, unit="step", leave=False)
    was_training, was_checkpointing = model.training, model.model.gradient_checkpointing
    model.train()
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    t0 = time.perf_counter()
    step = epoch = 0
    with seeded_default_generators(cfg.seed, model.lm_head.weight.device):  # the LoRA dropout masks
        try:
            for epoch in range(cfg.epochs):
                order = torch.randperm(n, generator=gen)
                epoch_losses = []
                for s in range(steps_per_epoch):
                    lr = lr_at(step, total_steps, cfg)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    first = s * accum  # this step's first micro-batch
                    micro = [order[(first + k) * cfg.batch_size:(first + k + 1) * cfg.batch_size]
                             for k in range(accum)]
                    micro = [idx for idx in micro if len(idx)]
                    step_loss, tokens, computed = backward_step(
                        model, [(input_ids[idx], labels[idx]) for idx in micro], cfg,
                        [soft_targets[0][idx] for idx in micro] if soft_targets else None,
                        *(soft_targets[1:] if soft_targets else ()))
                    result.tokens += tokens
                    result.tokens_computed += computed
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    problem = lora_weights_problem(params)
                    if problem is not None:
                        raise Diverged(problem)
                    result.losses.append(step_loss)
                    result.lrs.append(lr)
                    epoch_losses.append(step_loss)
                    step += 1
                    if bar:
                        bar.set_postfix(loss=f"{step_loss:.3f}", epoch=epoch)
                        bar.update()
                result.epochs_loss.append(sum(epoch_losses) / len(epoch_losses))
        except Diverged as e:
            result.error = f"{e} at epoch {epoch}, step {step}"
        finally:
            if bar:
                bar.close()
            model.train(was_training)
            model.model.gradient_checkpointing = was_checkpointing
            for p in params:
                p.grad = None
            result.seconds = time.perf_counter() - t0
    return result


@contextmanager
def seeded_default_generators(seed: int, device: torch.device):
    """Within the block, torch's default generators of the CPU and of `device` start from `seed`; after it, they are
    where the caller left them. The LoRA dropout masks come from these generators (not from a generator of our own)
    because activation checkpointing replays them, and no other, when it recomputes a layer: a recomputed layer draws
    the masks its forward drew."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def backward_step(model, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
                  soft_targets: list[SoftTargets] | None = None, temperature: float = 1.0,
                  hard_weight: float = 0.0) -> tuple[float, int, int]:
    """Forward and backward of one optimizer step's micro-batches of (input_ids, labels) windows, the gradients
    accumulated in the parameters' `.grad`. Each micro-batch's mean loss is weighted by its share of the step's
    labelled tokens, so the step's loss and gradient are those of the mean token loss over all its windows, as one
    batch would give (a mean of micro-batch means would weigh a token of a sparsely labelled micro-batch more).
    Returns the step's loss, the tokens of its (trimmed) windows and the positions the model ran."""
    device = model.lm_head.weight.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    labelled = [int((y != IGNORE_INDEX).sum()) for _, y in micro_batches]
    total = max(sum(labelled), 1)
    step_loss, tokens, computed_total = 0.0, 0, 0
    for i, ((x, y), n_labelled) in enumerate(zip(micro_batches, labelled)):
        targets = soft_targets[i] if soft_targets is not None else None
        x, y = trim_unlabelled_tail(x, y)
        x, y = x.to(device), y.to(device)
        with autocast:
            hidden, computed = hidden_states(model, x, cfg.share_prefix)  # (b, L, C)
            if targets is None:
                loss = chunked_lm_loss(hidden, model.lm_head.weight, y, cfg.loss_chunk_size)
            else:
                targets = SoftTargets(targets.top_ids[:, :x.shape[1]].to(device),
                                      targets.top_logprobs[:, :x.shape[1]].to(device))
                loss = soft_target_loss(hidden, model.lm_head.weight, y, targets, temperature, hard_weight,
                                        cfg.loss_chunk_size)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss {loss.item()}")
        share = n_labelled / total  # exactly 1.0 for a step of one micro-batch
        (loss * share).backward()
        step_loss += loss.item() * share
        tokens += x.numel()
        computed_total += computed
    return step_loss, tokens, computed_total


def shared_prefix_len(input_ids: torch.Tensor) -> int:
    """How many leading tokens every row of (B, T) input_ids has in common, at most T - 1 (each row keeps
    at least one token of its own); 0 for a single row."""
    B, T = input_ids.shape
    if B < 2:
        return 0
    differs = (input_ids != input_ids[:1]).any(0).nonzero()  # columns where some row differs from row 0
    return min(int(differs[0]) if len(differs) else T, T - 1)


def hidden_states(model, input_ids: torch.Tensor, share_prefix: bool = True) -> tuple[torch.Tensor, int]:
    """Final hidden states (B, T, C) of a training micro-batch and the number of token positions computed.

    With share_prefix, a prefix all rows start with is computed once (Qwen2Model.forward_shared_prefix: the
    same hidden states and gradients up to rounding) when that saves at least SHARE_PREFIX_MIN_SAVING of the
    B T positions and leaves at most SHARE_PREFIX_MAX_POSITIONS; otherwise one plain pass."""
    B, T = input_ids.shape
    P = shared_prefix_len(input_ids) if share_prefix else 0
    computed = P + B * (T - P)
    if P and (B - 1) * P >= SHARE_PREFIX_MIN_SAVING * B * T and computed <= SHARE_PREFIX_MAX_POSITIONS:
        return model.model.forward_shared_prefix(input_ids, P), computed
    return model.model(input_ids), B * T


def trim_unlabelled_tail(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the positions after the last labelled one of a (b, L) micro-batch (the padding of a last text
    window or of a part-filled chat window). Attention is causal, so nothing before them depends on them:
    the loss and gradients are those of the full windows, for less compute."""
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    end = int(labelled[-1]) + 1 if len(labelled) else 1
    return input_ids[:, :end], labels[:, :end]


def make_lm_windows(token_ids: list[int], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows of seq_len tokens over one long text; each window predicts its own next
    tokens (the first token of a window has no target from the previous window). The last window is
    right-padded with IGNORE_INDEX targets."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    windows = [token_ids[i:i + seq_len] for i in range(0, max(1, len(token_ids) - 1), seq_len - 1)]
    # Overlap of one token so that every token of the text is a target exactly once.
    windows = [w for w in windows if len(w) >= 2]
    ids = torch.full((len(windows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w)
        labels[i, :len(w) - 1] = torch.tensor(w[1:])
    return ids, labels
