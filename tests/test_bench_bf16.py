"""The benchmarks of the bf16 CPU path on a tiny model: training throughput with sides in their own dtypes (lora-mem
in fp32 and bf16, peft in bf16), the floor in each dtype, the step floor's dtype option, and the CPU's fp32 / bf16
GEMM rates with what the policy chose."""

from __future__ import annotations

import json

import pytest

from bench.perf import cpu_bf16, step_floor
from bench.perf.train_throughput import main, split_side
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_checkpoint(d, "qwen2")
    # a 2048-position window: retrieved turns are long in the byte-level tiny tokenizer (rotary positions extend)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    return d


def test_sides_in_their_own_dtypes_side_by_side(ckpt, tmp_path):
    out = tmp_path / "train.json"
    main(["--setup", "cpu", "--model", str(ckpt), "--seq-len", "24", "--batch-sizes", "1", "--rank", "4",
          "--steps", "2", "--warmup", "1", "--sides", "lora-mem,lora-mem:bfloat16,peft:bfloat16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["dtype"] == "float32"
    row = saved["rows"][0]
    for side in ("lora-mem", "lora-mem:bfloat16", "peft:bfloat16"):
        assert "error" not in row[side], row[side]
        assert row[side]["tokens_per_second"] > 0
    # the floor in both dtypes, each side set against its own dtype's
    floors = row["floors_by_dtype"]
    assert set(floors) == {"float32", "bfloat16"} and floors["float32"] == row["floor"]
    assert floors["bfloat16"]["dtype"] == "bfloat16" and floors["float32"]["dtype"] == "float32"
    for side, dtype in (("lora-mem", "float32"), ("lora-mem:bfloat16", "bfloat16"), ("peft:bfloat16", "bfloat16")):
        assert row[side]["step_over_floor"] == pytest.approx(
            row[side]["step_seconds_median"] / floors[dtype]["floor_seconds"])
    assert set(row["dtype_speedups"]) == {"lora-mem:bfloat16"}  # peft has no fp32 side here
    # the same function before any update on both engines in bf16 (bf16's rounding apart), and close to fp32's
    assert row["lora-mem:bfloat16"]["first_loss"] == pytest.approx(row["peft:bfloat16"]["first_loss"], rel=2e-2)
    assert row["lora-mem:bfloat16"]["first_loss"] == pytest.approx(row["lora-mem"]["first_loss"], rel=2e-2)


def test_side_names_and_dtypes():
    assert split_side("peft:bfloat16", "float32") == ("peft", "bfloat16")
    assert split_side("lora-mem", "float32") == ("lora-mem", "float32")
    with pytest.raises(SystemExit):
        main(["--sides", "lora-mem:fp8"])


def test_step_floor_takes_a_dtype(capsys):
    floor = step_floor.main(["--setup", "cpu", "--seq-len", "8", "--repeats", "1", "--dtype", "bfloat16"])
    assert floor["dtype"] == "bfloat16" and floor["floor_seconds"] > 0


def test_cpu_bf16_records_the_cpu_and_both_rates(tmp_path, monkeypatch):
    from lora_mem.kernels import policy

    out = tmp_path / "cpu.json"
    r = cpu_bf16.main(["--tokens", "16", "--hidden", "8", "--intermediate", "12", "--repeats", "1",
                       "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert [g["shape"] for g in r["gemms"]] == [[16, 8, 12], [16, 12, 8]]
    assert all(g["fp32_gflops"] > 0 and g["bf16_gflops"] > 0 for g in r["gemms"])
    assert r["torch_cpu_capability"] and r["cpu"]["vector_extensions"] is not None
    # the tests' CPU reads as having no bf16 instructions (conftest): the policy stays fp32, and says so
    assert r["cpu_bf16_instructions"] == [] and r["policy_cpu_bf16"] is False and r["default_cpu_dtype"] == "float32"
    assert r["kernel_policy"]["cpu_bf16"] is False
    monkeypatch.setattr(policy, "cpu_bf16_instructions", lambda: ("amx",))
    monkeypatch.delenv("LORA_MEM_CPU_BF16")
    r = cpu_bf16.main(["--tokens", "4", "--hidden", "8", "--intermediate", "8", "--repeats", "1", "--out", str(out)])
    assert r["cpu_bf16_instructions"] == ["amx"] and r["default_cpu_dtype"] == "bfloat16"


def test_answering_in_both_dtypes_without_and_with_retrieval(ckpt, tmp_path):
    from pathlib import Path

    from bench.perf import answer_dtypes

    fixture = Path(__file__).parent / "fixtures" / "locomo_tiny.json"
    out = tmp_path / "answer.json"
    r = answer_dtypes.main(["--model", str(ckpt), "--data", str(fixture), "--conversation", "tiny-1",
                            "--questions", "3", "--rounds", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert set(r["modes"]) == {"direct", "rag"} and r["questions"] == 3
    direct, rag = r["modes"]["direct"], r["modes"]["rag"]
    assert rag["prompt_tokens_mean"] > direct["prompt_tokens_mean"]  # the retrieved turns are in the prompt
    for mode in (direct, rag):
        assert set(mode["sides"]) == {"float32", "bfloat16"}
        assert all(len(s["seconds_all"]) == 2 and s["questions_per_second"] > 0 for s in mode["sides"].values())
        assert mode["speedup"]["bfloat16_vs_float32"] > 0 and 0 <= mode["identical_answers"] <= 3
    with pytest.raises(SystemExit):
        answer_dtypes.main(["--model", str(ckpt), "--data", str(fixture), "--dtypes", "float32,int8"])
