"""bench.stream on the tiny fixture: sessions appended in order, questions asked when their evidence is written,
the curve, forgetting and cost reported; an interrupted run resumes to the same results; bad input is one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import bench.stream as stream
from bench.analysis import stream_curve
from bench.locomo_data import QA, load_locomo
from lora_mem.lora_core.memory import Memory
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


def args(ckpt, out, *extra) -> list[str]:
    return ["--model", str(ckpt), "--data", str(FIXTURE), "--out", str(out), "--quiet", "--epochs", "1",
            "--seq-len", "64", "--rank", "4", "--max-new-tokens", "4", "--every", "1",
            "--train-format", "text+queries", *extra]


def run_cli(monkeypatch, capsys, argv) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["bench.stream", *argv])
    with pytest.raises(SystemExit) as e:
        stream.cli()
    return e.value.code, capsys.readouterr().err


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.exists() else {}


def test_evidence_decides_when_a_question_is_asked():
    sample = load_locomo(FIXTURE)[0]
    qa = [QA("a", "x", 4, ["D1:3"]), QA("b", "x", 4, ["D8:6; D9:17"]), QA("c", "x", 4, ["D:11:26", "D2:1"]),
          QA("d", "x", 4, []), QA("e", "x", 4, ["D2:4"])]
    assert [stream.evidence_session(q) for q in qa] == [1, 9, 11, None, 2]
    assert stream.askable(sample, qa, 1) == [0]  # of two sessions: after the first, only what it holds
    assert stream.askable(sample, qa, 2) == [0, 1, 2, 3, 4]  # after the last: everything
    assert stream.checkpoints(19, 5) == [5, 10, 15, 19] and stream.checkpoints(30, 5) == [5, 8, 10, 15, 20, 25, 30]
    assert stream.append_ends(30, 5, 4) == [4, 5, 8, 10, 12, 15, 16, 20, 24, 25, 28, 30]


def test_a_stream_run_reports_final_curve_forgetting_and_cost(ckpt, tmp_path, monkeypatch):
    seen = []
    real = Memory.training_data

    def capture(self, conv, **kw):
        seen.append(conv)
        return real(self, conv, **kw)

    monkeypatch.setattr(Memory, "training_data", capture)
    out = tmp_path / "run"
    results = stream.main(args(ckpt, out, "--strategy", "continue", "--replay-ratio", "0.5"))
    # training saw plain conversations of the sessions, one session per append, in order
    assert [type(c).__name__ for c in seen] == ["Conversation"] * 4
    assert [[s.index for s in c.sessions] for c in seen] == [[1], [2], [1], [2]]
    samples = load_locomo(FIXTURE)
    for s in samples:
        conv_dir = out / "conversations" / s.sample_id
        first = [json.loads(x) for x in (conv_dir / "checkpoints" / "1.jsonl").read_text().splitlines()]
        assert {r["question"] for r in first} == {q.question for q in s.qa if q.category != 5
                                                  and stream.evidence_session(q) == 1}
        last = (conv_dir / "checkpoints" / "2.jsonl").read_text().splitlines()
        assert len(last) == len([q for q in s.qa if q.category != 5])
        manifest = json.loads((conv_dir / "memory" / "manifest.json").read_text())
        assert [a["sessions"] for a in manifest["writes"]] == [[1], [2]]
    assert [p["sessions_written"] for p in results["curve"]] == [1, "final"]
    assert [p["sessions_written"] for p in results["forgetting"]["points"]] == ["written", "final"]
    assert results["cost"]["train_tokens"] == sum(a["train_tokens"] for r in results["conversations"]
                                                  for a in r["appends"]) > 0
    assert set(results["final"]["question_specific"]["avg"]) == {"f1", "shuffled_f1", "question_specific"}
    assert (out / "table.md").read_text().startswith("After the last session")
    rows = (out / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == results["final"]["f1"]["n"] == sum(r["n_questions"] for r in results["conversations"])


def test_an_interrupted_stream_resumes_to_the_same_results(ckpt, tmp_path, monkeypatch):
    whole = stream.main(args(ckpt, tmp_path / "whole", "--strategy", "continue"))
    out = tmp_path / "cut"
    real = Memory.append
    calls = []

    def crash_on_second(self, sessions, **kw):  # tiny-1: its first session written and asked about
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, sessions, **kw)

    monkeypatch.setattr(Memory, "append", crash_on_second)
    with pytest.raises(stream.locomo.Interrupted):
        stream.main(args(ckpt, out, "--strategy", "continue"))
    monkeypatch.setattr(Memory, "append", real)
    resumed = stream.main(args(ckpt, out, "--strategy", "continue"))
    for s in ("tiny-1", "tiny-2"):
        for name in ("1.jsonl", "2.jsonl"):
            assert (out / "conversations" / s / "checkpoints" / name).read_text() == \
                   (tmp_path / "whole" / "conversations" / s / "checkpoints" / name).read_text()
    assert resumed["final"] == whole["final"] and resumed["cost"]["train_tokens"] == whole["cost"]["train_tokens"]


def test_reference_run_is_compared_and_checked(ckpt, tmp_path, monkeypatch, capsys):
    import bench.locomo as locomo

    ref = tmp_path / "ref"
    locomo.main(["--model", str(ckpt), "--data", str(FIXTURE), "--out", str(ref), "--quiet", "--epochs", "1",
                 "--seq-len", "64", "--rank", "4", "--max-new-tokens", "4", "--train-format", "text+queries"])
    rewrite = stream.main(args(ckpt, tmp_path / "rw", "--strategy", "rewrite", "--reference", str(ref)))
    # the rewrite's last append is the all-at-once write: same tokens, same answers
    assert rewrite["cost"]["train_tokens_over_all_at_once"] > 1
    assert rewrite["final"]["f1"] == rewrite["all_at_once"]["f1"]
    curve = stream_curve.main([str(tmp_path / "rw"), "--out", str(tmp_path / "curve")])
    assert curve["runs"][0]["strategy"] == "rewrite" and curve["all_at_once"]["run"] == str(ref)
    assert "| rewrite | 0.00 | 0.00 |" in (tmp_path / "curve.md").read_text()
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "other"
    capsys.readouterr()
    code, err = run_cli(monkeypatch, capsys, args(ckpt, out, "--reference", str(ref)) + ["--rank", "2"])
    assert code == 2 and err.count("\n") == 1 and "--reference" in err and "rank: 4 there, 2 here" in err
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [(["--every", "0"], "--every"), (["--replay-ratio", "-1"], "--replay-ratio"),
                                           (["--strategy", "grow"], "--strategy"),
                                           (["--reference", "/nonexistent"], "/nonexistent/results.json")])
def test_bad_input_is_one_line_before_any_work(ckpt, tmp_path, monkeypatch, capsys, extra, needle):
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, args(ckpt, out) + extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert not out.exists()


def test_a_damaged_memory_in_out_is_named_before_the_model_loads(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    stream.main(args(ckpt, out, "--conversations", "tiny-1", "--strategy", "continue"))
    shutil.rmtree(out / "conversations" / "tiny-1" / "checkpoints")  # as if killed before asking anything
    (out / "conversations" / "tiny-1" / "result.json").unlink()
    replay = out / "conversations" / "tiny-1" / "memory" / "replay.safetensors"
    replay.write_bytes(b"broken")
    before = snapshot(out)
    capsys.readouterr()
    monkeypatch.setattr(stream, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    code, err = run_cli(monkeypatch, capsys, args(ckpt, out, "--conversations", "tiny-1", "--strategy", "continue"))
    assert code == 2 and err.count("\n") == 1 and str(replay) in err
    assert snapshot(out) == before


def test_modules_from_asks_another_runs_modules_without_training(ckpt, tmp_path, monkeypatch, capsys):
    source = tmp_path / "modules"
    trained = stream.main(args(ckpt, source, "--strategy", "modules", "--route-top-k", "1"))
    monkeypatch.setattr(Memory, "append", lambda *a, **k: pytest.fail("a --modules-from run trained"))
    again = stream.main(args(ckpt, tmp_path / "same", "--strategy", "modules", "--route-top-k", "1",
                             "--modules-from", str(source)))
    for s in ("tiny-1", "tiny-2"):  # the same composition of the same modules: the same answers, at every checkpoint
        for n in (1, 2):
            rows = stream.checkpoint_rows(tmp_path / "same", s, n)
            assert rows == stream.checkpoint_rows(source, s, n) and rows
    assert again["cost"]["train_tokens"] == trained["cost"]["train_tokens"] > 0  # the cost is the source run's
    assert not (tmp_path / "same" / "conversations" / "tiny-1" / "memory").exists()
    stream.main(args(ckpt, tmp_path / "top2", "--strategy", "modules", "--route-top-k", "2",
                     "--modules-from", str(source)))
    for s in ("tiny-1", "tiny-2"):  # after one session one module exists; after two, both answer every question
        assert {tuple(r["modules"]) for r in stream.checkpoint_rows(tmp_path / "top2", s, 1)} == {(1,)}
        assert {tuple(r["modules"]) for r in stream.checkpoint_rows(tmp_path / "top2", s, 2)} == {(1, 2)}
    for extra, needle in ((["--rank", "2"], "rank: 4 there, 2 here"), (["--strategy", "continue"], "--modules-from")):
        out = tmp_path / "refused"
        capsys.readouterr()
        code, err = run_cli(monkeypatch, capsys, args(ckpt, out, "--strategy", "modules", "--modules-from",
                                                      str(source), *extra))
        assert code == 2 and err.count("\n") == 1 and needle in err, err
        assert not out.exists()
