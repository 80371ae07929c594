"""bench.analysis.capacity_combine: cells of several capacity results files as one set of curves (a curve per rank and
recipe), duplicates taken once, incomparable files refused; and the combined table of the committed CPU files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.analysis.capacity_combine import combine, main

SETTINGS = {"model": "m", "dtype": "float32", "seed": 0, "attributes": ["a", "b"], "question_template": "{question}",
            "train_format": "qa", "epochs": 6, "lr": 0.002, "batch_size": 2, "preset": "cpu", "max_new_tokens": 16}


def cell(rank, n, recalled):
    return {"rank": rank, "n_facts": n, "facts_recalled": recalled, "exact_match": recalled / n, "lora_params": rank}


def results_file(tmp: Path, name: str, cells: list[dict], base_ns=(), **settings) -> Path:
    r = {"benchmark": "capacity", "settings": {**SETTINGS, **settings}, "command": f"capacity.py {name}",
         "git_commit": "abc", "cells": cells,
         "base_by_facts": {str(n): {"exact_match": 0.0, "facts_recalled": 0} for n in base_ns} or None}
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(r))
    return p


def test_curves_per_rank_and_recipe_with_duplicates_taken_once(tmp_path):
    a = results_file(tmp_path, "a", [cell(1, 10, 6), cell(4, 10, 10), cell(4, 30, 23)], base_ns=(10, 30))
    b = results_file(tmp_path, "b", [cell(4, 30, 23), cell(4, 100, 69)], base_ns=(100,))  # resumed a, grew
    c = results_file(tmp_path, "c", [cell(4, 10, 9), cell(4, 100, 84)], lr=0.0005)  # another recipe for r=4
    r = combine([a, b, c])
    assert r["recipe_settings"] == ["lr"]
    labels = [cv["label"] for cv in r["curves"]]
    assert labels == ["r=1, lr 0.002", "r=4, lr 0.0005", "r=4, lr 0.002"]
    r4 = r["curves"][2]
    assert [(x["n_facts"], x["facts_recalled"], Path(x["source"]).name) for x in r4["cells"]] == [
        (10, 10, "a.json"), (30, 23, "a.json"), (100, 69, "b.json")]
    assert r["duplicate_cells"] == [{"curve": "r=4, lr 0.002", "n_facts": 30, "kept_from": str(a), "also_in": str(b),
                                     "same_recall": True}]
    assert r["facts"] == [10, 30, 100] and sorted(r["base_by_facts"]) == ["10", "100", "30"]
    assert [s["cells"] for s in r["sources"]] == [3, 2, 2]


def test_one_recipe_has_plain_rank_labels_and_the_table_marks_missing_cells(tmp_path):
    a = results_file(tmp_path, "a", [cell(1, 10, 6), cell(4, 30, 23)])
    out = tmp_path / "combined"
    r = main([str(a), "--out", str(out)])
    assert [cv["label"] for cv in r["curves"]] == ["r=1", "r=4"]
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| exact-match recall (%) | 10 facts | 30 facts |"
    assert table[2] == "| r=1 | 60.0 | - |" and table[3] == "| r=4 | - | 76.7 |"
    assert json.loads(out.with_suffix(".json").read_text())["curves"][0]["cells"][0]["facts_recalled"] == 6
    assert out.with_suffix(".png").stat().st_size > 0


def test_incomparable_or_bad_files_are_refused_by_name(tmp_path):
    a = results_file(tmp_path, "a", [cell(1, 10, 6)])
    other_model = results_file(tmp_path, "b", [cell(1, 10, 6)], model="other")
    with pytest.raises(SystemExit, match=r"b.json: setting 'model' is 'other'"):
        main([str(a), str(other_model), "--out", str(tmp_path / "x")])
    not_capacity = tmp_path / "decode.json"
    not_capacity.write_text(json.dumps({"benchmark": "decode"}))
    with pytest.raises(SystemExit, match="decode.json: not a bench.capacity results file"):
        main([str(not_capacity), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="nope.json: not found"):
        main([str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")])


def test_the_committed_cpu_files_combine_into_the_readme_table(tmp_path):
    results = Path(__file__).resolve().parent.parent / "bench" / "results"
    files = [results / f for f in ("capacity_cpu.json", "capacity_cpu_1000.json", "capacity_cpu_r1_1000.json",
                                   "capacity_cpu_r64_lr5e-4.json")]
    r = combine(files)
    by = {cv["label"]: {x["n_facts"]: x["facts_recalled"] for x in cv["cells"]} for cv in r["curves"]}
    assert by["r=4, lr 0.002"][1000] == 467 and by["r=1, lr 0.002"][1000] == 407
    assert by["r=64, lr 0.0005"][100] == 84 and by["r=64, lr 0.002"][100] == 2
    assert all(d["same_recall"] for d in r["duplicate_cells"])  # the resumed run did not retrain its cells
