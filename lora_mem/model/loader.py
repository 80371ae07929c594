"""Load a Qwen2-family checkpoint: a local HF directory, a hub repo id, or a packaged model name.

Weights stream from the safetensors files straight into the parameters: the model is built on the
`meta` device, given real (uninitialised) storage once with `to_empty`, and each tensor is read from
the file into its parameter. Peak memory is one model plus one tensor, not two models.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lora_mem.kernels.cpu_allocator import keep_freed_memory
from lora_mem.kernels.policy import KernelPolicy
from lora_mem.model.config import ModelConfig
from lora_mem.model.qwen2 import Qwen2ForCausalLM
from lora_mem.model.tokenizer import Tokenizer
from lora_mem.untrusted import JSONFileError, check_name, parse_json, read_json_as, validated


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, tensor or model."""


@dataclass
class LoadedModel:
    model: Qwen2ForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path  # the resolved local checkpoint directory
    name: str  # what the user asked for


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def parse_dtype(name: str | None, device: torch.device, policy: KernelPolicy | None = None) -> torch.dtype:
    """A dtype name; None or "auto": the kernel policy's default for the device (bf16 on CUDA and on a CPU with bf16
    instructions, else fp32: KernelPolicy.default_dtype)."""
    if name is None or name == "auto":
        return (policy or KernelPolicy()).default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype '{name}' (choose from {', '.join(table)})")
    return table[name]


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint directory
# ---------------------------------------------------------------------------------------------

def resolve_checkpoint(name_or_path: str) -> Path:
    """A local directory as is; a packaged model name built into the cache; else a hub repo id."""
    from lora_mem.model.packaged import PACKAGED_MODELS, ensure_packaged_model

    if name_or_path in PACKAGED_MODELS:
        return ensure_packaged_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory with config.json, got a file")
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        if Path(name_or_path.split("/")[0]).expanduser().is_dir():  # "mymodels/smol" with a folder mymodels/
            raise CheckpointError(f"{name_or_path}: no such directory (its parent {name_or_path.split('/')[0]}/ "
                                  "exists, so this reads as a local path, not a hub repo id)")
        try:
            return download_from_hub(name_or_path)
        except CheckpointError as e:
            raise CheckpointError(f"{name_or_path}: not a local directory (no such path), and as a hub repo id: "
                                  f"{e}") from e
    raise CheckpointError(
        f"unknown model '{name_or_path}': not a packaged model ({', '.join(sorted(PACKAGED_MODELS))}), "
        "not an existing directory, and not a hub repo id of the form 'org/name'"
    )


def download_from_hub(repo_id: str) -> Path:
    """snapshot_download the config, tokenizer and safetensors; honours HF_HUB_OFFLINE and the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"model '{repo_id}' is not in the Hugging Face cache and {why}: download it once while online "
            f"(huggingface-cli download {repo_id}) or pass a local checkpoint directory"
        ) from e
    except Exception as e:  # repository not found, gated, network errors: all name the repo
        raise CheckpointError(f"could not download model '{repo_id}' from the hub: {e}") from e


# ---------------------------------------------------------------------------------------------
# Reading safetensors without mmap (so pages of the file do not count twice while loading)
# ---------------------------------------------------------------------------------------------

@dataclass
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {header_len})")
        try:
            header = parse_json(f.read(header_len), "header")
        except JSONFileError as e:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (bad {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file (the header is not a JSON object)")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = validated(info, TensorHeader, f"{path}: corrupt safetensors header: tensor '{name}'", CheckpointError)
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info.dtype}")
        dtype = SAFETENSORS_DTYPES[info.dtype]
        shape = tuple(info.shape)
        begin, end = info.data_offsets
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (tensor '{name}' bytes {begin}..{end} "
                f"do not fit shape {list(shape)} or the file size {size})"
            )
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, end - begin)
    return entries


class TensorHeader(BaseModel):
    """One tensor's entry in a safetensors header."""

    model_config = ConfigDict(strict=True, extra="ignore")
    dtype: str
    shape: list[Annotated[int, Field(ge=0)]]
    data_offsets: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]


class SafetensorsIndex(BaseModel):
    """model.safetensors.index.json: which shard file holds each tensor."""

    model_config = ConfigDict(strict=True, extra="ignore")
    weight_map: dict[str, str]

    @field_validator("weight_map")
    @classmethod
    def shard_names(cls, weight_map: dict[str, str]) -> dict[str, str]:
        for shard in set(weight_map.values()):  # files beside the index, never a path elsewhere
            check_name(shard, "shard file", ValueError)
        return weight_map


def checkpoint_entries(ckpt_dir: Path) -> dict[str, TensorEntry]:
    index = ckpt_dir / "model.safetensors.index.json"
    single = ckpt_dir / "model.safetensors"
    if index.is_file():
        weight_map = read_json_as(index, SafetensorsIndex, CheckpointError).weight_map
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")
    entries: dict[str, TensorEntry] = {}
    for fname in files:
        if not (ckpt_dir / fname).is_file():
            raise CheckpointError(f"{ckpt_dir / fname}: shard listed in the index is missing")
        entries.update(read_safetensors_header(ckpt_dir / fname))
    return entries


def read_tensor_into(entry: TensorEntry, name: str, out: torch.Tensor, f) -> None:
    """Read one tensor's bytes into `out` (converting dtype/device only if they differ)."""
    if out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous():
        buf = out
    else:
        buf = torch.empty(entry.shape, dtype=entry.dtype)
    f.seek(entry.start)
    view = memoryview(buf.view(-1).view(torch.uint8).numpy())
    if f.readinto(view) != entry.nbytes:
        raise CheckpointError(f"{entry.file}: truncated or corrupt safetensors file (short read of '{name}')")
    if buf is not out:
        out.copy_(buf)


# ---------------------------------------------------------------------------------------------
# Building and filling the model
# ---------------------------------------------------------------------------------------------

def checked_entries(model: Qwen2ForCausalLM, ckpt_dir: Path) -> dict[str, TensorEntry]:
    """The checkpoint's tensors, their names and shapes checked strictly against `model` (which may be on the meta
    device: nothing is read but the headers)."""
    entries = checkpoint_entries(ckpt_dir)
    params = dict(model.named_parameters())  # tied lm_head.weight appears once, as embed_tokens
    tied = model.config.tie_word_embeddings
    if tied:
        entries.pop("lm_head.weight", None)  # some tied checkpoints also store the head: same values
    entries = {k: v for k, v in entries.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(params) - set(entries))
    unexpected = sorted(set(entries) - set(params))
    misshaped = sorted(
        f"{k}: checkpoint {list(entries[k].shape)} vs model {list(params[k].shape)}"
        for k in set(params) & set(entries)
        if tuple(params[k].shape) != entries[k].shape
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match the config: " + " | ".join(parts))
    return entries


def load_weights(model: Qwen2ForCausalLM, ckpt_dir: Path, progress: bool = False) -> None:
    """Stream every tensor of the checkpoint into the model, checking names and shapes strictly."""
    entries = checked_entries(model, ckpt_dir)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for k, e in entries.items():
        by_file.setdefault(e.file, []).append(k)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), desc="loading weights", unit="tensor", leave=False)
    with torch.no_grad():
        for path, names in by_file.items():
            with open(path, "rb") as f:
                for k in sorted(names, key=lambda n: entries[n].start):  # sequential reads
                    read_tensor_into(entries[k], k, params[k].data, f)
                    if bar:
                        bar.update()
    if bar:
        bar.close()


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32,
               policy: KernelPolicy = KernelPolicy()) -> Qwen2ForCausalLM:
    """The model's structure on the meta device: shapes and names, no storage."""
    with torch.device("meta"):
        return Qwen2ForCausalLM(cfg, policy).to(dtype)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                policy: KernelPolicy = KernelPolicy()) -> Qwen2ForCausalLM:
    """Uninitialised model with real storage: built on meta, allocated once with to_empty."""
    model = meta_model(cfg, dtype, policy).to_empty(device=device)  # dtype first: free on meta, no second copy
    model.tie_weights()  # to_empty gives shared parameters separate storage; share it again
    rope = model.model.rotary_emb
    rope.inv_freq = rope.compute_inv_freq(device)  # buffers are not in the checkpoint
    return model


@dataclass
class Checkpoint:
    """A checkpoint's files read and checked against each other, no weight loaded: what a command checks before the
    model loads."""

    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    structure: Qwen2ForCausalLM  # on the meta device: the layers an adapter may adapt, their shapes


def inspect_checkpoint(name_or_path: str, policy: KernelPolicy = KernelPolicy()) -> Checkpoint:
    """Find the checkpoint and check its config.json, tokenizer files and every tensor's name and shape (headers
    only); any problem is one error naming the file and field or tensor (ConfigError, TokenizerError,
    CheckpointError)."""
    path = resolve_checkpoint(name_or_path)
    cfg = ModelConfig.from_file(path / "config.json")
    tokenizer = Tokenizer.from_dir(path, cfg)
    structure = meta_model(cfg, policy=policy)
    checked_entries(structure, path)
    return Checkpoint(path, cfg, tokenizer, structure)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    policy: KernelPolicy | None = None,
) -> LoadedModel:
    """Load model + tokenizer. `policy` (default: KernelPolicy()): which kernels the model runs, and its dtype when
    `dtype` names none (bf16 on CUDA and on a CPU with bf16 instructions, else fp32; lora_mem.kernels.policy). On a
    CPU, glibc is told to keep freed memory for reuse (lora_mem.kernels.cpu_allocator). Every file is checked before
    memory is allocated for the weights."""
    policy = policy or KernelPolicy()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not isinstance(dtype, torch.dtype):
        dtype = parse_dtype(dtype, device, policy)
    ckpt = inspect_checkpoint(name_or_path, policy)
    if device.type == "cpu":
        keep_freed_memory()
    model = build_model(ckpt.config, device, dtype, policy)
    load_weights(model, ckpt.path, progress=progress)
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model=model, tokenizer=ckpt.tokenizer, config=ckpt.config, path=ckpt.path, name=name_or_path)
