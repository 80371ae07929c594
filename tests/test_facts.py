"""The parser-built question set (`lora_core.facts`): questions asked of sentences written for this test.

Each case is a turn and (question, answer) pairs that must be among the facts read from it: grammatical questions
that carry the turn's words, short answers, speakers and pronouns resolved, relative dates resolved from the
session date.
"""

from datetime import datetime

import pytest

pytest.importorskip("spacy")
from lora_mem.lora_core.conversation import Conversation, Session, Turn  # noqa: E402
from lora_mem.lora_core.facts import conversation_facts, fact_queries, resolve_date  # noqa: E402
from lora_mem.lora_core.parser import ParserError, check_installed  # noqa: E402

try:
    check_installed()
except ParserError as e:  # the facts extra is not installed: nothing here can run
    pytest.skip(str(e), allow_module_level=True)

SESSION = "2:15 pm on 14 March, 2024"  # a Thursday


def facts_of(*texts: str, speakers=("Dana", "Eli")):
    turns = [Turn(speakers[i % 2], f"D1:{i + 1}", text) for i, text in enumerate(texts)]
    conv = Conversation("test", speakers[0], speakers[1], [Session(1, SESSION, turns)])
    return conv, {(q, f.answer) for f in conversation_facts(conv) for q in f.wordings}


@pytest.mark.parametrize("text, expected", [
    ("I adopted a grey kitten last Saturday.",
     [("What did Dana adopt?", "grey kitten"), ("What kitten did Dana adopt?", "grey kitten"),
      ("When did Dana adopt a grey kitten?", "the Saturday before 14 March 2024"),
      ("Who adopted a grey kitten?", "Dana")]),
    ("Yesterday I drove to Lisbon with my brother.",
     [("Where did Dana drive with Dana's brother?", "Lisbon"), ("Who did Dana drive with to Lisbon?", "brother"),
      ("When did Dana drive to Lisbon with Dana's brother?", "13 March 2024")]),
    ("I've been learning the cello for two years.",
     [("What has Dana been learning?", "cello"), ("How long has Dana been learning the cello?", "two years")]),
    ("We got a puppy named Biscuit.",
     [("What is the name of Dana's puppy?", "Biscuit")]),
    ("I'm planning to run a marathon next month.",
     [("What is Dana planning to do?", "run a marathon next month")]),
    ("I quit my job because my boss was rude.",
     [("Why did Dana quit Dana's job?", "boss was rude"), ("What did Dana quit?", "job")]),
    ("I'm a big fan of jazz piano.",
     [("What is Dana a big fan of?", "jazz piano")]),
    ("I went to a pottery workshop and it was so relaxing.",
     [("How was the pottery workshop?", "relaxing"), ("What workshop did Dana go to?", "pottery workshop")]),
    # a noun's prepositional modifier, asked with the noun
    ("I ran a bake sale for the animal shelter.", [("What was the bake sale for?", "animal shelter")]),
    # the means, "by" + a gerund
    ("I stay calm by breathing slowly.", [("How does Dana stay calm?", "by breathing slowly")]),
    # an imperative is advice to the other speaker
    ("Try a cooking class and bring a friend.",
     [("What advice did Dana give Eli?", "try a cooking class and bring a friend")]),
    # what happened to someone else, the predicate as said
    ("My sister broke her arm last week.", [("What happened to Dana's sister?", "broke her arm")]),
    # a dated event with its conjoined verbs
    ("Yesterday I slipped and had to see a doctor.",
     [("What did Dana do on 13 March 2024?", "slipped and had to see a doctor")]),
    ("I'm fixing up my bike and painting the frame.",
     [("What is Dana doing?", "fixing up bike and painting the frame")]),
    # a feeling caused: "X makes Y feel Z"
    ("The garden makes my parents feel calm.", [("How does the garden make Dana's parents feel?", "calm")]),
    # a gerund as the subject of "is"
    ("Cooking for friends is my favorite hobby.", [("What is cooking for friends?", "favorite hobby")]),
    # an object made for a purpose
    ("I baked something to cheer up my neighbor.", [("Why did Dana bake something?", "to cheer up neighbor")]),
    # what a turn tells of the place it named before; a feeling asked with what it is about
    ("I went to a pottery class on Sunday. I made a blue mug and I was so proud of it.",
     [("What did Dana make at the pottery class?", "blue mug"),
      ("How did Dana feel about the blue mug?", "proud")]),
    # a "when" clause asked with the event it belongs to
    ("I'll always remember our camping trip when we saw the northern lights.",
     [("What did Dana see during Dana's camping trip?", "northern lights")]),
    # "Let's ..." is a suggestion
    ("Let's grab lunch and plan the trip tomorrow.",
     [("What did Dana suggest to Eli?", "grab lunch and plan the trip")]),
    # a "when" clause as what something was
    ("My best memory was when my team won the final.", [("What was Dana's best memory?", "team won the final")]),
    # an adjective with no subject is how the speaker feels
    ("The festival was fun. Glad to be part of it.", [("How does Dana feel about the festival?", "glad")]),
    # how often, said with "once" or "twice", of a negated verb
    ("We don't go to the lake often, usually only once or twice a year.",
     [("How often does Dana go to the lake?", "once or twice a year")]),
    # what a thing is for
    ("I got new boots last week. They are for hiking.", [("What are the new boots for?", "hiking")]),
    # an event's date asked with its purpose
    ("Last Friday I went to a book fair to find a gift for my dad.",
     [("When did Dana go to a book fair to find a gift for Dana's dad?", "the Friday before 14 March 2024")]),
    # "he" and "she" stand for the last person or name named, not a speaker
    ("My dog Biscuit is so naughty. He hid my sock under the bed.",
     [("What did Dana's dog hide under the bed?", "sock"), ("Where did Dana's dog hide Dana's sock?", "bed")]),
])
def test_questions_asked_of_a_turn(text, expected):
    _, asked = facts_of(text)
    for pair in expected:
        assert pair in asked, f"{pair} not among {sorted(asked)}"


def test_you_is_the_other_speaker_and_it_the_thing_named_before():
    _, asked = facts_of("Did you see the new bakery?", "Yes! I loved it. It sells amazing croissants.")
    assert ("What does the new bakery sell?", "amazing croissants") in asked
    assert not any(q.startswith("What did Eli see") for q, _ in asked)  # a question says nothing


@pytest.mark.parametrize("expression, expected", [
    ("yesterday", "13 March 2024"), ("last Friday", "the Friday before 14 March 2024"),
    ("last week", "the week before 14 March 2024"), ("two weekends ago", "two weekends before 14 March 2024"),
    ("next month", "April 2024"), ("last year", "2023"), ("three days ago", "11 March 2024"),
])
def test_relative_dates_resolved_from_the_session(expression, expected):
    assert resolve_date(expression, datetime(2024, 3, 14, 14, 15)) == expected


def test_questions_across_turns_list_what_each_said():
    conv, _ = facts_of("I painted a lighthouse.", "Nice!", "I also painted a red barn.")
    listed = {q.question: q.answer for q in fact_queries(conv)}
    assert listed["What has Dana painted?"] == "lighthouse, red barn"


def test_wordings_and_per_turn_size_the_set():
    conv, _ = facts_of("I adopted a grey kitten last Saturday. I drove to Lisbon with my brother.")
    one = fact_queries(conv, wordings=1, across_turns=False)
    two = fact_queries(conv, wordings=2, across_turns=False)
    capped = fact_queries(conv, wordings=1, per_turn=2, across_turns=False)
    assert len(two) > len(one) > len(capped) == 2
    assert {q.question for q in one} <= {q.question for q in two}


def test_they_and_it_stand_for_a_thing_of_their_own_number_and_never_for_people():
    _, asked = facts_of("I bought new hiking boots and a tent. They are so comfy.")
    assert ("How are the new hiking boots?", "comfy") in asked, sorted(asked)
    # "it" stands for the last sentence's subject or object sooner than for a place named after them
    _, asked = facts_of("I knitted this scarf in my evening class. It took three weeks.")
    assert ("How long did the scarf take?", "three weeks") in asked, sorted(asked)
    # "they" after the kids means the kids, not the trip named before them: nothing is asked of "the road trip"
    _, asked = facts_of("The road trip was long, but my kids loved it. They were scared at first.")
    assert not [q for q, a in asked if "scared" in a and "trip" in q], sorted(asked)


def test_a_photo_is_asked_by_what_the_turn_calls_it():
    turn = Turn("Dana", "D1:1", "Here's my new quilt, finished it last night!", "a photo of a quilt with blue squares")
    conv = Conversation("test", "Dana", "Eli", [Session(1, SESSION, [turn])])
    asked = {(q, f.answer) for f in conversation_facts(conv) for q in f.wordings}
    assert ("What did Dana's photo of Dana's new quilt show?", "a quilt with blue squares") in asked, sorted(asked)
    assert ("When did Dana share a photo of Dana's new quilt?", "14 March 2024") in asked, sorted(asked)


def test_each_of_several_answers_is_also_asked_on_its_day():
    turns = [Turn("Dana", "D1:1", "I felt so proud of my garden."), Turn("Dana", "D2:1", "I felt tired.")]
    conv = Conversation("test", "Dana", "Eli", [Session(1, SESSION, turns[:1]),
                                                 Session(2, "10:00 am on 2 April, 2024", turns[1:])])
    asked = {(q.question, q.answer) for q in fact_queries(conv, across_turns=False)}
    assert ("How did Dana feel on 2 April 2024?", "tired") in asked, sorted(asked)


def test_a_pronoun_possessor_tells_nothing_of_which_one():
    _, asked = facts_of("I lost my keys at the gym.")
    assert ("Where did Dana lose Dana's keys?", "gym") in asked, sorted(asked)
    assert not [q for q, _ in asked if q.startswith("What keys")], sorted(asked)


def test_a_question_of_the_other_speaker_is_answered_by_the_turn_after_it():
    _, asked = facts_of("Thanks! What got you into running?", "Thanks! I've been running to clear my mind.")
    assert ("What got Eli into running?", "Eli has been running to clear Eli's mind") in asked, sorted(asked)
    _, asked = facts_of("Who played at the wedding?", "Oh, it was Nina Simone's cover band, they were so good!")
    assert ("Who played at the wedding?", "Nina Simone's cover band") in asked, sorted(asked)
    _, asked = facts_of("How did the kids take the news?", "Thanks! They were sad but we talked it through.")
    assert ("How did the kids take the news?", "they were sad") in asked, sorted(asked)  # the reply's first clause
    _, asked = facts_of("How are you?", "I'm good, thanks for asking.")
    assert not [q for q, _ in asked if q.startswith("How are")], sorted(asked)  # asks after nothing in particular
