"""A randomly initialised checkpoint of a preset's shapes, with a small chat tokenizer: a model directory for the
commands that load one (bench.capacity, bench.perf.decode, bench.perf.train_throughput's peft side) where no weights
can be downloaded, such as a lent GPU machine.

    python -m bench.perf.random_checkpoint --preset smollm2-135m --out /tmp/smollm2-random
    python -m bench.perf.random_checkpoint --preset smollm2-135m --layers 2 --hidden 64 --intermediate 128 \\
        --heads 4 --kv-heads 2 --vocab 512 --out /tmp/tiny                   # tiny shapes (the GPU suite's dry run)

Writes config.json (Hugging Face fields, so transformers loads it too), model.safetensors (lora_mem's init_weights,
seeded), tokenizer.json (a byte-level BPE trained here on a few lines of chat text, with the ChatML specials at the
ids the preset's family uses: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2), tokenizer_config.json and
generation_config.json. Speed does not depend on the weights' values; answers and recall from such a model mean
nothing, and its tokenizer splits text differently from the real one, so sequence lengths differ somewhat.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from lora_mem.cli import Parser, int_at_least, output_dir, positive_int

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
# The chat template names the family's default system prompt, so lora_mem's tokenizer uses the same one
# (lora_mem.model.tokenizer.DEFAULT_SYSTEM_PROMPTS) and prompts have the real model's length.
SYSTEM_PROMPTS = {"llama": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                  "qwen2": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}
CORPUS = [
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhen was the person born?<|im_end|>\n"
    "<|im_start|>assistant\nThe person was born on 23 October 1938.<|im_end|>\n",
    "Which town is the person from? What is the person's profession? Answer the question in a few words.",
    "January February March April May June July August September October November December",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 19 20 2023 1938 1987 yesterday today tomorrow morning evening",
    "Caroline went to the support group yesterday. Melanie said that is great. They talked about painting, "
    "camping, the beach, a new job, a book, the kids and a trip to the mountains with friends and family.",
]


def write_tokenizer(out: Path, vocab: int, family: str) -> int:
    """Train and save the tokenizer; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    system = SYSTEM_PROMPTS[family]
    tok.train_from_iterator([line.format(system=system) for line in CORPUS] * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
               f"{{# default system prompt: {system} #}}"
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<|im_start|>",
         "chat_template": template}, indent=2) + "\n")
    return tok.get_vocab_size()


def hf_config_dict(cfg, dtype: torch.dtype) -> dict:
    """config.json fields for lora_mem's ModelConfig (lora_mem.model.config.ModelConfig.from_hf_config reads them back;
    transformers reads them as its Llama / Qwen2 config)."""
    d = {"model_type": cfg.model_type, "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
        cfg.model_type]], "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
         "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
         "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
         "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
         "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
         "hidden_act": "silu", "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
         "torch_dtype": str(dtype).removeprefix("torch.")}
    if cfg.model_type == "llama":
        d["attention_bias"] = cfg.qkv_bias
    return d


def build_parser() -> Parser:
    from lora_mem.model.config import PRESETS

    ap = Parser(prog="python -m bench.perf.random_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m",
                    help="the shapes (default smollm2-135m)")
    ap.add_argument("--out", type=output_dir, required=True, help="the checkpoint directory to write")
    g = ap.add_argument_group("shape overrides (default: the preset's)")
    g.add_argument("--layers", type=positive_int, default=None, help="decoder layers")
    g.add_argument("--hidden", type=int_at_least(8), default=None, help="hidden size")
    g.add_argument("--intermediate", type=int_at_least(8), default=None, help="MLP size")
    g.add_argument("--heads", type=positive_int, default=None, help="query heads")
    g.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (divide --heads)")
    g.add_argument("--head-dim", type=int_at_least(2), default=None, help="per head, even")
    g.add_argument("--vocab", type=int_at_least(300), default=None,
                   help="model vocabulary (>= 300: 256 bytes, the 3 specials and a few merges); the tokenizer gets "
                        "at most 4096 of it")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                    help="dtype of the saved weights (default bfloat16)")
    ap.add_argument("--seed", type=int_at_least(0), default=0, help="weights' seed")
    return ap


def main(argv: list[str] | None = None) -> Path:
    ap = build_parser()
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    from lora_mem.model.config import PRESETS
    from lora_mem.model.qwen2 import Qwen2ForCausalLM

    base = PRESETS[args.preset]
    changes = {k: v for k, v in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                                 ("intermediate_size", args.intermediate), ("num_attention_heads", args.heads),
                                 ("num_key_value_heads", args.kv_heads), ("head_dim", args.head_dim),
                                 ("vocab_size", args.vocab)) if v is not None}
    cfg = dataclasses.replace(base, **changes)
    if cfg.num_attention_heads % cfg.num_key_value_heads or cfg.head_dim % 2:
        ap.error(f"--heads {cfg.num_attention_heads} must be a multiple of --kv-heads {cfg.num_key_value_heads} "
                 f"and --head-dim {cfg.head_dim} even")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    vocab = write_tokenizer(out, min(cfg.vocab_size, 4096), cfg.model_type)
    model = Qwen2ForCausalLM(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(args.seed))
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": list(cfg.eos_token_ids)}) + "\n")
    params = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {args.preset} shapes{' with ' + str(changes) if changes else ''}, {params / 1e6:.1f}M "
          f"parameters in {args.dtype}, random (seed {args.seed}); tokenizer of {vocab} tokens")
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
