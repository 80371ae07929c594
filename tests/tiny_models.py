"""Tiny randomly initialised Hugging Face checkpoints, built and saved with `transformers` inside the
tests (test-only reference): a Qwen2 with q/k/v bias and an untied head, a Llama with tied embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320  # 256 byte-level symbols, ChatML specials and a few merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CORPUS = [
    "Caroline: I went to the LGBTQ support group yesterday. Melanie: That is great, Caroline!",
    "Answer the question in a few words. Question: When did Caroline go to the support group?",
    "system user assistant You are a helpful assistant. 0123456789 May June 2023",
]


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a few lines, with ChatML specials: real chat prompts tokenise."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_tiny_checkpoint(out_dir: Path, kind: str, seed: int = 0):
    """Save a tiny `kind` ("qwen2" or "llama") model to out_dir; return the transformers model (eval, fp32)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=2, bos_token_id=0)
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
