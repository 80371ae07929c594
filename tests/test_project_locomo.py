"""bench.perf.project_locomo: the arithmetic of the projection, the row it picks, what it says about itself, its errors;
when rates and runs count as one machine; and the committed CPU files, which are from two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.perf.project_locomo import DEFAULT_RUNS, main


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def run_dir(tmp: Path, name: str, method: str, train_tokens: int, n_per_conv: list[int], device_type="cpu",
            train_s=0.0, answer_s=10.0) -> Path:
    d = tmp / name
    write(d / "results.json", {
        "settings": {"method": method, "model": "smollm2-135m-instruct", "rank": 8, "batch_size": 2, "seq_len": 512},
        "conversations": [{"sample_id": f"c{i}", "n_questions": n} for i, n in enumerate(n_per_conv)],
        "train_tokens": train_tokens, "train_seconds": train_s, "answer_seconds": answer_s,
        "device": "dev", "device_type": device_type})
    return d


def train_file(tmp: Path, rates: dict[int, float], seq_len=512, device_type="cpu", model="smollm2-135m-instruct"):
    rows = [{"batch": b, "lora-mem": {"tokens_per_second": r}, "peft": {"tokens_per_second": r / 2}}
            for b, r in rates.items()]
    return write(tmp / "train.json", {"device": "dev", "device_type": device_type, "model": model,
                                      "dtype": "float32", "seq_len": seq_len, "rows": rows})


def decode_file(tmp: Path, qps: float, workload="locomo"):
    return write(tmp / "decode.json", {"device_name": "dev", "device": "cpu", "model": "m", "dtype": "float32",
                                       "workloads": [{"workload": "single_stream"},
                                                     {"workload": workload, "batch_size": 64, "max_new_tokens": 32,
                                                      "questions": 100, "lora_mem": {"questions_per_s": qps}}]})


def test_projection_arithmetic_and_calibration(tmp_path):
    base = run_dir(tmp_path, "base", "base", 0, [10, 30], answer_s=5.0)
    lora = run_dir(tmp_path, "lora", "lora", 10_000, [10, 30], train_s=40.0, answer_s=5.0)
    out = tmp_path / "p.json"
    r = main(["--train", str(train_file(tmp_path, {1: 100.0, 2: 200.0, 8: 400.0})),
              "--decode", str(decode_file(tmp_path, 8.0)), "--runs", str(base), str(lora), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    # the runs train 2 x 512 tokens per step: the batch-2 row of a seq-512 file is the one used
    assert r["training_rate"]["batch"] == 2 and r["training_rate"]["tokens_per_second"] == 200.0
    b, lo = r["runs"]
    assert (b["questions"], lo["questions"], lo["train_tokens"]) == (40, 40, 10_000)
    assert b["projected_train_seconds"] == 0 and b["projected_answer_seconds"] == 5.0  # 40 q / 8 q/s
    assert lo["projected_train_seconds"] == 50.0 and lo["projected_seconds"] == 55.0  # 10,000 / 200 + 5
    assert r["projected_seconds"] == 60.0 and r["projected_minutes"] == 1.0
    assert r["goal_minutes"] == 45.0 and r["meets_goal"] is True
    # the runs' machine (same device type and name, no CPU details on either side): measured beside projected
    assert r["comparable_to_measured"] and lo["measured_seconds"] == 45.0
    assert lo["projected_over_measured"] == pytest.approx(55 / 45, abs=1e-3)
    assert r["measured_seconds"] == 50.0 and r["projected_over_measured"] == pytest.approx(60 / 50, abs=1e-3)
    assert len(r["caveats"]) == 2  # batch/seq of the rate, base at the with-adapter rate


def test_gpu_rates_synthetic_upper_bound_and_stand_in_tokenizer(tmp_path):
    base = run_dir(tmp_path, "base", "base", 0, [100])
    lora = run_dir(tmp_path, "lora", "lora", 1_000_000, [100], train_s=9.0)
    r = main(["--train", str(train_file(tmp_path, {1: 20_000.0, 8: 50_000.0}, seq_len=2048, device_type="cuda",
                                        model="preset:qwen2.5-1.5b")),
              "--decode", str(decode_file(tmp_path, 50.0, workload="synthetic")),
              "--runs", str(base), str(lora), "--train-batch", "8", "--out", str(tmp_path / "g.json")])
    assert r["training_rate"]["batch"] == 8 and r["goal_minutes"] == 5.0
    assert r["projected_seconds"] == pytest.approx(1_000_000 / 50_000 + 200 / 50.0, abs=0.1)
    assert r["comparable_to_measured"] is False and "measured_seconds" not in r["runs"][1]
    text = " ".join(r["caveats"])
    assert "upper bound" in text and "stand-in" in text
    assert r["answering_rate"]["upper_bound"] is True


def test_errors_name_the_file_and_field(tmp_path):
    lora = run_dir(tmp_path, "lora", "lora", 100, [1])
    train = train_file(tmp_path, {1: 10.0})
    dec = decode_file(tmp_path, 1.0)
    with pytest.raises(SystemExit, match="no row with batch 4"):
        main(["--train", str(train), "--decode", str(dec), "--runs", str(lora), "--train-batch", "4"])
    with pytest.raises(SystemExit, match="nope.*not found"):
        main(["--train", str(tmp_path / "nope.json"), "--decode", str(dec), "--runs", str(lora)])
    no_answering = write(tmp_path / "d2.json", {"workloads": [{"workload": "batched"}]})
    with pytest.raises(SystemExit, match="d2.json: no locomo or synthetic workload"):
        main(["--train", str(train), "--decode", str(no_answering), "--runs", str(lora)])
    with pytest.raises(SystemExit, match=r"results.json: no field 'conversations'"):
        write(tmp_path / "bad" / "results.json", {"settings": {}})
        main(["--train", str(train), "--decode", str(dec), "--runs", str(tmp_path / "bad")])


def test_committed_cpu_files_are_from_two_hosts(tmp_path):
    """The committed full runs were measured on an earlier machine that recorded no CPU details; the committed CPU
    training rate comes from a later one that does (2.0 GHz family 23 model 1): the projection gives its time but
    puts no measured time beside it, and says why."""
    results = DEFAULT_RUNS[0].parent.parent
    r = main(["--train", str(results / "train_cpu.json"), "--decode", str(results / "decode_cpu_locomo.json"),
              "--out", str(tmp_path / "cpu.json")])
    assert [x["method"] for x in r["runs"]] == ["base", "lora"]
    assert [x["questions"] for x in r["runs"]] == [1540, 1540]
    assert not r["comparable_to_measured"] and "projected_over_measured" not in r
    assert all("records its CPU" in why for why in r["not_comparable_because"])
    assert r["projected_seconds"] > 0


def test_same_host_needs_the_same_cpu():
    from bench.perf.project_locomo import host_mismatch

    cpu = {"name": "AMD EPYC", "family": "23", "model": "1", "mhz": 1996.2, "vector_extensions": ["avx2", "fma"]}
    run = {"measured_device_type": "cpu", "measured_device": "AMD EPYC (2 cores)", "measured_cpu": cpu}
    train = {"device_type": "cpu", "device": "AMD EPYC (2 cores)", "cpu": dict(cpu, mhz=2001.0)}
    assert host_mismatch(run, train) is None  # the clock read a little differently: same host
    assert "model" in host_mismatch(run, {**train, "cpu": dict(cpu, model="49")})
    assert "clock" in host_mismatch(run, {**train, "cpu": dict(cpu, mhz=3500.0)})
    assert "device type" in host_mismatch(run, {**train, "device_type": "cuda"})
    assert host_mismatch({**run, "measured_cpu": None}, {**train, "cpu": None}) is None  # neither records it
    assert "does not" in host_mismatch({**run, "measured_cpu": None}, train)
