"""bench.analysis.abstention: how often a run declines, per category, and whether it declines what another run got wrong."""

from __future__ import annotations

import json

import pytest

from bench.analysis.abstention import abstention_rates, compare_on_declined, main

NO = "Not mentioned in the conversation."


def row(i, category, prediction, f1=0.0, sample_id="conv-1"):
    return {"sample_id": sample_id, "question": f"q{i}", "category": category, "prediction": prediction, "f1": f1}


def test_rates_per_category_and_the_discrimination_ratio():
    rows = ([row(i, 5, NO) for i in range(3)] + [row(3, 5, "Sweden")]            # 75% of category 5
            + [row(4, 2, NO), row(5, 2, "7 May 2023"), row(6, 4, "Paris"), row(7, 4, "a dog")])  # 25% of 1-4
    r = abstention_rates(rows)
    assert r["by_category"]["Adversarial"] == {"n": 4, "declined_pct": 75.0}
    assert r["by_category"]["Temporal"]["declined_pct"] == 50.0 and r["by_category"]["SingleHop"]["declined_pct"] == 0
    assert "MultiHop" not in r["by_category"]
    assert r["answerable_n"] == 4 and r["answerable_declined_pct"] == 25.0
    assert r["adversarial_to_answerable_ratio"] == pytest.approx(3.0)
    # declining at one rate whatever is asked: ratio 1
    same = [row(0, 5, NO), row(1, 5, "x"), row(2, 4, NO), row(3, 4, "y")]
    assert abstention_rates(same)["adversarial_to_answerable_ratio"] == pytest.approx(1.0)


def test_compare_splits_the_other_runs_f1_by_what_this_run_declined():
    ours = [row(0, 4, NO), row(1, 4, NO), row(2, 4, "Paris"), row(3, 5, NO)]
    other = [row(0, 4, "x", 0.0), row(1, 4, "y", 0.2), row(2, 4, "Paris", 1.0), row(3, 5, "z")]
    c = compare_on_declined(ours, other)
    assert c == {"declined_n": 2, "answered_n": 1, "other_f1_on_declined": pytest.approx(10.0),
                 "other_f1_on_answered": pytest.approx(100.0)}
    with pytest.raises(SystemExit, match="no prediction"):
        compare_on_declined(ours + [row(9, 1, "?")], other)


def test_cli_writes_table_and_json(tmp_path):
    for name, preds in (("abst", [NO, "Paris", NO]), ("plain", ["Rome", "Paris", "Lima"])):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"method": f"method {name}"}))
        rows = [row(0, 4, preds[0], 0.0), row(1, 4, preds[1], 1.0), row(2, 5, preds[2])]
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = main([str(tmp_path / "abst"), "--compare", str(tmp_path / "plain"), "--out", str(tmp_path / "a")])
    assert out[0]["rates"]["answerable_declined_pct"] == 50.0 and out[0]["compare"]["method"] == "method plain"
    md = (tmp_path / "a.md").read_text()
    header, rule = md.splitlines()[2:4]
    assert header.count("|") == rule.count("|") == 9  # 8 columns
    assert "| method abst | 50.0 | - | - | - | 100.0 | 50.0 | 2.00 |" in md  # SingleHop .. Adversarial, 1-4, ratio
    assert "| method abst | method plain | 1 | 0.00 | 1 | 100.00 |" in md
    assert json.loads((tmp_path / "a.json").read_text())["runs"][0]["method"] == "method abst"
