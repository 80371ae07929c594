"""Architecture config of a Qwen2-family decoder, read from a Hugging Face `config.json`.

Only architecture fields live here (no batch size, no run settings). Qwen2/2.5 and Llama-family
checkpoints share one decoder; they differ in a few fields that this dataclass names explicitly:
bias on q/k/v (Qwen2), tied embeddings (small Qwen2.5 and SmolLM2), rope theta.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lora_mem.untrusted import read_json, validated


class ConfigError(ValueError):
    """A config.json this engine cannot run, with the field that is wrong."""


SUPPORTED_MODEL_TYPES = ("qwen2", "llama")

PositiveInt = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _token_ids(value: Any) -> int | list[int] | None:
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"must be a token id or a list of token ids, got {value!r:.60}")
    return value


TokenIds = Annotated[Any, AfterValidator(_token_ids)]  # a token id, a list of them, or None


class HFConfigFile(BaseModel):
    """The fields of a Hugging Face config.json that this engine reads, with their types and ranges (the defaults
    are transformers'); the other fields are ignored, and what the decoder does not implement is refused."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model_type: str
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None  # None: as many as attention heads
    head_dim: PositiveInt | None = None  # None: hidden_size / num_attention_heads
    rms_norm_eps: PositiveFloat = 1e-6
    # transformers >= 5 writes rope settings under `rope_parameters`; older files use `rope_theta` and
    # `rope_scaling`. Only plain (unscaled) rope is implemented.
    rope_theta: PositiveFloat | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: Annotated[int, Field(ge=2)] = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_sliding_window: bool | None = False
    mlp_bias: bool | None = False
    hidden_act: str = "silu"
    bos_token_id: TokenId | None = None
    eos_token_id: TokenIds = None

    @property
    def rope_theta_value(self) -> float:
        return (self.rope_parameters or {}).get("rope_theta", self.rope_theta)

    @model_validator(mode="after")
    def implemented(self) -> "HFConfigFile":
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type '{self.model_type}' (supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        theta = self.rope_theta_value
        if theta is None:
            raise ValueError("missing field 'rope_theta' (or 'rope_parameters.rope_theta')")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
            raise ValueError(f"field 'rope_parameters.rope_theta' must be a finite number > 0, got {theta!r:.60}")
        for field, scaling in (("rope_scaling", self.rope_scaling), ("rope_parameters", self.rope_parameters)):
            rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"unsupported rope scaling type '{rope_type}' in field '{field}'")
        if self.use_sliding_window:
            raise ValueError("unsupported field 'use_sliding_window' = true")
        if self.mlp_bias:
            raise ValueError("unsupported field 'mlp_bias' = true")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act '{self.hidden_act}' (only 'silu')")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads} (and no head_dim is given)")
        kv_heads = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        return self


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
        """Build from the dict of a Hugging Face config.json, every field checked (HFConfigFile); `source` names the
        file in errors."""
        c = validated(hf, HFConfigFile, source, ConfigError)
        num_heads = c.num_attention_heads
        return cls(
            model_type=c.model_type,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=c.num_key_value_heads or num_heads,
            head_dim=c.head_dim or c.hidden_size // num_heads,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=float(c.rope_theta_value),
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=c.tie_word_embeddings,
            qkv_bias=True if c.model_type == "qwen2" else c.attention_bias,
            o_bias=False if c.model_type == "qwen2" else c.attention_bias,
            bos_token_id=c.bos_token_id,
            eos_token_ids=tuple(c.eos_token_id) if isinstance(c.eos_token_id, list) else
            ((c.eos_token_id,) if c.eos_token_id is not None else ()),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        return cls.from_hf_config(read_json(path, ConfigError), source=str(path))

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
