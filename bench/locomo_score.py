"""LoCoMo QA scoring, exactly as LoCoMo's own ``task_eval/evaluation.py`` (snap-research/locomo) does it.

- ``normalize_answer``: remove commas (first, on the raw string), then lowercase, remove ``string.punctuation``,
  replace the words a/an/the/and by a space, collapse whitespace.
- ``token_f1`` (LoCoMo ``f1_score``): Porter-stemmed tokens (NLTK ``PorterStemmer``), overlap by multiset
  (``Counter`` intersection); 0 when nothing overlaps (hence an empty prediction or gold scores 0).
- ``multi_hop_f1`` (LoCoMo ``f1``): split prediction and gold at ','; mean over gold parts of the best
  ``token_f1`` against any prediction part.
- ``score_qa``: category 3 cuts the gold at its first ';'; categories 2, 3, 4 use ``token_f1``; 1 uses
  ``multi_hop_f1``; 5 is 1 if the lowercased prediction contains 'no information available' or 'not mentioned'.

Reporting convention of the reproduced experiment: "Avg F1" is the plain mean of the four category F1s (x100).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Mapping

from nltk.stem import PorterStemmer

__all__ = [
    "TABLE_CATEGORIES",
    "normalize_answer",
    "token_f1",
    "multi_hop_f1",
    "score_qa",
    "aggregate",
    "format_table",
]

_ps = PorterStemmer()
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")

# Table column order: (category, column name).
TABLE_CATEGORIES: list[tuple[int, str]] = [(4, "SingleHop"), (1, "MultiHop"), (3, "OpenDom"), (2, "Temporal")]


def normalize_answer(s) -> str:
    s = str(s).replace(",", "")
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _stems(s) -> list[str]:
    return [_ps.stem(w) for w in normalize_answer(s).split()]


def stem_counts(s) -> Counter:
    """The stemmed normalised tokens `token_f1` compares, counted: for comparing one text against many."""
    return Counter(_stems(s))


def counts_f1(p: Counter, g: Counter) -> float:
    """`token_f1` of two `stem_counts`."""
    num_same = sum((p & g).values())
    if num_same == 0:
        return 0.0
    precision = num_same / sum(p.values())
    recall = num_same / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(pred, gold) -> float:
    """LoCoMo ``f1_score``: token F1 of stemmed normalised tokens."""
    return counts_f1(stem_counts(pred), stem_counts(gold))


def multi_hop_f1(pred, gold) -> float:
    """LoCoMo ``f1``: mean over ','-separated gold parts of the max ``token_f1`` over ','-separated prediction parts."""
    preds = [p.strip() for p in str(pred).split(",")]
    golds = [g.strip() for g in str(gold).split(",")]
    return sum(max(token_f1(p, g) for p in preds) for g in golds) / len(golds)


def is_abstention(prediction) -> bool:
    """Whether LoCoMo counts a prediction as declining to answer (what category 5 rewards)."""
    low = ("" if prediction is None else str(prediction)).lower()
    return "no information available" in low or "not mentioned" in low


def declined_percent(records: Iterable) -> float | None:
    """Percent of ``records`` (with a ``prediction``) that :func:`is_abstention` counts as declining; None if empty."""
    records = list(records)
    return 100.0 * sum(is_abstention(_get(r, "prediction")) for r in records) / len(records) if records else None


def score_qa(prediction, answer, category: int) -> float:
    """Score one prediction against its gold answer (numbers are str()-ed, None prediction counts as "")."""
    prediction = "" if prediction is None else str(prediction)
    answer = "" if answer is None else str(answer)
    if category == 3:
        answer = answer.split(";")[0].strip()
    if category in (2, 3, 4):
        return token_f1(prediction, answer)
    if category == 1:
        return multi_hop_f1(prediction, answer)
    if category == 5:
        return 1.0 if is_abstention(prediction) else 0.0
    raise ValueError(f"unknown LoCoMo category {category!r}")


def _get(rec, key):
    return rec[key] if isinstance(rec, Mapping) else getattr(rec, key)


def _score_of(rec) -> float:
    for key in ("score", "f1"):
        try:
            return float(_get(rec, key))
        except (KeyError, AttributeError):
            continue
    raise KeyError(f"record has neither 'score' nor 'f1': {rec!r}")


def aggregate(records: Iterable) -> dict:
    """Summarise per-question scores.

    ``records``: mappings (or objects) with ``category`` (int) and ``score`` (or ``f1``) in [0, 1] from
    :func:`score_qa`. Returns (all F1s x100, unrounded):

    - ``SingleHop``, ``MultiHop``, ``OpenDom``, ``Temporal``: mean F1 per category (None if no question of it);
    - ``by_category``: the same keyed by category number (4, 1, 3, 2 order);
    - ``avg_f1``: plain mean of the category F1s that are present (the experiment's "Avg F1");
    - ``overall_f1``: question-weighted mean over categories 1-4;
    - ``counts``: number of questions per category (4, 1, 3, 2, and 5 if present); ``n``: total in 1-4;
    - ``adversarial_acc`` (x100) and ``adversarial_n`` only if category-5 records exist.
    """
    per: dict[int, list[float]] = {c: [] for c in (1, 2, 3, 4, 5)}
    for rec in records:
        cat = int(_get(rec, "category"))
        if cat not in per:
            raise ValueError(f"unknown LoCoMo category {cat!r} in record {rec!r}")
        per[cat].append(_score_of(rec))
    out: dict = {"by_category": {}, "counts": {}}
    for cat, name in TABLE_CATEGORIES:
        vals = per[cat]
        f = 100.0 * sum(vals) / len(vals) if vals else None
        out[name] = f
        out["by_category"][cat] = f
        out["counts"][cat] = len(vals)
    present = [v for v in out["by_category"].values() if v is not None]
    out["avg_f1"] = sum(present) / len(present) if present else None
    main = [x for c in (4, 1, 3, 2) for x in per[c]]
    out["overall_f1"] = 100.0 * sum(main) / len(main) if main else None
    out["n"] = len(main)
    if per[5]:
        out["counts"][5] = len(per[5])
        out["adversarial_acc"] = 100.0 * sum(per[5]) / len(per[5])
        out["adversarial_n"] = len(per[5])
    return out


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table ``| Method | SingleHop | MultiHop | OpenDom | Temporal | Avg F1 |`` with 2 decimals."""
    cols = [name for _, name in TABLE_CATEGORIES]
    lines = [
        "| Method | " + " | ".join(cols) + " | Avg F1 |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for method, agg in rows:
        cells = [_fmt(agg.get(c)) for c in cols] + [_fmt(agg.get("avg_f1"))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
