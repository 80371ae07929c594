"""Internalisation data is built from the conversation alone, and the QA format supervises answers only."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

from lora_mem.lora_core.recipes import (
    ABSTENTION_ANSWER,
    ABSTENTION_VOCABULARY,
    TRAIN_FORMATS,
    QAPair,
    Recipe,
    CONTRASTIVE_FORMS,
    abstention_pairs,
    contrastive_abstention_pairs,
    mentions,
    session_date,
    template_qa,
    training_data,
    training_qa_pairs,
)
from lora_mem.lora_core.memory import QUESTION_TEMPLATE
from lora_mem.lora_core.queries import keyword, phrase_heads
from bench.locomo_data import QA, conversation_text, load_locomo
from bench.locomo_score import score_qa
from lora_mem.lora_core.train import IGNORE_INDEX
from lora_mem.model.tokenizer import Tokenizer
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


def _load_one(tmp_path, raw_sample):
    p = tmp_path / "one.json"
    p.write_text(json.dumps([raw_sample]))
    return load_locomo(p)[0]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tiny_checkpoint(d, "llama")
    return Tokenizer.from_dir(d)


OPTIONS = {
    "default": {},
    "resolve_dates": {"resolve_dates": True},
    "qa_per_turn": {"qa_per_turn": 1},
    "abstention": {"abstention": True},
    "all": {"resolve_dates": True, "qa_per_turn": 2, "abstention": True, "abstention_ratio": 0.5, "seed": 3},
    "contrastive": {"abstention": True, "abstention_ratio": 1.0, "abstention_style": "contrastive"},
}


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("train_format", TRAIN_FORMATS)
def test_training_data_ignores_annotations(tok, tmp_path, train_format, options):
    """Changing every annotation (qa, observation, summaries) leaves the training data unchanged, whatever the
    options: relative dates, fewer pairs per turn, abstention negatives (the altered questions name subjects of
    the abstention vocabulary, so negatives built from them would differ)."""
    kw = dict(OPTIONS[options])
    seed = kw.pop("seed", 0)
    raw = json.loads(FIXTURE.read_text())
    altered = copy.deepcopy(raw)
    for s in altered:
        s["observation"] = {"x": "other observation"}
        s["session_summary"] = {"x": "other summary"}
        s["event_summary"] = {"x": "other events"}
        for qa in s["qa"]:
            qa["question"] = "When did Alice travel to Iceland with her parrot yesterday?"
            if "answer" in qa:
                qa["answer"] = "a different answer, last week"
            if "adversarial_answer" in qa:
                qa["adversarial_answer"] = "Not mentioned in the conversation."
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    for a, b in zip(load_locomo(FIXTURE), load_locomo(tmp_path / "altered.json")):
        ids_a, labels_a = training_data(a, tok, Recipe(train_format, 256, timestamps=False, **kw), QUESTION_TEMPLATE, seed=seed)
        ids_b, labels_b = training_data(b, tok, Recipe(train_format, 256, timestamps=False, **kw), QUESTION_TEMPLATE, seed=seed)
        assert torch.equal(ids_a, ids_b) and torch.equal(labels_a, labels_b)
        assert ids_a.shape[1] == 256 and (labels_a != IGNORE_INDEX).any()
    # and the annotation text never appears in what is trained on
    for sample in load_locomo(FIXTURE):
        ids, _ = training_data(sample, tok, Recipe(train_format, 256, timestamps=True, **kw), QUESTION_TEMPLATE, seed=seed)
        text = tok.decode(ids.flatten().tolist())
        assert "LEAK" not in text
        for qa in sample.qa:
            assert qa.question not in text


def test_template_qa_covers_who_what_when(tok):
    sample = load_locomo(FIXTURE)[0]
    pairs = template_qa(sample)
    first = next(t for s in sample.sessions for t in s.turns if len(t.text.split()) >= 4)
    whos = [p for p in pairs if p.question.startswith("Who said")]
    whens = [p for p in pairs if p.question.startswith(f"When did {first.speaker} say")]
    assert whos and whos[0].answer == first.speaker
    assert whens and any(ch.isdigit() for ch in whens[0].answer)  # a date like "8 May 2023"
    assert any("share a photo of" in p.question for p in pairs)
    # the sample's own QA is not consulted at all
    stripped = dataclasses.replace(sample, qa=[QA("q", "a", 4, [], None)])
    assert template_qa(stripped) == pairs


def test_qa_windows_supervise_only_answers(tok):
    sample = load_locomo(FIXTURE)[0]
    ids, labels = training_data(sample, tok, Recipe("qa", 256, timestamps=False), QUESTION_TEMPLATE)
    pairs = template_qa(sample)
    supervised = tok.decode([t for t in labels.flatten().tolist() if t != IGNORE_INDEX], skip_special_tokens=False)
    assert pairs[0].answer in supervised and "Who said" not in supervised
    # every window starts with the system turn and asks in the benchmark's chat format
    first_window = tok.decode(ids[0].tolist(), skip_special_tokens=False)
    assert first_window.startswith("<|im_start|>")
    assert "Answer the question in a few words.\nQuestion: Who said" in first_window
    # targets are the next tokens: wherever a label is set, it equals the following input token
    pos = (labels != IGNORE_INDEX).nonzero()
    for i, t in pos[:50].tolist():
        assert labels[i, t] == ids[i, t + 1]


# ---------------------------------------------------------------------------- defaults are the original data


def test_template_qa_default_pinned():
    """All options off: the pairs of the original recipe, in order (who, when, what, photo per turn)."""
    sample = load_locomo(FIXTURE)[0]
    pairs = template_qa(sample)
    assert pairs == template_qa(sample, qa_per_turn=None, resolve_dates=False)
    assert len(pairs) == 19  # 6 turns x who/when/what + one photo
    assert pairs[:3] == [
        QAPair('Who said "Hi Bob! I adopted a puppy named Biscuit yesterday."?', "Alice"),
        QAPair('When did Alice say "Hi Bob! I adopted a puppy named Biscuit yesterday."?', "8 May 2023"),
        QAPair("What did Alice say on 8 May 2023?", "Hi Bob! I adopted a puppy named Biscuit yesterday."),
    ]
    assert pairs[9] == QAPair("What did Alice share a photo of on 8 May 2023?", "a photo of a dog running on a beach")
    assert [p.question.split()[0] for p in template_qa(load_locomo(FIXTURE)[1])] == (
        ["Who", "When", "What"] * 2 + ["What"] + ["Who", "When", "What"] * 3)  # a photo with no text: one pair


def test_training_data_default_options_change_nothing(tok):
    for sample in load_locomo(FIXTURE):
        for fmt in TRAIN_FORMATS:
            for ts in (False, True):
                plain = training_data(sample, tok, Recipe(fmt, 256, ts), QUESTION_TEMPLATE)
                explicit = training_data(sample, tok, Recipe(fmt, 256, ts, resolve_dates=False, qa_per_turn=None, abstention=False, abstention_ratio=0.1), QUESTION_TEMPLATE, seed=0)
                assert all(torch.equal(x, y) for x, y in zip(plain, explicit))
        text_ids, _ = training_data(sample, tok, Recipe("text", 4096, True), QUESTION_TEMPLATE)
        assert tok.decode(text_ids[0].tolist()).strip().startswith(conversation_text(sample, timestamps=True)[:60])


# ---------------------------------------------------------------------------- resolve_dates


def test_resolve_dates_in_text_and_templates(tok):
    sample = load_locomo(FIXTURE)[0]
    for ts in (False, True):  # resolve_dates selects "timestamped+dates", which has the timestamps
        ids, _ = training_data(sample, tok, Recipe("text", 512, ts, resolve_dates=True), QUESTION_TEMPLATE)
        text = tok.decode(ids.flatten().tolist())
        assert "On 8 May 2023, Alice said: Hi Bob! I adopted a puppy named Biscuit yesterday (7 May 2023)." in text
        assert "last week (the week before 8 May 2023)" in text
    pairs = template_qa(sample, resolve_dates=True)
    assert len(pairs) == len(template_qa(sample))  # the same pairs, dates resolved in quotes and answers
    assert QAPair("What did Alice say on 8 May 2023?",
                  "Hi Bob! I adopted a puppy named Biscuit yesterday (7 May 2023).") in pairs
    assert any(p.question.startswith('Who said "Congrats Alice! I started learning the violin last week (the')
               for p in pairs)


# ---------------------------------------------------------------------------- qa_per_turn


def test_qa_per_turn_rotates_kinds():
    a, b = load_locomo(FIXTURE)
    one = template_qa(a, qa_per_turn=1)
    # turn j (all six have pairs) starts at pair j mod (its count): who, when, what(of 4: the photo turn), who, ...
    assert [p.question.split()[0] for p in one] == ["Who", "When", "What", "Who", "When", "What"]
    full = template_qa(a)
    assert all(p in full for p in one) and len(one) == a.num_turns
    assert one[2] == QAPair("What did Alice say on 8 May 2023?", "Here he is at the beach.")
    # a turn with one pair keeps it: the photo shared without text
    one_b = template_qa(b, qa_per_turn=1)
    assert QAPair("What did Maya share a photo of on 3 January 2024?", "a photo of a clay bowl on a wheel") in one_b
    assert len(one_b) == b.num_turns
    two = template_qa(a, qa_per_turn=2)
    assert len(two) == 2 * a.num_turns and all(p in full for p in two)
    assert len(set(two)) == len(two)
    assert template_qa(a, qa_per_turn=4) == full  # no turn has more than four
    with pytest.raises(ValueError, match="qa_per_turn"):
        template_qa(a, qa_per_turn=0)


def test_qa_per_turn_photo_pairs_rotate_in(tmp_path):
    """On a longer run of photo turns every kind, the photo pair included, comes up in turn."""
    raw = json.loads(FIXTURE.read_text())[0]
    turn = {"speaker": "Alice", "dia_id": "D1:3", "text": "Look at this one here.", "blip_caption": "a photo of a cat"}
    raw["conversation"]["session_1"] = [dict(turn, dia_id=f"D1:{i}") for i in range(8)]
    del raw["conversation"]["session_2"], raw["conversation"]["session_2_date_time"]
    sample = _load_one(tmp_path, raw)
    kinds = [p.question.split()[0] + (" photo" if "photo" in p.question else "")
             for p in template_qa(sample, qa_per_turn=1)]
    assert kinds == ["Who", "When", "What", "What photo"] * 2


def test_training_data_qa_per_turn(tok):
    sample = load_locomo(FIXTURE)[0]
    full_ids, full_labels = training_data(sample, tok, Recipe("qa", 256, False), QUESTION_TEMPLATE)
    one_ids, one_labels = training_data(sample, tok, Recipe("qa", 256, False, qa_per_turn=1), QUESTION_TEMPLATE)
    assert (one_labels != IGNORE_INDEX).sum() < (full_labels != IGNORE_INDEX).sum()
    assert (one_ids != tok.pad_id).sum() < (full_ids != tok.pad_id).sum()


# ---------------------------------------------------------------------------- abstention


def test_abstention_answer_scores_as_abstention():
    assert "not mentioned" in ABSTENTION_ANSWER.lower()
    assert score_qa(ABSTENTION_ANSWER, "", 5) == 1.0
    assert score_qa("Biscuit", "", 5) == 0.0


def _subject(question: str) -> str:
    """The vocabulary subject a generated question is about."""
    found = [x for xs, _ in ABSTENTION_VOCABULARY.values() for x in xs if re.search(rf"\b{re.escape(x)}\b", question)]
    assert found, question
    return max(found, key=len)


@pytest.mark.parametrize("index", [0, 1])
def test_abstention_subjects_never_in_conversation(index):
    sample = load_locomo(FIXTURE)[index]
    text = conversation_text(sample).lower()
    pairs = abstention_pairs(sample, 60, seed=0)
    assert len(pairs) == 60 and len(set(pairs)) == 60
    for p in pairs:
        assert p.answer == ABSTENTION_ANSWER
        for word in _subject(p.question).lower().split():
            assert not re.search(rf"\b{re.escape(word)}", text), (word, p.question)
    # distinct subjects first; both speakers asked about, about equally
    assert len({_subject(p.question) for p in pairs}) == 60
    a = sum(sample.speaker_a in p.question for p in pairs)
    b = sum(sample.speaker_b in p.question for p in pairs)
    assert a + b == 60 and abs(a - b) <= 2


def test_abstention_skips_mentioned_subjects(tmp_path):
    raw = json.loads(FIXTURE.read_text())[0]
    raw["conversation"]["session_1"][0]["text"] = "We went kayaking in Icelandic fjords and saw PARROTS, Thaddeus."
    sample = _load_one(tmp_path, raw)
    for subject in ("Iceland", "Icelandic", "parrot", "Thaddeus", "kayak"):
        assert mentions(sample, subject), subject
    assert not mentions(sample, "Peru")
    asked = {_subject(p.question) for p in abstention_pairs(sample, 10_000, seed=0)}
    assert not asked & {"Iceland", "Icelandic", "parrot", "Thaddeus"}
    assert "Peru" in asked


def test_abstention_pairs_deterministic():
    sample = load_locomo(FIXTURE)[0]
    assert abstention_pairs(sample, 25, seed=1) == abstention_pairs(sample, 25, seed=1)
    assert abstention_pairs(sample, 25, seed=1) != abstention_pairs(sample, 25, seed=2)
    assert abstention_pairs(sample, 10, seed=1) == abstention_pairs(sample, 25, seed=1)[:10]  # a prefix
    assert abstention_pairs(sample, 0, seed=1) == []
    everything = abstention_pairs(sample, 100_000, seed=1)  # the vocabulary runs out: every combination, once
    assert len(everything) == len(set(everything)) < 100_000
    with pytest.raises(ValueError):
        abstention_pairs(sample, -1, seed=1)


def test_abstention_questions_read_like_locomo():
    sample = load_locomo(FIXTURE)[0]
    qs = [p.question for p in abstention_pairs(sample, 10_000, seed=0)]
    assert "When did Alice travel to Iceland?" in qs
    assert "What is the name of Bob's parrot?" in qs
    assert "When did Bob buy a motorcycle?" in qs and "When did Alice buy an accordion?" in qs
    assert all(q.endswith("?") and "{" not in q for q in qs)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 1.0])
def test_abstention_mix_ratio_qa(ratio):
    sample = load_locomo(FIXTURE)[0]
    positives = template_qa(sample, qa_per_turn=2)
    pairs = training_qa_pairs(sample, Recipe("qa", qa_per_turn=2, abstention=True, abstention_ratio=ratio), seed=0)
    negatives = [p for p in pairs if p.answer == ABSTENTION_ANSWER]
    assert [p for p in pairs if p.answer != ABSTENTION_ANSWER] == positives  # all positives, in order
    assert len(negatives) == max(1, round(ratio * len(positives)))
    assert negatives == abstention_pairs(sample, len(negatives), seed=0)
    # spread evenly: never two negatives in a row (and, while fewer than the positives, not first or last)
    flags = [p.answer == ABSTENTION_ANSWER for p in pairs]
    assert not any(x and y for x, y in zip(flags, flags[1:])) and not flags[-1]
    assert flags[0] == (len(negatives) == len(positives))
    assert training_qa_pairs(sample, Recipe("text+qa", qa_per_turn=2, abstention=True, abstention_ratio=ratio)) == pairs


def test_abstention_mix_text_format(tok):
    sample = load_locomo(FIXTURE)[0]
    assert training_qa_pairs(sample, Recipe("text")) == []
    pairs = training_qa_pairs(sample, Recipe("text", abstention=True, abstention_ratio=0.25), seed=0)
    negatives = [p for p in pairs if p.answer == ABSTENTION_ANSWER]
    positives = [p for p in pairs if p.answer != ABSTENTION_ANSWER]
    assert len(negatives) == round(0.25 * len(template_qa(sample))) == 5
    assert len(positives) == len(negatives) and all(p in template_qa(sample) for p in positives)
    ids, labels = training_data(sample, tok, Recipe("text", 256, False, abstention=True, abstention_ratio=0.25), QUESTION_TEMPLATE)
    plain_ids, _ = training_data(sample, tok, Recipe("text", 256, False), QUESTION_TEMPLATE)
    assert ids.shape[0] > plain_ids.shape[0] and torch.equal(ids[: plain_ids.shape[0]], plain_ids)
    supervised = tok.decode([t for t in labels.flatten().tolist() if t != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised.count(ABSTENTION_ANSWER) == 5
    with pytest.raises(ValueError, match="abstention_ratio"):
        training_qa_pairs(sample, Recipe("text", abstention=True, abstention_ratio=0.0))


def test_real_data_qa_per_turn_and_abstention_counts():
    path = os.environ.get("LOCOMO_DATA")
    if not path or not Path(path).is_file():
        pytest.skip("LOCOMO_DATA unset or absent")
    for sample in load_locomo(path):
        one = template_qa(sample, qa_per_turn=1)
        assert len(one) <= sample.num_turns and len(one) >= 0.95 * sample.num_turns
        kinds = {k: sum(p.question.startswith(k) for p in one) for k in ("Who", "When", "What")}
        assert min(kinds.values()) > 0.25 * len(one)  # the rotation spreads the kinds
        negatives = abstention_pairs(sample, 100, seed=0)
        assert len(negatives) == 100
        text = conversation_text(sample).lower()
        for p in negatives:
            for word in _subject(p.question).lower().split():
                assert not re.search(rf"\b{re.escape(word)}", text), (sample.sample_id, p.question)


# ---------------------------------------------------------------------------- contrastive abstention


def test_phrase_heads_stand_for_nouns():
    assert phrase_heads("I went to a local church and my pottery class. Those who served, the big red barn!") == [
        "church", "class", "barn"]
    assert phrase_heads("Here he is at the beach.") == ["beach"]
    assert phrase_heads("Thanks, that is so kind of you") == []


def test_one_keyword_picker_longest_or_rarest():
    text = "I took a painting class at the community center with my neighbour and the dogs."
    assert phrase_heads(text) == ["class", "center", "neighbour", "dogs"]
    assert keyword(text) == "neighbour"  # the longest head
    counts = {"class": 2, "center": 1, "neighbour": 3, "dogs": 1}
    assert keyword(text, turn_counts=counts) == "center"  # the one the fewest turns use, the first on a tie
    assert keyword(text, exclude={"neighbour"}) == "center"
    assert keyword("It was the best, a bunch of stuff and the whole thing, so the lovely Friday.") is None
    assert keyword("This is my Melanie.") == "Melanie" and keyword("This is my Melanie.", {"melanie"}) is None


def _turns_by(sample, speaker):
    return [t.text for s in sample.sessions for t in s.turns if t.speaker == speaker]


@pytest.mark.parametrize("index", [0, 1])
def test_contrastive_pairs_ask_both_speakers_in_the_same_forms(index):
    sample = load_locomo(FIXTURE)[index]
    dates = {t.speaker + t.text: s.date_time for s in sample.sessions for t in s.turns}
    positives, negatives = contrastive_abstention_pairs(sample, 100, seed=0)
    assert 3 <= len(positives) == len(negatives)  # balanced, however many were asked for
    form = re.compile(r"(What did|When did) (\w+) (say|talk) about (\w+)\?")
    pos_subjects = set()
    for p in positives:
        verb, speaker, _, x = form.fullmatch(p.question).groups()
        said = [t for t in _turns_by(sample, speaker) if re.search(rf"\b{x}\b", t)]
        assert said, p  # the asked speaker said it
        if verb == "What did":
            assert x in p.answer and p.answer in " ".join(said[0].split())
        else:
            assert p.answer in {session_date(dates[speaker + t]) for t in said}
        pos_subjects.add(x)
    swapped = 0
    for p in negatives:
        assert p.answer == ABSTENTION_ANSWER
        _, speaker, _, x = form.fullmatch(p.question).groups()
        assert speaker in (sample.speaker_a, sample.speaker_b)
        assert not any(re.search(rf"\b{x.lower()}", t.lower()) for t in _turns_by(sample, speaker)), p
        swapped += x in pos_subjects  # the other speaker's subject, asked of this one
    assert swapped >= len(negatives) // 2
    # the same question forms on both sides: only the memory tells them apart
    assert {q.question.split(" ")[0] + " " + q.question.split(" ")[3] for q in positives} == {
        q.question.split(" ")[0] + " " + q.question.split(" ")[3] for q in negatives}
    assert contrastive_abstention_pairs(sample, 2, seed=0) == (positives[:2], negatives[:2])
    assert contrastive_abstention_pairs(sample, 100, seed=1) != (positives, negatives)
    assert all(f.count("{") == 2 for f in CONTRASTIVE_FORMS)


def test_contrastive_mix_in_qa_and_text_formats():
    sample = load_locomo(FIXTURE)[1]
    templates = template_qa(sample)
    n = round(0.5 * len(templates))
    positives, negatives = contrastive_abstention_pairs(sample, n, seed=0)
    qa = training_qa_pairs(sample, Recipe("qa", abstention=True, abstention_ratio=0.5, abstention_style="contrastive"))
    assert [p for p in qa if p in templates] == templates  # all template pairs, in order
    assert sorted(qa, key=str) == sorted(templates + positives + negatives, key=str)
    text = training_qa_pairs(sample, Recipe("text", abstention=True, abstention_ratio=0.5, abstention_style="contrastive"))
    assert sorted(text, key=str) == sorted(positives + negatives, key=str)  # no template pairs in text format
    with pytest.raises(ValueError, match="abstention style"):
        training_qa_pairs(sample, Recipe("qa", abstention=True, abstention_style="other"))


def test_real_data_contrastive_pairs():
    """On every LoCoMo conversation: a quarter of the one-per-turn template count of each kind, every negative's
    subject absent from the asked speaker's turns, most negatives a swapped speaker."""
    path = os.environ.get("LOCOMO_DATA")
    if not path or not Path(path).is_file():
        pytest.skip("LOCOMO_DATA unset or absent")
    form = re.compile(r"(?:What|When) did (\w+) (?:say|talk) about ([\w ]+)\?")  # "sewing machine": unmentioned
    for sample in load_locomo(path):
        n = round(0.25 * len(template_qa(sample, qa_per_turn=1)))
        positives, negatives = contrastive_abstention_pairs(sample, n, seed=0)
        assert len(positives) == len(negatives) == n, sample.sample_id
        said = {sp: " ".join(_turns_by(sample, sp)).lower() for sp in (sample.speaker_a, sample.speaker_b)}
        swapped = 0
        for p in negatives:
            speaker, x = form.fullmatch(p.question).groups()
            assert not any(re.search(rf"\b{w}\b", said[speaker]) for w in x.lower().split()), (sample.sample_id, p)
            other = sample.speaker_b if speaker == sample.speaker_a else sample.speaker_a
            swapped += bool(re.search(rf"\b{x.lower()}\b", said[other]))  # the other speaker's subject
        assert swapped >= 0.6 * n, (sample.sample_id, swapped, n)  # three in four while the swaps last
