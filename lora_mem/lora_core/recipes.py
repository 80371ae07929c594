"""Internalisation data: what an adapter is trained on, built from a conversation and nothing else.

`text` is the experiment's recipe: next-token loss on the conversation text. `qa` aligns the objective
with how the adapter is used: questions about the conversation asked and answered in the chat format
the benchmark asks in, with the loss on the answers only. The questions come from deterministic
templates over the turns (who said what, and when), never from LoCoMo's `qa` annotations, evidence,
observations or summaries: every function here reads the conversation's own fields only (`conversation_only`).

    When did Caroline say "I went to a LGBTQ support group yesterday and it was so powerful"?  -> 8 May 2023
    Who said "I went to a LGBTQ support group yesterday and it was so powerful"?               -> Caroline
    What did Caroline say on 8 May 2023?                                                        -> I went to ...
    What did Melanie share a photo of on 8 May 2023?                                            -> a photo of ...

Options (all off by default, which gives exactly the data of the original recipes):
- `resolve_dates`: the text is the "timestamped+dates" format ("yesterday (7 May 2023)", from the session
  date alone, see `conversation.resolve_relative_dates`), and template quotes/answers read the same way.
- `qa_per_turn`: at most that many template pairs per turn, the kind rotating over who/when/what/photo, so
  that a CPU run can afford the qa format (10 conversations, default model's tokenizer, seq 512: all pairs
  ~1.0M non-padding tokens per epoch, `qa_per_turn=1` ~0.31M, the timestamped text ~0.28M).
- `qa_source`: "templates" (above), "model" (pairs the base model writes about each turn, kept only if
  grounded in it: `generated_qa`, cached per conversation and model) or "both".
- `abstention`: questions about subjects the conversation never mentions ("When did Caroline travel to
  Iceland?"), answered "Not mentioned in the conversation." (what LoCoMo scores as abstention on category 5),
  mixed into the QA pairs; built from a fixed vocabulary checked against the conversation text only.
  `abstention_style="contrastive"`: the same question forms asked of the speaker who said a subject (answered) and
  of the other one, who never used its word (not mentioned), as LoCoMo's adversarial questions swap speakers.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime

import torch
from nltk.stem import PorterStemmer

from lora_mem.lora_core.conversation import (
    FORMATS,
    Conversation,
    ConversationError,
    Turn,
    conversation_only,
    conversation_text,
    parsed_date_time,
    photo_note,
    resolve_relative_dates,
    session_date,
)
from lora_mem.lora_core.facts import fact_queries
from lora_mem.lora_core.queries import Query, coverage_queries, keyword
from lora_mem.lora_core.train import IGNORE_INDEX, make_lm_windows
from lora_mem.model.tokenizer import Tokenizer

TRAIN_PARTS = ("text", "qa", "queries", "distill", "recite")
TRAIN_FORMATS = ("text", "qa", "text+qa")  # the original experiment's and its first fixes (any "+" join of parts works)
QA_SOURCES = ("templates", "model", "both")  # who writes the questions: templates, the base model, or both
QUERY_SOURCES = ("rules", "parser")  # what reads the turns for the queries part: regular expressions or a parser
SNIPPET_WORDS = 12  # a quote long enough to identify a turn, short enough to be a question
ANSWER_WORDS = 40  # long turns are cut: answers are meant to be short
ABSTENTION_ANSWER = "Not mentioned in the conversation."  # LoCoMo scores category 5 on "not mentioned"


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


def _words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


# ----------------------------------------------------------------------------------------------------------------
# Template QA over the turns
# ----------------------------------------------------------------------------------------------------------------


def _turn_pairs(turn: Turn, date: str | None, resolve_at: datetime | None) -> list[QAPair]:
    """A turn's template pairs, in the order who, when, what, photo (those that apply)."""
    pairs = []
    text = " ".join(turn.text.split())
    if len(text.split()) >= 4:
        if resolve_at is not None:
            text = resolve_relative_dates(text, resolve_at)
        quote = _words(text, SNIPPET_WORDS)
        pairs.append(QAPair(f'Who said "{quote}"?', turn.speaker))
        if date:
            pairs.append(QAPair(f'When did {turn.speaker} say "{quote}"?', date))
            pairs.append(QAPair(f"What did {turn.speaker} say on {date}?", _words(text, ANSWER_WORDS)))
    if turn.blip_caption and date:
        shared = photo_note(turn.blip_caption)[len("[shares "):-1]
        pairs.append(QAPair(f"What did {turn.speaker} share a photo of on {date}?", shared))
    return pairs


def template_qa(conv: Conversation, *, qa_per_turn: int | None = None, resolve_dates: bool = False) -> list[QAPair]:
    """Who said what, and when, for every turn of the conversation (session dates where known).

    ``qa_per_turn=None``: every pair of every turn. ``qa_per_turn=k``: k pairs per turn (all if it has no more),
    taken in rotation: the j-th turn that has pairs starts at its pair ``j mod (its number of pairs)`` in the
    order who, when, what, photo, so a run of ordinary turns cycles who -> when -> what and a photo turn gives
    its photo pair one time in four. ``resolve_dates``: quotes and answers carry resolved relative dates
    ("yesterday (7 May 2023)"), as the "timestamped+dates" text does.
    """
    if qa_per_turn is not None and qa_per_turn < 1:
        raise ValueError(f"qa_per_turn must be None or at least 1, got {qa_per_turn!r}")
    source = conversation_only(conv)  # the conversation's own fields, whatever object was passed
    pairs: list[QAPair] = []
    rotation = 0
    for session in source.sessions:
        date = session_date(session.date_time)
        resolve_at = parsed_date_time(session.date_time) if resolve_dates else None
        for turn in session.turns:
            options = _turn_pairs(turn, date, resolve_at)
            if not options:
                continue
            if qa_per_turn is None or len(options) <= qa_per_turn:
                pairs += options
            else:
                pairs += [options[(rotation + i) % len(options)] for i in range(qa_per_turn)]
            rotation += 1
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Abstention: questions about what the conversation never mentions
# ----------------------------------------------------------------------------------------------------------------

# Subjects by kind, with question forms like LoCoMo's. "{s}" is a speaker, "{x}" the subject, "{a_x}" it with
# "a"/"an". A subject is only used if none of its words (or their stems) occurs anywhere in the conversation.
ABSTENTION_VOCABULARY: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "place": (
        ("Iceland", "Peru", "Morocco", "Norway", "Vietnam", "Kenya", "Argentina", "Egypt", "Finland", "Chile",
         "Croatia", "Mongolia", "Nepal", "Cuba", "Scotland", "Sweden", "Portugal", "Tanzania", "Madagascar",
         "Bolivia", "Estonia", "Jamaica", "Uruguay", "Slovenia", "Bhutan", "Namibia", "Ecuador", "Latvia",
         "Malta", "Cambodia", "Greenland", "Fiji", "Tasmania", "Patagonia"),
        ("When did {s} travel to {x}?", "What did {s} do on the trip to {x}?", "Why did {s} go to {x}?",
         "Who went to {x} with {s}?", "What did {s} say about the trip to {x}?"),
    ),
    "pet": (
        ("parrot", "hamster", "iguana", "ferret", "tortoise", "goldfish", "chinchilla", "hedgehog", "cockatoo",
         "pony", "alpaca", "gecko", "parakeet", "guinea pig", "axolotl", "tarantula", "canary", "donkey",
         "llama", "rooster"),
        ("What is the name of {s}'s {x}?", "When did {s} get {a_x}?", "How old is {s}'s {x}?",
         "What color is {s}'s {x}?"),
    ),
    "object": (
        ("motorcycle", "sailboat", "telescope", "harp", "trampoline", "drone", "accordion", "microscope",
         "saxophone", "treadmill", "typewriter", "chainsaw", "snowmobile", "jukebox", "harmonica", "unicycle",
         "hammock", "tractor", "canoe", "banjo", "tuba", "greenhouse", "metronome", "sewing machine"),
        ("When did {s} buy {a_x}?", "Why did {s} buy {a_x}?", "Where did {s} get the {x}?",
         "What color is {s}'s {x}?"),
    ),
    "activity": (
        ("archery", "fencing", "falconry", "beekeeping", "skydiving", "curling", "origami", "calligraphy",
         "taxidermy", "juggling", "knitting", "woodworking", "birdwatching", "sumo wrestling", "karate", "judo",
         "lacrosse", "rugby", "polo", "badminton", "snowboarding", "paragliding", "windsurfing", "embroidery",
         "crochet", "ventriloquism", "parkour", "fly fishing"),
        ("When did {s} take up {x}?", "How long has {s} been doing {x}?", "What got {s} into {x}?",
         "How often does {s} practice {x}?"),
    ),
    "language": (
        ("Icelandic", "Swahili", "Finnish", "Tagalog", "Hungarian", "Norwegian", "Korean", "Mandarin", "Polish",
         "Dutch", "Czech", "Welsh", "Latin", "Esperanto", "Hebrew", "Thai"),
        ("When did {s} start learning {x}?", "Why is {s} learning {x}?", "Who teaches {s} {x}?"),
    ),
    "person": (
        ("Thaddeus", "Bartholomew", "Ignatius", "Winifred", "Percival", "Ottoline", "Cornelius", "Evangeline",
         "Leopold", "Rosalind", "Barnaby", "Clementine", "Ezekiel", "Philippa", "Augustin", "Gwendolyn",
         "Horatio", "Marisol", "Desmond", "Imogen"),
        ("How did {s} meet {x}?", "What did {x} give {s}?", "What does {s} think of {x}?",
         "When did {s} last see {x}?"),
    ),
}

_stemmer = PorterStemmer()


def _conversation_words(source: Conversation) -> tuple[set[str], set[str]]:
    """Every lowercase word of the conversation (text, photo notes, speaker names) and their Porter stems."""
    text = conversation_text(source) + f"\n{source.speaker_a} {source.speaker_b}"
    words = set(re.findall(r"[a-z]+", text.lower()))
    return words, {_stemmer.stem(w) for w in words}


def mentions(source: Conversation, subject: str, words: tuple[set[str], set[str]] | None = None) -> bool:
    """Whether any word of ``subject`` occurs in the conversation: as a word, with the same Porter stem
    ("kayak" ~ "kayaking"), or as the start of a longer word ("Iceland" ~ "Icelandic"). Case-insensitive."""
    conv_words, conv_stems = words if words is not None else _conversation_words(source)
    for w in re.findall(r"[a-z]+", subject.lower()):
        if w in conv_words or _stemmer.stem(w) in conv_stems or any(c.startswith(w) for c in conv_words):
            return True
    return False


def _with_article(x: str) -> str:
    return ("an " if x[0].lower() in "aeiou" else "a ") + x


def abstention_pairs(conv: Conversation, n: int, seed: int) -> list[QAPair]:
    """``n`` questions about subjects the conversation never mentions, each answered ``ABSTENTION_ANSWER``.

    Built from the conversation alone (:func:`conversation_only`): a subject of :data:`ABSTENTION_VOCABULARY` is used
    only if :func:`mentions` finds none of its words in the conversation text. Each question pairs a subject with
    one of its kind's question forms and one of the two speakers (alternating, so both are asked about about
    equally). Deterministic given ``seed``; distinct subjects come first (a subject repeats, in another form or for
    the other speaker, only when every usable subject has been asked once). Fewer than ``n`` only if the
    vocabulary runs out.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    source = conversation_only(conv)  # the conversation's own fields, whatever object was passed
    words = _conversation_words(source)
    rng = random.Random(seed)
    subjects = [(kind, x) for kind, (xs, _) in ABSTENTION_VOCABULARY.items() for x in xs
                if not mentions(source, x, words)]
    rng.shuffle(subjects)
    speakers = (source.speaker_a, source.speaker_b)
    per_subject = []
    for i, (kind, x) in enumerate(subjects):
        forms = list(ABSTENTION_VOCABULARY[kind][1])
        rng.shuffle(forms)
        first, second = speakers if i % 2 == 0 else speakers[::-1]  # subjects alternate who is asked about first
        combos = [(f, first if j % 2 == 0 else second) for j, f in enumerate(forms)]
        combos += [(f, second if j % 2 == 0 else first) for j, f in enumerate(forms)]
        per_subject.append([QAPair(form.format(s=s, x=x, a_x=_with_article(x)), ABSTENTION_ANSWER)
                            for form, s in combos])
    out: list[QAPair] = []
    for r in range(max((len(c) for c in per_subject), default=0)):  # round r: the r-th form of every subject
        for combos in per_subject:
            if len(out) == n:
                return out
            if r < len(combos):
                out.append(combos[r])
    return out


# Contrastive abstention: the same questions, answerable or not depending on who said what
# ----------------------------------------------------------------------------------------------------------------
# LoCoMo's adversarial questions (category 5) are mostly about something the conversation does mention, asked of the
# wrong speaker ("What did Melanie realize after the charity race?" when Caroline ran it). The "unmentioned" style
# above asks about subjects nobody mentions, in forms the answerable templates never use, so an adapter can learn the
# form instead of the memory (on the full set it answered "Not mentioned" to 95% of answerable questions). The
# "contrastive" style asks every question form both ways: of the speaker who said the subject (answered from the
# turn) and of the other speaker, who never used the word (answered "Not mentioned"), plus one question in four about
# a subject the conversation never mentions. Only the words of the turns decide which is which.

ABSTENTION_STYLES = ("unmentioned", "contrastive")
CONTRASTIVE_FORMS = ("What did {s} say about {x}?", "When did {s} talk about {x}?")


def _turn_words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def _snippet_around(text: str, keyword: str, before: int = 4, words: int = SNIPPET_WORDS) -> str:
    """About ``words`` words of ``text`` starting a few words before the keyword's first occurrence."""
    tokens = text.split()
    at = next((i for i, t in enumerate(tokens) if keyword in t), 0)
    start = max(0, min(at - before, len(tokens) - words))
    return " ".join(tokens[start:start + words])


def contrastive_abstention_pairs(conv: Conversation, n: int, seed: int,
                                 resolve_dates: bool = False) -> tuple[list[QAPair], list[QAPair]]:
    """``n`` answerable and ``n`` unanswerable questions in the same forms (:data:`CONTRASTIVE_FORMS`), built from
    the conversation alone.

    Each turn with a keyword (:func:`queries.keyword`, the one the fewest turns use) gives a subject x said by its
    speaker s: the positive asks s ("What did s say about x?" -> the words around x in the turn; "When did s talk
    about x?" -> the session date).
    Three negatives in four ask the other speaker about such an x when none of that speaker's turns uses x's word
    (or its Porter stem); the fourth asks about a subject of :data:`ABSTENTION_VOCABULARY` the conversation never
    mentions. Negatives answer ``ABSTENTION_ANSWER``. Turns are drawn in a ``seed``-shuffled order; fewer than ``n``
    of each only if the conversation runs out of keywords (or of subjects), never more negatives than positives.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    source = conversation_only(conv)  # the conversation's own fields, whatever object was passed
    speakers = (source.speaker_a, source.speaker_b)
    names = {w.lower() for sp in speakers for w in _turn_words(sp)}
    turn_counts: dict[str, int] = {}
    spoken: dict[str, set[str]] = {sp: set() for sp in speakers}  # each speaker's words and their stems
    for session in source.sessions:
        for turn in session.turns:
            words = {w.lower() for w in _turn_words(turn.text)}
            for w in words:
                turn_counts[w] = turn_counts.get(w, 0) + 1
            spoken.setdefault(turn.speaker, set()).update(words | {_stemmer.stem(w) for w in words})
    candidates = []  # (speaker, keyword, snippet, date)
    for session in source.sessions:
        date = session_date(session.date_time)
        resolve_at = parsed_date_time(session.date_time) if resolve_dates else None
        for turn in session.turns:
            text = " ".join(turn.text.split())
            if resolve_at is not None:
                text = resolve_relative_dates(text, resolve_at)
            subject = keyword(text, names, turn_counts)
            if subject is not None:
                candidates.append((turn.speaker, subject, _snippet_around(text, subject), date))
    rng = random.Random(seed)
    rng.shuffle(candidates)

    def form(i: int, date: str | None) -> str:
        return CONTRASTIVE_FORMS[i % len(CONTRASTIVE_FORMS)] if date else CONTRASTIVE_FORMS[0]

    positives = []
    for i, (speaker, x, snippet, date) in enumerate(candidates[:n]):
        f = form(i, date)
        positives.append(QAPair(f.format(s=speaker, x=x), snippet if f == CONTRASTIVE_FORMS[0] else date))
    others = {speakers[0]: speakers[1], speakers[1]: speakers[0]}
    swapped = deque((others[sp], x) for sp, x, _, _ in candidates
                    if sp in others and x.lower() not in spoken[others[sp]]
                    and _stemmer.stem(x.lower()) not in spoken[others[sp]])
    conversation = _conversation_words(source)
    unmentioned = [x for _, (xs, _) in sorted(ABSTENTION_VOCABULARY.items()) for x in xs
                   if not mentions(source, x, conversation)]
    rng.shuffle(unmentioned)
    negatives: list[QAPair] = []
    for i in range(len(positives)):  # as many as the positives: the mix stays balanced
        if i % 4 == 3 and unmentioned:
            s, x = speakers[(i // 4) % 2], unmentioned.pop()
        elif swapped:
            s, x = swapped.popleft()
        elif unmentioned:
            s, x = speakers[i % 2], unmentioned.pop()
        else:
            break
        negatives.append(QAPair(CONTRASTIVE_FORMS[i % len(CONTRASTIVE_FORMS)].format(s=s, x=x), ABSTENTION_ANSWER))
    return positives, negatives


def _interleave(positives: list[QAPair], negatives: list[QAPair]) -> list[QAPair]:
    """The negatives spread evenly among the positives (the j-th after ((j+1) * P) // (N+1) positives)."""
    slots = [(j + 1) * len(positives) // (len(negatives) + 1) for j in range(len(negatives))]
    out, j = [], 0
    for i, pair in enumerate(positives):
        while j < len(negatives) and slots[j] == i:
            out.append(negatives[j])
            j += 1
        out.append(pair)
    return out + negatives[j:]


# ----------------------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ChatWindows:
    input_ids: torch.Tensor  # (N, seq_len)
    targets: torch.Tensor  # (N, seq_len): position t predicts token t+1; IGNORE_INDEX but on answers
    placed: list[tuple[int, int, int]]  # per exchange packed: (its index, its window, first target of its answer)


def pack_chat_windows(exchanges: list[tuple[str, list[int]]], tok: Tokenizer, seq_len: int,
                      question_template: str) -> ChatWindows:
    """Pack (question, answer token ids with the end marker) exchanges into multi-turn chats of at most seq_len
    tokens: the system turn once per window, as at question time, then user/assistant turns; targets only on the
    answers. An exchange too long for any window is left out (absent from ``placed``)."""
    system = tok.default_system_prompt
    head = tok.encode(tok.format_chat([{"role": "system", "content": system}], add_generation_prompt=False)
                      if system is not None else "")
    newline = tok.encode("\n")
    windows: list[tuple[list[int], list[int]]] = []
    ids, labels, placed = list(head), [IGNORE_INDEX] * len(head), []
    for i, (question, answer) in enumerate(exchanges):
        user = tok.encode(f"<|im_start|>user\n{question_template.format(question=question)}<|im_end|>\n"
                          "<|im_start|>assistant\n")
        n = len(user) + len(answer) + len(newline)
        if len(head) + n > seq_len:
            continue
        if len(ids) + n > seq_len:
            windows.append((ids, labels))
            ids, labels = list(head), [IGNORE_INDEX] * len(head)
        placed.append((i, len(windows), len(ids) + len(user) - 1))  # the position that predicts its first token
        ids += user + answer + newline
        labels += [IGNORE_INDEX] * len(user) + answer + [IGNORE_INDEX] * len(newline)
    if len(ids) > len(head):
        windows.append((ids, labels))
    input_ids = torch.full((len(windows), seq_len), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(windows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for w, (w_ids, w_labels) in enumerate(windows):
        input_ids[w, :len(w_ids)] = torch.tensor(w_ids)
        targets[w, :len(w_ids) - 1] = torch.tensor(w_labels[1:])  # position t predicts token t+1
    return ChatWindows(input_ids, targets, placed)


def chat_qa_windows(pairs: list[QAPair], tok: Tokenizer, seq_len: int, question_template: str):
    """(input_ids, targets) of the pairs packed into chat windows (:func:`pack_chat_windows`), the loss on each
    answer and its end marker."""
    if not pairs:
        raise ValueError("no question-answer pairs to train on")
    packed = pack_chat_windows([(p.question, tok.encode(f"{p.answer}<|im_end|>")) for p in pairs], tok, seq_len,
                               question_template)
    return packed.input_ids, packed.targets


@dataclass(frozen=True)
class Recipe:
    """What a conversation is turned into for training. Every default is the original experiment's.

    ``train_format`` joins parts with "+" (each once):
      text     next-token loss on the conversation text
      qa       template questions about quotes and dates (who said what, when), loss on the answers
      queries  questions covering each turn's statements in several phrasings (`queries`), loss on the answers
      distill  the same questions, the student matching a teacher that holds the session in context (`distill`)
      recite   the same questions, answered by reciting the turn with its date (for ``AnswerConfig.mode="recite"``)
    The other fields are the options documented at the top of this module; ``seq_len`` is the length of a training
    window; ``queries_per_turn`` and ``query_phrasings`` size the queries, distill and recite parts, and
    ``queries_from`` says what reads the turns for them: "rules" (`queries`) or "parser" (`facts`)."""

    train_format: str = "text"
    seq_len: int = 512
    timestamps: bool = False
    resolve_dates: bool = False
    qa_per_turn: int | None = None
    qa_source: str = "templates"
    abstention: bool = False
    abstention_ratio: float = 0.1
    abstention_style: str = "unmentioned"
    queries_per_turn: int | None = 2
    query_phrasings: int = 1  # chosen on the dev split (docs/memory.md)
    queries_from: str = "rules"
    distill_top_k: int = 16
    distill_temperature: float = 1.0
    distill_hard_weight: float = 0.0
    distill_answers: str = "teacher"

    def __post_init__(self):
        parts = self.train_format.split("+")
        if not parts or any(p not in TRAIN_PARTS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"train_format: unknown {self.train_format!r} (parts joined by '+', each once, from "
                             f"{', '.join(TRAIN_PARTS)})")
        if self.queries_per_turn is not None and self.queries_per_turn < 1 or self.query_phrasings < 1:
            raise ValueError(f"queries_per_turn and query_phrasings must be >= 1, got {self.queries_per_turn}, "
                             f"{self.query_phrasings}")
        if not 0 <= self.distill_hard_weight <= 1:
            raise ValueError(f"distill_hard_weight: must be in [0, 1], got {self.distill_hard_weight}")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(f"seq_len: must be at least {MIN_SEQ_LEN} tokens, got {self.seq_len}")
        if self.qa_per_turn is not None and self.qa_per_turn < 1:
            raise ValueError(f"qa_per_turn: must be None or at least 1, got {self.qa_per_turn!r}")
        if self.queries_from not in QUERY_SOURCES:
            raise ValueError(f"queries_from: unknown {self.queries_from!r} (choose from {', '.join(QUERY_SOURCES)})")
        if self.qa_source not in QA_SOURCES:
            raise ValueError(f"qa_source: unknown {self.qa_source!r} (choose from {', '.join(QA_SOURCES)})")
        if not 0 < self.abstention_ratio <= 1:
            raise ValueError(f"abstention_ratio: must be in (0, 1], got {self.abstention_ratio!r}")
        if self.abstention_style not in ABSTENTION_STYLES:
            raise ValueError(f"abstention_style: unknown abstention style {self.abstention_style!r} "
                             f"(choose from {', '.join(ABSTENTION_STYLES)})")
        if self.qa_source != "templates" and not self.has_qa:
            raise ValueError(f"qa_source={self.qa_source!r} applies to the qa formats or abstention only")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.train_format.split("+"))

    @property
    def has_qa(self) -> bool:
        """Whether question-answer pairs are trained (the qa part, or abstention questions beside the text)."""
        return "qa" in self.parts or self.abstention

    @property
    def needs_generated_qa(self) -> bool:
        """Whether the base model must first write questions about the turns (`generated_qa`)."""
        return self.qa_source != "templates" and self.has_qa

    @property
    def uses_queries(self) -> bool:
        return any(p in self.parts for p in ("queries", "distill", "recite"))

    @property
    def uses_chat(self) -> bool:
        """Whether any window is a chat of questions and answers (which must fit a system turn and one exchange)."""
        return self.has_qa or self.uses_queries

    @property
    def text_format(self) -> str:
        """The conversation text's format (`conversation.FORMATS`)."""
        return "timestamped+dates" if self.resolve_dates else ("timestamped" if self.timestamps else "raw")


# Shortest window worth training: room for a chat system turn and one short exchange.
MIN_SEQ_LEN = 16


def training_qa_pairs(conv: Conversation, recipe: Recipe, *, seed: int = 0,
                      generated: list[QAPair] | None = None) -> list[QAPair]:
    """The chat-QA pairs that :func:`training_data` trains on for ``recipe`` ([] for plain "text").

    ``qa_source``: "templates" (:func:`template_qa`), "model" (``generated``: the pairs the base model wrote,
    :mod:`lora_mem.lora_core.generated_qa`) or "both" (the generated pairs spread evenly among the template pairs).

    With ``abstention``, ``max(1, round(abstention_ratio * P))`` negatives (:func:`abstention_pairs`), where P is
    the number of template pairs (:func:`template_qa` with ``qa_per_turn``/``resolve_dates``): formats with qa mix
    them evenly into those P pairs; "text" trains them with as many template pairs, evenly spaced over the
    conversation, so that the model keeps answering rather than always abstaining. ``abstention_style``:
    "unmentioned" (:func:`abstention_pairs`) or "contrastive" (:func:`contrastive_abstention_pairs`: as many
    answerable questions in the negatives' forms come with them, in place of the text format's template pairs).
    ``seed`` picks the abstention questions.
    """
    if recipe.needs_generated_qa and generated is None:
        raise ValueError(f"qa_source={recipe.qa_source!r} needs the generated pairs (generated_qa.generate_qa)")
    source = conversation_only(conv)
    if not recipe.has_qa:
        return []
    pairs = template_qa(source, qa_per_turn=recipe.qa_per_turn, resolve_dates=recipe.resolve_dates)
    if recipe.qa_source == "model":
        pairs = list(generated)
    elif recipe.qa_source == "both":
        pairs = _interleave(pairs, list(generated))
    if not recipe.abstention:
        return pairs
    text_only = "qa" not in recipe.parts
    n = max(1, round(recipe.abstention_ratio * len(pairs)))
    if recipe.abstention_style == "contrastive":
        positives, negatives = contrastive_abstention_pairs(source, n, seed, resolve_dates=recipe.resolve_dates)
        mixed = _interleave(positives, negatives)
        return mixed if text_only else _interleave(pairs, mixed)
    negatives = abstention_pairs(source, n, seed)
    if text_only:  # as many positives as negatives, spread over the conversation
        k = min(len(negatives), len(pairs))
        pairs = [pairs[i * len(pairs) // k] for i in range(k)] if k else []
    return _interleave(pairs, negatives)


def recipe_queries(conv: Conversation, recipe: Recipe) -> list[Query]:
    """The questions the queries, distill and recite parts ask about ``conv``: read from its turns by rules
    (`queries`) or by a dependency parser (`facts`)."""
    if recipe.queries_from == "parser":
        return fact_queries(conv, wordings=recipe.query_phrasings, per_turn=recipe.queries_per_turn)
    return coverage_queries(conv, phrasings=recipe.query_phrasings, per_turn=recipe.queries_per_turn)


# The instruction of the recite part and of recite-then-answer: the adapter says the turn a question is about.
RECITE_TEMPLATE = "Recite the message of our conversation that answers the question.\nQuestion: {question}"
RECITATION_WORDS = 60


def recitation_pairs(conv: Conversation, queries: list[Query]) -> list[QAPair]:
    """Each query (its first phrasing per fact and turn: the key) with the recitation of its turn (the value):
    "On 8 May 2023, Caroline said: <the turn, relative dates resolved>"; a turn no query asks about is keyed by
    "What did <speaker> say on <date>?"."""
    source = conversation_only(conv)
    header, line = FORMATS["timestamped+dates"]
    recitation, keyed = {}, {}
    for session in source.sessions:
        for turn in session.turns:
            recitation[turn.dia_id] = _words(line(source, session, turn), RECITATION_WORDS)
            keyed[turn.dia_id] = f"What did {turn.speaker} say on {session_date(session.date_time)}?" \
                if session.date_time else None
    pairs, asked = [], set()
    for q in queries:
        if q.dia_id in recitation and (q.dia_id, q.kind) not in asked:
            asked.add((q.dia_id, q.kind))
            pairs.append(QAPair(q.question, recitation[q.dia_id]))
    for dia_id, key in keyed.items():
        if key and not any(d == dia_id for d, _ in asked):
            pairs.append(QAPair(key, recitation[dia_id]))
    return pairs


def training_data(conv: Conversation, tok: Tokenizer, recipe: Recipe, question_template: str, *, seed: int = 0,
                  generated: list[QAPair] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets) windows of one conversation under ``recipe``, in order: the conversation text in
    ``recipe.text_format`` (the "text" part), the chat-QA pairs of :func:`training_qa_pairs`, the coverage
    queries with their answers ("queries"), the recitations ("recite"), each packed into ``recipe.seq_len``-token
    windows. The "distill" part needs the teacher: `memory.Memory.training_data` adds it. The recipe's defaults
    give exactly the original experiment's data."""
    pairs = training_qa_pairs(conv, recipe, seed=seed, generated=generated)
    source = conversation_only(conv)
    queries = recipe_queries(source, recipe) if recipe.uses_queries else []
    parts = []
    if "text" in recipe.parts:
        text = conversation_text(source, format=recipe.text_format)
        parts.append(make_lm_windows(tok.encode(text), recipe.seq_len, tok.pad_id))
    if pairs:
        parts.append(chat_qa_windows(pairs, tok, recipe.seq_len, question_template))
    if "queries" in recipe.parts and queries:
        parts.append(chat_qa_windows([QAPair(*q.pair) for q in queries], tok, recipe.seq_len, question_template))
    if "recite" in recipe.parts:
        parts.append(chat_qa_windows(recitation_pairs(source, queries), tok, recipe.seq_len, RECITE_TEMPLATE))
    if not parts:
        if recipe.parts == ("distill",):  # the teacher's part alone: nothing model-free to add
            return (torch.empty(0, recipe.seq_len, dtype=torch.long),) * 2
        raise ConversationError(f"{conv.sample_id}: no training data for train_format={recipe.train_format!r}, "
                                f"qa_source={recipe.qa_source!r}: no question-answer pairs")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
