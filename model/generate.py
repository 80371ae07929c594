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

import torch

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


def prefill(model: Qwen2ForCausalLM, prompts: list[list[int]], pad_id: int, kv_caches: list[KVCache]):
    """Fill the caches with the prompts; return last-slot logits (B, V), positions (B,), slot mask (B, T).

    Slot layout: [shared prefix | left-padded suffixes]. The prefix is computed once (batch 1) and
    broadcast into every row's cache; pad slots sit between prefix and suffix, masked out, and
    rotary positions count real tokens only, so each row sees exactly its own prompt."""
    device = model.lm_head.weight.device
    P = common_prefix_len(prompts) if len(prompts) > 1 else 0
    ids, suffix_mask = left_pad([p[P:] for p in prompts], pad_id, device)  # (B, S)
    B = ids.shape[0]
    if P:
        prefix_caches = model.new_kv_caches(1, P)
        model.model(torch.tensor([prompts[0][:P]], device=device), kv_caches=prefix_caches)
        for cache, prefix_cache in zip(kv_caches, prefix_caches):
            cache.update(0, prefix_cache.k.expand(B, -1, -1, -1), prefix_cache.v.expand(B, -1, -1, -1))
    mask = torch.cat([torch.ones((B, P), dtype=torch.bool, device=device), suffix_mask], dim=1)  # (B, T)
    position_ids = P + (suffix_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    # No prefix and no padding: no mask, SDPA's causal fast path.
    attention_mask = None if P == 0 and bool(suffix_mask.all()) else mask
    hidden = model.model(ids, position_ids, attention_mask, kv_caches, cache_start=P)  # (B, S, C)
    logits = model.lm_head(hidden[:, -1])  # (B, V): only the last slot is needed
    return logits, position_ids[:, -1], mask


def decode_step(model, token, positions, mask, kv_caches, cache_start: int) -> torch.Tensor:
    """One token per row at slot `cache_start`; returns (B, V) logits."""
    hidden = model.model(token[:, None], positions[:, None], mask, kv_caches, cache_start)
    return model.lm_head(hidden[:, -1])


@torch.no_grad()
def generate_batch(
    model: Qwen2ForCausalLM, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuation of each prompt (without the stop token), stopping per row.
    Rows that have stopped are dropped from the batch once a quarter of it has (so a batch does not
    keep computing for answers that are already complete; the copy is amortised)."""
    device = model.lm_head.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    kv_caches = model.new_kv_caches(B, T + max_new_tokens)
    logits, positions, mask = prefill(model, prompts, pad_id, kv_caches)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original row of each batch slot still decoding
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = torch.where(done, pad_id, logits.argmax(-1))  # (b,)
        out[rows, step] = token
        done = done | torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if 4 * int(done.sum()) >= len(done):
            keep = (~done).nonzero().squeeze(1)
            rows, token, positions, mask, done = rows[keep], token[keep], positions[keep], mask[keep], done[keep]
            for cache in kv_caches:
                cache.keep_rows(keep)
        positions = positions + 1
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.bool, device=device)], dim=1)
        logits = decode_step(model, token, positions, mask, kv_caches, cache_start=T + step)
    results = []
    for row in out.tolist():
        kept = []
        for t in row:
            if t in stop_ids:
                break
            kept.append(t)
        results.append(kept)
    return results


def generate(
    model: Qwen2ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    stop_ids: list[int] | None = None,
    pad_id: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuations of many prompts, batched by similar length (less padding), in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="answering", unit="q", leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, stop_ids or [], pad_id)
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
