"""Batched greedy decoding with a KV cache: prefill, one decode step, the loop.

Prompts of different lengths share a batch through left padding: pad slots are masked out of
attention and each row's rotary positions count only its real tokens, so every row decodes exactly
as it would alone. With adapters stacked (lora_mem.lora_core.multi_adapter), `adapter_ids` gives each
prompt its own: every forward call carries the rows' adapters (`Qwen2Model.forward(..., adapter_ids=...)`).

Memory: `generate` answers within a budget (`memory_budget_mb`, default MEMORY_BUDGET_MB) of keys and values plus
prefill activations. `plan_decode` turns it into how many rows decode at once (each holds its slots' keys and values
in every layer) and how many prompt tokens one prefill pass takes: the prompts being admitted are prefilled in groups
of at most that many tokens, and a longer prompt in chunks of its columns. Rows still decode as they would alone.

CLI:  python -m lora_mem.model.generate --model smollm2-135m-instruct --prompt "What is the capital of France?"
      (with LoRA adapters: python -m lora_mem.lora_core.generate ... --adapter DIR)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_mem.cli import Parser, fail, positive_int
from lora_mem.kernels.policy import DTYPE_DEFAULT_HELP, KernelPolicy, add_kernel_args
from lora_mem.model.config import ModelConfig
from lora_mem.model.qwen2 import KVCache, Qwen2ForCausalLM


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids and (B, T) bool mask of real tokens, padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = True
    return ids.to(device), mask.to(device)


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with (the system prompt and instruction of chat questions), keeping
    at least one token of each prompt outside it."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


@dataclass
class Prefix:
    """Keys/values of the prompt head that every prompt of a `generate` call starts with, computed once.

    One row per adapter the prompts use (LoRA changes keys and values, so a prefix is per adapter),
    `adapter_ids[i]` being row i's adapter (None: the model as it is). A long prefix under one
    adapter is attended in place by every row (`cascade`, see `KVCache.set_prefix`); otherwise each
    row gets its copy in its first slots."""

    tokens: list[int]
    caches: list[KVCache]  # per layer: (n, Hkv, P, D)
    adapter_ids: list[int] | None = None
    cascade: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    def rows_for(self, adapter_ids: list[int] | None) -> torch.Tensor:
        """Index of the prefix row each batch row (with these adapters) starts from."""
        if self.adapter_ids is None:
            return torch.zeros(len(adapter_ids or [0]), dtype=torch.long)
        where = {a: i for i, a in enumerate(self.adapter_ids)}
        return torch.tensor([where[a] for a in adapter_ids], dtype=torch.long)


# Prefixes at least this long are attended in place (cascade) rather than copied into every row:
# below it the copy is cheaper than the extra attention kernel launches.
CASCADE_MIN_TOKENS = 256


# Greedy decoding needs each row's best token, not its logits. On a CPU the LM head's product
# (B x hidden) @ (hidden x vocab) runs faster in vocabulary slices whose weights and logits stay in
# cache than as one (B, vocab) product, once a batch has several rows (`bench.perf.greedy_head` measures it; a
# single row reads the weights once either way, slices only add calls). Each slice
# computes the same dot products, so the tokens are those of the full product's argmax. On CUDA one
# product is best.
CPU_VOCAB_SLICE = 2048
CPU_SLICE_MIN_ROWS = 8


def vocab_slice_for(device: torch.device, rows: int) -> int | None:
    return CPU_VOCAB_SLICE if device.type == "cpu" and rows >= CPU_SLICE_MIN_ROWS else None


def greedy_tokens(hidden: torch.Tensor, weight: torch.Tensor, vocab_slice: int | None) -> torch.Tensor:
    """argmax(hidden @ weight^T) per row, (B, C) x (V, C) -> (B,), the product taken `vocab_slice`
    vocabulary rows at a time (None: in one). Ties go to the lowest token id, as argmax does."""
    if vocab_slice is None or vocab_slice >= weight.shape[0]:
        return F.linear(hidden, weight).argmax(-1)
    best_values, best_ids = [], []
    for start in range(0, weight.shape[0], vocab_slice):
        values, ids = F.linear(hidden, weight[start:start + vocab_slice]).max(-1)  # (B,), first max of the slice
        best_values.append(values)
        best_ids.append(ids + start)
    winner = torch.stack(best_values, 1).argmax(1, keepdim=True)  # (B, 1): first slice holding the max
    return torch.stack(best_ids, 1).gather(1, winner).squeeze(1)


def adapter_tensor(adapter_ids: list[int] | None, device) -> torch.Tensor | None:
    return torch.tensor(adapter_ids, dtype=torch.long, device=device) if adapter_ids is not None else None


def columns_per_pass(rows: int, columns: int, max_tokens: int | None) -> int:
    """How many of `columns` prompt columns of `rows` rows one forward pass takes: all of them, or as many as keep
    the pass within `max_tokens` tokens (at least one)."""
    return columns if max_tokens is None else max(1, min(columns, max_tokens // rows))


def is_cascade(n_rows: int, prefix_len: int, cascade_min_tokens: int = CASCADE_MIN_TOKENS) -> bool:
    """Whether a prefix of this many tokens, computed for this many adapters, is attended in place."""
    return n_rows == 1 and prefix_len >= cascade_min_tokens


def compute_prefix(model: Qwen2ForCausalLM, tokens: list[int], adapter_ids: list[int] | None = None,
                   cascade_min_tokens: int = CASCADE_MIN_TOKENS, max_tokens: int | None = None) -> Prefix:
    """Run the shared prompt head once per adapter (batch = distinct adapters) and keep its KV; at most `max_tokens`
    tokens per forward pass (None: all in one)."""
    device = model.lm_head.weight.device
    distinct = sorted(set(adapter_ids)) if adapter_ids is not None else None
    n = len(distinct) if distinct is not None else 1
    caches = model.new_kv_caches(n, len(tokens))
    ids = torch.tensor([tokens] * n, device=device)
    step = columns_per_pass(n, len(tokens), max_tokens)
    for start in range(0, len(tokens), step):  # a later chunk attends the keys the earlier ones cached
        model.model(ids[:, start:start + step], kv_caches=caches, cache_start=start,
                    adapter_ids=adapter_tensor(distinct, device))
    return Prefix(tokens, caches, distinct, cascade=is_cascade(n, len(tokens), cascade_min_tokens))


def prefill(model: Qwen2ForCausalLM, prompts: list[list[int]], pad_id: int, kv_caches: list[KVCache],
            prefix: Prefix | None = None, adapter_ids: list[int] | None = None, max_tokens: int | None = None):
    """Fill the caches with the prompts; return the greedy next token (B,), positions (B,), slot mask (B, S),
    and the next free slot.

    Slot layout: [prefix copy | left-padded suffixes], or with a cascade prefix just the suffixes
    (the prefix is shared, outside the rows). Pad slots sit before each suffix, masked out, and
    rotary positions count real tokens only, so each row sees exactly its own prompt. `max_tokens`: at most this
    many tokens per forward pass, the columns taken in chunks, each attending the keys the earlier ones cached
    (None: all in one pass)."""
    device = model.lm_head.weight.device
    P = len(prefix) if prefix is not None else 0
    ids, suffix_mask = left_pad([p[P:] for p in prompts], pad_id, device)  # (B, S)
    B = ids.shape[0]
    position_ids = P + (suffix_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    if prefix is not None and prefix.cascade:
        for cache, prefix_cache in zip(kv_caches, prefix.caches):
            cache.set_prefix(prefix_cache.k, prefix_cache.v)
        mask, cache_start = suffix_mask, 0
    else:
        if P:
            rows = prefix.rows_for(adapter_ids).to(device)
            for cache, prefix_cache in zip(kv_caches, prefix.caches):
                cache.update(0, prefix_cache.k[rows], prefix_cache.v[rows])
        mask = torch.cat([torch.ones((B, P), dtype=torch.bool, device=device), suffix_mask], dim=1)  # (B, P+S)
        cache_start = P
    # No prefix and no padding: no mask, SDPA's causal fast path (for the first chunk; later ones get a causal mask).
    attention_mask = None if cache_start == 0 and bool(suffix_mask.all()) else mask
    adapters = adapter_tensor(adapter_ids, device)
    step = columns_per_pass(B, ids.shape[1], max_tokens)
    for start in range(0, ids.shape[1], step):
        hidden = model.model(ids[:, start:start + step], position_ids[:, start:start + step], attention_mask,
                             kv_caches, cache_start + start, adapters)  # (B, chunk, C)
    head = model.lm_head.weight
    next_token = greedy_tokens(hidden[:, -1], head, vocab_slice_for(head.device, B))  # only the last slot is needed
    return next_token, position_ids[:, -1], mask, cache_start + ids.shape[1]


def decode_step(model, token, positions, mask, kv_caches, cache_start: int,
                adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row at slot `cache_start` (with `adapter_ids` (B,): each row's adapter); returns each row's
    greedy next token (B,)."""
    hidden = model.model(token[:, None], positions[:, None], mask, kv_caches, cache_start, adapter_ids)
    head = model.lm_head.weight
    return greedy_tokens(hidden[:, -1], head, vocab_slice_for(head.device, len(token)))


def shared_head_len(prompts: list[list[int]]) -> int:
    """Tokens of the head all prompts share that is computed once (0 for a single prompt)."""
    return common_prefix_len(prompts) if len(prompts) > 1 else 0


def batch_prefix(model, prompts: list[list[int]], adapter_ids: list[int] | None,
                 max_tokens: int | None = None) -> Prefix | None:
    """The prompts' common head, computed once (None if they share none), at most `max_tokens` per pass."""
    P = shared_head_len(prompts)
    return compute_prefix(model, prompts[0][:P], adapter_ids, max_tokens=max_tokens) if P else None


# Continuous batching: a row whose answer is complete gives its place to the next prompt instead of
# computing pad tokens until the whole batch is done. New prompts are prefilled together once this
# fraction of the batch is free: each prefill reads all the weights once, which costs about as much as
# a decode step of a few rows, while a free row waiting for the group costs its share of every step.
# Admitting one row at a time pays the first cost too often, half the batch the second.
REFILL_FRACTION = 1 / 4
# Columns no live row attends any more are cut off the caches once there are this many (a copy of the
# live columns), so attention does not grow with the length of the whole run.
TRIM_COLUMNS = 32


def row_slots(prefix: Prefix | None, prompt_len: int) -> int:
    """Slots a prompt of this many tokens takes in its row: all of them, unless the prefix is a cascade
    one (attended in place, outside the rows)."""
    return prompt_len - (len(prefix) if prefix is not None and prefix.cascade else 0)


# ---------------------------------------------------------------------------------------------
# Memory: how many rows decode at once and how many tokens a prefill pass takes
# ---------------------------------------------------------------------------------------------

# The default working memory of answering: the rows' keys and values and a prefill pass (the model's weights are
# not in it). Peak resident memory is about the weights, plus torch's own (~0.3 GB), plus this.
MEMORY_BUDGET_MB = 1024
# The share of the budget a prefill pass may take (its caches, activations and attention scores); the rows' caches
# get the rest. Passes of a few hundred tokens already run the GEMMs at full rate on a CPU.
PREFILL_SHARE = 1 / 4


def kv_bytes_per_slot(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes of one cache slot of one row: its key and value in every layer."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize


def prefill_bytes_per_token(cfg: ModelConfig, itemsize: int, keys: int) -> int:
    """Transient bytes one prompt token costs in a prefill pass, besides its cached keys and values. Nothing is kept
    for autograd, so one layer's tensors live at a time: the larger of attention's (input, norm, q, k, v, the
    rotated q and k, output) and the MLP's (input, norm, gate, up, silu(gate), their product), the layer's output,
    and the token's attention scores and probabilities over `keys` slots (fp32, the most any attention path makes)."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    attention = 2 * C + 3 * H * D + 4 * Hkv * D
    mlp = 2 * C + 4 * I
    return (max(attention, mlp) + C) * itemsize + 2 * H * keys * 4


@dataclass(frozen=True)
class DecodePlan:
    rows: int  # prompts decoded at once
    prefill_tokens: int | None  # tokens per prefill pass (None: each admission in one pass)
    budget_bytes: int | None = None
    planned_bytes: int | None = None  # what the plan holds at most: rows' caches + a prefill pass + the prefix


def plan_decode(cfg: ModelConfig, itemsize: int, prompt_lens: list[int], prefix_len: int, prefix_rows: int,
                max_new_tokens: int, batch_size: int, budget_mb: float | None) -> DecodePlan:
    """Rows and prefill pass size that keep answering within `budget_mb` (None: `batch_size` rows, no limit).

    A row holds `widest + max_new_tokens + TRIM_COLUMNS` slots (the pool's columns, `decode_queue`) of keys and
    values, and, for one layer at a time, its keys and values repeated to every query head (attention's copy). A
    prefill pass of n tokens holds their keys and values (a prompt's whole width when it is prefilled alone, in
    chunks) and n tokens' transient activations (`prefill_bytes_per_token`). The shared prefix's keys and values
    are held throughout. Rows never go below one: a budget too small for a single row is exceeded, not refused."""
    n_prompts = len(prompt_lens)
    if budget_mb is None:
        return DecodePlan(rows=max(1, min(batch_size, n_prompts)), prefill_tokens=None)
    budget = int(budget_mb * 2**20)
    cascade = is_cascade(prefix_rows, prefix_len)
    widest = max(prompt_lens) - (prefix_len if cascade else 0)  # the widest prompt's slots in its row
    kv = kv_bytes_per_slot(cfg, itemsize)
    per_token = kv + prefill_bytes_per_token(cfg, itemsize, keys=max(prompt_lens))
    prefill_tokens = max(1, int(budget * PREFILL_SHARE) // per_token)
    prefill = max(prefill_tokens, widest) * kv + prefill_tokens * (per_token - kv)
    prefix = prefix_rows * prefix_len * kv if prefix_len else 0
    capacity = widest + max_new_tokens + TRIM_COLUMNS
    attention_copy = 2 * cfg.num_attention_heads * cfg.head_dim * itemsize  # one layer, k and v at every head
    row = capacity * (kv + attention_copy + 1)  # + the row's slot mask
    rows = max(1, min(batch_size, n_prompts, (budget - prefill - prefix) // row))
    return DecodePlan(rows=rows, prefill_tokens=prefill_tokens, budget_bytes=budget,
                      planned_bytes=rows * row + prefill + prefix)


def prefill_groups(widths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Consecutive runs of prompts (indices) prefilled together: each run, padded to its widest, holds at most
    `max_tokens` tokens, or is one prompt (prefilled in chunks). None: all in one."""
    if max_tokens is None:
        return [list(range(len(widths)))]
    groups: list[list[int]] = []
    widest = 0
    for i, w in enumerate(widths):
        if groups and (len(groups[-1]) + 1) * max(widest, w) <= max_tokens:
            groups[-1].append(i)
            widest = max(widest, w)
        else:
            groups.append([i])
            widest = w
    return groups



class RowPool:
    """The rows being decoded together: one prompt per row, one new token per row per step.

    Slots (columns) are shared by all rows and written at one pointer, `end`. A prompt joins at a
    free row with its [prefix copy | suffix] slots right-aligned at `end`; the columns before its
    own are masked out for it, and its rotary positions count its own tokens only, so it decodes as
    it would alone. With a cascade prefix only the suffixes are in the rows (`KVCache.set_prefix`)."""

    def __init__(self, model: Qwen2ForCausalLM, n_rows: int, capacity: int, prefix: Prefix | None, pad_id: int):
        self.model, self.prefix, self.pad_id = model, prefix, pad_id
        self.device = model.lm_head.weight.device
        self.caches = model.new_kv_caches(n_rows, capacity)
        if prefix is not None and prefix.cascade:
            for cache, prefix_cache in zip(self.caches, prefix.caches):
                cache.set_prefix(prefix_cache.k, prefix_cache.v)
        self.mask = torch.zeros((n_rows, capacity), dtype=torch.bool, device=self.device)  # real slot of a row
        self.end = 0  # slots written so far
        self.prompt = [-1] * n_rows  # prompt index of each row, -1: free
        self.start = [0] * n_rows  # first slot of each row's prompt
        self.token = torch.full((n_rows,), pad_id, dtype=torch.long, device=self.device)  # next input
        self.positions = torch.zeros(n_rows, dtype=torch.long, device=self.device)  # rotary position of `token`
        self.adapter = [0] * n_rows  # adapter id of each row (any valid id for a free row)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]


    def live(self) -> list[int]:
        return [r for r, p in enumerate(self.prompt) if p >= 0]

    def free(self) -> list[int]:
        return [r for r, p in enumerate(self.prompt) if p < 0]

    def shift(self, by: int) -> None:
        """Move every row's slots `by` columns right (negative: left, dropping the first -by columns)."""
        lo, hi = max(0, -by), self.end
        for cache in self.caches:
            cache.k[:, :, lo + by:hi + by] = cache.k[:, :, lo:hi].clone()
            cache.v[:, :, lo + by:hi + by] = cache.v[:, :, lo:hi].clone()
        self.mask[:, lo + by:hi + by] = self.mask[:, lo:hi].clone()
        if by > 0:
            self.mask[:, :by] = False
        self.end += by
        self.start = [s + by for s in self.start]

    def make_room(self, columns: int) -> None:
        """At least `columns` free slots after `end`; columns no live row attends are cut once there
        are TRIM_COLUMNS of them (or when the caches are full), and the caches grow if that is not enough."""
        live = self.live()
        dead = min((self.start[r] for r in live), default=self.end)
        if dead >= TRIM_COLUMNS or (dead > 0 and self.end + columns > self.capacity):
            self.shift(-dead)
        if self.end + columns > self.capacity:
            self.grow(self.end + columns)

    def grow(self, needed: int) -> None:
        n, capacity = len(self.prompt), max(needed, self.capacity + self.capacity // 2)
        for cache in self.caches:
            for name in ("k", "v"):
                old = getattr(cache, name)
                new = old.new_zeros((n, old.shape[1], capacity, old.shape[3]))
                new[:, :, :self.end] = old[:, :, :self.end]
                setattr(cache, name, new)
        mask = self.mask.new_zeros((n, capacity))
        mask[:, :self.end] = self.mask[:, :self.end]
        self.mask = mask

    def admit(self, rows: list[int], prompt_ids: list[int], prompts: list[list[int]],
              adapter_ids: list[int] | None, prefill_tokens: int | None = None) -> torch.Tensor:
        """Prefill these prompts into these free rows, in groups of at most `prefill_tokens` tokens per pass
        (`prefill_groups`; None: one batch); returns their first tokens (n,)."""
        widths = [row_slots(self.prefix, len(p)) for p in prompts]
        self.make_room(0)  # cut dead columns first: the prompts may then fit before `end`
        if max(widths) > self.end:  # the prompts must end at `end`: move the rows right to make space before it
            by = max(widths) - self.end
            if self.end + by > self.capacity:
                self.grow(self.end + by)
            self.shift(by)
        first = torch.empty(len(rows), dtype=torch.long, device=self.device)
        for group in prefill_groups(widths, prefill_tokens):
            width = max(widths[i] for i in group)  # the group's widest prompt's slots
            caches = self.model.new_kv_caches(len(group), width)
            tokens, positions, mask, _ = prefill(
                self.model, [prompts[i] for i in group], self.pad_id, caches, self.prefix,
                [adapter_ids[i] for i in group] if adapter_ids is not None else None, prefill_tokens)
            index = torch.tensor([rows[i] for i in group], dtype=torch.long, device=self.device)
            lo = self.end - width
            for cache, new in zip(self.caches, caches):
                cache.k[index, :, lo:self.end] = new.k
                cache.v[index, :, lo:self.end] = new.v
            self.mask[index, :lo] = False
            self.mask[index, lo:self.end] = mask
            self.positions[index] = positions
            self.token[index] = tokens
            first[group] = tokens
            for j, i in enumerate(group):
                r = rows[i]
                self.prompt[r], self.adapter[r] = prompt_ids[i], adapter_ids[i] if adapter_ids is not None else 0
                self.start[r] = lo + int(mask[j].int().argmax())  # its first real slot (left pads are dead)
        return first

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (when no prompt is left to take the free ones' places)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for cache in self.caches:
            cache.keep_rows(index)
        self.mask, self.token, self.positions = self.mask[index], self.token[index], self.positions[index]
        self.prompt, self.start, self.adapter = ([xs[r] for r in rows] for xs in (self.prompt, self.start, self.adapter))

    def step(self, adapter_ids: torch.Tensor | None) -> torch.Tensor:
        """One decode step of every row (free rows compute on pad tokens), each row with its adapter of
        `adapter_ids` (None: the model as it is); returns the next tokens (n,)."""
        self.make_room(1)
        self.mask[:, self.end] = True
        next_token = decode_step(self.model, self.token, self.positions, self.mask[:, :self.end + 1],
                                 self.caches, self.end, adapter_ids)
        self.end += 1
        return next_token


def decode_queue(
    model: Qwen2ForCausalLM, prompts: list[list[int]], order: list[int], max_new_tokens: int,
    stop_ids: list[int], pad_id: int, batch_size: int, adapter_ids: list[int] | None = None,
    prefix: Prefix | None = None, on_done=None, prefill_tokens: int | None = None,
) -> list[list[int]]:
    """Greedy continuations (without the stop token) of `prompts`, taken in `order`, at most `batch_size`
    decoding at once: a finished row's place goes to the next prompt in the queue (continuous
    batching; see REFILL_FRACTION); once the queue is empty finished rows leave the batch when a
    quarter of it has finished. Prompts are prefilled at most `prefill_tokens` tokens per pass (None: each
    admission in one). `on_done(n)` is told each time n more answers are complete."""
    if max_new_tokens < 1 or not order:
        return [[] for _ in prompts]
    stop = set(stop_ids)
    n_rows = min(batch_size, len(order))
    widest = row_slots(prefix, max(len(prompts[i]) for i in order))
    pool = RowPool(model, n_rows, widest + max_new_tokens + TRIM_COLUMNS, prefix, pad_id)  # room for any row
    refill_at = max(1, int(n_rows * REFILL_FRACTION))
    out: list[list[int]] = [[] for _ in prompts]
    queue = list(reversed(order))  # pop() takes the next prompt
    row_adapters = None  # (n_rows,) each row's adapter, remade when rows change
    adapters_changed = True

    def record(rows: list[int], tokens: list[int]) -> None:
        """Append each row's new token (also its next input, `pool.token`); a row whose answer is
        complete becomes free."""
        finished = 0
        for r, t in zip(rows, tokens):
            i = pool.prompt[r]
            if t in stop or len(out[i]) + 1 >= max_new_tokens:
                if t not in stop:
                    out[i].append(t)
                pool.prompt[r], finished = -1, finished + 1
            else:
                out[i].append(t)
        if finished and on_done is not None:
            on_done(finished)

    while True:
        while queue and len(pool.free()) >= min(refill_at, len(queue)):
            rows = pool.free()[:len(queue)]
            take = [queue.pop() for _ in rows]
            first = pool.admit(rows, take, [prompts[i] for i in take],
                               [adapter_ids[i] for i in take] if adapter_ids is not None else None, prefill_tokens)
            record(rows, first.tolist())
            adapters_changed = True
        live = pool.live()
        if not live:
            break
        if not queue and 4 * (len(pool.prompt) - len(live)) >= len(pool.prompt):
            pool.keep(live)
            live = list(range(len(live)))
            adapters_changed = True
        free = pool.free()
        if free:  # free rows compute on pad tokens until a prompt takes their place
            pool.token[free] = pad_id
        pool.positions += 1
        if adapters_changed and adapter_ids is not None:
            row_adapters = adapter_tensor(pool.adapter, pool.device)
        adapters_changed = False
        pool.token = pool.step(row_adapters)
        record(live, pool.token[live].tolist())
    return out


@torch.no_grad()
def generate_batch(
    model: Qwen2ForCausalLM, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
    adapter_ids: list[int] | None = None, prefix: Prefix | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt (without the stop token), all prompts in one batch, stopping
    per row. `adapter_ids`: the adapter of each prompt, for a model whose adapters are stacked
    (lora_mem.lora_core.multi_adapter); None answers with the model as it is. `prefix`: a precomputed shared
    head of all prompts (default: computed here from the prompts' common head)."""
    if prefix is None:
        prefix = batch_prefix(model, prompts, adapter_ids)
    return decode_queue(model, prompts, list(range(len(prompts))), max_new_tokens, stop_ids, pad_id,
                        len(prompts), adapter_ids, prefix)


@torch.no_grad()
def generate(
    model: Qwen2ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    stop_ids: list[int] | None = None,
    pad_id: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    adapter_ids: list[int] | None = None,
    memory_budget_mb: float | None = MEMORY_BUDGET_MB,
) -> list[list[int]]:
    """Greedy continuations of many prompts, at most `batch_size` at once, in input order.

    Prompts are taken shortest first (similar lengths decode side by side), and a finished answer's
    row is given to the next prompt (continuous batching). The head all prompts share (system
    prompt, instruction; for in-context answering the whole context) is computed once for the call.
    `adapter_ids` (one per prompt) answers each prompt with its own adapter from a stacked set, in
    shared batches. `memory_budget_mb`: the keys, values and prefill activations of the call stay within it
    (`plan_decode`: fewer rows, prefill in passes; None: `batch_size` rows, each admission prefilled in one pass);
    the answers are the same."""
    if adapter_ids is not None and len(adapter_ids) != len(prompts):
        raise ValueError(f"{len(adapter_ids)} adapter ids for {len(prompts)} prompts")
    if memory_budget_mb is not None and not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be > 0 (or None: no limit), got {memory_budget_mb}")
    if not prompts:
        return []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    head = shared_head_len(prompts)
    plan = plan_decode(model.config, model.lm_head.weight.element_size(), [len(p) for p in prompts], head,
                       len(set(adapter_ids)) if adapter_ids is not None else 1, max_new_tokens, batch_size,
                       memory_budget_mb)
    prefix = batch_prefix(model, prompts, adapter_ids, plan.prefill_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="answering", unit="q", leave=False)
    try:
        return decode_queue(model, prompts, order, max_new_tokens, stop_ids or [], pad_id, plan.rows,
                            adapter_ids, prefix, on_done=bar.update if bar else None,
                            prefill_tokens=plan.prefill_tokens)
    finally:
        if bar:
            bar.close()


def cli_parser(description: str, prog: str = "python -m lora_mem.model.generate") -> argparse.ArgumentParser:
    """The options of the generate command lines (this one, and lora_mem.lora_core.generate's with adapters); bad
    values are one error line."""
    ap = Parser(prog=prog, description=description)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--prompt", action="append", required=True, help="a user message; repeat for a batch")
    ap.add_argument("--system", default=None, help="system prompt (default: the model family's own)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64, help="the longest answer, in tokens")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help=DTYPE_DEFAULT_HELP)
    add_kernel_args(ap)
    return ap


def load_for_cli(args: argparse.Namespace):
    """The model the options name, with the kernel policy they (or the environment) give."""
    from lora_mem.model.loader import load_model

    try:
        policy = KernelPolicy.from_args(args)
    except ValueError as e:  # a LORA_MEM_* variable with a value it cannot have
        fail(str(e))
    return load_model(args.model, device=args.device, dtype=args.dtype, progress=True, policy=policy)


def answer_and_print(lm, args: argparse.Namespace) -> None:
    """Greedy answers to the --prompt messages, printed with the decoding speed."""
    tok = lm.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}], system_prompt=args.system) for p in args.prompt]
    t0 = time.perf_counter()
    outs = generate(lm.model, prompts, args.max_new_tokens, tok.stop_ids, tok.pad_id)
    dt = time.perf_counter() - t0
    for p, o in zip(args.prompt, outs):
        print(f"> {p}\n{tok.decode(o)}\n")
    n_tokens = sum(len(o) for o in outs)
    print(f"[{n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:.1f} tokens/s, {len(outs)} prompt(s), {lm.name}]")


def main(argv: list[str] | None = None) -> None:
    args = cli_parser("Greedy chat answers from a Qwen2-family model.").parse_args(argv)
    answer_and_print(load_for_cli(args), args)


def cli(run=main, errors: tuple[type[Exception], ...] = ()) -> None:
    """run() with bad input (model, checkpoint, tokenizer, and `errors`) reported in one line instead of a
    traceback."""
    from lora_mem.model.config import ConfigError
    from lora_mem.model.loader import CheckpointError
    from lora_mem.model.packaged import PackagedModelError
    from lora_mem.model.tokenizer import TokenizerError

    try:
        run()
    except (ConfigError, CheckpointError, PackagedModelError, TokenizerError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
