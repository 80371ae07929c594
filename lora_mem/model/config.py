"""Architecture config of a Qwen2-family decoder, read from a Hugging Face `config.json`.

Only architecture fields live here (no batch size, no run settings). Qwen2/2.5 and Llama-family
checkpoints share one decoder; they differ in a few fields that this dataclass names explicitly:
bias on q/k/v (Qwen2), tied embeddings (small Qwen2.5 and SmolLM2), rope theta.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config.json this engine cannot run, with the field that is wrong."""


SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "qwen2" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v projections
    o_bias: bool  # Qwen2: none on o; Llama's `attention_bias` puts one on all four
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from the dict of a Hugging Face config.json; `source` names the file in errors."""

        def need(key: str):
            if key not in hf:
                raise ConfigError(f"{source}: missing field '{key}'")
            return hf[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        # transformers >= 5 writes rope settings under `rope_parameters`; older files use `rope_theta`
        # and `rope_scaling`. Only plain (unscaled) rope is implemented.
        rope_parameters = hf.get("rope_parameters") or {}
        rope_theta = rope_parameters.get("rope_theta", hf.get("rope_theta"))
        if rope_theta is None:
            raise ConfigError(f"{source}: missing field 'rope_theta' (or 'rope_parameters.rope_theta')")
        for field, scaling in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", rope_parameters)):
            if scaling:
                rope_type = scaling.get("rope_type", scaling.get("type", "default"))
                if rope_type != "default":
                    raise ConfigError(f"{source}: unsupported rope scaling type '{rope_type}' in field '{field}'")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: unsupported field 'use_sliding_window' = true")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: unsupported field 'mlp_bias' = true")
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act '{hidden_act}' (only 'silu')")

        num_heads = need("num_attention_heads")
        hidden_size = need("hidden_size")
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_config(hf, source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


# Named shapes for benchmarks, where speed does not depend on the weights' values.
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-1.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True,
        qkv_bias=True, o_bias=False, bos_token_id=None, eos_token_ids=(151645, 151643),
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True,
        qkv_bias=False, o_bias=False, bos_token_id=1, eos_token_ids=(2,),
    ),
}
