"""LoCoMo scoring rules, hand-checked (bench/locomo_score.py mirrors snap-research/locomo task_eval/evaluation.py)."""

import pytest

from bench.locomo_score import (
    aggregate,
    format_table,
    multi_hop_f1,
    normalize_answer,
    score_qa,
    token_f1,
)

approx = pytest.approx


# ---------------------------------------------------------------------------- normalize_answer


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Cat, and a DOG!", "cat dog"),  # lowercase, comma, articles incl. 'and', punctuation
        ("1,000", "1000"),  # commas are deleted, not turned into spaces
        ("1,000 dollars", "1000 dollars"),
        ("U.S.A.", "usa"),
        ("don't", "dont"),
        ("self-care", "selfcare"),  # string.punctuation removed without a space
        ("(the) dog", "dog"),  # punctuation is removed before articles
        ("Andrew and the theater", "andrew theater"),  # only whole words
        ("an  apple \n a day", "apple day"),  # whitespace collapsed
        ("", ""),
        (2022, "2022"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


# ---------------------------------------------------------------------------- token_f1


def test_commas_in_numbers():
    assert token_f1("1,000", "1000") == 1.0
    assert token_f1("1000", "1,000") == 1.0


def test_articles_and_punctuation_ignored():
    assert token_f1("The violin.", "violin") == 1.0
    assert token_f1("a dog and a cat", "Cat, dog!") == 1.0


def test_stemming():
    assert token_f1("running", "runs") == 1.0  # both stem to "run"
    # pred stems [he, run, daili], gold [run]: P=1/3, R=1 -> 0.5
    assert token_f1("he runs daily", "running") == approx(0.5)


def test_f1_precision_recall():
    assert token_f1("Paris France", "Paris") == approx(2 / 3)  # P=1/2, R=1
    assert token_f1("Paris", "Paris France") == approx(2 / 3)  # P=1, R=1/2
    assert token_f1("dog dog", "dog") == approx(2 / 3)  # Counter intersection: 1 common, P=1/2
    assert token_f1("Berlin", "Lisbon") == 0.0


def test_empty_prediction_or_gold_is_zero():
    assert token_f1("", "Biscuit") == 0.0
    assert token_f1("the a an", "Biscuit") == 0.0  # normalises to nothing
    assert token_f1("Biscuit", "") == 0.0
    assert token_f1("", "") == 0.0  # LoCoMo: no common tokens -> 0


# ---------------------------------------------------------------------------- multi-hop


def test_multi_hop_split():
    # gold parts: "running on the beach" -> [run, on, beach]; "charity race" -> [chariti, race]
    # best for part 1: "beach" P=1 R=1/3 -> 0.5; part 2: "race" P=1 R=1/2 -> 2/3; mean -> 7/12
    assert multi_hop_f1("beach, race", "running on the beach, charity race") == approx(7 / 12)
    assert score_qa("beach, race", "running on the beach, charity race", 1) == approx(7 / 12)
    # the same pair without splitting (category 4): common 2, P=1, R=2/5 -> 4/7
    assert score_qa("beach, race", "running on the beach, charity race", 4) == approx(4 / 7)


def test_multi_hop_order_and_unsplit_prediction():
    assert score_qa("violin, Lisbon", "Lisbon, violin", 1) == 1.0
    # prediction without commas is one part [lisbon, violin]: each gold part P=1/2 R=1 -> 2/3
    assert score_qa("Lisbon and violin", "Lisbon, violin", 1) == approx(2 / 3)
    # extra prediction parts do not hurt: max over prediction parts
    assert score_qa("Berlin, Lisbon, violin", "Lisbon, violin", 1) == 1.0
    # mean over gold parts: one of two found
    assert score_qa("Lisbon", "Lisbon, violin", 1) == approx(0.5)
    assert score_qa("", "Lisbon, violin", 1) == 0.0


# ---------------------------------------------------------------------------- categories


def test_category_3_cut_at_semicolon():
    gold = "Likely yes; he plays the violin"
    assert score_qa("likely yes", gold, 3) == 1.0
    # without the cut (as category 4): gold [like, ye, he, play, violin], P=1 R=2/5 -> 4/7
    assert score_qa("likely yes", gold, 4) == approx(4 / 7)
    # category 3 does not split at commas
    assert score_qa("yes", "yes, since she collects books", 3) == approx(2 / 6)  # P=1, R=1/5


def test_categories_2_and_4_plain_f1():
    assert score_qa("On 7 May 2023", "7 May 2023", 2) == approx(2 * (3 / 4) / (1 + 3 / 4))
    assert score_qa("Biscuit", "Biscuit", 4) == 1.0


def test_numeric_answers():
    assert score_qa("2022", 2022, 2) == 1.0
    assert score_qa("In 2022.", 2022, 2) == approx(2 / 3)
    assert score_qa("3", 3, 1) == 1.0


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("No information available.", 1.0),
        ("That is NOT MENTIONED in the conversation.", 1.0),
        ("(a) Not mentioned in the conversation", 1.0),
        ("Biscuit", 0.0),
        ("not mention", 0.0),
        ("I don't know", 0.0),
        ("", 0.0),
    ],
)
def test_category_5_phrases(pred, expected):
    assert score_qa(pred, None, 5) == expected
    assert score_qa(pred, "Biscuit", 5) == expected  # gold is irrelevant


def test_none_prediction_and_unknown_category():
    assert score_qa(None, "Biscuit", 4) == 0.0
    with pytest.raises(ValueError, match="category"):
        score_qa("x", "x", 6)


def test_scores_are_floats():
    assert isinstance(score_qa("x", "y", 4), float)
    assert isinstance(score_qa("x", "x", 1), float)


# ---------------------------------------------------------------------------- aggregate / table

PUBLISHED = [
    ("Base (no context)", (8.56, 5.50, 9.67, 3.03), 6.69),
    ("LoRA-Mem (r=4)", (9.16, 6.72, 8.87, 2.30), 6.76),
    ("LoRA-Mem (r=8)", (10.44, 7.05, 8.64, 2.54), 7.17),
]


def _records(single, multi, open_dom, temporal):
    return [
        {"category": 4, "score": single / 100},
        {"category": 1, "score": multi / 100},
        {"category": 3, "score": open_dom / 100},
        {"category": 2, "score": temporal / 100},
    ]


@pytest.mark.parametrize("method, cats, avg", PUBLISHED)
def test_avg_f1_is_plain_mean_of_categories(method, cats, avg):
    agg = aggregate(_records(*cats))
    assert (agg["SingleHop"], agg["MultiHop"], agg["OpenDom"], agg["Temporal"]) == approx(cats)
    assert round(agg["avg_f1"], 2) == avg
    assert agg["avg_f1"] == approx(sum(cats) / 4)


def test_format_table_reproduces_mission_table():
    rows = [(m, aggregate(_records(*c))) for m, c, _ in PUBLISHED]
    assert format_table(rows) == "\n".join(
        [
            "| Method | SingleHop | MultiHop | OpenDom | Temporal | Avg F1 |",
            "|---|---|---|---|---|---|",
            "| Base (no context) | 8.56 | 5.50 | 9.67 | 3.03 | 6.69 |",
            "| LoRA-Mem (r=4) | 9.16 | 6.72 | 8.87 | 2.30 | 6.76 |",
            "| LoRA-Mem (r=8) | 10.44 | 7.05 | 8.64 | 2.54 | 7.17 |",
        ]
    )


def test_avg_vs_question_weighted_overall():
    recs = [{"category": 4, "score": 1.0}] * 3 + [
        {"category": 1, "score": 0.0},
        {"category": 3, "score": 0.0},
        {"category": 2, "score": 0.0},
    ]
    agg = aggregate(recs)
    assert agg["SingleHop"] == 100.0
    assert agg["avg_f1"] == approx(25.0)  # mean of (100, 0, 0, 0)
    assert agg["overall_f1"] == approx(50.0)  # 3 of 6 questions
    assert agg["counts"] == {4: 3, 1: 1, 3: 1, 2: 1}
    assert agg["n"] == 6
    assert list(agg["by_category"]) == [4, 1, 3, 2]
    assert "adversarial_acc" not in agg


def test_adversarial_reported_separately():
    recs = _records(50, 50, 50, 50) + [{"category": 5, "score": 1.0}, {"category": 5, "score": 0.0}]
    agg = aggregate(recs)
    assert agg["adversarial_acc"] == approx(50.0)
    assert agg["adversarial_n"] == 2
    assert agg["counts"][5] == 2
    assert agg["avg_f1"] == approx(50.0)
    assert agg["overall_f1"] == approx(50.0)
    assert agg["n"] == 4


def test_aggregate_f1_key_missing_categories_and_table_dash():
    agg = aggregate([{"category": 4, "f1": 0.5}, {"category": 2, "f1": 0.25}])
    assert agg["SingleHop"] == approx(50.0) and agg["Temporal"] == approx(25.0)
    assert agg["MultiHop"] is None and agg["OpenDom"] is None
    assert agg["avg_f1"] == approx(37.5)  # over the categories present
    assert format_table([("x", agg)]).splitlines()[-1] == "| x | 50.00 | — | — | 25.00 | 37.50 |"
    empty = aggregate([])
    assert empty["avg_f1"] is None and empty["overall_f1"] is None and empty["n"] == 0


def test_aggregate_end_to_end_with_score_qa():
    items = [("Biscuit", "Biscuit", 4), ("Berlin", "Lisbon", 4), ("2022", 2022, 2), ("violin, Lisbon", "Lisbon, violin", 1)]
    recs = [{"category": c, "score": score_qa(p, g, c)} for p, g, c in items]
    agg = aggregate(recs)
    assert agg["SingleHop"] == approx(50.0)
    assert agg["Temporal"] == approx(100.0)
    assert agg["MultiHop"] == approx(100.0)
    assert agg["overall_f1"] == approx(75.0)


def test_is_abstention_is_what_category_5_rewards():
    from bench.locomo_score import is_abstention

    for declined in ("Not mentioned in the conversation.", "NO INFORMATION AVAILABLE", "that was not mentioned"):
        assert is_abstention(declined) and score_qa(declined, "", 5) == 1.0
    for answered in ("Biscuit", "", None, "mentioned it"):
        assert not is_abstention(answered) and score_qa(answered, "", 5) == 0.0
