"""bench.analysis.context_coverage: which evidence turns the ICL / RAG prompts held, and F1 split by it (tiny fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.analysis.context_coverage as cov
import bench.locomo as locomo
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-2k")
    make_tiny_checkpoint(d, "llama")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    return d


def run(ckpt, out, *extra):
    return locomo.main(["--model", str(ckpt), "--data", str(FIXTURE), "--out", str(out), "--quiet",
                        "--max-new-tokens", "4", "--conversations", "tiny-1", *extra])


def test_evidence_ids_and_splits():
    assert cov.evidence_ids(["D8:6; D9:17", "D9:1 D4:4"]) == {"D8:6", "D9:17", "D9:1", "D4:4"}
    assert cov.evidence_ids(["D", ""]) == set()  # malformed annotations count as none
    assert cov.split_of({"D1:1"}, {"D1:1", "D1:2"}) == "all"
    assert cov.split_of({"D1:1", "D2:1"}, {"D1:1"}) == "some"
    assert cov.split_of({"D2:1"}, {"D1:1"}) == "none"
    assert cov.split_of(set(), {"D1:1"}) == "n/a"


def test_icl_and_rag_coverage_follow_the_prompts(ckpt, tmp_path):
    icl = run(ckpt, tmp_path / "icl", "--method", "icl", "--context-tokens", "300")
    run(ckpt, tmp_path / "rag", "--method", "rag", "--top-k", "2")
    run(ckpt, tmp_path / "base", "--method", "base")
    # give the compared run distinct F1s (the tiny model scores 0 everywhere) so the join by question is checked
    rows = [json.loads(line) for line in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["f1"] = (i + 1) / 10
    (tmp_path / "base" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = cov.main([str(tmp_path / "icl"), str(tmp_path / "rag"), "--compare", str(tmp_path / "base"),
                   "--data", str(FIXTURE), "--out", str(tmp_path / "coverage")])
    report = json.loads((tmp_path / "coverage.json").read_text())
    assert (tmp_path / "coverage.md").read_text() == md and "| F1 of Base (no context) |" in md
    icl_rep, rag_rep = report["runs"]
    # a 300-token budget keeps the end of session 2 only (test_locomo_pipeline checks the prompt itself)
    assert icl["conversations"][0]["context"]["turns_kept"] < icl["conversations"][0]["context"]["turns_total"]
    splits = icl_rep["splits"]
    assert sum(s["n"] for s in splits.values()) == icl_rep["questions"] == 7  # tiny-1, categories 1-4
    # held turns are the conversation's last turns_kept; every question is judged against its own evidence
    data = {s.sample_id: s for s in cov.load_locomo(FIXTURE)}["tiny-1"]
    turns = [t.dia_id for s in data.sessions for t in s.turns]
    held = set(turns[len(turns) - icl["conversations"][0]["context"]["turns_kept"]:])
    questions = cov.select_questions(data)
    expected = [cov.split_of(cov.evidence_ids(q.evidence), held) for q in questions]
    assert {k: splits[k]["n"] for k in cov.SPLITS} == {k: expected.count(k) for k in cov.SPLITS}
    assert splits["none"]["n"] >= 1 and splits["all"]["n"] + splits["some"]["n"] >= 1  # the budget cut matters
    # RAG: the puppy questions retrieve the turn that names it (see test_locomo_pipeline), so D1:1 is covered
    assert rag_rep["splits"]["all"]["n"] >= 1
    # the compared run's F1 is the base model's on the same questions
    for split in cov.SPLITS:
        want = [r["f1"] for r, e in zip(rows, expected) if e == split]
        got = splits[split]["Base (no context)"]
        assert (got is None and not want) or got == pytest.approx(100 * sum(want) / len(want))


def test_refuses_runs_without_context(ckpt, tmp_path):
    run(ckpt, tmp_path / "base", "--method", "base", "--max-questions", "1")
    with pytest.raises(SystemExit, match="puts no conversation in the prompt"):
        cov.main([str(tmp_path / "base"), "--data", str(FIXTURE)])
    with pytest.raises(SystemExit, match="is the run finished"):
        cov.main([str(tmp_path / "nothing"), "--data", str(FIXTURE)])


def test_recitation_counts_the_turn_it_reproduces():
    data = {s.sample_id: s for s in cov.load_locomo(FIXTURE)}["tiny-1"]
    counts = {t.dia_id: cov.stem_counts(t.text) for s in data.sessions for t in s.turns}
    faithful = "On 8 May 2023, Alice said: Hi Bob! I adopted a puppy named Biscuit yesterday (7 May 2023)."
    assert cov.recited_turn(faithful, counts) == {"D1:1"}
    assert cov.recited_turn("Congrats Alice! I started learning the violin", counts) == {"D1:2"}
    assert cov.recited_turn("The weather in Paris was rainy and cold all week.", counts) == set()
    assert cov.recited_turn("", counts) == set()


def test_recite_run_coverage_reads_each_recitation(ckpt, tmp_path):
    run(ckpt, tmp_path / "recite", "--train-format", "text+recite", "--answer-mode", "recite", "--epochs", "1",
        "--seq-len", "128", "--rank", "4")
    path = tmp_path / "recite" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all("recitation" in r for r in rows)
    data = {s.sample_id: s for s in cov.load_locomo(FIXTURE)}["tiny-1"]
    first_turn = data.sessions[0].turns[0]  # D1:1, the puppy
    for i, r in enumerate(rows):  # the tiny model recites noise: make every other row recite D1:1 faithfully
        r["recitation"] = f"Alice said: {first_turn.text}" if i % 2 == 0 else "nothing at all like any turn"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = json.loads(json.dumps(cov.coverage(tmp_path / "recite", {"tiny-1": data}, {})))
    questions = cov.select_questions(data)
    expected = [cov.split_of(cov.evidence_ids(q.evidence), {"D1:1"} if i % 2 == 0 else set())
                for i, q in enumerate(questions)]
    assert {k: report["splits"][k]["n"] for k in cov.SPLITS} == {k: expected.count(k) for k in cov.SPLITS}
    assert report["splits"]["all"]["n"] >= 1 and report["settings"]["answer_mode"] == "recite"


def test_conversations_option_restricts_each_run(ckpt, tmp_path):
    run(ckpt, tmp_path / "rag", "--method", "rag", "--top-k", "2", "--conversations", "tiny-1,tiny-2")
    both = cov.main([str(tmp_path / "rag"), "--data", str(FIXTURE), "--out", str(tmp_path / "both")])
    one = cov.main([str(tmp_path / "rag"), "--data", str(FIXTURE), "--conversations", "tiny-1",
                    "--out", str(tmp_path / "one")])
    n_both = json.loads((tmp_path / "both.json").read_text())["runs"][0]["questions"]
    n_one = json.loads((tmp_path / "one.json").read_text())["runs"][0]["questions"]
    assert n_one == 7 < n_both and one != both
