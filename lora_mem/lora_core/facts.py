"""Every statement of a conversation asked as questions, read with a dependency parser (`parser.english`).

Each clause of each turn is parsed; its subject is resolved to a person ("I" -> the speaker, "you" -> the other
speaker, "it" -> the thing last named), and each of its constituents becomes a question whose answer is that short
constituent, as people ask about what was said:

    Caroline (8 May 2023): "I went to a LGBTQ support group yesterday and it was so powerful."
        Where did Caroline go?                                   -> a LGBTQ support group
        What group did Caroline go to?                           -> LGBTQ support group
        When did Caroline go to a LGBTQ support group?           -> 7 May 2023
        What did Caroline do on 7 May 2023?                      -> went to a LGBTQ support group
        How was the LGBTQ support group?                         -> powerful
    Caroline: "I've been researching adoption agencies."  What has Caroline been researching? -> adoption agencies
    Melanie: "we got another cat named Bailey."            What is the name of Melanie's cat?  -> Bailey
    Caroline: "I chose them 'cause they help LGBTQ+ folks" Why did Caroline choose the agencies? -> they help ...

A turn also answers the wh-question the other speaker ended the turn before with ("What got you into running?" ->
the reply's first statement, or the name it gives); an imperative is advice to the other speaker; a noun's
prepositional modifier is asked with the noun ("What was the charity race for?"); what a turn tells after naming
where its speaker went is also asked at that place ("What did Melanie make at the pottery workshop?").

Relative dates are resolved against the session's date with dateparser, and written as LoCoMo's annotators write
them ("last Friday" -> "the Friday before 15 July 2023", "yesterday" -> "14 July 2023", "last year" -> "2022").
Across turns, each person's likes, plans, places, companions and belongings are asked as one question whose answer
lists them in the order they were said (:func:`person_queries`).

Every fact has several wordings (the first the plainest): the same fact asked from its other end ("Who went to a
LGBTQ support group?" -> Caroline), with the head noun of the answer in the question, or as told to the other
speaker. Built from the conversation's own fields only (`conversation_only`); no annotation is read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lora_mem.lora_core.conversation import Conversation, conversation_only, parsed_date_time, photo_note, \
    session_date
from lora_mem.files import atomic_write_json
from lora_mem.home import cache_dir
from lora_mem.lora_core.parser import PIPELINE_SHA256, english
from lora_mem.lora_core.queries import MAX_MERGED_ANSWERS, Query
from lora_mem.untrusted import slug

ANSWER_WORDS = 12  # a constituent longer than this is cut at its first clause or phrase boundary past it
PHRASE_WORDS = 8  # the longest noun phrase put into a question
PEOPLE_WORDS = frozenset("""mom mother dad father parent parents son daughter kid kids child children baby brother
sister sibling siblings husband wife partner boyfriend girlfriend friend friends family fam grandma grandpa
grandmother grandfather aunt uncle cousin niece nephew neighbor neighbour colleague colleagues coworker coworkers
boss mentor mentors team teammates classmates students teacher coach group gang buddy buddies""".split())
MOTION_VERBS = frozenset("""go come move travel run walk drive fly head return arrive hike ride swim sail visit
take bring""".split())
COGNITION_VERBS = frozenset("""realize realise think know learn feel believe find discover notice understand
remember decide hope wish say tell mention figure see""".split())
INTENT_VERBS = frozenset("""want plan hope try decide love like start begin need learn wish aim intend choose
prefer enjoy continue keep""".split())
LIKE_VERBS = frozenset("love like enjoy adore prefer".split())
OWN_VERBS = frozenset("have get buy adopt own receive find make build paint draw create write bake".split())
# Nouns of chat that no pronoun stands for ("Thanks, Mel! It was great": it is not the thanks).
CHAT_WORDS = frozenset("""thing things lot time way one stuff thanks thank lol wow yeah hey congrats congratulations
sure idea bit kind sort part day week year""".split())
REASON_MARKERS = frozenset("because 'cause cause cuz".split())  # "since" and "as" are as often about time
# Words that make a clause not a statement of fact about the speaker.
HEDGES = frozenset("if whether unless".split())
WEEK_WORDS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "weekend", "week",
              "mon", "tue", "tues", "wed", "thu", "thur", "thurs", "fri", "sat", "sun")
_WEEKDAY_FULL = {"mon": "Monday", "tue": "Tuesday", "tues": "Tuesday", "wed": "Wednesday", "thu": "Thursday",
                 "thur": "Thursday", "thurs": "Thursday", "fri": "Friday", "sat": "Saturday", "sun": "Sunday"}


@dataclass
class Fact:
    """One statement of one turn, asked in several wordings (``wordings[0]`` the plainest), with one answer."""

    kind: str  # what, which, where, who, with, when, did_on, why, how, feel, want, think, name, count, how_long,
    #            how_often, is, photo, modifier, advice, happened, doing, reply
    wordings: list[str]
    answer: str
    dia_id: str
    session: int
    person: str | None = None  # whose statement it is, for the questions across turns
    relation: str | None = None  # likes, plans, places, people, owns, did: the cross-turn question it feeds
    verb: str | None = None  # the lemma of an object's verb ("paint"), for "What has Melanie painted?"


@dataclass(frozen=True)
class Named:
    """A noun phrase a pronoun may stand for: "the" + phrase, where it ends, its grammatical number, and whether it
    names people (whom "they" may mean, but who are never asked as a thing)."""

    end: int
    phrase: str
    plural: bool
    people: bool
    proper: bool = False  # a name ("Oliver", "my dog Max"): "he" or "she" may mean it, a person or not
    sentence: tuple[int, int] = (0, 0)  # (turn, sentence start) where it was named
    role: int = 2  # 0 a subject, 1 an object, 2 else: a pronoun stands for the subject sooner than the rest


@dataclass
class _Context:
    speaker: str
    other: str
    names: tuple[str, ...]  # everyone who speaks
    when: datetime | None  # the session's date and time
    antecedents: list[Named] = field(default_factory=list)  # things named in the turns before, the last last
    chunks: list[Named] = field(default_factory=list)  # things named in this turn
    setting: str | None = None  # where this turn's speaker says they went ("at the pottery workshop")
    turn: int = 0  # how many turns were read before this one
    asked: str | None = None  # the question the turn before ended with, its speakers resolved


# ----------------------------------------------------------------------------------------------------------------
# Dates
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _date_parser(when: datetime, prefer: str):
    from dateparser.date import DateDataParser

    return DateDataParser(languages=["en"], settings={"RELATIVE_BASE": when, "PREFER_DATES_FROM": prefer})


def _dmy(d: datetime) -> str:
    return f"{d.day} {d.strftime('%B')} {d.year}"


def resolve_date(expression: str, when: datetime) -> str | None:
    """A time expression said at ``when``, written as LoCoMo's annotators write dates: a weekday, week or weekend
    counted back from the session ("last Friday" -> "the Friday before 15 July 2023"), a day ("yesterday" ->
    "14 July 2023"), a month ("next month" -> "August 2023"), a year ("last year" -> "2022"). None if dateparser
    cannot read it. A weekday, week or weekend ("two weekends ago") keeps its words, counted back from the session
    date, so that the answer says what the speaker said."""
    text = " ".join(expression.lower().replace("this past", "last").split())
    words = re.findall(r"[a-z]+", text)
    session = _dmy(when)
    unit = next((w.rstrip("s") if w.rstrip("s") in WEEK_WORDS else w for w in words
                 if w in WEEK_WORDS or w.rstrip("s") in WEEK_WORDS), None)
    if unit is not None and ("last" in words or "ago" in words or "past" in words):
        unit = _WEEKDAY_FULL.get(unit, unit.capitalize() if unit not in ("week", "weekend") else unit)
        count = re.match(r"(.+?)\s+\w+\s+ago$", text)
        if count and count.group(1) not in ("a", "one"):
            return f"{count.group(1)} {unit}s before {session}"
        return f"the {unit} before {session}"
    prefer = "future" if {"next", "tomorrow", "upcoming", "coming"} & set(words) else "past"
    try:
        data = _date_parser(when, prefer).get_date_data(text) if len(text) < 60 else None
    except Exception:  # dateparser raises several types on text it cannot read
        data = None
    if data is None or data.date_obj is None:
        return None
    d, period = data.date_obj, data.period
    if period == "year":
        return str(d.year)
    if period == "month":
        return f"{d.strftime('%B')} {d.year}"
    if period == "week":
        return f"the week {'before' if d < when else 'after'} {session}"
    return _dmy(d)


# ----------------------------------------------------------------------------------------------------------------
# Words of a turn as a reader would ask about them
# ----------------------------------------------------------------------------------------------------------------

_DETERMINERS = frozenset("a an the this that these those some another".split())


def _third_person(token, ctx: _Context) -> str:
    """The token's text with first and second person resolved to the speakers ("my" -> "Melanie's")."""
    low = token.lower_
    s, o = ctx.speaker, ctx.other
    swaps = {"i": s, "me": s, "myself": s, "we": s, "us": s, "ourselves": s, "my": f"{s}'s", "our": f"{s}'s",
             "mine": f"{s}'s", "ours": f"{s}'s", "you": o, "yourself": o, "your": f"{o}'s", "yours": f"{o}'s"}
    if token.tag_ in ("PRP", "PRP$") and low in swaps:
        return swaps[low]
    if low == "'s" and token.dep_ == "case":
        return "'s"
    if low == "n't":
        return "not"
    if token.pos_ == "AUX" and _of_a_speaker(token):  # "I'm" -> "Caroline is", "do you" -> "does Melanie"
        return _THIRD_PERSON_AUX.get(low, token.text)
    return token.text


# Auxiliaries as they agree with a speaker's name in place of I, we or you.
_THIRD_PERSON_AUX = {"am": "is", "'m": "is", "are": "is", "'re": "is", "were": "was", "have": "has", "'ve": "has",
                     "do": "does"}


def _of_a_speaker(aux) -> bool:
    """Whether an auxiliary's subject is I, we or you (whom a question or answer names in the third person)."""
    verb = aux.head if aux.dep_ in ("aux", "auxpass") else aux
    subject = next((c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")), None)
    return subject is not None and subject.lower_ in ("i", "we", "you")


def _render(tokens, ctx: _Context) -> str:
    """Tokens as the turn wrote them (its own spacing), pronouns of the speakers resolved."""
    out = []
    for i, t in enumerate(tokens):
        word = _third_person(t, ctx)
        if i == 0 and t.i == t.sent.start and t.pos_ != "PROPN" and word == t.text:
            word = word[:1].lower() + word[1:]  # a sentence's first word, asked about mid-question
        last = i == len(tokens) - 1 or tokens[i + 1].i != t.i + 1
        if (t.lower_ == "n't" or word != t.text and t.text.startswith("'") and not word.startswith("'")) \
                and out and not out[-1].endswith(" "):
            out[-1] += " "  # "don't" -> "do not", "I'm" -> "Caroline is"
        out.append(word + ("" if last else t.whitespace_))
    text = "".join(out)
    text = re.sub(r"'s's\b", "'s", text)
    return " ".join(text.split()).strip(" ,;:-–—\"'“”")


def _is_pronoun(token) -> bool:
    return token.pos_ == "PRON" or token.lower_ in ("this", "that", "these", "those", "it", "they", "them")


def _span_tokens(head, *, drop_det: bool = False, max_words: int = ANSWER_WORDS, skip_relcl: bool = False):
    """The head's subtree as a contiguous token list, cut at the first clause or phrase boundary past
    ``max_words`` (a relative clause, a prepositional phrase), leading determiners dropped on request."""
    tokens = [t for t in head.subtree]
    if skip_relcl:
        cut = {u.i for c in head.children if c.dep_ in ("relcl", "acl", "advcl") for u in c.subtree}
        tokens = [t for t in tokens if t.i not in cut]
    while tokens and (tokens[-1].is_punct or tokens[-1].dep_ == "cc"):
        tokens.pop()
    while tokens and (tokens[0].is_punct or tokens[0].dep_ == "cc"):
        tokens.pop(0)
    if drop_det and tokens and tokens[0].lower_ in _DETERMINERS and tokens[0].head == head:
        tokens = tokens[1:]
    return _cut(tokens, head, max_words)


def _cut(tokens: list, head, max_words: int) -> list:
    """Tokens cut back to the last phrase or clause boundary past ``head`` that keeps at most ``max_words``."""
    if len(tokens) > max_words:
        bounds = [i for i, t in enumerate(tokens[:max_words + 1]) if i >= 2 and t.i > head.i and
                  t.dep_ in ("relcl", "acl", "prep", "cc", "punct", "advcl", "conj", "mark")]
        tokens = tokens[:bounds[-1]] if bounds else tokens[:max_words]
    while tokens and (tokens[-1].is_punct or tokens[-1].dep_ == "cc"):
        tokens.pop()
    return tokens


# A verb's dependents that are not part of what its subject did: the subject, how the sentence hangs together,
# other clauses (a reason, a relative clause on the verb), the date (asked on its own).
_NOT_PREDICATE = ("nsubj", "nsubjpass", "csubj", "aux", "mark", "advcl", "parataxis", "punct", "intj", "cc", "advmod",
                  "npadvmod", "discourse", "dep", "expl")


def _predicate(verb, ctx: _Context) -> str:
    """What the subject did, as said, with the verbs conjoined to it: "I got hurt and had to take a break from
    pottery" -> "got hurt and had to take a break from pottery"."""
    keep = {verb.i}
    for c in verb.children:
        if c.dep_ == "auxpass" and c.lemma_ == "get":  # "got hurt"
            keep.add(c.i)
        elif c.dep_ == "conj" and not any(d.dep_ in ("nsubj", "nsubjpass") for d in c.children):
            keep |= {t.i for t in c.subtree} - {u.i for d in c.children if d.dep_ in ("mark", "advcl", "punct")
                                                for u in d.subtree}
        elif c.dep_ == "cc" and any(d.dep_ == "conj" for d in verb.children):
            keep.add(c.i)
        elif (c.dep_ not in _NOT_PREDICATE or c.dep_ == "advmod" and c.i > verb.i) and not _is_time_of(c):
            keep |= {t.i for t in c.subtree}
    tokens = [t for t in verb.subtree if t.i in keep]
    return _render(_cut(tokens, verb, ANSWER_WORDS), ctx)


def _phrase(head, ctx: _Context, **kwargs) -> str:
    return _render(_span_tokens(head, **kwargs), ctx)


def _noun_phrase(token, ctx: _Context, *, for_question: bool = True) -> str | None:
    """The noun phrase ``token`` heads, its pronoun resolved: the speakers for I/you/we, the last thing named for
    it/this/they; None if it cannot be resolved."""
    low = token.lower_
    if token.pos_ == "PRON" or (low in ("this", "that", "these", "those") and token.dep_ != "det"):
        if low in ("i", "me", "we", "us", "myself"):
            return ctx.speaker
        if low in ("you", "yourself"):
            return ctx.other
        if low in ("it", "this", "that", "these", "those", "they", "them"):
            return _antecedent(token, ctx)
        if low in ("he", "him", "she") or low == "her" and token.tag_ == "PRP":
            return _person_antecedent(token, ctx)
        if low in INDEFINITE_PRONOUNS:  # "I made something to catch the eye": asked as said
            return _phrase(token, ctx, max_words=PHRASE_WORDS, skip_relcl=True)
        return None
    if token.ent_type_ in ("PERSON", "GPE", "LOC", "FAC", "ORG") and token.dep_ != "compound":
        return _name_words(token)
    return _phrase(token, ctx, max_words=PHRASE_WORDS if for_question else ANSWER_WORDS, skip_relcl=for_question)


INDEFINITE_PRONOUNS = frozenset("something someone somebody everything everyone everybody".split())
_VAGUE = frozenset("""thing things stuff lot lots bit part best one ones time times way much many more most some
all something anything everything nothing kind sort ton tons bunch world""".split())


def _worth_asking(token) -> bool:
    """Whether a constituent headed by ``token`` says something: a noun, a name, a number or a resolvable pronoun,
    not a vague word ("a lot", "my best", "so many")."""
    if token.lemma_.lower() in _VAGUE:
        return False
    if token.pos_ == "PRON":
        return token.lower_ in ("it", "them", "this", "these", "those", "that")
    return token.pos_ in ("NOUN", "PROPN", "NUM", "X")


# Words of praise and emphasis that chat says of everything ("that's awesome!").
GENERIC_WORDS = frozenset("""great awesome amazing cool nice good fun special tough hard so really very super pretty
totally fantastic wonderful incredible beautiful lovely sweet cute funny crazy insane exciting interesting important
huge big blast success best awful bad wild rough stunning gorgeous neat perfect fab fabulous excellent brilliant
such a an the and too just lot""".split())


def _names_people(token) -> bool:
    return token.ent_type_ == "PERSON" or token.lemma_.lower() in PEOPLE_WORDS


def _particular(token) -> bool:
    """Whether a subject names a particular thing: a name, a pronoun standing for one, or a noun with a determiner,
    possessor, number or modifier ("the charity race", "my pottery class"), not a bare abstraction ("dance")."""
    if token.pos_ in ("PRON", "PROPN") or token.dep_ == "csubj":  # "Creating a space for customers is key"
        return True
    return any(c.dep_ in ("det", "poss", "nummod", "compound", "amod") for c in token.children)


def _specific(answer: str) -> bool:
    return any(w not in GENERIC_WORDS for w in re.findall(r"[a-z0-9']+", answer.lower()))


def _unowned(answer: str, ctx: _Context) -> str:
    """An answer without the speakers' possessives ("Caroline's own journey" -> "own journey"): LoCoMo's answers
    say "her" or nothing, and an adapter trained on names in every answer answers with the name."""
    names = "|".join(re.escape(n) for n in ctx.names)
    unowned = re.sub(rf"\b(?:{names})'s\s+", "", " ".join(answer.split()))
    return unowned if _content(unowned) else " ".join(answer.split())


def _content(text: str) -> bool:
    return any(len(w) > 2 and w not in ("the", "and", "that", "this", "one", "too", "all", "lot", "it's", "its")
               for w in re.findall(r"[a-z0-9']+", text.lower()))


def _definite(phrase: str) -> str:
    """A phrase as asked about again: "a LGBTQ support group" -> "the LGBTQ support group"."""
    words = phrase.split()
    if words and words[0].lower() in ("a", "an", "another", "some", "this", "that"):
        return " ".join(["the"] + words[1:])
    return phrase


def _no_article(phrase: str) -> str:
    words = phrase.split()
    if words and words[0].lower() in ("a", "an", "the", "some", "another", "this", "that", "these", "those"):
        return " ".join(words[1:])
    return phrase


# ----------------------------------------------------------------------------------------------------------------
# Clauses
# ----------------------------------------------------------------------------------------------------------------


def _subject(verb):
    """The clause's subject: the nearest before the verb ("Hey Caroline, I went": I), else its governing verb's
    for a conjoined or non-finite verb ("I'm thinking about going": I)."""
    subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")] or \
        [c for c in verb.children if c.dep_ == "csubj"]
    before = [c for c in subjects if c.i < verb.i]
    if before or subjects:
        return (before or subjects)[-1]
    if verb.dep_ in ("conj", "xcomp") and verb.head.pos_ in ("VERB", "AUX"):
        return _subject(verb.head)
    if verb.dep_ == "pcomp" and verb.head.dep_ == "prep" and verb.head.head.pos_ in ("VERB", "AUX"):
        return _subject(verb.head.head)
    return None


def _dropped_subject(verb) -> bool:
    """ "Took a short trip to Rome": a sentence opening with a past verb says what its speaker did."""
    first = next((t for t in verb.sent if not t.is_punct and t.pos_ not in ("INTJ", "ADV", "CCONJ")), None)
    return verb.dep_ == "ROOT" and first is not None and first.i == verb.i and _past_lemma(verb) is not None


def _past_lemma(verb) -> str | None:
    """The lemma of a verb written in the past tense ("took" -> "take"), whatever the tagger said; else None."""
    from lemminflect import getLemma

    if verb.tag_ == "VBD":
        return verb.lemma_.lower()
    lemmas = getLemma(verb.lower_, upos="VERB")
    lemma = lemmas[0] if lemmas else None
    return lemma if lemma and lemma != verb.lower_ and _inflect(lemma, "VBD") == verb.lower_ else None


@dataclass
class _VerbForm:
    aux: str  # the word that opens the question: did, does, is, has, will, ...
    main: str  # the verb as it follows the subject in the question: go, going, been researching, ...
    past: str  # the verb as said ("went"), for "Who went ...?"
    tense: str  # past, present, progressive, perfect, future


def _verb_form(verb, *, negated_ok: bool = False) -> _VerbForm | None:
    """How a question asks about the clause's verb; None for a verb it cannot ask about (negated, bare)."""
    auxes = [c for c in verb.children if c.dep_ in ("aux", "auxpass") and c.lower_ not in ("do", "does", "did")
             or c.dep_ in ("aux", "auxpass") and not negated_ok]
    aux_lemmas = [a.lemma_.lower() for a in auxes]
    lemma = verb.lemma_.lower()
    if any(c.dep_ == "neg" for c in verb.children) and not negated_ok:
        return None
    do = next((c for c in verb.children if c.dep_ == "aux" and c.lower_ in ("do", "does", "did")), None)
    if negated_ok and do is not None and verb.tag_ == "VB":  # "we don't go often": how often does she go?
        past = do.lower_ == "did"
        return _VerbForm("did" if past else "does", lemma, _inflect(lemma, "VBD" if past else "VBZ"),
                         "past" if past else "present")
    if not auxes and (verb.tag_ == "VBD" or _dropped_subject(verb)):
        lemma = _past_lemma(verb) or lemma
        return _VerbForm("did", lemma, verb.text.lower(), "past")
    if verb.tag_ in ("VBZ", "VBP") and not auxes:
        return _VerbForm("does", lemma, _inflect(lemma, "VBZ"), "present")
    if verb.tag_ == "VBG":
        if "have" in aux_lemmas and "be" in aux_lemmas:
            return _VerbForm("has", f"been {verb.text.lower()}", f"has been {verb.text.lower()}", "perfect")
        if "be" in aux_lemmas:
            be = next(a for a in auxes if a.lemma_ == "be")
            aux = "was" if be.tag_ == "VBD" else "is"
            return _VerbForm(aux, verb.text.lower(), f"{aux} {verb.text.lower()}", "progressive")
    if verb.tag_ == "VBN" and "have" in aux_lemmas and "be" not in aux_lemmas:
        have = next(a for a in auxes if a.lemma_ == "have")
        aux = "had" if have.tag_ == "VBD" else "has"
        return _VerbForm(aux, verb.text.lower(), f"{aux} {verb.text.lower()}", "perfect")
    if verb.tag_ == "VBN" and any(a.dep_ == "auxpass" for a in auxes):  # "I was born on ...", "we got married"
        be = next(a for a in auxes if a.dep_ == "auxpass")
        aux = "was" if be.tag_ == "VBD" else "is"
        return _VerbForm(aux, verb.text.lower(), f"{aux} {verb.text.lower()}", "past" if aux == "was" else
                         "present")
    if verb.tag_ == "VB":
        modal = next((a for a in auxes if a.tag_ == "MD"), None)
        if modal is not None:
            word = {"'ll": "will", "wo": "will", "'d": "would", "ca": "can"}.get(modal.lower_, modal.lower_)
            return _VerbForm(word, lemma, f"{word} {lemma}", "future")
    # a bare verb conjoined to another is asked like it: "wanted to make the place cozy and make my customers feel"
    if verb.dep_ == "conj" and verb.tag_ == "VB" and verb.head.tag_ == "VB" and not auxes:
        head = _verb_form(verb.head)
        if head is not None and head.main.split()[-1] == verb.head.lemma_.lower():
            main = " ".join(head.main.split()[:-1] + [lemma])
            return _VerbForm(head.aux, main, " ".join(head.past.split()[:-1] + [verb.lower_]), head.tense)
    # a non-finite verb asked with its governing verb: "starting to realize", "thinking about going"
    if verb.dep_ == "xcomp" and verb.tag_ == "VB" and verb.head.pos_ in ("VERB", "AUX") and verb.head.lemma_ != "be":
        head = _verb_form(verb.head)
        if head is not None:
            return _VerbForm(head.aux, f"{head.main} to {verb.lower_}", f"{head.past} to {verb.lower_}", head.tense)
    if verb.dep_ == "pcomp" and verb.tag_ == "VBG" and verb.head.dep_ == "prep":
        head = _verb_form(verb.head.head) if verb.head.head.pos_ in ("VERB", "AUX") else None
        if head is not None:
            link = f"{verb.head.lower_} {verb.lower_}"
            return _VerbForm(head.aux, f"{head.main} {link}", f"{head.past} {link}", head.tense)
    return None


def _inflect(lemma: str, tag: str) -> str:
    """``lemma`` in the form of Penn tag ``tag`` ("have", "VBZ" -> "has"), by lemminflect."""
    from lemminflect import getInflection

    forms = getInflection(lemma, tag=tag)
    return forms[0] if forms else lemma


# Prepositional phrases that are turns of speech, not circumstances of the event ("by the way", "for sure").
_IDIOMS = frozenset({("by", "way"), ("of", "course"), ("in", "fact"), ("for", "sure"), ("at", "least"),
                     ("at", "all"), ("for", "real"), ("in", "general"), ("at", "moment"), ("in", "way")})


def _is_idiom(prep) -> bool:
    pobj = _prep_object(prep)
    return pobj is not None and (prep.lower_, pobj.lemma_.lower()) in _IDIOMS


def _prep_object(prep):
    return next((c for c in prep.children if c.dep_ in ("pobj", "pcomp")), None)


def _is_date(token) -> bool:
    return token.ent_type_ in ("DATE", "TIME")


def _event_of(verb, ctx: _Context) -> str | None:
    """The event a "when" clause belongs to: "our camping trip last year when we saw the meteor shower" ->
    "during the camping trip"."""
    if verb.dep_ not in ("relcl", "advcl") or not any(c.dep_ == "advmod" and c.lower_ == "when"
                                                      for c in verb.children):
        return None
    head = verb.head
    if head.pos_ != "NOUN":  # "I remember our trip when we saw ...": the event is the governing verb's object
        head = next((c for c in head.children if c.dep_ == "dobj" and c.pos_ == "NOUN" and c.i < verb.i), None)
    event = _noun_phrase(head, ctx) if head is not None and not _is_date(head) else None
    return f"during {_definite(event)}" if event else None


def _is_location(prep, pobj) -> bool:
    """A particular thing something is in, at or under: "hid his bone in my slipper", "left it at the studio"."""
    return prep.lower_ in ("in", "at", "into", "under", "inside") and pobj.pos_ == "NOUN" and \
        any(c.dep_ in ("det", "poss") for c in pobj.children) and pobj.lemma_.lower() not in _VAGUE | CHAT_WORDS


def _is_time_of(dependent) -> bool:
    """Whether a verb's dependent says when: "yesterday", "last week", "on Friday"."""
    pobj = _prep_object(dependent) if dependent.dep_ == "prep" else None
    return _is_date(dependent) or pobj is not None and _is_date(pobj)


def _date_phrase(verb):
    """The clause's own time expression (a DATE entity hanging from the verb), as said, or None."""
    for c in verb.children:
        if c.dep_ in ("npadvmod", "advmod", "tmod", "obl") and _is_date(c):
            return c.doc[min(t.i for t in c.subtree):max(t.i for t in c.subtree) + 1]
        if c.dep_ == "prep":
            pobj = _prep_object(c)
            if pobj is not None and _is_date(pobj) and c.lower_ in ("on", "in", "at", "during", "over", "last"):
                return c.doc[min(t.i for t in pobj.subtree):max(t.i for t in pobj.subtree) + 1]
    return None


def _ent_span(token):
    return next((e for e in token.doc.ents if e.start <= token.i < e.end), None)


def _complements(verb, ctx: _Context, skip: set[int]) -> str:
    """What follows the verb in a question about the clause: its particle, object and prepositional phrases, less
    the constituent asked about (``skip``: token indices), dates and clauses."""
    parts = []
    for c in verb.children:
        if c.i in skip or c.i < verb.i and c.dep_ != "prt":
            continue
        if c.dep_ == "prt":
            parts.append((c.i, c.text.lower()))
        elif c.dep_ in ("dobj", "attr", "oprd", "dative"):
            np = _noun_phrase(c, ctx)
            if np is None:
                return "\0"  # an unresolved pronoun: the question would not say what it is about
            parts.append((c.i, np))
        elif c.dep_ == "prep":
            pobj = _prep_object(c)
            if pobj is None or _is_date(pobj) or _is_idiom(c):
                continue
            np = _noun_phrase(pobj, ctx)
            if np is None:
                continue
            parts.append((c.i, f"{c.lower_} {np}"))
        elif c.dep_ == "acomp" and verb.lemma_ != "be":
            parts.append((c.i, _phrase(c, ctx, max_words=4)))
    words = " ".join(p for _, p in sorted(parts))
    return " ".join(words.split()[:2 * PHRASE_WORDS])


def _question(*words: str) -> str:
    text = " ".join(w for w in words if w)
    text = " ".join(text.split())
    return text[0].upper() + text[1:] + "?"


_QUANTITIES = frozenset("lot lots bunch couple plenty loads load ton tons kind sort type piece pair set".split())


def _objects(verb) -> list:
    """The clause's objects worth asking: its direct object ("a lot of books": the books), or the subject of a
    small clause after a causative verb ("I made this window to remind me": the window)."""
    found = []
    for c in verb.children:
        if c.dep_ == "dobj":
            if c.lemma_.lower() in _QUANTITIES:
                of = next((p for p in c.children if p.dep_ == "prep" and p.lower_ == "of"), None)
                c = _prep_object(of) if of is not None else c
            if c is not None and _worth_asking(c):
                found.append(c)
    if not found:
        for c in verb.children:
            if c.dep_ == "ccomp" and c.i > verb.i:
                subj = next((s for s in c.children if s.dep_ == "nsubj" and s.pos_ in ("NOUN", "PROPN")), None)
                if subj is not None and _worth_asking(subj):
                    found.append(subj)
    return found


# Kinds also asked with the place the turn's speaker said they went to, when their clause names none.
SET_KINDS = frozenset("what which feel doing why how is want".split())


def _clause_facts(verb, ctx: _Context, dia_id: str, session: int) -> list[Fact]:
    """The facts of one clause headed by ``verb``."""
    subj_token = _subject(verb)
    if subj_token is None and not _dropped_subject(verb):
        return []
    subject = _noun_phrase(subj_token, ctx) if subj_token is not None else ctx.speaker
    if subject is None or not _content(subject) and subject not in ctx.names:
        return []
    if subject not in ctx.names and subj_token is not None and not _particular(subj_token):
        return []  # "dance helps me de-stress": a bare abstraction is no subject to ask about
    person = subject if subject in ctx.names else None
    facts: list[Fact] = []

    def add(kind, wordings, answer, relation=None, verb_lemma=None):
        answer = answer if kind in ("when", "who") else _no_article(_unowned(answer, ctx))
        if kind == "how" and not _specific(answer):
            return  # "How was the party?" -> "awesome": said of everything, it tells nothing apart
        if answer and _content(answer) and len(answer.split()) <= ANSWER_WORDS + 4:
            facts.append(Fact(kind, list(wordings), answer, dia_id, session, person, relation, verb_lemma))
            setting = _event_of(verb, ctx) or ctx.setting
            if kind in SET_KINDS and setting and wordings[0] and not rest_has_place and \
                    setting.split()[-1] not in wordings[0]:
                # what the turn tells of a place it named before: "What did Melanie make at the pottery workshop?"
                facts.append(Fact(kind, [f"{wordings[0][:-1]} {setting}?"], answer, dia_id, session))

    lemma = verb.lemma_.lower()
    rest_has_place = any(c.dep_ == "prep" and c.lower_ in ("at", "in", "to") for c in verb.children)
    if lemma == "be":
        if subj_token is not None:
            _copula_facts(verb, subj_token, subject, ctx, add)
        return facts
    form = _verb_form(verb)
    if form is None or form.main.split()[-1] in ("be", "being", "been"):
        return facts  # a copula reached through another verb ("to be about helping") reads as no question
    rest_all = _complements(verb, ctx, set())
    if "\0" in rest_all:
        rest_all = ""
    date = _date_phrase(verb)
    # the object
    for c in _objects(verb):
        answer = _noun_phrase(c, ctx, for_question=False)
        if answer is None or answer in ctx.names:
            continue
        rest = _complements(verb, ctx, {c.i})
        if "\0" in rest:
            continue
        head = c.text.lower() if c.pos_ == "NOUN" and c.ent_type_ == "" else None
        # "a dance studio", "my daughter's birthday" tell which; "his bone" does not
        modified = head is not None and any(m.dep_ in ("compound", "amod", "nmod") or m.dep_ == "poss" and
                                            m.pos_ != "PRON" for m in c.children)
        relation = "likes" if lemma in LIKE_VERBS else "owns" if lemma in OWN_VERBS and person else None
        add("what", [_question("What", form.aux, subject, form.main, rest)], answer, relation,
            lemma if person and form.tense in ("past", "perfect") else None)
        if person:  # the same fact from its other end (a second wording: asked only with wordings >= 2)
            add("who", ["", _question("Who", form.past, answer, rest)], person)
        if modified and len(_unowned(_no_article(answer), ctx).split()) > 1:
            add("which", [_question("What", head, form.aux, subject, form.main, rest),
                          _question("What kind of", head, form.aux, subject, form.main, rest)],
                _no_article(answer))
    for adjective in (c for c in verb.children if c.dep_ == "acomp"):
        by = next((p for p in adjective.children if p.dep_ == "prep" and p.lower_ == "by"), None)
        means = _prep_object(by) if by is not None else None
        if means is not None and means.tag_ == "VBG":
            rest = _complements(verb, ctx, {adjective.i})
            add("how", [_question("How", form.aux, subject, form.main, adjective.lower_,
                                  rest if "\0" not in rest else "")], f"by {_phrase(means, ctx)}")
    # what happened to someone other than the speakers: "my son got into an accident"
    if person is None and subj_token is not None and _names_people(subj_token) and rest_all and \
            form.tense == "past" and (subj_token.ent_type_ == "PERSON" or
                                      any(c.dep_ == "poss" for c in subj_token.children)) and \
            not any(c.dep_ == "conj" for c in subj_token.children):
        add("happened", [_question("What happened to", subject)], _predicate(verb, ctx))
    # an object made for a purpose: "I made something to catch the eye" -> why did Melanie make something?
    for c in (c for c in verb.children if c.dep_ == "dobj"):
        purpose = next((r for r in c.children if r.dep_ == "relcl" and
                        any(m.dep_ == "aux" and m.lower_ == "to" for m in r.children)), None)
        if purpose is not None and rest_all:
            add("why", [_question("Why", form.aux, subject, form.main, rest_all)], _phrase(purpose, ctx))
    # the subject, when it is a thing: "What spoke to Caroline?" -> their inclusivity and support
    if person is None and subj_token is not None and subj_token.pos_ in ("NOUN", "PROPN") and rest_all:
        add("what", [_question("What", form.past, rest_all)], _phrase(subj_token, ctx, skip_relcl=True))
    # prepositional phrases: where, with whom, what about
    for c in verb.children:
        if c.dep_ != "prep" or _is_idiom(c):
            continue
        pobj = _prep_object(c)
        if pobj is None or _is_date(pobj):
            continue
        answer = _noun_phrase(pobj, ctx, for_question=False)
        if answer is None:
            continue
        rest = _complements(verb, ctx, {c.i})
        if "\0" in rest:
            continue
        prep = c.lower_
        if prep == "by" and pobj.tag_ == "VBG":  # "I stay motivated by reminding myself": how?
            add("how", [_question("How", form.aux, subject, form.main, rest)], f"by {answer}")
            continue
        place = pobj.ent_type_ in ("GPE", "LOC", "FAC") or (prep in ("to", "at", "in", "into", "from")
                                                              and lemma in MOTION_VERBS)
        people = _names_people(pobj)
        if prep == "with" and people:
            add("with", [_question("Who", form.aux, subject, form.main, "with", rest),
                         _question("With whom", form.aux, subject, form.main, rest)], answer, "people")
        elif place and prep != "with" or _is_location(c, pobj):
            if person == ctx.speaker and prep in ("to", "at", "in") and lemma in MOTION_VERBS:
                ctx.setting = f"{'in' if pobj.ent_type_ in ('GPE', 'LOC') else 'at'} {_definite(answer)}"
            add("where", [_question("Where", form.aux, subject, form.main, "from" if prep == "from" else "", rest),
                          _question("What place", form.aux, subject, form.main, rest, prep)], answer,
                "places" if place else None)
            head = pobj.lemma_.lower() if pobj.pos_ == "NOUN" else None
            if head and any(m.dep_ in ("compound", "amod") for m in pobj.children):
                add("which", [_question("What", head, form.aux, subject, form.main, prep, rest),
                              _question("What kind of", head, form.aux, subject, form.main, prep, rest)],
                    _no_article(answer))
        else:
            job = [f"What is {subject}'s job?", f"What is {subject}'s profession?"] \
                if lemma == "work" and prep == "as" and person else []
            add("what", [_question("Who" if people else "What", form.aux, subject, form.main, prep, rest)] + job,
                answer)
    # when, and the event asked from its date, with the event's purpose ("went to a fair to get more exposure")
    purpose = next((c for c in verb.children if c.dep_ in ("advcl", "xcomp") and c.i > verb.i and
                    lemma not in INTENT_VERBS and any(m.dep_ == "aux" and m.lower_ == "to" for m in c.children)), None)
    event = f"{rest_all} {_phrase(purpose, ctx, max_words=PHRASE_WORDS)}" if purpose is not None else rest_all
    if date is not None and ctx.when is not None and (rest_all or not _objects(verb)):
        resolved = resolve_date(date.text, ctx.when)
        if resolved:
            add("when", [_question("When", form.aux, subject, form.main, event),
                         _question("On what date", form.aux, subject, form.main, rest_all)], resolved)
            if form.tense == "past" and person:
                add("did_on", [_question("What did", subject, "do", _on_date(resolved))], _predicate(verb, ctx),
                    "did")
    elif form.tense in ("past",) and ctx.when is not None and rest_all and person:
        add("when", [_question("When", form.aux, subject, form.main, event)], session_date_text(ctx.when))
    if form.tense == "past" and person and rest_all and date is None:
        add("did_on", [], _predicate(verb, ctx), "did")  # feeds "What has X done?" only
    if form.tense == "progressive" and form.aux == "is" and person and rest_all:
        add("doing", [_question("What", form.aux, subject, "doing")], _predicate(verb, ctx))
    # why
    for c in verb.children:
        if c.dep_ == "advcl" and any(m.dep_ == "mark" and m.lower_ in REASON_MARKERS for m in c.children):
            reason = _phrase(c, ctx, max_words=ANSWER_WORDS)
            reason = re.sub(r"^(because|'cause|cause|cuz|since|as)\s+", "", reason, flags=re.I)
            if rest_all:
                add("why", [_question("Why", form.aux, subject, form.main, rest_all)], reason)
        if c.dep_ == "advcl" and any(m.dep_ == "aux" and m.lower_ == "to" for m in c.children) and rest_all:
            add("why", [_question("Why", form.aux, subject, form.main, rest_all)], _phrase(c, ctx))
    # wants, plans, thoughts
    for c in verb.children:
        if c.dep_ == "xcomp" and c.pos_ in ("VERB", "AUX") and lemma in INTENT_VERBS | {"go"}:
            answer = _phrase(c, ctx, max_words=ANSWER_WORDS)
            answer = re.sub(r"^to\s+", "", answer)
            if lemma == "go" and form.tense == "progressive":
                add("want", [_question("What", form.aux, subject, "going to do"),
                             _question("What is", subject, "planning to do")], answer, "plans")
            elif lemma in INTENT_VERBS:
                relation = "plans" if lemma in ("want", "plan", "hope", "decide", "wish", "aim", "intend") else \
                    "likes" if lemma in LIKE_VERBS else None
                add("want", [_question("What", form.aux, subject, form.main, "to do")], answer, relation)
        elif c.dep_ == "xcomp" and c.pos_ == "VERB" and rest_all and lemma not in INTENT_VERBS | {"go", "use", "have"} \
                and any(m.dep_ == "aux" and m.lower_ == "to" for m in c.children):
            add("why", [_question("Why", form.aux, subject, form.main, rest_all),
                        _question("What", form.aux, subject, form.main, rest_all, "for")], _phrase(c, ctx))
        if c.dep_ == "ccomp" and lemma in COGNITION_VERBS and c.pos_ in ("VERB", "AUX"):
            said = _phrase(c, ctx, max_words=ANSWER_WORDS)
            said = re.sub(r"^that\s+", "", said)
            add("think", [_question("What", form.aux, subject, form.main)], said)
    # feelings: "I felt tiny", "it made me feel relaxed"
    for c in verb.children:  # "make my customers feel cozy": how did Gina want to make her customers feel?
        if c.dep_ == "ccomp" and c.lemma_.lower() == "feel" and lemma in ("make", "let", "help"):
            feeler = next((t for t in c.children if t.dep_ == "nsubj"), None)
            feeling = next((t for t in c.children if t.dep_ in ("acomp", "oprd")), None)
            who = _noun_phrase(feeler, ctx) if feeler is not None else None
            if who is not None and feeling is not None:
                add("feel", [_question("How", form.aux, subject, form.main, who, "feel")],
                    _phrase(feeling, ctx, max_words=6))
    if lemma in ("feel", "become", "seem", "look", "sound"):
        for c in verb.children:
            if c.dep_ in ("acomp", "attr", "oprd"):
                feeling = _render(_without_intensifiers(_span_tokens(c), c), ctx)
                about = _complements(verb, ctx, {c.i})
                add("feel", [_question("How", form.aux, subject, form.main, about if "\0" not in about else "")],
                    feeling)
    return facts


def session_date_text(when: datetime) -> str:
    return _dmy(when)


def _on_date(resolved: str) -> str:
    return resolved if resolved.startswith(("the ", "two ", "three ", "four ", "five ")) else \
        ("in " if re.fullmatch(r"(\w+ )?\d{4}", resolved) else "on ") + resolved


def _copula_facts(verb, subj_token, subject: str, ctx: _Context, add) -> None:
    """ "X is Y", "it was so powerful", "I'm a fan of Bach": what X is, how X was, and Y asked the other way."""
    person = subject in ctx.names
    plural = not person and verb.lower_ in ("are", "were", "'re")  # "they're comfy": how are the boots?
    aux = ("were" if plural else "was") if verb.tag_ == "VBD" else "are" if plural else "is"
    if any(c.dep_ == "neg" for c in verb.children):
        return
    thing = _definite(subject)
    for c in verb.children:
        if c.dep_ == "prep" and person and c.lower_ in ("from", "in", "at") and _prep_object(c) is not None:
            place = _prep_object(c)
            where = _noun_phrase(place, ctx, for_question=False)
            if where and (place.ent_type_ in ("GPE", "LOC", "FAC") or c.lower_ == "from"):
                add("where", [_question("Where", aux, subject, "from" if c.lower_ == "from" else ""),
                              _category_question(place, aux, subject, c.lower_)], where, "places")
        if c.dep_ == "prep" and not person and c.lower_ in ("for", "about") and _prep_object(c) is not None:
            purpose = _noun_phrase(_prep_object(c), ctx, for_question=False)  # "These are for running"
            if purpose:
                add("is", [_question("What", aux, thing, c.lower_)], purpose)
        if c.dep_ == "acomp":
            quality = _render(_without_intensifiers(_span_tokens(c, max_words=6), c), ctx)
            about = _xcomp_of(c, ctx)
            if person:
                how_feel = _question("How", "did" if aux == "was" else "does", subject, "feel")
                add("feel", [how_feel], quality)
                # the feeling asked with what it is about, named in the clause or last before it
                topic = about if about and _xcomp_of_is_thing(c) else _topic(c, ctx)
                if topic:
                    add("feel", [f"{how_feel[:-1]} about {_definite(topic)}?"], _adjective_alone(c, ctx))
                if about:
                    add("feel", [_question("What", aux, subject, c.text.lower(), _prep_word(c)),
                                 _question("What", aux, subject, "excited about")
                                 if c.lemma_.lower() in ("thrilled", "stoked", "pumped", "excited") else ""], about)
            elif subj_token.pos_ in ("PRON", "NOUN", "PROPN"):
                add("how", [_question("How", aux, thing), _question("What", aux, thing, "like")], quality)
        if c.dep_ == "advcl" and not any(d.dep_ in ("attr", "acomp") for d in verb.children) and \
                any(m.lower_ in ("when", "where") for m in c.children if m.dep_ == "advmod") and \
                not _is_pronoun(subj_token):
            said = re.sub(r"^(when|where)\s+", "", _phrase(c, ctx), flags=re.I)
            add("is", [_question("What", aux, thing)], said)
        if c.dep_ == "attr" and _worth_asking(c):
            value = _noun_phrase(c, ctx, for_question=False)
            if value is None or value == subject:
                continue
            prep = next((p for p in c.children if p.dep_ == "prep" and _prep_object(p) is not None), None)
            if person and prep is not None:  # "I'm a fan of Bach": what is Melanie a fan of?
                kind = _render([t for t in c.subtree if t.i < prep.i], ctx)
                add("is", [_question("What", aux, subject, kind, prep.lower_),
                           _question("Who", aux, subject, kind, prep.lower_)
                           if _prep_object(prep).ent_type_ == "PERSON" else ""],
                    _noun_phrase(_prep_object(prep), ctx, for_question=False) or "")
            elif c.lemma_.lower() not in _VAGUE:
                add("is", [_question("What", aux, thing)], value)
                if not _is_pronoun(subj_token) and c.pos_ == "NOUN" and len(value.split()) > 1:
                    # "This necklace is a gift from my grandma": what is a gift from Caroline's grandma?
                    add("is", [_question("What", aux, _noun_phrase(c, ctx))], _no_article(subject))


def _category_question(name, aux: str, subject: str, prep: str) -> str:
    """ "Lisbon, a small town": which town is Dana from? (a name's apposition says what kind of thing it is)."""
    kind = next((c for c in name.children if c.dep_ == "appos" and c.pos_ == "NOUN"), None)
    return _question("Which", kind.lemma_.lower(), aux, subject, prep) if kind is not None else ""


def _prep_word(adjective) -> str:
    prep = next((c for c in adjective.children if c.dep_ == "prep"), None)
    return prep.lower_ if prep is not None else "about"


def _xcomp_of_is_thing(adjective) -> bool:
    """Whether what an adjective is about is a thing ("excited about the trip"), not a clause ("excited to go")."""
    return not any(c.dep_ == "xcomp" for c in adjective.children)


def _adjective_alone(adjective, ctx: _Context) -> str:
    """"so excited about the trip" -> "so excited": the feeling, without what it is about."""
    dropped = {u.i for c in adjective.children if c.dep_ in ("prep", "xcomp", "ccomp", "punct") for u in c.subtree}
    return _render(_without_intensifiers([t for t in adjective.subtree if t.i not in dropped], adjective), ctx)


# Degree words a feeling or quality is said with ("so excited"), which a short answer leaves out ("excited").
INTENSIFIERS = frozenset("so very really super pretty totally extra quite incredibly truly".split())


def _without_intensifiers(tokens: list, head) -> list:
    kept = [t for t in tokens if not (t.head.i == head.i and t.dep_ == "advmod" and t.lower_ in INTENSIFIERS)]
    return kept or tokens


def _topic(token, ctx: _Context) -> str | None:
    """The thing last named before ``token`` (in this turn, else the turns before): what a remark is about."""
    before = ctx.antecedents + [n for n in ctx.chunks if n.end <= token.i]
    named = next((n for n in reversed(before) if not n.people), None)
    return named.phrase if named is not None and len(named.phrase.split()) > 1 else None  # not a bare "need"


def _turn_topic(ctx: _Context) -> str | None:
    """The thing this turn named last (not one of the turns before): what a photo shared with it is about."""
    named = next((n for n in reversed(ctx.chunks) if not n.people), None)
    return named.phrase if named is not None and len(named.phrase.split()) > 1 else None


def _xcomp_of(adjective, ctx: _Context) -> str | None:
    for c in adjective.children:
        if c.dep_ == "xcomp":
            return re.sub(r"^to\s+", "", _phrase(c, ctx))
        if c.dep_ == "prep" and c.lower_ in ("about", "for", "with", "of"):
            pobj = _prep_object(c)
            if pobj is not None:
                return _noun_phrase(pobj, ctx, for_question=False)
    return None


def _name_facts(doc, ctx: _Context, dia_id: str, session: int) -> list[Fact]:
    """Names: "a cat named Bailey", "Oscar, my guinea pig", "my home country, Sweden"."""
    facts = []
    for t in doc:
        pairs = []
        if t.dep_ == "acl" and t.lemma_.lower() in ("name", "call"):
            name = next((c for c in t.children if c.dep_ in ("oprd", "attr", "dobj") and c.pos_ == "PROPN"), None)
            if name is not None and t.head.pos_ == "NOUN":
                pairs.append((t.head, name))
        if t.dep_ == "appos":
            a, b = t.head, t
            if a.pos_ == "NOUN" and b.pos_ == "PROPN":
                pairs.append((a, b))
            elif a.pos_ == "PROPN" and b.pos_ == "NOUN":
                pairs.append((b, a))
        for noun, name in pairs:
            if name.text in ctx.names:  # "No doubts, Caroline": a speaker addressed, not a name given
                continue
            owner = next((c for c in noun.children if c.dep_ == "poss"), None)
            thing = " ".join(m.text.lower() for m in noun.children if m.dep_ in ("compound", "amod") and m.i < noun.i)
            thing = f"{thing} {noun.text.lower()}".strip()
            whose = _third_person(owner, ctx) if owner is not None else f"{ctx.speaker}'s"
            name_text = _name_words(name)
            if not _content(name_text) and len(name_text) < 3:
                continue
            if name.ent_type_ in ("GPE", "LOC", "NORP"):
                wordings = [f"What is {whose} {thing}?", f"Which {noun.text.lower()} is {whose} {thing}?"]
            else:
                wordings = [f"What is the name of {whose} {thing}?", f"What is {whose} {thing} called?",
                            f"Who is {name_text}?"]
            facts.append(Fact("name", wordings[:2], name_text, dia_id, session, ctx.speaker, "owns"))
            if len(wordings) > 2:
                facts.append(Fact("name", [wordings[2]], f"{whose} {thing}", dia_id, session))
    return facts


def _name_words(token) -> str:
    """A name as written: its entity's words, or the token with its compound parts ("Matt Patterson")."""
    ent = _ent_span(token)
    if ent is not None and ent.label_ not in ("DATE", "TIME", "CARDINAL", "ORDINAL"):
        return ent.text
    parts = [c for c in token.children if c.dep_ in ("compound", "flat") and c.i < token.i] + [token]
    return " ".join(t.text for t in parts)


def _count_facts(doc, ctx: _Context, dia_id: str, session: int) -> list[Fact]:
    """Counts ("two cats") and durations ("for 4 years", "seven years now")."""
    facts = []
    for t in doc:
        if t.dep_ != "nummod" or t.head.pos_ != "NOUN":
            continue
        noun = t.head
        verb = noun.head if noun.dep_ in ("dobj", "pobj") else None
        if verb is not None and verb.dep_ == "prep":
            verb = verb.head
        if verb is None or verb.pos_ not in ("VERB", "AUX"):
            continue
        subj = _subject(verb)
        who = _noun_phrase(subj, ctx) if subj is not None else None
        if who is None:
            continue
        number = _render([t], ctx)
        if _is_date(noun) and noun.lemma_.lower() in ("year", "month", "week", "day"):
            form = _verb_form(verb)
            if form is None:
                continue
            doing = form.main if form.tense in ("perfect",) else form.main
            rest = _complements(verb, ctx, {noun.head.i if noun.dep_ == "pobj" else noun.i})
            rest = "" if "\0" in rest else rest
            facts.append(Fact("how_long", [_question("How long", form.aux, who, doing, rest)],
                              f"{number} {noun.text.lower()}", dia_id, session))
        elif not _is_date(noun):
            form = _verb_form(verb)
            if form is None:
                continue
            facts.append(Fact("count", [_question("How many", noun.text.lower(), form.aux, who, form.main)],
                              number, dia_id, session))
    return facts


def _frequencies(sentence) -> list:
    """How often things happen: a date entity that says so ("every Sunday"), or "once" / "twice" and what follows
    it ("only once or twice a year"), which the tagger does not always read as a date."""
    spans = [e for e in sentence.ents if e.label_ == "DATE" and
             re.search(r"\b(every|once|twice|times|daily|weekly|usually)\b", e.text, re.I)]
    for t in sentence:
        if t.lower_ in ("once", "twice") and t.dep_ == "advmod" and not any(e.start <= t.i < e.end for e in spans):
            spans.append(sentence.doc[t.i:max(u.i for u in t.subtree) + 1])
    return spans


def _frequency_facts(doc, ctx: _Context, dia_id: str, session: int) -> list[Fact]:
    facts = []
    for ent in _frequencies(doc):
        verb = ent.root.head
        while verb.pos_ not in ("VERB", "AUX") and verb.head != verb:
            verb = verb.head
        subj = _subject(verb)
        who = _noun_phrase(subj, ctx) if subj is not None else None
        form = _verb_form(verb, negated_ok=True)
        if who is None or form is None:
            continue
        rest = _complements(verb, ctx, set())
        rest = "" if "\0" in rest else rest
        facts.append(Fact("how_often", [_question("How often", form.aux, who, form.main, rest)], ent.text, dia_id,
                          session))
    return facts


# Imperatives of chat that give no advice ("Thank you!", "Let me know", "Take care").
CHAT_IMPERATIVES = frozenset("thank let take have enjoy hang congrats hug keep check look show".split())
# Verbs of a first-person remark whose "I" chat drops ("Love that color!", "Can't wait", "Bet it was great").
REMARK_VERBS = LIKE_VERBS | COGNITION_VERBS | frozenset("appreciate bet miss guess agree wait".split())


def _advice_facts(sentence, ctx: _Context, dia_id: str, session: int) -> list[Fact]:
    """An imperative sentence is advice to the other speaker: "Do your research and find an agency" ->
    What advice did Caroline give Melanie? -> do research and find an agency."""
    root = sentence.root
    suggested = next((c for c in root.children if c.dep_ == "ccomp" and
                      any(s.dep_ == "nsubj" and s.lower_ in ("'s", "us") for s in c.children)), None)
    if root.lemma_.lower() == "let" and suggested is not None:  # "Let's live it up": a suggestion
        dropped = {u.i for c in suggested.children if c.dep_ == "nsubj" for u in c.subtree}
        answer = _render([t for t in suggested.subtree if t.i not in dropped and not _is_date(t)], ctx)
        return [Fact("advice", [f"What did {ctx.speaker} suggest to {ctx.other}?"], answer, dia_id, session,
                     ctx.speaker)] if _content(answer) else []
    first = next((t for t in sentence if not t.is_punct and t.pos_ not in ("INTJ", "ADV", "CCONJ")), None)
    opens = first is not None and (first.i == root.i or first.head.i == root.i and first.lemma_ == "do")
    if root.pos_ != "VERB" or root.tag_ != "VB" or not opens or root.lemma_.lower() in CHAT_IMPERATIVES | REMARK_VERBS \
            or any(c.dep_ in ("nsubj", "nsubjpass", "expl") for c in root.children):
        return []
    if not any(c.dep_ in ("prep", "xcomp", "ccomp", "acomp") or c.dep_ == "dobj" and not _is_pronoun(c)
               for c in root.children):
        return []  # "Go for it!", "Do it!": cheering, not advice
    answer = _unowned(_phrase(root, ctx, max_words=ANSWER_WORDS + 4), ctx)
    if not _specific(answer) or not _content(answer):
        return []
    return [Fact("advice", [f"What advice did {ctx.speaker} give {ctx.other}?",
                            f"What did {ctx.speaker} tell {ctx.other} to do?"], answer, dia_id, session,
                 ctx.speaker)]


def _fragment_feeling(sentence, ctx: _Context, dia_id: str, session: int) -> list[Fact]:
    """"Glad to be part of it!": an adjective with no subject is how the speaker feels."""
    root = sentence.root
    if root.pos_ != "ADJ" or any(c.dep_ in ("nsubj", "nsubjpass", "expl") for c in root.children):
        return []
    feeling = _adjective_alone(root, ctx)
    if not _specific(feeling):
        return []  # "Awesome!": said of everything
    facts = [Fact("feel", [f"How does {ctx.speaker} feel?"], feeling, dia_id, session, ctx.speaker)]
    topic = _topic(root, ctx)
    if topic:
        facts.append(Fact("feel", [f"How does {ctx.speaker} feel about {_definite(topic)}?"], feeling, dia_id,
                          session, ctx.speaker))
    return facts


# Prepositions of a noun's modifier asked as "What was the <noun> <prep>?" ("a charity race for mental health").
MODIFIER_PREPS = frozenset("for about from with by on".split())


def _modifier_facts(sentence, ctx: _Context, dia_id: str, session: int) -> list[Fact]:
    """A noun's prepositional modifier, asked with the noun: "I ran a charity race for mental health" ->
    What was the charity race for? -> mental health; "a gift from my grandma" -> Who was the gift from?"""
    facts = []
    for prep in sentence:
        noun = prep.head
        pobj = _prep_object(prep)
        if prep.dep_ != "prep" or prep.lower_ not in MODIFIER_PREPS or noun.pos_ != "NOUN" or pobj is None or \
                _is_date(pobj) or _is_idiom(prep) or not _worth_asking(pobj) and pobj.tag_ != "VBG" or \
                noun.lemma_.lower() in _VAGUE | _QUANTITIES | CHAT_WORDS or not _particular(noun):
            continue
        before = [t for t in noun.subtree if t.i <= noun.i]
        thing = _definite(_render(before, ctx))
        answer = _noun_phrase(pobj, ctx, for_question=False)
        if answer is None or not _content(thing) or answer in ctx.names:
            continue
        verb = next((a for a in noun.ancestors if a.pos_ in ("VERB", "AUX")), None)
        past = verb is not None and (verb.tag_ in ("VBD", "VBN") or any(c.tag_ == "VBD" for c in verb.children))
        plural = noun.tag_ == "NNS"
        be = ("were" if plural else "was") if past else "are" if plural else "is"
        asked = "Who" if _names_people(pobj) else "What"
        facts.append(Fact("modifier", [_question(asked, be, thing, prep.lower_)],
                          _no_article(_unowned(answer, ctx)), dia_id, session))
    return facts


def _shown_thing(doc):
    """What a turn that shares a photo points at: "Here's our latest work", "this bowl", "a pic of my garden"."""
    for t in doc:
        if t.lower_ == "here" and t.head.lemma_ == "be":
            shown = next((c for c in t.head.children if c.dep_ in ("nsubj", "attr") and c.pos_ == "NOUN"), None)
            if shown is not None:
                of = next((c for c in shown.children if c.dep_ == "prep" and c.lower_ == "of"), None)
                return _prep_object(of) if of is not None and _prep_object(of) is not None else shown
    return next((t.head for t in doc if t.dep_ == "det" and t.lower_ in ("this", "these") and t.head.pos_ == "NOUN"
                 and t.head.lemma_.lower() not in CHAT_WORDS), None)


# ----------------------------------------------------------------------------------------------------------------
# A turn, a conversation
# ----------------------------------------------------------------------------------------------------------------

_CLAUSE_DEPS = ("ROOT", "conj", "ccomp", "xcomp", "pcomp", "advcl", "relcl", "parataxis", "dep")


def _things_named(doc, ctx: _Context) -> list[Named]:
    """The noun phrases of a turn that "it" and "they" can stand for: things, and people (kept so that "they" after
    "my kids" is not read as the thing named before them)."""
    named = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        if root.pos_ not in ("NOUN", "PROPN") or _is_date(root) or root.dep_ == "appos" or \
                root.lemma_.lower() in CHAT_WORDS:
            continue
        plural = root.tag_ in ("NNS", "NNPS") or any(c.dep_ == "conj" for c in root.children)
        people = root.ent_type_ in ("PERSON", "NORP") or root.lemma_.lower() in PEOPLE_WORDS
        if people or root.ent_type_ not in ("GPE", "LOC", "ORG"):
            phrase = _render(list(chunk), ctx)
            if root.pos_ == "NOUN" and chunk[0].dep_ not in ("det", "poss") and plural:
                phrase = f"the {phrase}"  # "new boots ... they are comfy": how are the new boots?
            proper = root.pos_ == "PROPN" or any(c.dep_ == "appos" and c.pos_ == "PROPN" for c in root.children)
            role = 0 if root.dep_ in ("nsubj", "nsubjpass") else 1 if root.dep_ in ("dobj", "attr") else 2
            named.append(Named(chunk.end, _definite(phrase), plural, people, proper, (ctx.turn, root.sent.start),
                               role))
    return named


def _antecedent(pronoun, ctx: _Context) -> str | None:
    """The thing ``pronoun`` (it, this, they, them, ...) stands for: the last phrase named before it in the turn,
    else in the turns before, of the pronoun's number ("they" after "the kids" is the kids, "it" is not); None when
    that phrase names people, or no phrase agrees."""
    plural = pronoun.lower_ in ("these", "those", "they", "them")
    before = ctx.antecedents + [n for n in ctx.chunks if n.end <= pronoun.i]
    agreeing = []
    for named in reversed(before):
        if named.people and plural and not agreeing:
            return None  # "my kids ... they were scared": people, not a thing to ask about
        if named.plural == plural and not named.people:
            agreeing.append(named)
    if not agreeing:
        return None
    # of the last sentence that named one, its subject before its object before the rest ("I made this bowl in my
    # class. It took some work": the bowl), the later first among equals
    latest = [n for n in agreeing if n.sentence == agreeing[0].sentence]
    return min(latest, key=lambda n: n.role).phrase


def _person_antecedent(pronoun, ctx: _Context) -> str | None:
    """The one ``pronoun`` (he, she, him, her) stands for: the last person or name named before it, not a speaker
    ("my son ... he was okay": Melanie's son; "Oliver's hilarious! He hid his bone": Oliver)."""
    before = ctx.antecedents + [n for n in ctx.chunks if n.end <= pronoun.i]
    named = next((n for n in reversed(before) if (n.people or n.proper) and not n.plural), None)
    return named.phrase if named is not None and named.phrase not in ctx.names else None


# Words of a question that ask nothing in particular ("How are you?", "What's up?", "How about you?").
_NOT_ASKING = frozenset("be do have go get up about doing".split())


def _question_asked(doc, ctx: _Context) -> str | None:
    """The last wh-question of a turn, speakers resolved ("What got you into running?" -> "What got Melanie into
    running?"), if it asks about something in particular; else None."""
    for sentence in reversed(list(doc.sents)):
        words = [t for t in sentence if not t.is_punct and t.pos_ != "INTJ"]
        if not sentence.text.rstrip().endswith("?") or not words or words[0].tag_ not in ("WDT", "WP", "WRB"):
            continue
        if words[0].lower_ == "when" or words[0].lower_ == "how" and words[1].lemma_ in ("be", "go"):
            return None  # a reply's date is asked from its own clause; "How's it going?" asks after nothing
        if not any(t.pos_ in ("NOUN", "PROPN", "VERB", "ADJ") and t.lemma_.lower() not in _NOT_ASKING | CHAT_WORDS
                   for t in words[1:]):
            return None
        return _question(_render(words, ctx))
    return None


# Names that answer a question asking which thing or who ("What's your favorite book?" -> "Charlotte's Web").
_ANSWER_NAMES = {"who": ("PERSON", "ORG"), "where": ("GPE", "LOC", "FAC", "ORG"),
                 "what": ("WORK_OF_ART", "PRODUCT", "EVENT", "PERSON", "ORG", "FAC", "GPE", "LOC"),
                 "which": ("WORK_OF_ART", "PRODUCT", "EVENT", "PERSON", "ORG", "FAC", "GPE", "LOC")}


def _reply(doc, ctx: _Context, asked: str) -> str | None:
    """A turn's answer to the question before it, from its first sentence that states something (not a thanks
    or a question): the name it gives when the question asks who, where or which thing ("It was Matt Patterson,
    he is so talented!" -> "Matt Patterson"), else the sentence."""
    wh = re.sub(r"'s$", "", asked.split()[0].lower())
    for sentence in doc.sents:
        words = [t for t in sentence if not t.is_punct]
        if sentence.text.rstrip().endswith("?") or len(words) < 3 or sentence.root.pos_ not in ("VERB", "AUX"):
            continue
        name = next((e for e in sentence.ents if e.label_ in _ANSWER_NAMES.get(wh, ()) and e.text not in ctx.names),
                    None)
        if name is not None and (wh != "what" or asked.split()[1].lower() not in ("do", "does", "did")):
            if name.root.dep_ == "poss":  # a name inside a title or a thing: "Charlotte's Web", "Nina's band"
                whole = list(name.root.head.subtree)
                name = sentence.doc[whole[0].i:whole[-1].i + 1]
            return re.sub(r"'s$", "", name.text).strip("\"“” ")  # not for "What did you do?": an act, not a name
        start = next((t for t in sentence if t.pos_ not in ("INTJ", "PUNCT") and t.dep_ != "discourse"), None)
        # the first clause: "They were scared but we reassured them" -> "They were scared"
        other_clauses = [c for c in sentence.root.children if c.dep_ == "conj" and
                         any(d.dep_ in ("nsubj", "nsubjpass") for d in c.children)]
        end = min((min(u.i for u in c.subtree) for c in other_clauses), default=sentence.end)
        kept = [t for t in sentence if start is not None and start.i <= t.i < end]
        return _render(_cut(kept, sentence.root, ANSWER_WORDS + 4), ctx)
    return None


def turn_facts(doc, turn, ctx: _Context, session: int) -> list[Fact]:
    """Every fact of one parsed turn, in the order they are said."""
    facts: list[Fact] = []
    ctx.chunks = _things_named(doc, ctx)
    ctx.setting = None
    for sentence in doc.sents:
        if sentence.text.rstrip().endswith("?") or any(t.lower_ in HEDGES for t in sentence):
            continue
        for t in sentence:
            if t.dep_ in _CLAUSE_DEPS and t.pos_ in ("VERB", "AUX"):
                facts += _clause_facts(t, ctx, turn.dia_id, session)
        facts += _name_facts(sentence, ctx, turn.dia_id, session)
        facts += _count_facts(sentence, ctx, turn.dia_id, session)
        facts += _frequency_facts(sentence, ctx, turn.dia_id, session)
        facts += _advice_facts(sentence, ctx, turn.dia_id, session)
        facts += _fragment_feeling(sentence, ctx, turn.dia_id, session)
        facts += _modifier_facts(sentence, ctx, turn.dia_id, session)
    reply = _reply(doc, ctx, ctx.asked) if ctx.asked else None
    if reply:  # the other speaker asked, this turn answers: "What got Melanie into running?" -> ...
        facts.append(Fact("reply", [ctx.asked], reply, turn.dia_id, session, ctx.speaker))
    ctx.asked = _question_asked(doc, ctx)
    ctx.antecedents = (ctx.antecedents + ctx.chunks)[-8:]
    ctx.turn += 1
    if turn.blip_caption:
        shown = photo_note(turn.blip_caption)[len("[shares "):-1]
        for prefix in ("a photo of ", "a picture of ", "a photo: "):
            if shown.startswith(prefix):
                shown = shown[len(prefix):]
        day = f" on {_dmy(ctx.when)}" if ctx.when is not None else ""
        facts.append(Fact("photo", [f"What did {turn.speaker} share a photo of{day}?",
                                    f"What was in the photo {turn.speaker} shared{day}?"], shown, turn.dia_id,
                          session, turn.speaker))
        pointed = _shown_thing(doc)
        thing = _noun_phrase(pointed, ctx) if pointed is not None else _turn_topic(ctx)
        if thing and _content(thing):  # the photo asked by what the turn calls it: one answer per photo
            facts.append(Fact("photo", [f"What did {turn.speaker}'s photo of {_definite(thing)} show?"], shown,
                              turn.dia_id, session))
            if ctx.when is not None:
                facts.append(Fact("when", [f"When did {turn.speaker} share a photo of {_definite(thing)}?"],
                                  _dmy(ctx.when), turn.dia_id, session))
    return facts


# Chat spellings the parser reads as other words ("gonna" -> "gon" + "na").
_SPOKEN = ((re.compile(r"\bgonna\b", re.I), "going to"), (re.compile(r"\bwanna\b", re.I), "want to"),
           (re.compile(r"\bgotta\b", re.I), "got to"), (re.compile(r"'em\b"), "them"))


def _written(text: str) -> str:
    text = " ".join(text.split())
    for pattern, words in _SPOKEN:
        text = pattern.sub(words, text)
    return text


def conversation_facts(conv: Conversation, *, cache: bool = True) -> list[Fact]:
    """Every fact of every turn, in conversation order (:func:`turn_facts`), built from the conversation alone.

    Parsing a long conversation takes seconds to a minute, so the facts are cached under
    ``$LORA_MEM_HOME/questions``, keyed by the conversation's own fields, this module's source and the parser's
    pin: any change to one of them builds them again."""
    source = conversation_only(conv)
    path = None
    if cache:
        key = hashlib.sha256(json.dumps(dataclasses.asdict(source), sort_keys=True).encode() + b"\0" +
                             Path(__file__).read_bytes() + PIPELINE_SHA256.encode()).hexdigest()[:16]
        path = cache_dir("questions") / f"{slug(source.sample_id, 'conversation')}-{key}.json"
        if path.is_file():
            try:
                return [Fact(**f) for f in json.loads(path.read_text())]
            except (ValueError, TypeError):  # an unreadable entry is built again
                pass
    facts = _parse_facts(source)
    if path is not None:
        atomic_write_json(path, [dataclasses.asdict(f) for f in facts])
    return facts


def _parse_facts(source: Conversation) -> list[Fact]:
    names = tuple(dict.fromkeys([source.speaker_a, source.speaker_b] +
                                [t.speaker for s in source.sessions for t in s.turns]))
    turns = [(session, turn) for session in source.sessions for turn in session.turns]
    docs = english().pipe([_written(t.text) for _, t in turns], batch_size=64)
    facts: list[Fact] = []
    ctx = None
    for (session, turn), doc in zip(turns, docs):
        other = source.speaker_b if turn.speaker == source.speaker_a else source.speaker_a
        when = parsed_date_time(session.date_time)
        if ctx is None or ctx.when != when:
            ctx = _Context(turn.speaker, other, names, when)
        ctx.speaker, ctx.other = turn.speaker, other
        facts += turn_facts(doc, turn, ctx, session.index)
    return facts


# The questions across turns: one per person and relation, its answer the list of what was said, in order.
RELATION_QUESTIONS = {
    "likes": ("What does {p} like?", "What does {p} enjoy?"),
    "plans": ("What are {p}'s plans?", "What does {p} want to do?"),
    "places": ("Where has {p} been?", "What places has {p} been to?"),
    "people": ("Who does {p} spend time with?", "Who has {p} done things with?"),
    "owns": ("What does {p} have?", "What things does {p} have?"),
    "did": ("What has {p} done?", "What activities has {p} done?"),
}


def person_queries(facts: list[Fact], wordings: int) -> list[Query]:
    """Per person and relation, one question listing the answers of its facts in the order they were said (at most
    MAX_MERGED_ANSWERS, the latest kept: what a person does lately is what is asked)."""
    grouped: dict[tuple[str, str], list[Fact]] = {}
    for f in facts:
        if f.person and f.relation:
            grouped.setdefault((f.person, f.relation), []).append(f)
    questions = {(person, relation): RELATION_QUESTIONS[relation] for person, relation in grouped}
    for f in facts:  # a person's objects of one verb: "What has Melanie painted?" -> a lake sunrise, a horse
        if f.person and f.verb and f.kind == "what":
            key = (f.person, f"verb {f.verb}")
            grouped.setdefault(key, []).append(f)
            done = _inflect(f.verb, "VBN")
            questions[key] = (f"What has {f.person} {done}?", f"What things has {f.person} {done}?")
    out = []
    for key, group in grouped.items():
        answers = list(dict.fromkeys(_no_article(f.answer) for f in group))
        if len(answers) < 2:
            continue
        answer = ", ".join(answers[-MAX_MERGED_ANSWERS:])
        for q in questions[key][:wordings]:
            out.append(Query(q.format(p=key[0]), answer, f"person_{key[1].split()[0]}", group[-1].dia_id,
                             group[-1].session))
    return out


# Kinds whose question, when several turns answer it, is also asked with each turn's day: events and things,
# not feelings or qualities (every turn has one, and the day does not tell them apart in how people ask).
DATED_KINDS = frozenset("""what which want is did_on where think why with feel count how_long how_often name
advice doing happened modifier reply""".split())


def fact_queries(conv: Conversation, *, wordings: int = 1, per_turn: int | None = None,
                 across_turns: bool = True) -> list[Query]:
    """The parser-built question set of ``conv``: each fact (:func:`conversation_facts`) in its first ``wordings``
    wordings, at most ``per_turn`` facts of a turn (in the order said), then the questions across turns
    (:func:`person_queries`). A question several turns answer is asked once, its answers listed in the order said
    (as `queries.coverage_queries` does)."""
    if wordings < 1 or (per_turn is not None and per_turn < 1):
        raise ValueError(f"wordings and per_turn must be >= 1, got {wordings}, {per_turn}")
    facts = conversation_facts(conv)
    asked: dict[str, list] = {}  # question (lowercase) -> [its first query, its facts in order]
    counts: dict[str, int] = {}
    for f in facts:
        asks = [q for q in f.wordings[:wordings] if q]
        if not asks:
            continue
        counts[f.dia_id] = counts.get(f.dia_id, 0) + 1
        if per_turn is not None and counts[f.dia_id] > per_turn:
            continue
        for q in asks:
            entry = asked.setdefault(q.lower(), [Query(q, f.answer, f.kind, f.dia_id, f.session), []])
            if all(f.answer != g.answer for g in entry[1]):
                entry[1].append(f)
    days = {s.index: session_date(s.date_time) for s in conversation_only(conv).sessions}
    queries = []
    for q, group in asked.values():
        queries.append(Query(q.question, ", ".join(f.answer for f in group[:MAX_MERGED_ANSWERS]), q.kind, q.dia_id,
                             q.session))
        if len(group) > 1 and q.kind in DATED_KINDS and not re.search(r"\d{4}\?$", q.question):
            # each of several answers also asked on its own day: "What did Caroline make on 25 May 2023?"
            queries += [Query(f"{q.question[:-1]} on {days[f.session]}?", f.answer, q.kind, f.dia_id, f.session)
                        for f in group if days.get(f.session) and f.person]
    if across_turns:
        queries += person_queries(facts, wordings)
    return queries
