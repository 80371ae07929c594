"""bench.decode end to end on a tiny checkpoint: the JSON it writes, positive speeds, identical tokens."""

from __future__ import annotations

import json

import pytest

from bench.decode import batched_questions, main, parse_args
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint(d, "llama")
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
