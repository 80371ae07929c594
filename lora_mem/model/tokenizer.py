"""The `tokenizers` tokenizer of a checkpoint plus ChatML chat formatting.

ChatML (Qwen2/2.5, SmolLM2):
    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n
Each family's chat template inserts its own default system prompt when none is given; we do the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict
from tokenizers import Tokenizer as HFTokenizer

from lora_mem.model.config import ModelConfig, TokenIds
from lora_mem.untrusted import Schema, read_json_as

# Default system prompts, keyed by a phrase that identifies the family in its chat template.
DEFAULT_SYSTEM_PROMPTS = {
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class TokenizerError(ValueError):
    pass


def _special_token(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens either as strings or as {"content": ...} dicts
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise ValueError(f"must be a token string or {{\"content\": string}}, got {value!r:.60}")
    return content


def _chat_template(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template", ""), str) for t in value):
        return " ".join(t.get("template", "") for t in value)  # several named templates
    raise ValueError(f"must be a template string or a list of {{\"name\", \"template\"}} objects, got {value!r:.60}")


class TokenizerConfigFile(BaseModel):
    """The fields of tokenizer_config.json this engine reads (the file is optional; so is each field)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    eos_token: Annotated[Any, AfterValidator(_special_token)] = None
    pad_token: Annotated[Any, AfterValidator(_special_token)] = None
    chat_template: Annotated[Any, AfterValidator(_chat_template)] = ""
    default_system_prompt: str | None = None


class GenerationConfigFile(BaseModel):
    """The field of generation_config.json this engine reads (the file is optional)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    eos_token_id: TokenIds = None


def read_optional(path: Path, schema: type[Schema]) -> Schema:
    """An optional file of the checkpoint, checked field by field; an absent one gives the schema's defaults."""
    return read_json_as(path, schema, TokenizerError) if path.is_file() else schema()


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, system_prompt: str | None, eos_ids: list[int], pad_id: int):
        self.tokenizer = tokenizer
        self.default_system_prompt = system_prompt
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        # Generation stops at any EOS of the model and at the end of a chat turn.
        stops = list(dict.fromkeys(eos_ids + ([self.im_end_id] if self.im_end_id is not None else [])))
        self.stop_ids = stops
        self.pad_id = pad_id

    @classmethod
    def from_dir(cls, ckpt_dir: Path, cfg: ModelConfig | None = None) -> "Tokenizer":
        path = ckpt_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{ckpt_dir}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot be read by `tokenizers` ({e})") from e
        if cfg is not None and tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
            raise TokenizerError(f"{path}: {tok.get_vocab_size(with_added_tokens=True)} tokens, more than the model's "
                                 f"vocab_size {cfg.vocab_size} in config.json (other model's tokenizer?)")
        tok_cfg = read_optional(ckpt_dir / "tokenizer_config.json", TokenizerConfigFile)
        gen_cfg = read_optional(ckpt_dir / "generation_config.json", GenerationConfigFile)

        eos_ids: list[int] = []
        gen_eos = gen_cfg.eos_token_id
        eos_ids += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        if cfg is not None:
            eos_ids += list(cfg.eos_token_ids)
        if tok_cfg.eos_token and tok.token_to_id(tok_cfg.eos_token) is not None:
            eos_ids.append(tok.token_to_id(tok_cfg.eos_token))
        pad_id = tok.token_to_id(tok_cfg.pad_token) if tok_cfg.pad_token else None
        if pad_id is None:
            pad_id = eos_ids[0] if eos_ids else 0

        system_prompt = tok_cfg.default_system_prompt
        if system_prompt is None:
            system_prompt = next((p for p in DEFAULT_SYSTEM_PROMPTS.values() if p in tok_cfg.chat_template), None)
        return cls(tok, system_prompt, list(dict.fromkeys(eos_ids)), pad_id)

    # -- plain text -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------
    def format_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, system_prompt: str | None = None
    ) -> str:
        """ChatML text of `messages` ({"role", "content"}), with the family's default system prompt
        unless the messages start with a system message or `system_prompt` is given."""
        if self.im_start_id is None:
            raise TokenizerError("this tokenizer has no <|im_start|> token: ChatML chat formatting is not available")
        if messages and messages[0]["role"] != "system":
            system = system_prompt if system_prompt is not None else self.default_system_prompt
            if system is not None:
                messages = [{"role": "system", "content": system}] + list(messages)
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        if add_generation_prompt:
            text += f"{IM_START}assistant\n"
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, system_prompt=None) -> list[int]:
        return self.encode(self.format_chat(messages, add_generation_prompt, system_prompt))
