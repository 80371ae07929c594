"""LoCoMo data: locating, loading, validating, and formatting the conversation as training text.

Layout of the canonical ``locomo10.json`` (see ``/work/shared/docs/mission.md``): a list of samples, each with
``sample_id``, ``conversation`` (``speaker_a``, ``speaker_b``, ``session_<n>_date_time``, ``session_<n>``: list of
turns ``{speaker, dia_id, text[, img_url, blip_caption, query]}``), ``observation``, ``session_summary``,
``event_summary`` and ``qa`` (``{question, answer, evidence, category[, adversarial_answer]}``).

Leakage rule: ONLY the ``conversation`` field may feed training text. The loader keeps nothing of ``observation``,
``session_summary`` or ``event_summary`` (they are generated/annotated extras that summarise the facts), and the
formatting functions (:func:`conversation_text`, :func:`session_texts`) read only ``speaker_a``, ``speaker_b`` and
``sessions`` -- never ``qa``. :func:`training_source` returns the QA-free view of a sample that trainers should hold.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "CATEGORY_NAMES",
    "LOCOMO_URL",
    "LocomoDataError",
    "Turn",
    "Session",
    "QA",
    "Sample",
    "resolve_data_path",
    "default_cache_path",
    "download_file",
    "load_locomo",
    "select_questions",
    "training_source",
    "parse_session_datetime",
    "photo_note",
    "session_texts",
    "conversation_text",
    "FORMATS",
    "iter_samples",
]

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}

LOCOMO_URL = "https://raw.githubusercontent.com/snap-research/locomo/main/data/locomo10.json"

_HOW_TO_GET = (
    "Get locomo10.json from the official LoCoMo repository "
    f"({LOCOMO_URL}, repo https://github.com/snap-research/locomo) and pass it with --data PATH "
    "or the LOCOMO_DATA environment variable."
)


class LocomoDataError(ValueError):
    """Any problem locating, reading or validating LoCoMo data. Messages name file, sample, field and value."""


# ----------------------------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    speaker: str
    dia_id: str
    text: str
    blip_caption: str | None = None


@dataclass(frozen=True)
class Session:
    index: int  # the <n> of session_<n>
    date_time: str | None  # raw LoCoMo string, e.g. "1:56 pm on 8 May, 2023"
    turns: list[Turn]

    def parsed_datetime(self) -> datetime:
        """The parsed ``date_time`` (raises :class:`LocomoDataError` if absent or unparseable)."""
        if self.date_time is None:
            raise LocomoDataError(f"session_{self.index} has no date_time")
        return parse_session_datetime(self.date_time)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # always a string (numbers in the JSON are str()-ed); "" for category 5 without an answer
    category: int
    evidence: list[str] = field(default_factory=list)
    adversarial_answer: str | None = None

    @property
    def category_name(self) -> str:
        return CATEGORY_NAMES[self.category]


@dataclass(frozen=True)
class Sample:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: list[Session]  # numeric session order (session_2 before session_10)
    qa: list[QA] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


# ----------------------------------------------------------------------------------------------------------------
# Locating the file
# ----------------------------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$LORA_MEM_CACHE/data/locomo10.json`` or ``~/.cache/lora-mem/data/locomo10.json``."""
    root = os.environ.get("LORA_MEM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-mem")
    return Path(root) / "data" / "locomo10.json"


def download_file(url: str, dest: Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, then rename), with a tqdm bar.

    The payload must parse as a JSON list (guards against caching an HTML error page). Raises on any failure;
    callers turn that into a :class:`LocomoDataError`.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        with open(tmp, encoding="utf-8") as f:
            if not isinstance(json.load(f), list):
                raise ValueError(f"downloaded content from {url} is not a JSON list")
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dest


def resolve_data_path(data: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Where locomo10.json is: ``--data PATH``, else ``$LOCOMO_DATA``, else the cache, else download into the cache.

    An explicit path (``data`` or ``LOCOMO_DATA``) that does not exist is an error naming it; it never falls
    through to the download. A failing download (offline, ...) raises one clear :class:`LocomoDataError`.
    """
    if data is not None and str(data) != "":
        p = Path(data).expanduser()
        if not p.is_file():
            raise LocomoDataError(f"--data {str(data)!r}: no such file. {_HOW_TO_GET}")
        return p
    env = os.environ.get("LOCOMO_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise LocomoDataError(f"LOCOMO_DATA={env!r}: no such file. {_HOW_TO_GET}")
        return p
    cached = default_cache_path()
    if cached.is_file():
        return cached
    if not download:
        raise LocomoDataError(f"LoCoMo data not found (no --data, no LOCOMO_DATA, no cache at {cached}). {_HOW_TO_GET}")
    try:
        download_file(LOCOMO_URL, cached)
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear message
        raise LocomoDataError(
            f"LoCoMo data not found locally (no --data, no LOCOMO_DATA, no cache at {cached}) and the download "
            f"from {LOCOMO_URL} failed ({type(e).__name__}: {e}). {_HOW_TO_GET}"
        ) from e
    return cached


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------

_SESSION_RE = re.compile(r"session_(\d+)")


def _err(path: Path, where: str, msg: str) -> LocomoDataError:
    return LocomoDataError(f"{path}: {where}: {msg}")


def _req_str(obj: dict, key: str, path: Path, where: str, *, allow_number: bool = False) -> str:
    if key not in obj:
        raise _err(path, where, f"missing field {key!r}")
    v = obj[key]
    if isinstance(v, str):
        return v
    if allow_number and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise _err(path, where, f"field {key!r} must be a string, got {type(v).__name__} {v!r}")


def _parse_turn(t, path: Path, where: str) -> Turn:
    if not isinstance(t, dict):
        raise _err(path, where, f"turn must be an object, got {type(t).__name__} {t!r:.80}")
    speaker = _req_str(t, "speaker", path, where)
    text = _req_str(t, "text", path, where)
    dia_id = t.get("dia_id", "")
    cap = t.get("blip_caption")
    if cap is not None and not isinstance(cap, str):
        raise _err(path, where, f"field 'blip_caption' must be a string, got {type(cap).__name__} {cap!r}")
    return Turn(speaker=speaker, dia_id=str(dia_id), text=text, blip_caption=cap or None)


def _parse_conversation(conv, path: Path, sid: str) -> tuple[str, str, list[Session]]:
    where = f"sample {sid!r}"
    if not isinstance(conv, dict):
        raise _err(path, where, f"field 'conversation' must be an object, got {type(conv).__name__}")
    speaker_a = _req_str(conv, "speaker_a", path, f"{where} conversation")
    speaker_b = _req_str(conv, "speaker_b", path, f"{where} conversation")
    indices = sorted(int(m.group(1)) for k in conv if (m := _SESSION_RE.fullmatch(k)))
    sessions = []
    for n in indices:
        key = f"session_{n}"
        turns = conv[key]
        if not isinstance(turns, list):
            raise _err(path, f"{where} field {key!r}", f"session must be a list of turns, got {type(turns).__name__} {turns!r:.80}")
        dt = conv.get(f"{key}_date_time")
        if dt is not None and not isinstance(dt, str):
            raise _err(path, f"{where} field '{key}_date_time'", f"must be a string, got {type(dt).__name__} {dt!r}")
        parsed = [_parse_turn(t, path, f"{where} {key} turn {i}") for i, t in enumerate(turns)]
        sessions.append(Session(index=n, date_time=dt, turns=parsed))
    return speaker_a, speaker_b, sessions


def _parse_qa(q, path: Path, sid: str, i: int) -> QA:
    where = f"sample {sid!r} qa[{i}]"
    if not isinstance(q, dict):
        raise _err(path, where, f"qa entry must be an object, got {type(q).__name__}")
    question = _req_str(q, "question", path, where)
    if "category" not in q:
        raise _err(path, where, "missing field 'category'")
    cat = q["category"]
    if isinstance(cat, bool) or not isinstance(cat, int) or cat not in CATEGORY_NAMES:
        raise _err(path, where, f"field 'category' has unknown value {cat!r} (expected one of {sorted(CATEGORY_NAMES)})")
    if cat == 5:
        answer = "" if q.get("answer") is None else _req_str(q, "answer", path, where, allow_number=True)
        adv = q.get("adversarial_answer")
        adv = None if adv is None else _req_str(q, "adversarial_answer", path, where, allow_number=True)
    else:
        answer = _req_str(q, "answer", path, where, allow_number=True)
        adv = None
    ev = q.get("evidence", [])
    if not isinstance(ev, list):
        raise _err(path, where, f"field 'evidence' must be a list, got {type(ev).__name__} {ev!r}")
    return QA(question=question, answer=answer, category=cat, evidence=[str(e) for e in ev], adversarial_answer=adv)


def load_locomo(path: str | os.PathLike) -> list[Sample]:
    """Load and validate a LoCoMo JSON file. Every problem raises :class:`LocomoDataError`."""
    path = Path(path)
    if not path.is_file():
        raise LocomoDataError(f"{path}: no such file. {_HOW_TO_GET}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise LocomoDataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from e
    except UnicodeDecodeError as e:
        raise LocomoDataError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(raw, list):
        raise LocomoDataError(f"{path}: top level must be a list of samples, got {type(raw).__name__}")
    samples = []
    seen = set()
    for k, s in enumerate(raw):
        if not isinstance(s, dict):
            raise _err(path, f"sample #{k}", f"must be an object, got {type(s).__name__}")
        if "sample_id" not in s:
            raise _err(path, f"sample #{k}", "missing field 'sample_id'")
        sid = str(s["sample_id"])
        if sid in seen:
            raise _err(path, f"sample #{k}", f"duplicate sample_id {sid!r}")
        seen.add(sid)
        for key in ("conversation", "qa"):
            if key not in s:
                raise _err(path, f"sample {sid!r}", f"missing field {key!r}")
        if not isinstance(s["qa"], list):
            raise _err(path, f"sample {sid!r}", f"field 'qa' must be a list, got {type(s['qa']).__name__}")
        a, b, sessions = _parse_conversation(s["conversation"], path, sid)
        qa = [_parse_qa(q, path, sid, i) for i, q in enumerate(s["qa"])]
        samples.append(Sample(sample_id=sid, speaker_a=a, speaker_b=b, sessions=sessions, qa=qa))
    return samples


def select_questions(sample: Sample, with_adversarial: bool = False, max_questions: int | None = None) -> list[QA]:
    """Questions of categories 1-4 (plus 5 with ``with_adversarial``), in file order, at most ``max_questions``."""
    cats = {1, 2, 3, 4, 5} if with_adversarial else {1, 2, 3, 4}
    out = [q for q in sample.qa if q.category in cats]
    return out if max_questions is None else out[: max(0, max_questions)]


def training_source(sample: Sample) -> Sample:
    """The view of a sample that may feed training: speakers and sessions only, ``qa`` emptied.

    ``observation``, ``session_summary`` and ``event_summary`` are never loaded at all. Trainers should hold this
    object, not the full sample, so that questions/answers cannot leak into the training text.
    """
    return replace(sample, qa=[])


# ----------------------------------------------------------------------------------------------------------------
# Dates
# ----------------------------------------------------------------------------------------------------------------

_MONTHS = {
    m: i + 1
    for i, names in enumerate(
        [("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",), ("june", "jun"),
         ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"), ("october", "oct"),
         ("november", "nov"), ("december", "dec")]
    )
    for m in names
}

_DT_RE = re.compile(
    r"^\s*(?:(?P<h>\d{1,2})(?::(?P<mi>\d{2}))?\s*(?P<ap>[ap])\.?\s*m\.?\s*,?\s*(?:on\s+)?)?"
    r"(?P<d>\d{1,2})(?:st|nd|rd|th)?\s+(?P<mon>[A-Za-z]+)\.?\s*,?\s*(?P<y>\d{4})\s*$",
    re.IGNORECASE,
)


def parse_session_datetime(s: str) -> datetime:
    """Parse LoCoMo session dates: ``"1:56 pm on 8 May, 2023"``, ``"10:37 am on 27 June, 2023"``.

    Tolerates case, missing comma, abbreviated months, ``a.m.``, and a missing time (-> midnight).
    """
    m = _DT_RE.match(s) if isinstance(s, str) else None
    if not m:
        raise LocomoDataError(f"unparseable session date {s!r} (expected like '1:56 pm on 8 May, 2023')")
    mon = _MONTHS.get(m.group("mon").lower())
    if mon is None:
        raise LocomoDataError(f"unparseable session date {s!r}: unknown month {m.group('mon')!r}")
    hour, minute = 0, 0
    if m.group("h") is not None:
        hour, minute = int(m.group("h")), int(m.group("mi") or 0)
        if not 1 <= hour <= 12 or minute > 59:
            raise LocomoDataError(f"unparseable session date {s!r}: bad time")
        hour = hour % 12 + (12 if m.group("ap").lower() == "p" else 0)
    try:
        return datetime(int(m.group("y")), mon, int(m.group("d")), hour, minute)
    except ValueError as e:
        raise LocomoDataError(f"unparseable session date {s!r}: {e}") from e


def _day_month_year(dt: datetime) -> str:
    return f"{dt.day} {dt.strftime('%B')} {dt.year}"  # "8 May 2023" (locale-independent for C/en locales)


# ----------------------------------------------------------------------------------------------------------------
# Training text -- THE one place it is formatted
# ----------------------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Collapse internal whitespace/newlines so that each turn is exactly one line."""
    return " ".join(text.split())


def photo_note(caption: str) -> str:
    """``"a photo of a dog"`` -> ``"[shares a photo of a dog]"``; BLIP's ``"a photography of"`` is read as a photo."""
    cap = _clean(caption)
    low = cap.lower()
    if low.startswith("a photography of "):
        cap = "a photo of " + cap[len("a photography of "):]
    elif not low.startswith("a photo of ") and not low.startswith("a picture of "):
        cap = "a photo: " + cap
    return f"[shares {cap}]"


def _turn_body(turn: Turn) -> str:
    text = _clean(turn.text)
    if turn.blip_caption:
        note = photo_note(turn.blip_caption)
        text = f"{text} {note}" if text else note
    return text


# A format = (session header or None, turn line). Add variants here; nothing else formats training text.
def _raw_header(sample: Sample, session: Session) -> str | None:
    return None


def _raw_turn(sample: Sample, session: Session, turn: Turn) -> str:
    return f"{turn.speaker}: {_turn_body(turn)}"


def _ts_header(sample: Sample, session: Session) -> str | None:
    return f"Session {session.index} — {session.date_time}" if session.date_time else f"Session {session.index}"


def _ts_turn(sample: Sample, session: Session, turn: Turn) -> str:
    if not session.date_time:
        return f"{turn.speaker} said: {_turn_body(turn)}"
    try:
        dt = parse_session_datetime(session.date_time)
    except LocomoDataError as e:
        raise LocomoDataError(f"sample {sample.sample_id!r} session_{session.index}_date_time: {e}") from None
    return f"On {_day_month_year(dt)}, {turn.speaker} said: {_turn_body(turn)}"


FORMATS: dict[str, tuple[Callable[[Sample, Session], str | None], Callable[[Sample, Session, Turn], str]]] = {
    "raw": (_raw_header, _raw_turn),  # the original experiment: "Speaker: text", no dates
    "timestamped": (_ts_header, _ts_turn),  # session header with date + "On 8 May 2023, X said: text"
}


def session_texts(sample: Sample, timestamps: bool = False, *, format: str | None = None) -> list[str]:
    """One string per session (same formatting as :func:`conversation_text`), e.g. for per-session chunking."""
    name = format or ("timestamped" if timestamps else "raw")
    if name not in FORMATS:
        raise ValueError(f"unknown conversation format {name!r} (known: {sorted(FORMATS)})")
    header, line = FORMATS[name]
    out = []
    for session in sample.sessions:  # reads only speakers/sessions: never qa
        lines = []
        h = header(sample, session)
        if h is not None:
            lines.append(h)
        lines.extend(line(sample, session, t) for t in session.turns)
        out.append("\n".join(lines))
    return out


def conversation_text(sample: Sample, timestamps: bool = False, *, format: str | None = None) -> str:
    """The training text of one conversation.

    Default (``"raw"``, faithful to the original experiment): ``Speaker: text`` one turn per line, sessions in
    order separated by a blank line, no dates; a shared photo adds ``[shares a photo of ...]`` from its BLIP
    caption. ``timestamps=True`` (``"timestamped"``): each session opens with ``Session 3 — 1:56 pm on 8 May, 2023``
    and each turn reads ``On 8 May 2023, Caroline said: text``.
    """
    return "\n\n".join(session_texts(sample, timestamps, format=format))


def iter_samples(samples: Iterable[Sample], ids: Iterable[str] | None = None) -> list[Sample]:
    """Samples whose ``sample_id`` is in ``ids`` (all if None), in file order; unknown ids are an error."""
    samples = list(samples)
    if ids is None:
        return samples
    want = list(ids)
    known = {s.sample_id for s in samples}
    missing = [i for i in want if i not in known]
    if missing:
        raise LocomoDataError(f"unknown sample_id(s) {missing} (known: {sorted(known)})")
    keep = set(want)
    return [s for s in samples if s.sample_id in keep]
