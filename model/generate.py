"""Batched greedy decoding with a KV cache: prefill, one decode step, the loop.

Prompts of different lengths share a batch through left padding: pad slots are masked out of
attention and each row's rotary positions count only its real tokens, so every row decodes exactly
as it would alone.

CLI:  python -m model.generate --model smollm2-135m-instruct --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.qwen2 import KVCache, Qwen2ForCausalLM


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
# cache than as one (B, vocab) product, once a batch has several rows (bench.greedy_head: 1.07-1.16x at
# 8-64 rows on a 2-core CPU, noisy; a single row reads the weights once either way, slices only add calls). Each slice
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


def set_row_adapters(model: torch.nn.Module, adapter_ids: torch.Tensor | None) -> None:
    """Tell every module that serves one adapter per batch row (a `row_adapter_ids` attribute, as
    lora_core's LoRALinear has once adapters are stacked) which adapter each row uses; None: off."""
    for m in model.modules():
        if hasattr(m, "row_adapter_ids"):
            m.row_adapter_ids = adapter_ids


def compute_prefix(model: Qwen2ForCausalLM, tokens: list[int], adapter_ids: list[int] | None = None,
                   cascade_min_tokens: int = CASCADE_MIN_TOKENS) -> Prefix:
    """Run the shared prompt head once per adapter (batch = distinct adapters) and keep its KV."""
    device = model.lm_head.weight.device
    distinct = sorted(set(adapter_ids)) if adapter_ids is not None else None
    n = len(distinct) if distinct is not None else 1
    caches = model.new_kv_caches(n, len(tokens))
    if distinct is not None:
        set_row_adapters(model, torch.tensor(distinct, device=device))
    model.model(torch.tensor([tokens] * n, device=device), kv_caches=caches)
    return Prefix(tokens, caches, distinct, cascade=n == 1 and len(tokens) >= cascade_min_tokens)


def prefill(model: Qwen2ForCausalLM, prompts: list[list[int]], pad_id: int, kv_caches: list[KVCache],
            prefix: Prefix | None = None, adapter_ids: list[int] | None = None):
    """Fill the caches with the prompts; return the greedy next token (B,), positions (B,), slot mask (B, S),
    and the next free slot.

    Slot layout: [prefix copy | left-padded suffixes], or with a cascade prefix just the suffixes
    (the prefix is shared, outside the rows). Pad slots sit before each suffix, masked out, and
    rotary positions count real tokens only, so each row sees exactly its own prompt."""
    device = model.lm_head.weight.device
    P = len(prefix) if prefix is not None else 0
    ids, suffix_mask = left_pad([p[P:] for p in prompts], pad_id, device)  # (B, S)
    B = ids.shape[0]
    position_ids = P + (suffix_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    if adapter_ids is not None:
        set_row_adapters(model, torch.tensor(adapter_ids, device=device))
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
    # No prefix and no padding: no mask, SDPA's causal fast path.
    attention_mask = None if cache_start == 0 and bool(suffix_mask.all()) else mask
    hidden = model.model(ids, position_ids, attention_mask, kv_caches, cache_start=cache_start)  # (B, S, C)
    head = model.lm_head.weight
    next_token = greedy_tokens(hidden[:, -1], head, vocab_slice_for(head.device, B))  # only the last slot is needed
    return next_token, position_ids[:, -1], mask, cache_start + ids.shape[1]


def decode_step(model, token, positions, mask, kv_caches, cache_start: int) -> torch.Tensor:
    """One token per row at slot `cache_start`; returns each row's greedy next token (B,)."""
    hidden = model.model(token[:, None], positions[:, None], mask, kv_caches, cache_start)
    head = model.lm_head.weight
    return greedy_tokens(hidden[:, -1], head, vocab_slice_for(head.device, len(token)))


def batch_prefix(model, prompts: list[list[int]], adapter_ids: list[int] | None) -> Prefix | None:
    P = common_prefix_len(prompts) if len(prompts) > 1 else 0
    return compute_prefix(model, prompts[0][:P], adapter_ids) if P else None


@torch.no_grad()
def generate_batch(
    model: Qwen2ForCausalLM, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
    adapter_ids: list[int] | None = None, prefix: Prefix | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt (without the stop token), stopping per row.

    `adapter_ids`: the adapter of each prompt, for a model whose adapters are stacked (lora_core.
    multi_adapter); None answers with the model as it is. `prefix`: a precomputed shared head of
    all prompts (default: computed here from the prompts' common head).
    Rows that have stopped are dropped from the batch once a quarter of it has (so a batch does not
    keep computing for answers that are already complete; the copy is amortised)."""
    device = model.lm_head.weight.device
    if prefix is None:
        prefix = batch_prefix(model, prompts, adapter_ids)
    P = len(prefix) if prefix is not None else 0
    B, S = len(prompts), max(len(p) for p in prompts) - P
    kv_caches = model.new_kv_caches(B, (S if prefix is not None and prefix.cascade else P + S) + max_new_tokens)
    try:
        next_token, positions, mask, next_slot = prefill(model, prompts, pad_id, kv_caches, prefix, adapter_ids)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)  # original row of each batch slot still decoding
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = torch.where(done, pad_id, next_token)  # (b,)
            out[rows, step] = token
            done = done | torch.isin(token, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if 4 * int(done.sum()) >= len(done):
                keep = (~done).nonzero().squeeze(1)
                rows, token, positions, mask, done = rows[keep], token[keep], positions[keep], mask[keep], done[keep]
                for cache in kv_caches:
                    cache.keep_rows(keep)
                if adapter_ids is not None:  # the adapters follow their rows
                    set_row_adapters(model, torch.tensor(adapter_ids, device=device)[rows])
            positions = positions + 1
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.bool, device=device)], dim=1)
            next_token = decode_step(model, token, positions, mask, kv_caches, cache_start=next_slot + step)
    finally:
        if adapter_ids is not None:
            set_row_adapters(model, None)
    results = []
    for row in out.tolist():
        kept = []
        for t in row:
            if t in stop_ids:
                break
            kept.append(t)
        results.append(kept)
    return results


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
) -> list[list[int]]:
    """Greedy continuations of many prompts, batched by similar length (less padding), in input order.

    The head all prompts share (system prompt, instruction; for in-context answering the whole
    context) is computed once for the call and reused by every batch. `adapter_ids` (one per
    prompt) answers each prompt with its own adapter from a stacked set, in shared batches."""
    if adapter_ids is not None and len(adapter_ids) != len(prompts):
        raise ValueError(f"{len(adapter_ids)} adapter ids for {len(prompts)} prompts")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)
    try:
        prefix = batch_prefix(model, prompts, adapter_ids)
    finally:
        if adapter_ids is not None:
            set_row_adapters(model, None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="answering", unit="q", leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        chunk_adapters = [adapter_ids[i] for i in chunk] if adapter_ids is not None else None
        outs = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, stop_ids or [], pad_id,
                              chunk_adapters, prefix)
        for i, o in zip(chunk, outs):
            results[i] = o
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    from model.loader import load_model

    ap = argparse.ArgumentParser(description="Greedy chat answers from a Qwen2-family model, optionally with LoRA adapters.")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--prompt", action="append", required=True, help="a user message; repeat for a batch")
    ap.add_argument("--adapter", action="append", default=[],
                    help="a LoRA adapter directory in PEFT format; repeat to answer with each adapter in turn")
    ap.add_argument("--system", default=None, help="system prompt (default: the model family's own)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)")
    args = ap.parse_args(argv)

    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
    tok = lm.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}], system_prompt=args.system) for p in args.prompt]
    for adapter in args.adapter or [None]:
        if adapter is not None:
            from lora_core.adapter_io import load_adapter  # runtime LoRA support lives in lora_core

            cfg = load_adapter(lm.model, adapter)
            print(f"[adapter {adapter}: r={cfg.rank}, alpha={cfg.alpha:g}]")
        t0 = time.perf_counter()
        outs = generate(lm.model, prompts, args.max_new_tokens, tok.stop_ids, tok.pad_id)
        dt = time.perf_counter() - t0
        for p, o in zip(args.prompt, outs):
            print(f"> {p}\n{tok.decode(o)}\n")
        n_tokens = sum(len(o) for o in outs)
        print(f"[{n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:.1f} tokens/s, {len(outs)} prompt(s), {lm.name}]")


def cli() -> None:
    """main() with bad input (model, checkpoint, adapter) reported in one line instead of a traceback."""
    from lora_core.adapter_io import AdapterError
    from model.config import ConfigError
    from model.loader import CheckpointError
    from model.packaged import PackagedModelError
    from model.tokenizer import TokenizerError

    try:
        main()
    except (ConfigError, CheckpointError, PackagedModelError, AdapterError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
