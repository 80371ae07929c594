"""Coverage queries: what a turn's statements are asked as, verbs in their base form, dates from the session, and
the recipe parts built on them (queries, recite) from the conversation alone."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from bench.locomo_data import load_locomo
from lora_mem.lora_core.conversation import conversation_only
from lora_mem.lora_core.conversation import Turn, session_date
from lora_mem.lora_core.queries import base_form, coverage_queries, turn_facts
from lora_mem.lora_core.recipes import RECITE_TEMPLATE, Recipe, recitation_pairs, training_data
from lora_mem.lora_core.train import IGNORE_INDEX

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"
SPEAKERS = ("Caroline", "Melanie")
DAY = datetime(2023, 5, 25)


def asked(text: str, speaker: str = "Melanie", caption: str | None = None) -> dict[str, str]:
    facts = turn_facts(Turn(speaker, "D1:1", text, caption), SPEAKERS, session_date("1:00 pm on 25 May, 2023"), DAY)
    return {p.question: p.answer for fact in facts for p in fact}


@pytest.mark.parametrize("past, base", [("went", "go"), ("painted", "paint"), ("tried", "try"), ("stopped", "stop"),
                                        ("created", "create"), ("realized", "realize"), ("loved", "love"),
                                        ("decided", "decide"), ("joined", "join"), ("baked", "bake"),
                                        ("visited", "visit"), ("need", None), ("excited", None), ("red", None)])
def test_base_form(past, base):
    assert base_form(past) == base


def test_a_dated_statement_is_asked_when_what_and_who():
    q = asked("I ran a charity race for mental health last Saturday - it was really rewarding.")
    assert q["When did Melanie run a charity race for mental health?"] == "20 May 2023"
    assert q["What did Melanie run?"] == "a charity race for mental health"
    assert q["Who ran a charity race for mental health?"] == "Melanie"
    assert q["When was it that Melanie ran a charity race for mental health?"] == "20 May 2023"


def test_an_undated_statement_takes_the_session_day_and_motion_verbs_ask_where():
    q = asked("I went to a LGBTQ support group and it was so powerful.", "Caroline")
    assert q["When did Caroline go to a LGBTQ support group?"] == "25 May 2023"
    assert q["Where did Caroline go?"] == "a LGBTQ support group"


def test_names_plans_durations_and_photos():
    assert asked("We got another cat named Bailey.")["What is the name of Melanie's cat?"] == "Bailey"
    plan = asked("I'm planning to go camping next month.")
    assert plan["What is Melanie planning to do?"] == "go camping"
    assert plan["When is Melanie planning to go camping?"] == "June 2023"
    assert asked("I've been painting for seven years now.")["How long has Melanie been painting?"] == "seven years"
    photo = asked("Look!", caption="a photo of a lake at sunrise")
    assert photo["What did Melanie share a photo of?"] == "a lake at sunrise"


def test_birth_origin_and_work():
    assert asked("I was born on 3 March 1990.")["When was Melanie born?"] == "3 March 1990"
    assert asked("I'm from Xexholm, a small town.")["Where is Melanie from?"] == "Xexholm"
    assert asked("I work as a cheesemaker.")["What is Melanie's job?"] == "cheesemaker"


def test_relative_clauses_obligations_and_questions():
    q = asked("This book I read last year reminds me to pursue my dreams.")
    assert q["When did Melanie read this book?"] == "2022"
    assert not any(k.startswith("What did Melanie read") for k in q)
    assert not any("have" in k for k in asked("I had to take a break from pottery."))
    assert asked("Did you go to the beach yesterday?") == {}  # a question says nothing about its speaker


def test_first_person_words_are_asked_in_the_third_person():
    q = asked("I took my fam camping in the mountains last week.")
    assert "When did Melanie take Melanie's fam camping in the mountains?" in q


def test_coverage_queries_phrasings_and_per_turn():
    conv = conversation_only(load_locomo(FIXTURE)[0])
    one = coverage_queries(conv, phrasings=1)
    two = coverage_queries(conv, phrasings=2)
    assert one and len(two) > len(one)
    assert {q.pair for q in one} <= {q.pair for q in two}
    capped = coverage_queries(conv, phrasings=1, per_turn=1)
    assert len({q.dia_id for q in capped}) == len(capped)  # one fact per turn
    turns = {t.dia_id for s in conv.sessions for t in s.turns}
    assert all(q.dia_id in turns and q.kind for q in two)
    with pytest.raises(ValueError):
        coverage_queries(conv, phrasings=0)


def test_queries_and_recite_parts_never_read_the_annotations(tmp_path):
    """Other questions, answers and summaries in the file leave the queries and recitations unchanged (a query may
    still ask what a LoCoMo question asks: both are written from the same turns)."""
    from lora_mem.model.tokenizer import Tokenizer
    from tests.tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, "llama")
    tok = Tokenizer.from_dir(tmp_path)
    altered = json.loads(FIXTURE.read_text())
    for s in altered:
        s["session_summary"] = {"x": "other summary"}
        for qa in s["qa"]:
            qa["question"], qa["evidence"] = "When did Alice travel to Iceland?", ["D1:1"]
            qa["answer"] = "a different answer"
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    for sample, other in zip(load_locomo(FIXTURE), load_locomo(tmp_path / "altered.json")):
        ids, labels = training_data(sample, tok, Recipe("queries+recite", 256), "Q: {question}")
        ids_b, labels_b = training_data(other, tok, Recipe("queries+recite", 256), "Q: {question}")
        assert ids.equal(ids_b) and labels.equal(labels_b)
        text = tok.decode(ids.flatten().tolist())
        assert "LEAK" not in text and (labels != IGNORE_INDEX).any()
        pairs = recitation_pairs(sample, coverage_queries(sample))
        assert pairs and all(p.answer.startswith("On ") and " said: " in p.answer for p in pairs)
        turns = sum(len(s.turns) for s in sample.sessions)
        assert len({p.answer for p in pairs}) == turns  # every turn can be recited
    assert "{question}" in RECITE_TEMPLATE


def test_a_question_several_turns_answer_is_asked_once_with_their_answers():
    from lora_mem.lora_core.conversation import Conversation, Session

    turns = [Turn("Melanie", "D1:1", "I painted a lake sunrise."), Turn("Caroline", "D1:2", "Nice!"),
             Turn("Melanie", "D1:3", "I painted a horse too."), Turn("Melanie", "D1:4", "I painted a horse.")]
    conv = Conversation("x", "Melanie", "Caroline", [Session(1, "1:00 pm on 25 May, 2023", turns)])
    q = [x for x in coverage_queries(conv, phrasings=1) if x.question == "What did Melanie paint?"]
    assert len(q) == 1 and q[0].answer == "a lake sunrise, a horse" and q[0].dia_id == "D1:1"


def test_recipe_train_format_is_checked():
    assert Recipe("text+distill+recite").parts == ("text", "distill", "recite")
    for bad in ("text+text", "nope", "text+"):
        with pytest.raises(ValueError, match="train_format"):
            Recipe(bad)
    assert json.loads(json.dumps(Recipe().__dict__))["train_format"] == "text"
