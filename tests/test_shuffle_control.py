"""bench.analysis.shuffle_control: a prediction scored against another question's gold of the same conversation and
category; what a constant answer earns is not question-specific, a right answer is."""

from __future__ import annotations

import json

import pytest

from bench.locomo_score import score_qa
from bench.analysis.shuffle_control import control, main, shuffled_f1

GOLDS = ["7 May 2023", "June 2023", "2022", "The week before 9 June 2023", "10 July 2023"]


def rows(predictions, golds=GOLDS, category=2, sample_id="conv-1"):
    return [{"sample_id": sample_id, "category": category, "answer": g, "prediction": p,
             "f1": score_qa(p, g, category)} for p, g in zip(predictions, golds)]


def test_a_constant_answer_is_not_question_specific():
    rs = rows(["23 August 2023"] * len(GOLDS))
    c = control(rs)["Temporal"]
    assert c["f1"] > 0 and c["shuffled_f1"] == pytest.approx(c["f1"]) and c["question_specific"] == pytest.approx(0)


def test_right_answers_are_question_specific():
    c = control(rows(GOLDS))["Temporal"]
    assert c["f1"] == pytest.approx(100) and c["shuffled_f1"] < 50 and c["question_specific"] > 50


def test_shuffles_stay_within_conversation_and_category():
    # two conversations whose answers share nothing: a shuffle across them would lower the F1, within them it cannot
    a = rows(["Paris"] * 3, ["Paris", "Paris", "Paris"], sample_id="a")
    b = rows(["Lima"] * 3, ["Lima", "Lima", "Lima"], sample_id="b")
    assert shuffled_f1(a + b) == pytest.approx(100)
    other_category = rows(["Lima"] * 3, ["Lima"] * 3, category=1, sample_id="a")
    assert shuffled_f1(a + other_category) == pytest.approx(100)


def test_cli_writes_table_and_json(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"method": "Test method"}))
    rs = rows(GOLDS) + rows(["Caroline"] * 2, ["Caroline", "Melanie"], category=4)
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    out = main([str(run), "--seeds", "3", "--out", str(tmp_path / "ctl")])
    assert out[0]["method"] == "Test method" and set(out[0]["control"]) == {"Temporal", "SingleHop", "avg"}
    md = (tmp_path / "ctl.md").read_text()
    assert "| Test method | " in md and "100.00 / " in md
    assert json.loads((tmp_path / "ctl.json").read_text())["seeds"] == 3
