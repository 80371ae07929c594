"""Tiny randomly initialised Hugging Face checkpoints, built and saved with `transformers` inside the
tests (test-only reference): a Qwen2 with q/k/v bias and an untied head, a Llama with tied embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 128


def tiny_tokenizer() -> Tokenizer:
    """A word-level tokenizer over a tiny vocabulary with ChatML specials, enough for load_model."""
    words = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_tiny_checkpoint(out_dir: Path, kind: str, seed: int = 0):
    """Save a tiny `kind` ("qwen2" or "llama") model to out_dir; return the transformers model (eval, fp32)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=1, bos_token_id=1)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # Non-trivial norms and biases so that a mix-up of any parameter shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tiny_tokenizer().save(str(out_dir / "tokenizer.json"))
    return model
