"""Question-answer pairs about a conversation, written by the base model itself (`--qa-source model`).

The template questions of `lora_mem.lora_core.recipes` ask about quotes ("Who said ..."); a capable model can ask
what a reader would ("What is the name of Tom's puppy?"). For every turn of the conversation the base
model (no adapter) gets a one-shot prompt with the turn and its session date, and continues an assistant
turn that starts with "Question:". Its continuation is parsed as one question and one answer, and kept
only if it is grounded: every content word of the answer occurs in the turn (its text, speaker, date or
photo caption) and the question is not the answer. Ungrounded pairs are counted and dropped, so a model
too small to follow the prompt yields few pairs rather than wrong ones.

Like every training input, it is built from the conversation alone (`conversation_only`): LoCoMo's `qa`, `evidence`,
observations and summaries never reach the prompt.

The pairs are cached per conversation and model under `<cache>/generated-qa/<model>/` (cache:
`$LORA_MEM_HOME` or `~/.cache/lora-mem`, see `lora_mem.home`), keyed by a hash of the model, the generation settings, the
prompt and the conversation's text; the file records all of them and every raw generation (parsing and the
filter are cheap and run again on every read, so changing them needs no new generation).

    python -m bench.analysis.generated_qa --conversations conv-26 --max-turns 20 --out bench/results/generated_qa_sample.json
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_mem.files import atomic_write_json
from lora_mem.home import cache_dir as lora_mem_cache
from lora_mem.lora_core.conversation import Conversation, Turn, conversation_only, photo_note, session_date
from lora_mem.lora_core.inject import lora_disabled
from lora_mem.lora_core.queries import STOP_WORDS
from lora_mem.lora_core.recipes import ANSWER_WORDS, QAPair
from lora_mem.model.generate import generate
from lora_mem.untrusted import slug

CACHE_VERSION = 1  # bump when what is generated changes (parsing and filtering are redone on every read)
ONE_SHOT = (
    "Write a question about the message and its short answer.\n\n"
    'Message (12 March 2021) Tom: "I just adopted a puppy named Rex from the shelter."\n'
    "Question: What is the name of the puppy Tom adopted?\nAnswer: Rex\n\n"
    'Message ({date}) {speaker}: "{text}"\n'
)
ASSISTANT_START = "Question:"  # the assistant turn is begun for the model, so it answers in the format
MIN_TURN_WORDS = 4  # greetings and one-word replies hold no fact to ask about


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 40
    batch_size: int = 64


@dataclass
class GeneratedQA:
    pairs: list[QAPair]  # the grounded ones
    cache_file: Path | None = None
    records: list[dict] = field(default_factory=list)  # per turn asked: the turn, raw text, pair, kept

    @property
    def generated(self) -> int:
        return len(self.records)

    @property
    def kept(self) -> int:
        return len(self.pairs)


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS}


def turn_text(turn: Turn) -> str:
    text = " ".join(turn.text.split())
    return f"{text} {photo_note(turn.blip_caption)}" if turn.blip_caption else text


def askable_turns(source: Conversation) -> list[tuple[str, Turn]]:
    """(session date, turn) for every dated turn with something to ask about, in conversation order."""
    out = []
    for session in source.sessions:
        date = session_date(session.date_time)
        if date is None:
            continue
        out += [(date, t) for t in session.turns if len(t.text.split()) >= MIN_TURN_WORDS]
    return out


def parse_generated(text: str) -> QAPair | None:
    """The first question and answer of a continuation of "Question:" (None if it has no answer line)."""
    m = re.match(r"\s*(?P<q>[^\n]+?)\s*\n+\s*Answer:\s*(?P<a>[^\n]+)", text)
    if not m:
        return None
    question, answer = m.group("q").strip(), m.group("a").strip()
    if not question.endswith("?") or not answer:
        return None
    return QAPair(question, " ".join(answer.split()[:ANSWER_WORDS]))


_QUESTION_WORDS = frozenset("what which who whom whose when where why how did does do name called kind".split())


def grounded(pair: QAPair, date: str, turn: Turn, speakers: tuple[str, ...] = ()) -> bool:
    """A pair about this turn, answered from it:
    - every content word of the answer is in the turn (text, photo caption, speaker, session date), and at least
      one is not a speaker's name (small models answer "the name of ..." with whoever is speaking or addressed;
      `speakers`: the conversation's two, besides the turn's own);
    - the question shares a content word with the turn's text (not a question about the prompt's example);
    - the question does not contain the whole answer ("Who adopted Biscuit? -> Biscuit")."""
    answer, question = _content_words(pair.answer), _content_words(pair.question)
    speaker = _content_words(" ".join((turn.speaker, *speakers)))
    said = _content_words(f"{date} {turn_text(turn)}") - speaker
    return (bool(answer) and answer <= said | speaker and bool(answer & said)
            and bool((question - _QUESTION_WORDS - speaker) & said) and not answer <= question)


def _records(turns: list[tuple[str, Turn]], raws: list[str], speakers: tuple[str, ...]) -> list[dict]:
    """Parse and filter each turn's generation (cheap, so done on every read: the cache holds generations)."""
    records = []
    for (date, turn), raw in zip(turns, raws):
        pair = parse_generated(raw)
        records.append({"date": date, "speaker": turn.speaker, "dia_id": turn.dia_id, "raw": raw,
                        "question": pair.question if pair else None, "answer": pair.answer if pair else None,
                        "kept": pair is not None and grounded(pair, date, turn, speakers)})
    return records


def _key(model_id: str, settings: GenerationSettings, turns: list[tuple[str, Turn]]) -> str:
    h = hashlib.sha256()
    conversation = [(d, t.speaker, turn_text(t)) for d, t in turns]
    h.update(json.dumps([CACHE_VERSION, model_id, asdict(settings), ONE_SHOT, ASSISTANT_START, conversation])
             .encode())
    return h.hexdigest()[:16]


def generate_qa(conv: Conversation, lm, settings: GenerationSettings = GenerationSettings(), *,
                cache_dir: Path | None = None, max_turns: int | None = None, progress: bool = False) -> GeneratedQA:
    """Grounded QA pairs the base model (`lm`, adapters disabled) writes about each turn; cached."""
    source = conversation_only(conv)  # the conversation only: no qa, observations or summaries
    turns = askable_turns(source)[:max_turns]
    model_id = f"{lm.name}@{lm.path}"
    cache = Path(cache_dir) if cache_dir is not None else lora_mem_cache("generated-qa")
    path = cache / slug(lm.name, "model") / f"{slug(conv.sample_id, 'model')}-{_key(model_id, settings, turns)}.json"
    if path.is_file():
        raws = json.loads(path.read_text())["raw"]
    else:
        tok = lm.tokenizer
        prompts = [tok.encode_chat([{"role": "user", "content": ONE_SHOT.format(date=d, speaker=t.speaker,
                                                                               text=turn_text(t))}])
                   + tok.encode(ASSISTANT_START) for d, t in turns]
        with lora_disabled(lm.model):  # the base model writes the data, whatever adapter is loaded
            outs = generate(lm.model, prompts, settings.max_new_tokens, tok.stop_ids, tok.pad_id,
                            batch_size=settings.batch_size, progress=progress) if prompts else []
        raws = [tok.decode(o) for o in outs]
        atomic_write_json(path, {"sample_id": conv.sample_id, "model": model_id, "cache_version": CACHE_VERSION,
                                 "settings": asdict(settings), "prompt": ONE_SHOT,
                                 "assistant_start": ASSISTANT_START, "turns": len(turns), "raw": raws})
    records = _records(turns, raws, (source.speaker_a, source.speaker_b))
    kept = [QAPair(r["question"], r["answer"]) for r in records if r["kept"]]
    return GeneratedQA(kept, path, records)
