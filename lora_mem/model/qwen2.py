"""A minimal Qwen2-family decoder (Qwen2/2.5 and Llama-family configs) in raw PyTorch.

Reads top to bottom: RMSNorm -> rotary embedding -> attention (GQA through SDPA; block GEMMs for CPU
training) -> SwiGLU MLP ->
decoder layer -> model -> LM head. Parameter names are Hugging Face's, so a checkpoint's
state dict maps 1:1 (`model.layers.0.self_attn.q_proj.weight`, ...).

RMSNorm, the rotary embedding of q and k and SwiGLU's silu(gate) * up go through kernels/ (`rms_norm`,
`apply_rotary_qk`, `swiglu`): fused Triton kernels or the plain PyTorch references, as the model's kernel policy
(`Qwen2Model.policy`, lora_mem.kernels.policy.KernelPolicy, set at construction) says; the model hands it to every
call that dispatches.

Adapters: a projection is a plain `nn.Linear`, or an adapter layer that lora_core put in its place (a module whose
forward takes `(x, policy, rows)`; see `project`). `forward(..., adapter_ids=...)` gives each sequence its own adapter
out of a stacked set: the rows are planned once per forward (`adapter_rows`) and handed to every projection.

Training rows that all open with the same tokens can run that prefix once (`Qwen2Model.forward_shared_prefix`).

Shapes: B batch, T new tokens, S cached + new tokens, H query heads, Hkv key/value heads, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lora_mem.kernels.block_causal_attention import block_causal_attention, use_block_causal
from lora_mem.kernels.multi_lora_linear import AdapterRows, adapter_rows
from lora_mem.kernels.policy import KernelPolicy
from lora_mem.kernels.rms_norm import rms_norm
from lora_mem.kernels.rope import apply_rotary, apply_rotary_qk, rotate_half  # noqa: F401  (re-exported: the rope reference)
from lora_mem.kernels.swiglu import swiglu
from lora_mem.model.config import ModelConfig


def project(layer: nn.Module, x: torch.Tensor, policy: KernelPolicy, rows: AdapterRows | None) -> torch.Tensor:
    """A linear projection of x: a plain nn.Linear, or an adapter layer, which also takes the kernel policy and the
    rows' adapters (None: no per-row adapters)."""
    if isinstance(layer, nn.Linear):
        return layer(x)
    return layer(x, policy, rows)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, policy: KernelPolicy = KernelPolicy()) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as Hugging Face does (bit-for-bit in bf16).
        # The fused Triton kernel where the policy says so; else lora_mem.kernels.rms_norm.rms_norm_reference.
        return rms_norm(x, self.weight, self.eps, policy)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, in the rotate-half convention of Hugging Face checkpoints."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache(nn.Module):
    """Preallocated keys/values of one layer. Slots are shared across the batch; rows that were
    left-padded simply mask their pad slots out (see `Qwen2Model.forward`).

    Optionally a shared prefix (`set_prefix`): keys/values of a prompt head that every row starts
    with, stored once (1, Hkv, P, D) instead of once per row, and attended by all rows before their
    own slots (cascade attention). A long context asked many questions (in-context learning) then
    costs its memory and memory traffic once per batch, not once per row."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.prefix_k: torch.Tensor | None = None  # (1, Hkv, P, D)
        self.prefix_v: torch.Tensor | None = None

    def set_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Share keys/values (1, Hkv, P, D) of a prefix: slot 0 of this cache then follows prefix position P-1."""
        if k.shape[0] != 1 or k.shape != v.shape:
            raise ValueError(f"a shared prefix is (1, Hkv, P, D) keys and values, got {tuple(k.shape)}, {tuple(v.shape)}")
        self.prefix_k, self.prefix_v = k, v

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at slots start..start+T and return all slots filled so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.k, self.v = self.k[rows], self.v[rows]


def cascade_attention(q, prefix_k, prefix_v, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of every row over a shared prefix (1, Hkv, P, D) and then its own slots (B, Hkv, S, D).

    The prefix is read once for the whole batch: the batch folds into the query axis of one product
    per KV head, so no row ever holds a copy. One softmax runs over [prefix | own slots] (the
    prefix is visible to every query; own slots follow `mask` (B, 1, T, S), or are causal when it
    is None), so the result equals plain attention over the concatenated keys.
    q: (B, H, T, D) -> (B, H, T, D)."""
    B, H, T, D = q.shape
    Hkv, P, S = prefix_k.shape[1], prefix_k.shape[2], k.shape[2]
    g = H // Hkv  # query heads per KV head (GQA)
    scale = D ** -0.5

    def fold(t):  # (B, H, T, X) -> grouped by KV head: (Hkv, B*g*T, X)
        return t.reshape(B, Hkv, g, T, -1).transpose(0, 1).reshape(Hkv, B * g * T, -1)

    def unfold(t):  # inverse of fold
        return t.reshape(Hkv, B, g, T, -1).transpose(0, 1).reshape(B, H, T, -1)

    scores_prefix = unfold(torch.bmm(fold(q), prefix_k[0].transpose(1, 2)))  # (B, H, T, P)
    k_rows, v_rows = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, H, S, D)
    scores_own = q @ k_rows.transpose(-1, -2)  # (B, H, T, S)
    if mask is None:  # own slots hold exactly this step's tokens: causal
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores_own = scores_own.masked_fill(~mask, float("-inf"))
    scores = torch.cat([scores_prefix, scores_own], dim=-1)
    probs = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)) * scale, dim=-1).to(q.dtype)
    probs_prefix, probs_own = probs.split([P, S], dim=-1)
    return unfold(torch.bmm(fold(probs_prefix), prefix_v[0])) + probs_own @ v_rows


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask: torch.Tensor | None, kv_cache: KVCache | None, cache_start: int,
                policy: KernelPolicy = KernelPolicy(), rows: AdapterRows | None = None):
        B, T, _ = x.shape
        q = project(self.q_proj, x, policy, rows).view(B, T, self.n_heads, self.head_dim)
        k = project(self.k_proj, x, policy, rows).view(B, T, self.n_kv_heads, self.head_dim)
        v = project(self.v_proj, x, policy, rows).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D) x 2
        q, k = apply_rotary_qk(q, k, cos, sin, policy)  # rotate-half rope (lora_mem.kernels.rope: one fused launch)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_start, k, v)  # (B, Hkv, S, D)
            if kv_cache.prefix_k is not None:
                y = cascade_attention(q, kv_cache.prefix_k, kv_cache.prefix_v, k, v, mask)
                return project(self.o_proj, y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), policy, rows)
        if mask is None and use_block_causal(q, k, v, policy):
            # CPU training, 256..1024 tokens: causal attention as block GEMMs that skip the masked half
            # (lora_mem.kernels.block_causal_attention: PyTorch's CPU flash kernel runs at a fraction of the GEMM rate;
            # bench.perf.attention measures both).
            y = block_causal_attention(q, k, v)  # (B, H, T, D)
        else:
            # No mask means a plain causal sequence starting at slot 0: SDPA's fused causal path.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
            )  # (B, H, T, D)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), policy, rows)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, policy: KernelPolicy = KernelPolicy(), rows: AdapterRows | None = None):
        gate, up = project(self.gate_proj, x, policy, rows), project(self.up_proj, x, policy, rows)
        return project(self.down_proj, swiglu(gate, up, policy), policy, rows)  # silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache, cache_start, policy: KernelPolicy = KernelPolicy(),
                rows: AdapterRows | None = None):
        x = x + self.self_attn(self.input_layernorm(x, policy), cos, sin, mask, kv_cache, cache_start, policy, rows)
        return x + self.mlp(self.post_attention_layernorm(x, policy), policy, rows)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, policy: KernelPolicy = KernelPolicy()):
        super().__init__()
        self.policy = policy  # which kernels run, handed to every call that dispatches
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # Activation checkpointing: keep only each layer's input in training and recompute the layer
        # in backward (less memory for longer sequences or larger batches, about 1/3 more compute).
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); default 0..T-1 (+cache_start)
        attention_mask: torch.Tensor | None = None,  # (B, S) bool, True = real token in that slot
        kv_caches: list[KVCache] | None = None,
        cache_start: int = 0,
        adapter_ids: torch.Tensor | None = None,  # (B,) int: each row's adapter of a stacked set, -1 = none
    ) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + T, device=x.device).expand(B, T)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mask = None
        if attention_mask is not None or cache_start > 0:
            mask = self.build_mask(attention_mask, B, T, cache_start, x.device)
        rows = adapter_rows(adapter_ids, x, self.policy) if adapter_ids is not None else None  # planned once
        return self.run_layers(x, cos, sin, mask, kv_caches, cache_start, rows)

    def run_layers(self, x, cos, sin, mask, kv_caches: list[KVCache] | None = None, cache_start: int = 0,
                   rows: AdapterRows | None = None):
        """The decoder layers and the final norm over embedded tokens x (B, T, C) -> (B, T, C)."""
        for i, layer in enumerate(self.layers):
            kv_cache = kv_caches[i] if kv_caches is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv_cache, cache_start, self.policy,
                                                      rows, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, cache_start, self.policy, rows)
        return self.norm(x, self.policy)  # (B, T, C)

    def forward_shared_prefix(self, input_ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """Hidden states (B, T, C) of rows that all start with the same prefix_len tokens, that prefix computed once.

        The prefix and the rows' own tokens are laid out as one sequence, [prefix | row 0 | row 1 | ...], each
        row's positions continuing the prefix's (P..T-1), with a mask that lets a row's tokens see the prefix and
        their own row's earlier tokens, nothing else. The result equals self(input_ids) up to rounding, gradients
        included (autograd sums every row's gradient into the one prefix), for P + B (T - P) positions instead of
        B T, each linear layer one product over all of them. Attention is one masked SDPA over the whole sequence,
        quadratic in its length: for short windows that all open with the same chat system turn (one-fact
        capacity windows), which is where sharing saves much; lora_mem.lora_core.train.hidden_states bounds the length."""
        B, T = input_ids.shape
        P, S = prefix_len, T - prefix_len
        if not 0 < P < T:
            raise ValueError(f"prefix_len must be in 1..{T - 1} for {T}-token rows, got {prefix_len}")
        if not bool((input_ids[:, :P] == input_ids[:1, :P]).all()):
            raise ValueError(f"the rows do not all start with the same {prefix_len} tokens")
        device = input_ids.device
        packed = torch.cat([input_ids[0, :P], input_ids[:, P:].reshape(-1)])[None]  # (1, N), N = P + B S
        position = torch.cat([torch.arange(P, device=device), torch.arange(P, T, device=device).repeat(B)])  # (N,)
        row = torch.cat([torch.full((P,), -1, device=device), torch.arange(B, device=device).repeat_interleave(S)])
        # query i sees key j if j is not later and j is in the prefix (row -1) or in i's own row
        mask = (position[None, :] <= position[:, None]) & ((row[None, :] == -1) | (row[None, :] == row[:, None]))
        x = self.embed_tokens(packed)  # (1, N, C)
        cos, sin = self.rotary_emb(position[None], x.dtype)
        hidden = self.run_layers(x, cos, sin, mask[None, None])[0]  # (N, C)
        return torch.cat([hidden[:P].expand(B, P, -1), hidden[P:].view(B, S, -1)], dim=1)

    @staticmethod
    def build_mask(attention_mask: torch.Tensor | None, B: int, T: int, cache_start: int, device) -> torch.Tensor:
        """(B, 1, T, S) bool: query at slot cache_start+i sees key slot j if j <= cache_start+i and j is real."""
        S = cache_start + T
        query_slots = torch.arange(cache_start, S, device=device)[:, None]  # (T, 1)
        key_slots = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = (key_slots <= query_slots)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S]
            # A pad query (left padding) would see no key at all and SDPA would give NaN, which then
            # leaks into later layers through that slot's keys/values. Let every query see itself;
            # pad slots stay masked as keys for every real query, so real rows are unaffected.
            mask = mask | (key_slots == query_slots)[None, None]
        return mask.expand(B, 1, T, S)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, policy: KernelPolicy = KernelPolicy()):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg, policy)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_caches=None, cache_start=0,
                adapter_ids=None):
        """Logits (B, T, vocab). Training code should use `model.model(...)` and a chunked loss instead."""
        return self.lm_head(self.model(input_ids, position_ids, attention_mask, kv_caches, cache_start, adapter_ids))

    def new_kv_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        cfg, p = self.config, self.lm_head.weight
        return [
            KVCache(batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim, p.dtype, p.device)
            for _ in range(cfg.num_hidden_layers)
        ]

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for tests and benchmarks (speed does not depend on the values)."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std, generator=generator)
