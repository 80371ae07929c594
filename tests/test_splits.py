"""bench.analysis.splits: runs reported on the dev split, the test split and all, with question-specific F1 and cost."""

from __future__ import annotations

import json

import pytest

from bench.analysis import splits
from bench.locomo_data import DEV_SPLIT
from bench.locomo_score import score_qa


def write_run(path, method, settings, rows, conversations):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"method": method, "settings": settings,
                                                   "conversations": conversations}))
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(sample_id, category, answer, prediction):
    return {"sample_id": sample_id, "category": category, "question": f"q {answer}?", "answer": answer,
            "prediction": prediction, "f1": score_qa(prediction, answer, category)}


@pytest.fixture
def runs(tmp_path):
    dev, test = DEV_SPLIT[0], "conv-41"
    # "knows": right on every question; "dates": the same date-shaped answer everywhere (form, no knowledge)
    questions = [(dev, 2, "7 May 2023"), (dev, 2, "9 June 2023"), (test, 2, "1 July 2022"), (test, 2, "3 March 2022"),
                 (dev, 4, "violin"), (test, 4, "Biscuit"), (test, 5, "adversarial")]
    knows = [row(s, c, a, a) for s, c, a in questions]
    dates = [row(s, c, a, "7 May 2023") for s, c, a in questions]
    convs = [{"sample_id": dev, "train_tokens": 100, "train_seconds": 10.0, "teacher_seconds": 2.0},
             {"sample_id": test, "train_tokens": 300, "train_seconds": 30.0}]
    write_run(tmp_path / "knows", "LoRA-Mem (r=8, text+queries)", {"query_phrasings": 1, "threads": 2}, knows, convs)
    write_run(tmp_path / "dates", "LoRA-Mem (r=8, text+queries)", {"query_phrasings": 3, "threads": 1}, dates, convs)
    return tmp_path


def test_splits_separate_dev_from_test_and_the_control_removes_form(runs, tmp_path):
    reports = splits.main([str(runs / "knows"), str(runs / "dates"), "--seeds", "3", "--out", str(tmp_path / "s")])
    knows, dates = reports
    assert knows["splits"]["dev"]["conversations"] == [DEV_SPLIT[0]]
    assert knows["splits"]["test"]["conversations"] == ["conv-41"]
    assert knows["splits"]["dev"]["questions"] == 3 and knows["splits"]["test"]["questions"] == 3  # no category 5
    assert knows["splits"]["all"]["avg_f1"] == pytest.approx(100.0)
    # the cost is that of the split's conversations
    assert (knows["splits"]["dev"]["train_tokens"], knows["splits"]["test"]["train_tokens"]) == (100, 300)
    assert knows["splits"]["dev"]["teacher_seconds"] == 2.0 and knows["splits"]["all"]["train_seconds"] == 40.0
    # one date for every temporal question scores on dev (it is right once) but little of it depends on the question
    d = dates["splits"]["dev"]
    assert d["categories"]["Temporal"] > 0
    assert d["question_specific"]["Temporal"] < d["categories"]["Temporal"]
    assert knows["splits"]["dev"]["question_specific"]["Temporal"] > d["question_specific"]["Temporal"]
    md = (tmp_path / "s.md").read_text()
    assert "### dev" in md and "### test" in md and "### all" in md
    assert json.loads((tmp_path / "s.json").read_text())["dev_split"] == list(DEV_SPLIT)


def test_runs_with_one_label_are_told_apart_by_their_recipe_settings(runs):
    reports = splits.main([str(runs / "knows"), str(runs / "dates"), "--seeds", "1"])
    # threads differ too, but say nothing of the recipe
    assert [r["method"] for r in reports] == ["LoRA-Mem (r=8, text+queries) [query_phrasings=1]",
                                              "LoRA-Mem (r=8, text+queries) [query_phrasings=3]"]
    assert splits.distinct_labels(["a", "b"], [{"x": 1}, {"x": 2}]) == ["a", "b"]
    # the dtype a run computed in changes its numbers, so it tells runs apart
    # and a setting one run does not record (its code predates it) does not
    assert splits.distinct_labels(["m", "m"], [{"dtype": "float32", "queries_from": None},
                                               {"dtype": "bfloat16", "queries_from": "rules"}]) == \
        ["m [dtype=float32]", "m [dtype=bfloat16]"]


def test_runs_of_the_same_settings_are_told_apart_by_their_code():
    same = [{"query_phrasings": 1, "threads": 2}, {"query_phrasings": 1, "threads": 1}]
    assert splits.distinct_labels(["m", "m"], same, ["875cbf0aaaa", "7047ae1bbbb"]) == \
        ["m [code 875cbf0]", "m [code 7047ae1]"]
    assert splits.distinct_labels(["m", "m"], same, ["875cbf0aaaa", "875cbf0aaaa"]) == ["m", "m"]
    three = [{"query_phrasings": 1}, {"query_phrasings": 3}, {"query_phrasings": 1}]
    assert splits.distinct_labels(["m", "m", "m"], three, ["aaaaaaa1", "aaaaaaa1", "bbbbbbb2"]) == \
        ["m [query_phrasings=1] [code aaaaaaa]", "m [query_phrasings=3]", "m [query_phrasings=1] [code bbbbbbb]"]
