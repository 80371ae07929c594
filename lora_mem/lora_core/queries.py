"""Questions that cover what a conversation says, the way people ask about it, built from the turns alone.

The quote templates of `recipes` ask "Who said '...'?"; people ask what someone did, bought, felt or plans, when,
where, who and how many. Each turn is read clause by clause (after its relative dates are resolved from the session
date) for first-person statements, and every statement found becomes a fact asked in several phrasings:

    Melanie (25 May 2023): "I ran a charity race for mental health last Saturday - it was really rewarding."
        When did Melanie run a charity race for mental health?        -> last Saturday (20 May 2023)
        What did Melanie run?                                          -> a charity race for mental health
        Who ran a charity race for mental health?                      -> Melanie
    Caroline: "We got another cat named Bailey."      What is the name of Caroline's cat?  -> Bailey
    Melanie: "I'm planning to go camping next month"  What is Melanie planning to do?      -> go camping
    Caroline: "I've been painting for seven years"    How long has Caroline been painting? -> seven years
    (a photo)                                          What did Caroline share a photo of?  -> a lake at sunrise
    (any turn with a distinctive noun)                 What did Caroline say about pottery? -> the words around it

A reader's rules, not a parser: a statement is "I/we [adverbs] <past verb> <object>" and the like, the object ends at
a clause boundary, and past verbs are put back in their base form by a table of irregular verbs and suffix rules.
What it misses (third-person statements, answers spread over turns) is measured by `bench.analysis.query_coverage`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_mem.lora_core.conversation import (
    Conversation,
    Turn,
    conversation_only,
    parsed_date_time,
    photo_note,
    resolve_relative_dates,
    session_date,
)


@dataclass(frozen=True)
class Query:
    question: str
    answer: str
    kind: str  # when, what, where, who, name, plan, like, doing, how_long, how_many, photo, about
    dia_id: str  # the turn it was built from
    session: int

    @property
    def pair(self) -> tuple[str, str]:
        return self.question, self.answer


KINDS = ("when", "what", "where", "who", "name", "plan", "like", "doing", "how_long", "how_many", "photo", "about")

# ----------------------------------------------------------------------------------------------------------------
# Verbs
# ----------------------------------------------------------------------------------------------------------------

IRREGULAR_PAST = {
    "went": "go", "got": "get", "made": "make", "took": "take", "saw": "see", "ran": "run", "bought": "buy",
    "read": "read", "wrote": "write", "gave": "give", "found": "find", "met": "meet", "had": "have", "did": "do",
    "felt": "feel", "began": "begin", "came": "come", "left": "leave", "heard": "hear", "thought": "think",
    "told": "tell", "won": "win", "spent": "spend", "sent": "send", "built": "build", "taught": "teach",
    "caught": "catch", "brought": "bring", "sold": "sell", "drew": "draw", "drove": "drive", "ate": "eat",
    "fell": "fall", "flew": "fly", "grew": "grow", "knew": "know", "rode": "ride", "sang": "sing", "swam": "swim",
    "threw": "throw", "wore": "wear", "chose": "choose", "forgot": "forget", "lost": "lose", "paid": "pay",
    "sat": "sit", "stood": "stand", "became": "become", "broke": "break", "held": "hold", "kept": "keep",
    "led": "lead", "spoke": "speak", "woke": "wake", "shook": "shake", "fought": "fight", "slept": "sleep",
    "meant": "mean", "lent": "lend", "fed": "feed", "shot": "shoot", "hung": "hang", "dug": "dig", "lit": "light",
    "put": "put", "set": "set", "cut": "cut", "hit": "hit", "quit": "quit", "let": "let", "hurt": "hurt",
    "understood": "understand", "overcame": "overcome", "tore": "tear", "stole": "steal", "bit": "bite",
    "hid": "hide", "blew": "blow", "froze": "freeze", "dealt": "deal", "sought": "seek", "rang": "ring",
    "began,": "begin", "undertook": "undertake", "withdrew": "withdraw", "beat": "beat", "bet": "bet",
}
# Past forms in -ed whose stem ends in a silent e that the suffix rules below cannot see.
E_VERBS = frozenset("""
decide arrive believe receive practice continue manage change imagine promise surprise purchase achieve involve
introduce produce reduce explore inspire admire prepare compare declare survive dance place face race bake save
love move like hike share care use close choose propose raise praise serve solve volunteer notice judge challenge
engage exchange arrange charge determine examine combine refuse excuse pause cause amuse confuse advise devise
revise adore ignore restore score snore store argue rescue value pursue issue tie die lie dye hope joke smoke vote
quote note date hate rate skate state create relate translate participate celebrate graduate motivate donate
dedicate educate nominate decorate meditate complete compete
""".split())
NOT_PAST = frozenset("""
need feed seed speed bed red shed indeed proceed exceed succeed breed bleed weed sled fled wed shred bred led
tired excited interested bored scared worried pleased thrilled stressed amazed inspired motivated blessed stoked
pumped prepared determined married engaged talented related supposed used""".split())
ADVERBS = ("just", "finally", "recently", "also", "even", "actually", "already", "really", "totally", "officially",
           "once", "first", "then", "both", "all", "still", "ultimately", "eventually", "luckily")


def base_form(past: str) -> str | None:
    """The base form of a past-tense verb ("went" -> "go", "painted" -> "paint", "tried" -> "try"), or None if
    the word does not read as one."""
    w = past.lower()
    if w in IRREGULAR_PAST:
        return IRREGULAR_PAST[w]
    if len(w) < 5 or not w.endswith("ed") or w in NOT_PAST:
        return None
    stem = w[:-2]
    if w.endswith("ied"):
        return w[:-3] + "y"  # tried -> try
    if stem + "e" in E_VERBS:
        return stem + "e"
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] in "bdgmnprt":
        return stem[:-1]  # stopped -> stop
    if stem.endswith(("at", "iz", "bl", "us")) or (stem.endswith("v") and not stem.endswith("vv")):
        return stem + "e"  # created -> create, realized -> realize, loved -> love
    return stem


# ----------------------------------------------------------------------------------------------------------------
# Clauses
# ----------------------------------------------------------------------------------------------------------------

_ADV = r"(?:(?:" + "|".join(ADVERBS) + r")\s+)*"
# The object of a clause runs to punctuation that ends a clause (a dated note in brackets is kept).
_REST = r"(?P<rest>(?:[^,.;:!?()\u2013\u2014]|\([^)]*\))*)"
_PAST = re.compile(r"\b(?P<subj>I|[Ww]e)\s+" + _ADV + r"(?P<verb>[a-z]+)\b" + _REST)
_DOING = re.compile(r"\b(?:I'm|I am|I’m)\s+" + _ADV + r"(?P<verb>[a-z]+ing)\b" + _REST)
_PLAN = re.compile(r"\b(?:I'm|I am|I’m|[Ww]e're|[Ww]e are|[Ww]e’re)\s+" + _ADV
                   + r"(?P<how>going to|gonna|planning to|planning on|thinking of|thinking about|hoping to|"
                     r"looking forward to|about to|excited to)\s+" + _REST)
_LIKE = re.compile(r"\bI\s+(?:really\s+|absolutely\s+|just\s+|also\s+)?(?P<verb>love|like|enjoy|adore|prefer)\s+"
                   + _REST)
_NAME = re.compile(r"\b(?P<noun>[a-z]+),?\s+(?:named|called)\s+(?P<name>[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)?)")
_HOW_LONG = re.compile(r"\b(?:I|[Ww]e)(?:'ve|’ve| have)\s+been\s+(?P<verb>[a-z]+ing)\b(?P<mid>[^,.;:!?()]*?)\s+"
                       r"for\s+(?P<dur>(?:about\s+|over\s+|almost\s+)?(?:\d+|a|an|one|two|three|four|five|six|seven|"
                       r"eight|nine|ten|a few|a couple of|several)\s+(?:years?|months?|weeks?|days?))")
_BORN = re.compile(r"\b(?:I|[Ww]e)\s+(?:was|were)\s+born\s+(?P<prep>on|in)\s+" + _REST)
_FROM = re.compile(r"\b(?:I'm|I am|I’m)\s+(?:originally\s+)?from\s+" + _REST)
_WORK = re.compile(r"\bI\s+(?:work|worked|have worked|'ve worked)\s+as\s+(?:a|an)\s+" + _REST)
_HAVE_N = re.compile(r"\b(?:I|[Ww]e)\s+(?:have|had|'ve got|’ve got)\s+(?P<n>\d+|two|three|four|five|six|seven|eight|"
                     r"nine|ten)\s+(?P<noun>[a-z]+s)\b")
_CLAUSE_END = re.compile(r"\s+(?:and|but|so|because|cause|since|while|when|which|who|where|as|if|though|until|"
                         r"before|after|or)\s+(?:I|we|it|that|this|they|he|she|my|our|then|now|i)\b.*$|"
                         r"\s+(?:because|since|which|while|though|so that|but)\b.*$")
_AND_VERB = re.compile(r"\s+and\s+(?P<verb>[a-z]+)\b")
# A time expression left at the end of an object once its bracketed date is taken out.
_TIME_TAIL = re.compile(r"\s*(?:\b(?:yesterday|today|tonight|tomorrow|recently|lately|earlier|again|now|too|"
                        r"this\s+\w+|last\s+\w+|next\s+\w+|the\s+other\s+day|the\s+day\s+before|"
                        r"(?:a\s+few|a\s+couple\s+of|several|\w+)\s+\w+\s+ago|on\s+\w+|over\s+the\s+weekend|"
                        r"at\s+the\s+weekend|this\s+past\s+\w+|a\s+while\s+ago)\b\s*)+$", re.IGNORECASE)
_DATE_NOTE = re.compile(r"\s*\(([^)]*\b\d{4}\b[^)]*)\)")
_OBJECT_WORDS = 10
# Words that carry no content of their own ("so", "my"): a phrase of these only says nothing (also the grounding check
# of lora_core.generated_qa).
STOP_WORDS = frozenset("""a an the and or but of to in on at for with from by is are was were be been it its this that
these those he she they them his her their i me my we our you your so just really very too also some any""".split())


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\s+[\u2013\u2014-]\s+", text) if s.strip()]


def _clean_object(rest: str) -> tuple[str, str | None]:
    """(object, its date note or None): the clause's words after the verb, cut at the next clause, with a
    trailing time expression and its bracketed date taken out."""
    rest = _CLAUSE_END.sub("", rest.strip())
    for m in _AND_VERB.finditer(rest):  # "went hiking and got lost": the first event only
        if base_form(m.group("verb")) is not None:
            rest = rest[:m.start()]
            break
    note = _DATE_NOTE.search(rest)
    when = note.group(1) if note else None
    if note:  # the expression before the note ("last Saturday") and the note itself
        rest = (rest[:note.start()] + rest[note.end():]).strip()
        rest = _TIME_TAIL.sub("", rest[:note.start()].rstrip()) + rest[note.start():]
    rest = _TIME_TAIL.sub("", rest.strip()).strip(" '\"“”")
    words = rest.split()
    if len(words) > _OBJECT_WORDS:
        return "", when  # too long to be a short answer
    return " ".join(words), when


def _has_content(text: str) -> bool:
    return any(w not in STOP_WORDS for w in re.findall(r"[a-z0-9]+", text.lower()))


def _when_answer(note: str | None, day: str | None) -> str | None:
    return note if note else day


_WHERE_PREPS = ("to", "at", "in", "into", "from")
MOTION_VERBS = frozenset("go come move travel run walk drive fly head return get arrive hike ride swim sail".split())
# Verbs whose "to ..." is the real action ("decided to adopt"); "had to" is an obligation, not an event.
TO_VERBS = frozenset("decide start begin learn love like hope plan try want agree choose manage offer".split())
_PREPS = frozenset("to at in into from for on with by about up out back over off down around through".split())
# Words that can precede a clause's subject: anything else before "I" makes it a relative clause ("the bowl I made").
_CLAUSE_STARTERS = frozenset("""and but so then because when that if as since while after before though although
until once oh well yeah yes no wow hey hi ok okay also plus actually honestly and,""".split())


def _third_person(text: str, speaker: str, other: str) -> str:
    """First and second person words of a turn as a reader would ask about them: "my" -> "Melanie's"."""
    swaps = {"my": f"{speaker}'s", "our": f"{speaker}'s", "me": speaker, "myself": speaker, "i": speaker,
             "your": f"{other}'s", "you": other}
    return re.sub(r"\b(my|our|me|myself|I|your|you)\b", lambda m: swaps[m.group(1).lower()], text)


def _relative_object(sentence: str, start: int) -> str | None:
    """The noun phrase a relative clause hangs on ("This book I read" -> "this book"), or None if the clause
    starts a sentence or follows a conjunction."""
    before = re.findall(r"[A-Za-z'’]+|[^\sA-Za-z]", sentence[:start])
    if not before or not before[-1].isalpha() or before[-1].lower() in _CLAUSE_STARTERS:
        return None
    phrase = []
    for w in reversed(before[-4:]):
        if not w.isalpha():
            break
        phrase.insert(0, w)
        if w.lower() in ("the", "a", "an", "this", "that", "my", "our", "these", "those"):
            break
    if phrase[0].lower() not in ("the", "a", "an", "this", "that", "my", "our", "these", "those"):
        return None
    return " ".join(phrase).lower() if phrase[0] != "I" else None


def _past_facts(sentence: str, speaker: str, other: str, day: str | None) -> list[tuple[str, list[tuple[str, str]]]]:
    facts = []
    for m in _PAST.finditer(sentence):
        verb = m.group("verb")
        base = base_form(verb)
        if base is None:
            continue
        obj, note = _clean_object(m.group("rest"))
        relative = _relative_object(sentence, m.start())
        if relative is not None:  # "the bowl I made last week": the object is the phrase before the clause
            obj = relative
        first, _, after = obj.partition(" ")
        if first.lower() == "to" and base == "have":
            continue  # "had to ...": an obligation, not an event
        if first.lower() == "to" and base in TO_VERBS and after:
            base, verb, obj = f"{base} to {after.split()[0]}", f"{verb} to {after.split()[0]}", \
                " ".join(after.split()[1:])
            first, _, after = obj.partition(" ")
        if not _has_content(obj) and not (note and " to " in f" {base} "):
            continue
        asked = _third_person(obj, speaker, other)
        tail = f" {asked}" if asked else ""
        when = _when_answer(note, day)
        if when:
            facts.append(("when", [(f"When did {speaker} {base}{tail}?", when),
                                   (f"When was it that {speaker} {verb}{tail}?", when),
                                   (f"On what date did {speaker} {base}{tail}?", when)]))
        if first.lower() in _WHERE_PREPS and base.split()[0] in MOTION_VERBS and _has_content(after):
            facts.append(("where", [(f"Where did {speaker} {base}?", after),
                                    (f"Where was it that {speaker} {verb}?", after)]))
        elif obj and first.lower() not in _PREPS and relative is None:
            facts.append(("what", [(f"What did {speaker} {base}?", obj),
                                   (f"What was it that {speaker} {verb}?", obj)]))
        facts.append(("who", [(f"Who {verb}{tail}?", speaker)]))
    return facts


def _other_facts(sentence: str, speaker: str, day: str | None) -> list[tuple[str, list[tuple[str, str]]]]:
    facts = []
    for m in _PLAN.finditer(sentence):
        obj, note = _clean_object(m.group("rest"))
        if obj and _has_content(obj):
            how = m.group("how")
            facts.append(("plan", [(f"What is {speaker} planning to do?", obj),
                                   (f"What is {speaker} {how}?" if how not in ("going to", "gonna") else
                                    f"What is {speaker} going to do?", obj)]))
            if note:
                facts.append(("when", [(f"When is {speaker} planning to {obj}?", note),
                                       (f"When is {speaker} {how} {obj}?", note)]))
    for m in _DOING.finditer(sentence):
        verb = m.group("verb")
        if verb in ("going", "planning", "thinking", "hoping", "looking", "trying", "feeling", "getting"):
            continue
        obj, note = _clean_object(m.group("rest"))
        if obj and _has_content(obj):
            facts.append(("doing", [(f"What is {speaker} {verb}?", obj), (f"What has {speaker} been {verb}?", obj)]))
    for m in _LIKE.finditer(sentence):
        obj, _ = _clean_object(m.group("rest"))
        if obj and _has_content(obj):
            verb = m.group("verb")
            facts.append(("like", [(f"What does {speaker} {verb}?", obj), (f"What is something {speaker} "
                                                                           f"{verb}s?", obj)]))
    for m in _NAME.finditer(sentence):
        noun = m.group("noun")
        if noun in STOP_WORDS or noun in ("is", "was", "been", "be", "am"):
            continue
        facts.append(("name", [(f"What is the name of {speaker}'s {noun}?", m.group("name")),
                               (f"What is {speaker}'s {noun} called?", m.group("name"))]))
    for m in _HOW_LONG.finditer(sentence):
        mid = m.group("mid").strip()
        what = f"{m.group('verb')}{' ' + mid if mid else ''}"
        facts.append(("how_long", [(f"How long has {speaker} been {what}?", m.group("dur")),
                                   (f"For how long has {speaker} been {what}?", m.group("dur"))]))
    for m in _BORN.finditer(sentence):
        obj, _ = _clean_object(m.group("rest"))
        if obj:
            dated = bool(re.search(r"\d", obj))
            facts.append(("when" if dated else "where",
                          [(f"When was {speaker} born?", obj), (f"What is {speaker}'s date of birth?", obj)] if dated
                          else [(f"Where was {speaker} born?", obj), (f"In which place was {speaker} born?", obj)]))
    for m in _FROM.finditer(sentence):
        obj, _ = _clean_object(m.group("rest"))
        if obj and _has_content(obj):
            facts.append(("where", [(f"Where is {speaker} from?", obj), (f"Where does {speaker} come from?", obj)]))
    for m in _WORK.finditer(sentence):
        obj, _ = _clean_object(m.group("rest"))
        if obj and _has_content(obj):
            facts.append(("what", [(f"What does {speaker} do for work?", obj), (f"What is {speaker}'s job?", obj)]))
    for m in _HAVE_N.finditer(sentence):
        facts.append(("how_many", [(f"How many {m.group('noun')} does {speaker} have?", m.group("n"))]))
    return facts


# ----------------------------------------------------------------------------------------------------------------
# A turn, a conversation
# ----------------------------------------------------------------------------------------------------------------

# A noun, with no tagger at hand: the head of a determiner phrase stands for one: the last of the
# (at most three) words after a determiner ("a local church" -> church, "my pottery class" -> class).
_DETERMINERS = frozenset("a an the my our your his her their some this these those".split())
_PHRASE_ENDS = frozenset("""
and or but so to of in on at for with from by as is are was were be been am it that than then when if because
about into like just very really too also not no who whom whose which what where how""".split())


def phrase_heads(text: str) -> list[str]:
    """The heads of the text's determiner phrases (see above), as written, in order."""
    tokens = re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text)
    heads = []
    for i, t in enumerate(tokens):
        if t.lower() not in _DETERMINERS:
            continue
        run = []
        for u in tokens[i + 1:i + 4]:
            if not u.isalpha() or u.lower() in _PHRASE_ENDS or u.lower() in _DETERMINERS:
                break
            run.append(u)
        if run:
            heads.append(run[-1])
    return heads


KEYWORD_MIN_LETTERS = 4
# Heads that are not subjects: time words, vague nouns, adjectives ending a phrase; months and weekdays are dates.
NOT_KEYWORDS = frozenset("""
time times while thing things stuff kind sort part lot way week weeks weekend day days month months year years today
tonight moment life people guys friend friends family something anything everything nothing bunch couple most more
much many other others same whole best first last next glad great good nice cool amazing awesome beautiful wonderful
lovely special important huge little big hard tough
january february march april june july august september october november december monday tuesday wednesday
thursday friday saturday sunday""".split())


def keyword(text: str, exclude: set[str] | frozenset[str] = frozenset(),
            turn_counts: dict[str, int] | None = None) -> str | None:
    """The text's subject, as written: of its determiner-phrase heads (:func:`phrase_heads`: "my pottery class" ->
    class) with at least KEYWORD_MIN_LETTERS letters, not an adverb in -ly, not in ``exclude`` (lowercase words:
    the speakers' names) or :data:`NOT_KEYWORDS`: the longest, or, given ``turn_counts`` (lowercase word -> turns of
    the conversation that use it), the one the fewest turns use; the first on a tie. None if there is none."""
    heads = [w for w in phrase_heads(text) if len(w) >= KEYWORD_MIN_LETTERS and not w.endswith("ly")
             and w.lower() not in exclude and w.lower() not in NOT_KEYWORDS]
    if not heads:
        return None
    if turn_counts is None:
        return max(heads, key=len)
    return min(heads, key=lambda w: turn_counts.get(w.lower(), 0))


def turn_facts(turn: Turn, speakers: tuple[str, str], day: str | None, resolve_at) -> list[list[Query]]:
    """Every fact found in one turn, each as its list of phrasings (the first the plainest)."""
    text = " ".join(turn.text.split())
    if resolve_at is not None:
        text = resolve_relative_dates(text, resolve_at)
    s = turn.speaker
    other = speakers[1] if s == speakers[0] else speakers[0]
    found: list[tuple[str, list[tuple[str, str]]]] = []
    about = []
    for sentence in _sentences(text):
        if sentence.rstrip().endswith("?"):
            continue  # a question the speaker asks says nothing about them
        facts = _past_facts(sentence, s, other, day) + _other_facts(sentence, s, day)
        found += facts
        subject = keyword(sentence, {sp.lower() for sp in speakers})
        if subject and not facts and len(sentence.split()) >= 5:
            snippet = " ".join(_DATE_NOTE.sub("", sentence).split()[:16]).strip(" .!?")
            about.append(("about", [(f"What did {s} say about {subject.lower()}?", snippet),
                                    (f"What did {s} tell {other} about {subject.lower()}?", snippet)]))
    if turn.blip_caption:
        shown = photo_note(turn.blip_caption)[len("[shares "):-1]
        for prefix in ("a photo of ", "a picture of ", "a photo: "):
            if shown.startswith(prefix):
                shown = shown[len(prefix):]
        found.append(("photo", [(f"What did {s} share a photo of?", shown),
                                (f"What was in the photo {s} shared?", shown)]))
    found += about[:1]  # one sentence of a turn with no statement found
    seen, facts = set(), []
    for kind, phrasings in found:
        if phrasings[0][0] in seen:
            continue
        seen.add(phrasings[0][0])
        facts.append([Query(q, a, kind, turn.dia_id, 0) for q, a in phrasings])
    return facts


MAX_MERGED_ANSWERS = 5  # a question asked of several turns lists at most this many answers


def coverage_queries(conv: Conversation, *, phrasings: int = 2, per_turn: int | None = None) -> list[Query]:
    """Questions about every turn of ``conv`` (:func:`turn_facts`), ``phrasings`` of each fact, at most
    ``per_turn`` facts of a turn (its statements first, in the order they are said), in conversation order.

    A question that several turns answer ("What did Melanie paint?") is asked once, where it is first answered,
    with their answers listed in the order they were said ("a lake sunrise, a horse"): one question never trains
    two answers, and a question about several events learns to list them, as multi-hop questions ask.

    Built from the conversation alone; relative dates are resolved from each session's date (its day answers
    "When" questions about statements with no date of their own)."""
    if phrasings < 1 or (per_turn is not None and per_turn < 1):
        raise ValueError(f"phrasings and per_turn must be >= 1, got {phrasings}, {per_turn}")
    source = conversation_only(conv)
    speakers = (source.speaker_a, source.speaker_b)
    asked: dict[str, list] = {}  # question (lowercase) -> [first query, its answers]
    for session in source.sessions:
        day, resolve_at = session_date(session.date_time), parsed_date_time(session.date_time)
        for turn in session.turns:
            for fact in turn_facts(turn, speakers, day, resolve_at)[:per_turn]:
                for q in fact[:phrasings]:
                    entry = asked.setdefault(q.question.lower(), [Query(q.question, q.answer, q.kind, q.dia_id,
                                                                        session.index), []])
                    if q.answer not in entry[1]:
                        entry[1].append(q.answer)
    return [Query(q.question, ", ".join(answers[:MAX_MERGED_ANSWERS]), q.kind, q.dia_id, q.session)
            for q, answers in asked.values()]
