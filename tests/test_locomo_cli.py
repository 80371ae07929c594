"""bench.locomo as a user meets it: every bad input is one `error:` line before any work, --out is left as it was,
a failed conversation is reported and retried, an interruption says how to resume, a resume checks its inputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import bench.locomo as locomo
import lora_mem.lora_core.memory as memory_api
from bench.common import read_jsonl
from lora_mem.lora_core.train import TrainResult
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


def base_args(ckpt, out, data=FIXTURE):
    return ["--model", str(ckpt), "--data", str(data), "--out", str(out), "--quiet", "--epochs", "1",
            "--seq-len", "64", "--batch-size", "2", "--max-new-tokens", "4", "--rank", "4"]


def snapshot(path: Path) -> dict:
    """Every file under path with its bytes: what "left as it was" compares."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["bench.locomo", *argv])
    with pytest.raises(SystemExit) as e:
        locomo.cli()
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def assert_one_error_line(err: str, *needles: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("option, value, needle", [
    ("--rank", "0", "--rank: must be an integer >= 1, got 0"),
    ("--rank", "-1", "--rank: must be an integer >= 1, got -1"),
    ("--lr", "nan", "--lr: must be a finite number in (0, 3.40282e+38], got nan"),
    ("--lr", "inf", "--lr: must be a finite number"),
    ("--lr", "0", "--lr: must be a finite number in (0, 3.40282e+38], got 0"),
    ("--lr", "-1e-3", "--lr: must be a finite number"),
    ("--lr", "1e39", "--lr: must be a finite number in (0, 3.40282e+38], got 1e39"),  # inf in float32
    ("--alpha", "1e39", "--alpha: must be a finite number in (0, 3.40282e+38]"),
    ("--seed", str(2**64), f"--seed: must be an integer in [0, {2**64 - 1}], got {2**64}"),
    ("--threads", "100000", "--threads: must be an integer in [1, 1024], got 100000"),  # 100,000 crash torch
    ("--device", "gpu", "--device: must be cpu, cuda or cuda:N, got 'gpu'"),
    ("--epochs", "0", "--epochs: must be an integer >= 1, got 0"),
    ("--seq-len", "3", "--seq-len: must be an integer >= 16, got 3"),
    ("--batch-size", "0", "--batch-size: must be an integer >= 1, got 0"),
    ("--conversations", "", "--conversations: must name at least one id"),
    ("--conversations", " , ", "--conversations: must name at least one id"),
    ("--abstention-ratio", "2", "--abstention-ratio: must be a finite number in (0, 1]"),
    ("--dropout", "1", "--dropout"),
    ("--max-questions", "0", "--max-questions"),
])
def test_bad_settings_are_one_line_before_any_work(ckpt, tmp_path, monkeypatch, capsys, option, value, needle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    code, stdout, err = run_cli(monkeypatch, capsys, base_args(ckpt, out) + [f"{option}={value}"])
    assert code == 2 and stdout == ""
    assert_one_error_line(err, needle)
    assert snapshot(out) == before


def test_out_that_is_a_file_or_cannot_be_created(ckpt, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a directory")
    code, _, err = run_cli(monkeypatch, capsys, base_args(ckpt, a_file))
    assert code == 2
    assert_one_error_line(err, "--out", "exists and is not a directory")
    code, _, err = run_cli(monkeypatch, capsys, base_args(ckpt, a_file / "run"))
    assert code == 2
    assert_one_error_line(err, "--out", "cannot be created")
    assert a_file.read_text() == "not a directory"


def test_a_chat_window_too_small_for_the_model_is_refused_before_loading(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(locomo, "load_model", lambda *a, **k: pytest.fail("must not load the weights"))
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, base_args(ckpt, out) + ["--train-format", "qa", "--seq-len", "16"])
    assert code == 2
    assert_one_error_line(err, "--seq-len 16 is too small for one chat window")
    assert not out.exists()


@pytest.mark.parametrize("break_it, needle", [
    (lambda s: s[0]["conversation"].update({k: [] for k in list(s[0]["conversation"]) if k.startswith("session_")
                                            and not k.endswith("date_time")}), "no text in any of its"),
    (lambda s: [s[0]["conversation"].pop(k) for k in list(s[0]["conversation"]) if k.startswith("session_")],
     "no sessions"),
])
def test_a_conversation_with_nothing_to_remember_is_a_data_error(ckpt, tmp_path, monkeypatch, capsys, break_it,
                                                                 needle):
    data = json.loads(FIXTURE.read_text())
    break_it(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code, _, err = run_cli(monkeypatch, capsys, base_args(ckpt, tmp_path / "out", bad))
    assert code == 2
    assert_one_error_line(err, str(bad), "sample 'tiny-1'", needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["run_config.json", "conversations/tiny-1/result.json",
                                  "conversations/tiny-1/train.json"])
def test_a_corrupt_file_in_out_is_named(ckpt, tmp_path, monkeypatch, capsys, name):
    out = tmp_path / "out"
    args = base_args(ckpt, out) + ["--conversations", "tiny-1", "--max-questions", "1"]
    locomo.main(args)
    if name.endswith("train.json"):  # a train.json is read when its adapter is loaded: make the run resume there
        (out / "conversations" / "tiny-1" / "result.json").unlink()
    (out / name).write_text("{not json")
    before = snapshot(out)
    capsys.readouterr()
    code, _, err = run_cli(monkeypatch, capsys, args)
    assert code == 2
    assert_one_error_line(err, str(out / name), "malformed JSON", "move it away")
    assert snapshot(out) == before


def test_ctrl_c_says_how_to_resume(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(locomo, "answer_prompts", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, base_args(ckpt, out))
    assert code == 130 and "Traceback" not in err
    assert_one_error_line(err.splitlines()[-1], "interrupted", f"--out {out}", "resume")  # after the run's progress


def test_a_failed_conversation_is_reported_not_scored_and_retried(ckpt, tmp_path, monkeypatch, capsys):
    clean = locomo.main(base_args(ckpt, tmp_path / "clean"))
    out = tmp_path / "out"
    real_train = memory_api.train_lora

    calls = []

    def diverge_on_tiny_2(model, ids, labels, cfg, **kw):  # conversations train in file order: tiny-2 second
        result = real_train(model, ids, labels, cfg, **kw)
        calls.append(1)
        if len(calls) == 2:
            return TrainResult(losses=result.losses[:1], error="non-finite loss nan at epoch 0, step 1")
        return result

    monkeypatch.setattr(memory_api, "train_lora", diverge_on_tiny_2)
    capsys.readouterr()
    code, stdout, _ = run_cli(monkeypatch, capsys, base_args(ckpt, out))
    assert code == 1
    assert "FAILED tiny-2: training failed: non-finite loss" in stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["failed"]) == ["tiny-2"] and "INCOMPLETE" in results["method"]
    assert "FAILED tiny-2" in (out / "table.md").read_text()
    assert {r["sample_id"] for r in read_jsonl(out / "predictions.jsonl")} == {"tiny-1"}
    assert not (out / "adapters" / "tiny-2").exists()
    # a resume retries it (training now succeeds) and gives the clean run's predictions
    monkeypatch.setattr(memory_api, "train_lora", real_train)
    resumed = locomo.main(base_args(ckpt, out))
    assert not resumed["failed"] and resumed["scores"] == clean["scores"]
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(tmp_path / "clean" / "predictions.jsonl")


def test_an_adapter_with_non_finite_weights_fails_the_conversation(ckpt, tmp_path, monkeypatch):
    import torch

    real_train = memory_api.train_lora

    def poison(model, ids, labels, cfg, **kw):
        result = real_train(model, ids, labels, cfg, **kw)
        with torch.no_grad():
            next(p for p in memory_api.lora_parameters(model)).fill_(float("nan"))
        return result

    monkeypatch.setattr(memory_api, "train_lora", poison)
    results = locomo.main(base_args(ckpt, tmp_path / "out") + ["--conversations", "tiny-1"])
    assert results["failed"] == {"tiny-1": "training failed: a LoRA weight is non-finite (nan)"}


def test_resume_refuses_another_data_file_and_other_threads(ckpt, tmp_path):
    out = tmp_path / "out"
    args = base_args(ckpt, out) + ["--conversations", "tiny-1", "--max-questions", "1"]
    locomo.main(args)
    assert json.loads((out / "run_config.json").read_text())["data_sha256"]
    other = tmp_path / "other.json"
    data = json.loads(FIXTURE.read_text())
    data[0]["conversation"]["session_1"][0]["text"] += " (edited)"
    other.write_text(json.dumps(data))
    with pytest.raises(locomo.RunConfigMismatch, match="data_sha256"):
        locomo.main(base_args(ckpt, out, other) + ["--conversations", "tiny-1", "--max-questions", "1"])
    with pytest.raises(locomo.RunConfigMismatch, match="threads: saved"):
        locomo.main(args + ["--threads", str(max(1, (os.cpu_count() or 1)) + 1)])


def test_runs_with_one_and_two_threads_give_identical_predictions(ckpt, tmp_path):
    """What the README says of torchrun's CPU ranks (fewer threads each) is shown here on the tiny model; the
    default model is measured by bench/results/locomo/threads_check.json."""
    one = locomo.main(base_args(ckpt, tmp_path / "one") + ["--threads", "1"])
    two = locomo.main(base_args(ckpt, tmp_path / "two") + ["--threads", "2"])
    assert read_jsonl(tmp_path / "one" / "predictions.jsonl") == read_jsonl(tmp_path / "two" / "predictions.jsonl")
    assert one["scores"] == two["scores"]
    from bench.analysis.compare_runs import compare

    same = compare(tmp_path / "one", tmp_path / "two")
    assert same["predictions_identical"] == same["questions"] == 14
    assert same["settings_that_differ"] == {"threads": [1, 2]}
    assert all(c["steps"] > 0 and c["max_weight_difference"] < 1e-5 for c in same["conversations"].values())


def test_local_path_that_does_not_exist_is_named_before_the_hub(tmp_path, monkeypatch):
    from lora_mem.model.loader import CheckpointError, resolve_checkpoint

    (tmp_path / "mymodels").mkdir()
    monkeypatch.chdir(tmp_path)
    import lora_mem.model.loader as loader
    monkeypatch.setattr(loader, "download_from_hub", lambda r: pytest.fail("must not try the hub"))
    with pytest.raises(CheckpointError, match="mymodels/smol: no such directory"):
        resolve_checkpoint("mymodels/smol")


def test_download_is_pinned_and_checked(tmp_path, monkeypatch):
    import io
    import urllib.request

    import bench.locomo_data as ld

    assert ld.LOCOMO_COMMIT in ld.LOCOMO_URL and len(ld.LOCOMO_SHA256) == 64
    monkeypatch.setenv("LORA_MEM_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LOCOMO_DATA", raising=False)

    class Response(io.BytesIO):
        headers = {}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    seen = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: seen.append(url) or Response(b"[]"))
    with pytest.raises(ld.LocomoDataError, match="sha256"):
        ld.resolve_data_path(None)
    assert seen == [ld.LOCOMO_URL] and not ld.default_cache_path().exists()


def test_loading_an_adapter_with_non_finite_weights_is_an_error(ckpt, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from lora_mem.lora_core.adapter_io import AdapterError, load_adapter
    from lora_mem.model.loader import load_model

    locomo.main(base_args(ckpt, tmp_path / "run") + ["--conversations", "tiny-1", "--max-questions", "1"])
    adapter = tmp_path / "run" / "adapters" / "tiny-1"
    weights = load_file(adapter / "adapter_model.safetensors")
    key = sorted(weights)[0]
    weights[key][0, 0] = float("inf")
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"{key} has non-finite values"):
        load_adapter(load_model(str(ckpt)).model, adapter)
    assert torch.isinf(weights[key]).any()
