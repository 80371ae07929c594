"""bench.perf.decode end to end on a tiny checkpoint: the JSON it writes, positive speeds, identical tokens;
the LoCoMo workload with a random and with a given adapter, answers equal to transformers + peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.perf.decode import (batched_questions, default_out_name, locomo_questions, main, parse_args, random_adapter,
                          spread)
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint(d, "llama")
    return d


@pytest.fixture(scope="module")
def result(ckpt):
    d = ckpt
    out = d / "results" / "decode.json"
    returned = main(["--model", str(d), "--device", "cpu", "--quick", "--max-new-tokens", "8",
                     "--num-prompts", "6", "--batch-size", "4", "--batched-max-new-tokens", "6",
                     "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))  # what main returns is what it wrote
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temp file
    return data


def test_metadata(result):
    assert result["benchmark"] == "decode" and result["quick"] is True
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    for k in ("torch", "transformers", "python"):
        assert result["versions"][k]
    assert result["cpu"]["torch_num_threads"] >= 1 and result["cpu"]["model_name"]
    assert "--quick" in result["command"]
    assert len(result["loadavg_start"]) == 3 and len(result["loadavg_end"]) == 3
    assert result["settings"]["batch_size"] == 4 and result["settings"]["num_prompts"] == 6


def test_single_stream(result):
    w = next(w for w in result["workloads"] if w["workload"] == "single_stream")
    assert w["tokens_match"] is True
    assert w["batch_size"] == 1 and w["max_new_tokens"] == 8
    for side in ("lora_mem", "transformers"):
        # EOS disabled: exactly max_new_tokens per prompt on both sides
        assert w[side]["generated_tokens"] == 8 * w["num_prompts"]
        assert w[side]["tokens_per_s"] > 0 and w[side]["seconds_median"] > 0
    assert w["ratio_tokens_per_s"] > 0


def test_batched(result):
    w = next(w for w in result["workloads"] if w["workload"] == "batched")
    assert w["num_prompts"] == 6 and w["batch_size"] == 4 and w["max_new_tokens"] == 6
    assert w["prompt_tokens"]["min"] < w["prompt_tokens"]["max"]  # prompts of different lengths
    for side in ("lora_mem_batched", "transformers_batch1", "transformers_batched"):
        assert w[side]["questions"] == 6
        assert w[side]["questions_per_s"] > 0 and w[side]["tokens_per_s"] > 0
    assert w["ratio_questions_per_s_vs_transformers_batch1"] > 0
    assert w["ratio_questions_per_s_vs_transformers_batched"] > 0
    # greedy fp32 on the same ids: the per-question answers agree with transformers at batch 1
    assert w["answers_match_transformers_batch1"] == 6


def test_questions_and_defaults():
    qs = batched_questions(200)
    assert len(set(qs)) == 200 and len({len(q) for q in qs[:64]}) > 10
    a = parse_args([])
    assert (a.repeats, a.num_prompts, a.batch_size, a.max_new_tokens, a.batched_max_new_tokens) == (3, 64, 64, 64, 32)
    q = parse_args(["--quick", "--repeats", "2"])
    assert q.repeats == 2 and q.num_prompts < 64  # explicit options win over --quick


# ---------------------------------------------------------------------------------------------
# The LoCoMo workload
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def locomo(ckpt, tmp_path_factory):
    """Random adapter, transformers batch 1 on 5 of the 14 fixture questions (extrapolated), profiled.
    B's std 0.3: the tiny model answers every question alike without it (and with B std 0.02), with it
    answers differ from question to question, so agreement between the sides means something."""
    out = tmp_path_factory.mktemp("locomo") / "decode_locomo.json"
    returned = main(["--model", str(ckpt), "--device", "cpu", "--quick", "--workloads", "locomo",
                     "--data", str(FIXTURE), "--random-adapter-b-std", "0.3", "--locomo-batch-size", "4",
                     "--locomo-max-new-tokens", "6", "--hf-bs1-questions", "5", "--profile", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    assert [w["workload"] for w in data["workloads"]] == ["locomo"]
    return data["workloads"][0]


def test_locomo_questions_and_sides(locomo):
    w = locomo
    assert w["questions"] == 14 and w["categories"] == {"1": 3, "2": 4, "3": 2, "4": 5}  # categories 1-4 only
    assert "{question}" in w["question_template"] and w["batch_size"] == 4 and w["max_new_tokens"] == 6
    assert w["adapter"]["source"] == "random" and w["adapter"]["rank"] == 8 and w["adapter"]["path"] is None
    for side in ("lora_mem", "transformers_peft_batch1", "transformers_peft_batched"):
        assert w[side]["questions_per_s"] > 0 and w[side]["seconds_median"] > 0
    assert w["lora_mem"]["questions"] == 14 and w["transformers_peft_batched"]["questions"] == 14
    h1 = w["transformers_peft_batch1"]
    assert h1["measured_questions"] == 5 and h1["questions"] == 5 and h1["extrapolated"] is True
    assert h1["seconds_all_questions_extrapolated"] == pytest.approx(h1["seconds_median"] * 14 / 5, abs=0.01)
    assert w["ratio_vs_transformers_batch1"] == pytest.approx(
        w["lora_mem"]["questions_per_s"] / h1["questions_per_s"], rel=1e-2)
    assert w["ratio_vs_transformers_batched"] > 0
    assert w["goals"] == {"vs_transformers_batch1": 10.0, "vs_transformers_batched": 2.0}
    assert isinstance(w["meets_goal_vs_transformers_batch1"], bool)


def test_locomo_answers_agree(locomo):
    # fp32 greedy, same token ids, same adapter files: identical answers on both sides and batch sizes
    assert locomo["answers_compared_transformers_batch1"] == 5
    assert locomo["answers_identical_transformers_batch1"] == 5
    assert locomo["answers_identical_transformers_batched"] == 14 == locomo["answers_compared_transformers_batched"]
    assert locomo["differing_answers_batched"] == []
    assert locomo["lora_mem"]["generated_tokens"] == locomo["transformers_peft_batched"]["generated_tokens"]
    answers = [a["answer"] for a in locomo["sample_answers"]]
    assert len(set(answers)) == 3  # not one degenerate answer for everything


def test_locomo_profile(locomo):
    p = locomo["profile"]
    assert sum(g["percent"] for g in p["groups_cpu"].values()) == pytest.approx(100, abs=0.1)
    assert p["groups_cpu"]["gemm"]["percent"] > 0 and p["groups_cpu"]["attention"]["percent"] > 0
    assert p["groups_cpu"]["optimizer"]["ms"] == 0  # decoding: no optimizer
    assert 0 < len(p["top_cpu"]) <= 15


def test_locomo_given_adapter_is_used_by_both_sides(ckpt, tmp_path):
    from lora_mem.lora_core.memory import QUESTION_TEMPLATE
    from lora_mem.model.generate import generate
    from lora_mem.model.loader import load_model

    lm = load_model(str(ckpt), device="cpu")
    tok = lm.tokenizer
    _, qs = locomo_questions(str(FIXTURE), 6)
    prompts = [tok.encode_chat([{"role": "user", "content": QUESTION_TEMPLATE.format(question=q.question)}])
               for q in qs]
    base = generate(lm.model, prompts, 6, tok.stop_ids, tok.pad_id, batch_size=4)
    adapter = random_adapter(lm, 4, tmp_path / "adapter", seed=1, b_std=0.3)
    with_adapter = generate(lm.model, prompts, 6, tok.stop_ids, tok.pad_id, batch_size=4)
    assert base != with_adapter  # the adapter changes answers, so agreement below means both sides applied it

    out = tmp_path / "r.json"
    r = main(["--model", str(ckpt), "--device", "cpu", "--workloads", "locomo", "--data", str(FIXTURE),
              "--adapter", str(adapter), "--locomo-questions", "6", "--locomo-batch-size", "4",
              "--locomo-max-new-tokens", "6", "--hf-bs1-questions", "0", "--out", str(out)])
    w = r["workloads"][0]
    assert w["adapter"]["source"] == "given" and w["adapter"]["rank"] == 4 and w["adapter"]["path"] == str(adapter)
    assert w["questions"] == 6 and w["transformers_peft_batch1"]["extrapolated"] is False
    assert w["answers_identical_transformers_batch1"] == 6 and w["answers_identical_transformers_batched"] == 6
    assert w["sample_answers"][0]["answer"] == tok.decode(with_adapter[0]).strip()
    assert "profile" not in w


def test_locomo_bad_adapter_stops_before_loading(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="adapter_config.json"):
        main(["--model", str(ckpt), "--workloads", "locomo", "--data", str(FIXTURE), "--adapter", str(tmp_path)])


def test_workload_selection_and_names():
    assert parse_args([]).workloads == ["single_stream", "batched"]
    assert parse_args(["--workloads", "all"]).workloads == ["single_stream", "batched", "locomo"]
    assert parse_args(["--workloads", "locomo,single_stream"]).workloads == ["single_stream", "locomo"]  # locomo last
    assert parse_args(["--workload", "single"]).workloads == ["single_stream"]
    with pytest.raises(SystemExit):
        parse_args(["--workloads", "batched,nope"])
    a = parse_args(["--workloads", "locomo"])
    assert (a.locomo_questions, a.locomo_batch_size, a.locomo_max_new_tokens, a.hf_bs1_questions) == (None, 64, 32, 256)
    assert default_out_name("cpu", ["single_stream", "batched"], False) == "decode_cpu.json"
    assert default_out_name("cpu", ["locomo"], True) == "decode_cpu_locomo_quick.json"
    assert spread(10, 3) == [0, 3, 6] and spread(4, 9) == [0, 1, 2, 3]


@pytest.fixture()
def tiny_preset(monkeypatch):
    """A tiny entry in lora_mem.model.config.PRESETS: the random-weights path of --model preset:NAME, at test size."""
    from lora_mem.model.config import PRESETS, ModelConfig

    cfg = ModelConfig(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=1e4, max_position_embeddings=128, tie_word_embeddings=True, qkv_bias=True,
                      o_bias=False, bos_token_id=None, eos_token_ids=(2,))
    monkeypatch.setitem(PRESETS, "tiny-test", cfg)
    return cfg


def test_random_preset_is_the_same_model_on_both_sides(tiny_preset):
    import torch

    from bench.perf.decode import load_random_preset

    lm, ref = load_random_preset("tiny-test", "cpu", None)
    assert lm.tokenizer is None and lm.path is None and lm.name == "preset:tiny-test"
    ids = torch.randint(0, tiny_preset.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = lm.model(ids)
        theirs = ref(input_ids=ids).logits
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # every weight copied, the head tied on both
    lm2, _ = load_random_preset("tiny-test", "cpu", None)
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), lm2.model.state_dict().values()))


def test_synthetic_workload_on_a_random_preset(tiny_preset, tmp_path):
    out = tmp_path / "synthetic.json"
    r = main(["--model", "preset:tiny-test", "--device", "cpu", "--workloads", "synthetic",
              "--synthetic-questions", "10", "--synthetic-prompt-tokens", "5-8", "--synthetic-new-tokens", "5",
              "--batch-size", "4", "--hf-bs1-questions", "3", "--random-adapter-b-std", "0.3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["model"] == "preset:tiny-test" and r["checkpoint"].startswith("none: random weights")
    (w,) = r["workloads"]
    assert w["workload"] == "synthetic" and w["questions"] == 10 and w["batch_size"] == 4
    assert w["prompt_tokens"] == {"min": 5, "max": 8, "mean": 6.3}  # 5,6,7,8,5,6,7,8,5,6
    assert w["stop_ids"] == [] and w["max_new_tokens"] == 5
    # EOS disabled: every answer is exactly the cap on every side
    assert w["lora_mem"]["generated_tokens"] == 50 == w["transformers_peft_batched"]["generated_tokens"]
    assert w["transformers_peft_batch1"]["generated_tokens"] == 15 and w["transformers_peft_batch1"]["extrapolated"]
    assert w["adapter"]["source"] == "random" and w["adapter"]["rank"] == 8
    # fp32 greedy on the same weights and adapter: the same answers
    assert w["answers_identical_transformers_batch1"] == 3 and w["answers_identical_transformers_batched"] == 10
    assert w["ratio_vs_transformers_batched"] > 0 and set(w["goals"]) == {"vs_transformers_batch1",
                                                                           "vs_transformers_batched"}


def test_synthetic_prompts_and_argument_errors(tiny_preset):
    from bench.perf.decode import synthetic_prompts

    p = synthetic_prompts(7, (3, 5), vocab=50)
    assert [len(x) for x in p] == [3, 4, 5, 3, 4, 5, 3] and all(0 <= t < 50 for x in p for t in x)
    assert p == synthetic_prompts(7, (3, 5), vocab=50)  # seeded
    assert parse_args(["--workloads", "synthetic"]).synthetic_prompt_tokens == (45, 73)
    for bad in (["--model", "preset:tiny-test"],  # default workloads need a tokenizer
                ["--model", "preset:nope", "--workloads", "synthetic"],
                ["--workloads", "synthetic,locomo"],
                ["--workloads", "synthetic", "--synthetic-prompt-tokens", "9-3"],
                ["--workloads", "synthetic", "--synthetic-prompt-tokens", "many"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
