"""The decoder against `transformers` (test-only reference), the KV cache, batched greedy decoding,
and the loader's errors on bad input."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from lora_mem.model.config import ConfigError, ModelConfig
from lora_mem.model.generate import generate, generate_batch
from lora_mem.model.loader import CheckpointError, load_model, read_safetensors_header
from tests.tiny_models import VOCAB, make_tiny_checkpoint

KINDS = ["qwen2", "llama"]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = make_tiny_checkpoint(d, request.param)
    return request.param, d, ref, load_model(str(d))


def test_config_fields(tiny):
    kind, d, ref, lm = tiny
    cfg = lm.config
    assert cfg.model_type == kind
    assert cfg.qkv_bias == (kind == "qwen2")
    assert cfg.tie_word_embeddings == (kind == "llama")
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    assert cfg.rope_theta == (10000.0 if kind == "qwen2" else 100000.0)
    # tied: one parameter, not two equal copies
    assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) == (kind == "llama")


def test_logits_match_transformers_full_sequence(tiny):
    kind, d, ref, lm = tiny
    ids = torch.randint(0, VOCAB, (3, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lm.model(ids)
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_step_by_step_through_kv_cache(tiny):
    kind, d, ref, lm = tiny
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref(ids).logits  # (B, T, V)
        caches = lm.model.new_kv_caches(2, 15)
        prefix = 5
        ours = [lm.model(ids[:, :prefix], kv_caches=caches, cache_start=0)]
        for t in range(prefix, 15):
            ours.append(lm.model(ids[:, t:t + 1], kv_caches=caches, cache_start=t))
    torch.testing.assert_close(torch.cat(ours, dim=1), theirs, atol=1e-4, rtol=1e-4)


def test_batched_greedy_equals_one_at_a_time(tiny):
    kind, d, ref, lm = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 19)]
    stop = [1]
    alone = [generate_batch(lm.model, [p], 12, stop, pad_id=0)[0] for p in prompts]
    together = generate_batch(lm.model, prompts, 12, stop, pad_id=0)
    assert together == alone
    assert generate(lm.model, prompts, 12, stop, pad_id=0, batch_size=2) == alone
    assert all(len(a) > 0 for a in alone)


def test_shared_prefix_and_early_stopping_rows_match_one_at_a_time(tiny):
    """Prompts with a common prefix (computed once, broadcast) and rows that stop early (dropped
    from the batch) still decode exactly as each prompt alone."""
    from lora_mem.model.generate import common_prefix_len

    kind, d, ref, lm = tiny
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(4, VOCAB, (9,), generator=g).tolist()
    prompts = [prefix + torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (1, 6, 3, 12, 2, 8, 5, 1)]
    assert common_prefix_len(prompts) >= 9 and common_prefix_len([prefix, prefix]) == 8
    free = [generate_batch(lm.model, [p], 10, [], pad_id=0)[0] for p in prompts]
    stop = sorted({free[0][1], free[3][0], free[5][2]})  # several rows stop early, at different steps
    alone = [generate_batch(lm.model, [p], 10, stop, pad_id=0)[0] for p in prompts]
    assert sum(len(a) < 10 for a in alone) >= 3
    assert generate_batch(lm.model, prompts, 10, stop, pad_id=0) == alone


def test_greedy_matches_transformers_generate(tiny):
    kind, d, ref, lm = tiny
    prompt = torch.randint(4, VOCAB, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = generate_batch(lm.model, [prompt], 10, stop_ids=[], pad_id=0)[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 9:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("vocab_slice", [1, 7, 64, 319, 320, 1000])
def test_greedy_tokens_in_vocab_slices_equal_full_argmax(vocab_slice):
    from lora_mem.model.generate import greedy_tokens

    g = torch.Generator().manual_seed(vocab_slice)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(VOCAB, 16, generator=g)
    # Ties: row 0's logits are equal at every token (lowest id must win); rows 1-2 tie two ids in
    # different slices (when the slice is smaller than their distance) or in one slice.
    hidden[0] = 0.0
    weight[250] = weight[3] = 10 * weight[3]
    hidden[1], hidden[2] = weight[3], weight[3] * 2
    full = (hidden @ weight.T).argmax(-1)
    assert full[0] == 0 and full[1] == 3 and full[2] == 3
    assert torch.equal(greedy_tokens(hidden, weight, vocab_slice), full)
    assert torch.equal(greedy_tokens(hidden, weight, None), full)


def test_generate_with_sliced_lm_head_equals_one_product(tiny, monkeypatch):
    """The decode loop takes the LM head in vocabulary slices on CPU (lora_mem.model.generate.CPU_VOCAB_SLICE,
    larger than the tiny vocab, so forced small here): the answers are those of one full product."""
    import lora_mem.model.generate as gen

    assert gen.vocab_slice_for(torch.device("cpu"), gen.CPU_SLICE_MIN_ROWS - 1) is None
    assert gen.vocab_slice_for(torch.device("cuda"), 64) is None
    kind, d, ref, lm = tiny
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 2, 13)]
    monkeypatch.setattr(gen, "CPU_VOCAB_SLICE", VOCAB)  # one product
    whole = generate(lm.model, prompts, 12, [1], pad_id=0)
    monkeypatch.setattr(gen, "CPU_VOCAB_SLICE", 37)  # 9 slices, the last one short
    monkeypatch.setattr(gen, "CPU_SLICE_MIN_ROWS", 1)  # every batch, down to its last row, is sliced
    assert gen.vocab_slice_for(torch.device("cpu"), 1) == 37
    assert generate(lm.model, prompts, 12, [1], pad_id=0) == whole
    assert sum(len(w) for w in whole) > 4 * 3


def test_greedy_stops_at_stop_token(tiny):
    kind, d, ref, lm = tiny
    prompt = [5, 6, 7]
    free = generate_batch(lm.model, [prompt], 8, stop_ids=[], pad_id=0)[0]
    stopped = generate_batch(lm.model, [prompt], 8, stop_ids=[free[2]], pad_id=0)[0]
    assert stopped == free[: free.index(free[2])]


# ---------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the problem
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def qwen_dir(tmp_path):
    make_tiny_checkpoint(tmp_path / "ckpt", "qwen2")
    return tmp_path / "ckpt"


def test_missing_config(qwen_dir):
    (qwen_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(str(qwen_dir))


def test_unsupported_model_type(qwen_dir):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (qwen_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'mamba'"):
        load_model(str(qwen_dir))


def test_unsupported_rope_scaling():
    hf = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=1, rope_theta=1e4, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="rope scaling type 'yarn' in field 'rope_scaling'"):
        ModelConfig.from_hf_config(hf)
    hf.pop("rope_theta")
    hf.pop("rope_scaling")
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig.from_hf_config(hf)
    hf["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert ModelConfig.from_hf_config(hf).rope_theta == 5e5


def test_truncated_safetensors(qwen_dir):
    f = qwen_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_model(str(qwen_dir))
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(str(qwen_dir))
    f.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="bad header"):
        load_model(str(qwen_dir))


def rewrite_checkpoint(qwen_dir, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(qwen_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, qwen_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(qwen_dir):
    def edit(t):
        t.pop("model.layers.1.mlp.up_proj.weight")
        t["model.layers.0.extra.weight"] = torch.zeros(2)

    rewrite_checkpoint(qwen_dir, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(str(qwen_dir))
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "unexpected tensors: model.layers.0.extra.weight" in str(e.value)


def test_misshaped_tensor(qwen_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    rewrite_checkpoint(qwen_dir, edit)
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: model.layers.0.self_attn.k_proj.weight: "
                                              r"checkpoint \[16, 64\] vs model \[32, 64\]"):
        load_model(str(qwen_dir))


def test_sharded_checkpoint_loads(qwen_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(qwen_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    shutil.copytree(qwen_dir, sharded)
    (sharded / "model.safetensors").unlink()
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / fname)
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load_model(str(qwen_dir)), load_model(str(sharded))
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids), b.model(ids), atol=0, rtol=0)
    assert len(read_safetensors_header(sharded / "model-00001-of-00002.safetensors")) == len(names[::2])


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        load_model("no-such-model")


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("Qwen/Qwen2.5-1.5B-Instruct")
