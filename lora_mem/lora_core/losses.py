"""Losses over the final hidden states with a frozen LM head: the gradient with respect to the hidden states is all a
LoRA step needs, so it is formed chunk by chunk and full-vocabulary logits are never kept.

`SoftTargetLoss` trains on a target distribution per position: a teacher's top-k log-probabilities (context
distillation, `distill`) or a hard label held as a one-token distribution, for which it is the cross-entropy.

    L = (1 - w) tau^2 KL(q_tau || s_tau) + w CE,   s_tau = softmax(h W^T / tau)

KL over the top-k tokens plus one bucket for the rest of the vocabulary. With t the teacher's q on the top-k and
q_rest * s_j / s_rest elsewhere (its rest mass spread as the student spreads it), dKL/dz = (s - t) / tau: the loss
is a cross-entropy against the soft target t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class SoftTargets:
    """Per window position: the target distribution's top-k token ids and log-probabilities. Positions trained on
    a hard label hold it as a one-token distribution (log q = 0), so one loss serves both."""

    top_ids: torch.Tensor  # (N, L, k) int64
    top_logprobs: torch.Tensor  # (N, L, k) float32, -inf where unused

    @classmethod
    def hard(cls, labels: torch.Tensor, k: int) -> "SoftTargets":
        ids = torch.zeros(*labels.shape, k, dtype=torch.long)
        logp = torch.full((*labels.shape, k), -math.inf)
        labelled = labels != IGNORE_INDEX
        ids[..., 0] = torch.where(labelled, labels, 0)
        logp[..., 0] = torch.where(labelled, 0.0, -math.inf)
        return cls(ids, logp)

    def __getitem__(self, index) -> "SoftTargets":
        return SoftTargets(self.top_ids[index], self.top_logprobs[index])

    @staticmethod
    def cat(parts: list["SoftTargets"]) -> "SoftTargets":
        return SoftTargets(torch.cat([p.top_ids for p in parts]), torch.cat([p.top_logprobs for p in parts]))


class SoftTargetLoss(torch.autograd.Function):
    """Mean over labelled positions of (1 - w) tau^2 KL(q || softmax(h W^T / tau)) + w CE(h W^T, target), in row
    chunks, the LM head frozen (see the module docstring for the gradient). Returns the loss; keeps dL/dh only."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, top_ids, top_logprobs, temperature: float, hard_weight: float,
                chunk_size: int):
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        n_valid = max(len(rows), 1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        tau, w = temperature, hard_weight
        for start in range(0, len(rows), chunk_size):
            r = rows[start:start + chunk_size]
            h, ids, logq = hidden[r], top_ids[r], top_logprobs[r].float()
            logits = (h @ weight.T).float()  # (n, V)
            log_s = torch.log_softmax(logits / tau, dim=-1)
            q = logq.exp()  # (n, k), 0 where unused
            log_s_top = log_s.gather(1, ids)
            s = log_s.exp()
            s_rest = (1 - s.gather(1, ids).masked_fill(q == 0, 0).sum(1)).clamp_min(1e-12)
            q_rest = (1 - q.sum(1)).clamp_min(0)
            kl = (q * (logq.masked_fill(q == 0, 0) - log_s_top)).sum(1) \
                + torch.where(q_rest > 0, q_rest * (q_rest.clamp_min(1e-12).log() - s_rest.log()), 0.0)
            # t: q on the top-k, the rest mass spread as the student spreads it
            t = s * (q_rest / s_rest)[:, None]
            t.scatter_(1, ids, torch.where(q > 0, q, t.gather(1, ids)))
            grad = (1 - w) * tau * (s - t)
            loss = (1 - w) * tau * tau * kl
            if w > 0:
                log_p = torch.log_softmax(logits, dim=-1)
                tgt = targets[r]
                loss = loss - w * log_p.gather(1, tgt[:, None]).squeeze(1)
                p = log_p.exp_()
                p[torch.arange(len(tgt)), tgt] -= 1
                grad += w * p
            total += loss.sum()
            grad_hidden[r] = ((grad.to(weight.dtype) @ weight) / n_valid).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None, None, None, None


def soft_target_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, soft: SoftTargets,
                     temperature: float = 1.0, hard_weight: float = 0.0, chunk_size: int = 512) -> torch.Tensor:
    if weight.requires_grad:
        raise ValueError("soft_target_loss gives no gradient to the LM head: freeze it (the LoRA targets never "
                         "include lm_head)")
    C = hidden.shape[-1]
    return SoftTargetLoss.apply(hidden.reshape(-1, C), weight, targets.reshape(-1),
                                soft.top_ids.reshape(-1, soft.top_ids.shape[-1]),
                                soft.top_logprobs.reshape(-1, soft.top_logprobs.shape[-1]),
                                temperature, hard_weight, chunk_size)


def soft_target_loss_reference(logits: torch.Tensor, targets: torch.Tensor, soft: SoftTargets,
                               temperature: float = 1.0, hard_weight: float = 0.0) -> torch.Tensor:
    """The same loss from full logits (N, V), written plainly: what `SoftTargetLoss` is tested against."""
    keep = targets != IGNORE_INDEX
    logits, targets = logits[keep].double(), targets[keep]
    ids, logq = soft.top_ids[keep], soft.top_logprobs[keep].double()
    log_s = torch.log_softmax(logits / temperature, dim=-1)
    q = logq.exp()
    s_top = log_s.gather(1, ids).exp() * (q > 0)
    s_rest = 1 - s_top.sum(1)
    q_rest = (1 - q.sum(1)).clamp_min(0)
    kl = (q * (torch.where(q > 0, logq, 0.0) - log_s.gather(1, ids))).sum(1)
    kl = kl + torch.where(q_rest > 0, q_rest * (q_rest.clamp_min(1e-300).log() - s_rest.log()), 0.0)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return ((1 - hard_weight) * temperature ** 2 * kl + hard_weight * ce).mean()
