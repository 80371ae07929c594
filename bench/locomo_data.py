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
from datetime import date, datetime, timedelta
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
    "resolve_relative_dates",
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
# Relative dates, resolved the way a reader would from the session's date alone
# ----------------------------------------------------------------------------------------------------------------
#
# "I went to a support group yesterday" said on 8 May 2023 -> "... yesterday (7 May 2023)". The annotation is
# computed from the session date and the words of the turn only (never from the QA annotations). Each rule below
# is one row: a pattern and a function (match, session day, the sentence around the match) -> the text to put in
# brackets after the expression, or None to leave it untouched. Conventions (documented per row):
#   - a week runs Monday-Sunday; a weekend is named by its Saturday ("the weekend of 6 May 2023");
#   - seasons are the northern meteorological ones (spring Mar-May, summer Jun-Aug, fall Sep-Nov, winter Dec-Feb);
#   - "last <weekday>" is the most recent such day strictly before the session date, "next <weekday>" the first
#     strictly after it; "on/this <weekday>" and "this weekend" look at the tense of their sentence (below);
#   - vague amounts ("a few days ago", "the other day") get a vague but anchored annotation
#     ("a few days before 8 May 2023"); "a couple of" counts as two.
# Left untouched: "the/my/his/... last week" (a final week, not a date), "today's" (often generic: "today's
# world"), bare weekdays, "recently"/"lately", "last time"/"last talked" (not a unit of time), hours and minutes.

_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December")

# Weekday spellings -> date.weekday() (Monday = 0). The abbreviations "mon", "wed", "sat" and "sun" are left out:
# "when I last sat down", "the last sun of summer" read as words, not days.
_WEEKDAY_NUMBERS = {"monday": 0, "tuesday": 1, "tues": 1, "tue": 1, "wednesday": 2, "thursday": 3, "thurs": 3,
                    "thur": 3, "thu": 3, "friday": 4, "fri": 4, "saturday": 5, "sunday": 6}

# Amounts before "... ago": None = vague ("a few"), resolved to "a few <unit>s before <anchor>".
_AMOUNTS: dict[str, int | None] = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a couple of": 2, "a couple": 2, "couple of": 2,
    "a few": None, "few": None, "several": None,
}

_SEASON_FIRST_MONTH = {"spring": 3, "summer": 6, "fall": 9, "autumn": 9, "winter": 12}

# Words before "last/next/past ..." that make it an adjective, not a date: "my last week at work", "the next month".
# ("her", "that" and "one" are not here: "I saw her last week", "I told you that last week", "I tried one last
# week" are dates.)
_DETERMINERS = {"the", "a", "an", "my", "your", "his", "its", "our", "their", "these", "those", "every", "each",
                "whose"}

# Tense of the sentence around "on Friday" / "this Friday" / "this weekend": "I won on Friday" is the Friday
# before the session, "on Sunday I am going on a picnic" the Sunday after. A cue list, not a parser: when the
# sentence has cues of one tense only, that tense decides; otherwise the rule's default applies.
_FUTURE_CUES = re.compile(
    r"\b(?:will|won't|shall|gonna|wanna|going to|plan(?:s|ning)? to|planning|can't wait|cannot wait|"
    r"looking forward|hope to|let's|let`s)\b|['’]ll\b|"
    r"\b(?:i'm|i am|we're|we are|you're|you are|he's|he is|she's|she is|they're|they are)\s+(?:\w+\s+)?\w+ing\b",
    re.IGNORECASE,
)
_PAST_CUES = re.compile(
    r"\b(?:was|were|had|did|went|got|took|made|saw|ran|won|found|came|met|bought|spent|felt|gave|told|began|"
    r"left|heard|thought|\w{3,}ed)\b",
    re.IGNORECASE,
)
_NOT_PAST = {"excited", "interested", "tired", "pleased", "thrilled", "stressed", "scared", "bored", "worried",
             "amazed", "inspired", "motivated", "blessed", "stoked", "pumped", "prepared", "determined", "exceed",
             "proceed", "succeed"}


def _dmy(d: date) -> str:
    return f"{d.day} {_MONTH_NAMES[d.month - 1]} {d.year}"  # "7 May 2023", as LoCoMo's gold answers read


def _month_year(year: int, month: int) -> str:
    return f"{_MONTH_NAMES[month - 1]} {year}"


def _add_months(d: date, k: int) -> tuple[int, int]:
    """(year, month) k months after d's month (k may be negative)."""
    n = d.year * 12 + (d.month - 1) + k
    return n // 12, n % 12 + 1


def _weekday_before(d: date, wd: int) -> date:
    """The most recent weekday ``wd`` strictly before d (a week back if d is that weekday)."""
    return d - timedelta(days=(d.weekday() - wd - 1) % 7 + 1)


def _weekday_after(d: date, wd: int) -> date:
    """The first weekday ``wd`` strictly after d."""
    return d + timedelta(days=(wd - d.weekday() - 1) % 7 + 1)


def _weekend_before(d: date) -> date:
    """Saturday of the last whole weekend before d (said on a Saturday or Sunday: the one before that)."""
    saturday = d - timedelta(days=(d.weekday() - 5) % 7)  # the most recent Saturday, d itself included
    return saturday - timedelta(weeks=1) if d.weekday() >= 5 else saturday


def _weekend_after(d: date) -> date:
    """Saturday of the first weekend starting after d."""
    return _weekday_after(d, 5)


def _tense(sentence: str) -> str | None:
    """'past' or 'future' when the sentence has cues of that tense only, else None."""
    future = bool(_FUTURE_CUES.search(sentence))
    past = any(m.group(0).lower() not in _NOT_PAST for m in _PAST_CUES.finditer(sentence))
    if future != past:
        return "future" if future else "past"
    return None


def _season(name: str, first_year: int) -> str:
    return f"winter {first_year}-{first_year + 1}" if name == "winter" else f"{name} {first_year}"


def _season_span(name: str, first_year: int) -> tuple[date, date]:
    """[start, end) of the season that begins in ``first_year`` (winter 2022 = Dec 2022 - Feb 2023)."""
    start = date(first_year, _SEASON_FIRST_MONTH[name], 1)
    end_year, end_month = _add_months(start, 3)
    return start, date(end_year, end_month, 1)


def _resolve_season(which: str, name: str, d: date) -> str:
    """last: the latest season of that name that ended by d; this: the one containing d, else the coming one;
    next: the first one starting after d."""
    years = range(d.year - 2, d.year + 2)
    spans = [(y, *_season_span(name, y)) for y in years]
    if which == "last":
        y = max(y for y, _, end in spans if end <= d)
    elif which == "this":
        y = next((y for y, start, end in spans if start <= d < end), None)
        if y is None:
            y = min(y for y, start, _ in spans if start > d)
    else:
        y = min(y for y, start, _ in spans if start > d)
    return _season(name, y)


def _ago(m: re.Match, d: date, sentence: str) -> str | None:
    """"two days ago" -> the date; "3 weeks ago" -> the week; "a few months ago" -> "a few months before May 2023"."""
    amount = " ".join(m.group("n").lower().split())
    n = int(amount) if amount.isdigit() else _AMOUNTS[amount]
    unit = m.group("unit").lower()
    if n is None:  # vague: anchor it at the session's day, month or year
        anchor = {"month": _month_year(d.year, d.month), "year": str(d.year)}.get(unit, _dmy(d))
        amount = "a few" if amount == "few" else amount
        return f"{amount} {unit}s before {anchor}"
    if n == 0:
        return None
    if unit == "day":
        return _dmy(d - timedelta(days=n))
    if unit == "week":
        return f"the week of {_dmy(d - timedelta(weeks=n))}"
    if unit == "weekend":
        return f"the weekend of {_dmy(_weekend_before(d) - timedelta(weeks=n - 1))}"
    if unit == "month":
        return _month_year(*_add_months(d, -n))
    return str(d.year - n)


def _on_or_this_weekday(m: re.Match, d: date, sentence: str) -> str:
    """"on Friday" (default: the past one) / "this Friday" (default: the coming one), by the sentence's tense."""
    wd = _WEEKDAY_NUMBERS[m.group("wd").lower()]
    which = m.group("which").lower()
    if which == "this" and wd == d.weekday():
        return _dmy(d)
    tense = _tense(sentence) or ("past" if which == "on" else "future")
    return _dmy(_weekday_before(d, wd) if tense == "past" else _weekday_after(d, wd))


def _this_weekend(m: re.Match, d: date, sentence: str) -> str:
    """Said on a Saturday or Sunday: that weekend. Otherwise the coming one, or the one just gone if the sentence
    is in the past tense ("we tried snowshoeing this weekend", said on a Wednesday)."""
    if d.weekday() >= 5:
        saturday = d - timedelta(days=d.weekday() - 5)
    else:
        saturday = _weekend_before(d) if _tense(sentence) == "past" else _weekend_after(d)
    return f"the weekend of {_dmy(saturday)}"


def _last_month_name(m: re.Match, d: date, sentence: str) -> str:
    """"last August": the most recent August before the session's month."""
    month = _MONTH_NAMES.index(m.group("month")) + 1
    return _month_year(d.year if month < d.month else d.year - 1, month)


def _next_month_name(m: re.Match, d: date, sentence: str) -> str:
    """"next August": the first August after the session's month."""
    month = _MONTH_NAMES.index(m.group("month")) + 1
    return _month_year(d.year if month > d.month else d.year + 1, month)


def _shift(days: int) -> Callable[[re.Match, date, str], str]:
    return lambda m, d, s: _dmy(d + timedelta(days=days))


def _weekday(after: bool) -> Callable[[re.Match, date, str], str]:
    def resolve(m: re.Match, d: date, s: str) -> str:
        wd = _WEEKDAY_NUMBERS[m.group("wd").lower()]
        return _dmy(_weekday_after(d, wd) if after else _weekday_before(d, wd))
    return resolve


_WD = r"(?P<wd>" + "|".join(sorted(_WEEKDAY_NUMBERS, key=len, reverse=True)) + r")"
_PART = r"(?:\s+(?:morning|afternoon|evening|night))?"  # "yesterday morning (7 May 2023)": the note goes after it
_AMOUNT = r"(?P<n>\d{1,3}|" + "|".join(a.replace(" ", r"\s+") for a in sorted(_AMOUNTS, key=len, reverse=True)) + r")"
_SEASON_NAMES = "|".join(_SEASON_FIRST_MONTH)
_MONTH = r"(?P<month>(?-i:" + "|".join(_MONTH_NAMES) + r"))"  # capitalised only: "last may" is not a month

# (pattern, resolver). Patterns are case-insensitive, match whole words, and may take a possessive "'s"
# ("last week's game (the week before ...)"). Where two matches overlap, the one starting first wins, then the
# longer ("the day before yesterday" over "yesterday").
_DATE_RULES: list[tuple[str, Callable[[re.Match, date, str], str | None]]] = [
    # days
    (rf"the\s+day\s+before\s+yesterday{_PART}", _shift(-2)),
    (rf"the\s+day\s+after\s+tomorrow{_PART}", _shift(+2)),
    (rf"yesterday{_PART}", _shift(-1)),
    (r"last\s+night", _shift(-1)),
    (r"today", _shift(0)),  # "today's" is skipped in _annotation (generic: "today's world")
    (r"tonight", _shift(0)),
    (r"this\s+(?:morning|afternoon|evening)", _shift(0)),
    (rf"tomorrow{_PART}", _shift(+1)),
    (rf"last\s+{_WD}{_PART}", _weekday(after=False)),
    (rf"next\s+{_WD}{_PART}", _weekday(after=True)),
    (rf"(?P<which>on|this)\s+{_WD}{_PART}", _on_or_this_weekday),
    (r"the\s+other\s+day", lambda m, d, s: f"a few days before {_dmy(d)}"),
    # "two days ago", "3 weeks ago", "a few years back" (not "two weeks back home")
    (rf"{_AMOUNT}\s+(?P<unit>day|weekend|week|month|year)s?\s+(?:ago|back(?!\s+(?:home|to|from|in|into|at|on|up|"
     r"down|out|over|then)\b))", _ago),
    # weeks and weekends
    (r"(?:last|this\s+past)\s+week", lambda m, d, s: f"the week before {_dmy(d)}"),
    (r"this\s+week", lambda m, d, s: f"the week of {_dmy(d)}"),
    (r"next\s+week", lambda m, d, s: f"the week after {_dmy(d)}"),
    (r"(?:last|this\s+past)\s+weekend", lambda m, d, s: f"the weekend of {_dmy(_weekend_before(d))}"),
    (r"this\s+weekend", _this_weekend),
    (r"next\s+weekend", lambda m, d, s: f"the weekend of {_dmy(_weekend_after(d))}"),
    # months, years, seasons
    (r"last\s+month", lambda m, d, s: _month_year(*_add_months(d, -1))),
    (r"this\s+month", lambda m, d, s: _month_year(d.year, d.month)),
    (r"next\s+month", lambda m, d, s: _month_year(*_add_months(d, +1))),
    (rf"last\s+{_MONTH}", _last_month_name),
    (rf"next\s+{_MONTH}", _next_month_name),
    (r"last\s+year", lambda m, d, s: str(d.year - 1)),
    (r"this\s+year", lambda m, d, s: str(d.year)),
    (r"next\s+year", lambda m, d, s: str(d.year + 1)),
    (rf"(?P<which>last|this|next)\s+(?P<season>{_SEASON_NAMES})",
     lambda m, d, s: _resolve_season(m.group("which").lower(), m.group("season").lower(), d)),
]
_DATE_RES = [(re.compile(rf"(?<![\w-])(?:{p})(?P<poss>['’]s)?(?![\w-])(?!['’]\w)", re.IGNORECASE), f)
             for p, f in _DATE_RULES]


def _sentence_around(text: str, start: int, end: int) -> str:
    """The sentence (between . ! ? marks) that holds text[start:end]."""
    left = max(text.rfind(c, 0, start) for c in ".!?") + 1
    right = min((i for i in (text.find(c, end) for c in ".!?") if i >= 0), default=len(text))
    return text[left:right]


def _annotation(text: str, m: re.Match, resolve, day: date) -> str | None:
    phrase = m.group(0).lower()
    if phrase.split()[0] in ("last", "next", "past"):
        before = re.search(r"(\w+)\s+$", text[: m.start()])
        if before and before.group(1).lower() in _DETERMINERS:
            return None  # "my last week at work", "the next month or so"
    if m.group("poss") and phrase.startswith("today"):
        return None
    return resolve(m, day, _sentence_around(text, m.start(), m.end()))


def resolve_relative_dates(text: str, session_date: datetime | date) -> str:
    """Follow each relative time expression in ``text`` by the absolute date it denotes, from ``session_date``.

    ``"I went to a support group yesterday."`` on 8 May 2023 -> ``"I went to a support group yesterday (7 May
    2023)."``; ``"last week"`` -> ``"last week (the week before 8 May 2023)"``; ``"last month"`` ->
    ``"last month (April 2023)"``; ``"two days ago"`` -> ``"two days ago (6 May 2023)"``. The rules and their
    conventions are the table ``_DATE_RULES`` above. Only the session date is used; text without a relative
    expression comes back unchanged.
    """
    day = session_date.date() if isinstance(session_date, datetime) else session_date
    found: list[tuple[int, int, str]] = []
    for regex, resolve in _DATE_RES:
        for m in regex.finditer(text):
            note = _annotation(text, m, resolve, day)
            if note:
                found.append((m.start(), m.end(), note))
    found.sort(key=lambda f: (f[0], -f[1]))  # leftmost first, then longest
    out, pos = [], 0
    for start, end, note in found:
        if start < pos:
            continue  # overlaps a match already annotated
        out += [text[pos:end], f" ({note})"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


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


def _turn_body(turn: Turn, resolve_at: datetime | None = None) -> str:
    """The turn's text on one line, relative dates resolved against ``resolve_at`` if given, then the photo note."""
    text = _clean(turn.text)
    if resolve_at is not None:
        text = resolve_relative_dates(text, resolve_at)
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


def _session_datetime(sample: Sample, session: Session) -> datetime | None:
    """The session's parsed date (None if it has none); an unparseable one names sample and field."""
    if not session.date_time:
        return None
    try:
        return parse_session_datetime(session.date_time)
    except LocomoDataError as e:
        raise LocomoDataError(f"sample {sample.sample_id!r} session_{session.index}_date_time: {e}") from None


def _ts_turn(sample: Sample, session: Session, turn: Turn) -> str:
    dt = _session_datetime(sample, session)
    if dt is None:
        return f"{turn.speaker} said: {_turn_body(turn)}"
    return f"On {_day_month_year(dt)}, {turn.speaker} said: {_turn_body(turn)}"


def _ts_dates_turn(sample: Sample, session: Session, turn: Turn) -> str:
    dt = _session_datetime(sample, session)
    if dt is None:  # nothing to resolve against
        return f"{turn.speaker} said: {_turn_body(turn)}"
    return f"On {_day_month_year(dt)}, {turn.speaker} said: {_turn_body(turn, resolve_at=dt)}"


FORMATS: dict[str, tuple[Callable[[Sample, Session], str | None], Callable[[Sample, Session, Turn], str]]] = {
    "raw": (_raw_header, _raw_turn),  # the original experiment: "Speaker: text", no dates
    "timestamped": (_ts_header, _ts_turn),  # session header with date + "On 8 May 2023, X said: text"
    # as "timestamped", and "yesterday" -> "yesterday (7 May 2023)" from the session date (resolve_relative_dates)
    "timestamped+dates": (_ts_header, _ts_dates_turn),
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
    and each turn reads ``On 8 May 2023, Caroline said: text``. ``format="timestamped+dates"``: the timestamped
    text with relative dates resolved from the session date (:func:`resolve_relative_dates`), e.g. ``On 8 May
    2023, Caroline said: I went to a LGBTQ support group yesterday (7 May 2023) and it was so powerful.``
    """
    return "\n\n".join(session_texts(sample, timestamps, format=format))


def iter_samples(samples: Iterable[Sample], ids: Iterable[str] | str | None = None) -> list[Sample]:
    """Samples whose ``sample_id`` is in ``ids`` (all if None; a string is a comma-separated list, as the CLIs'
    ``--conversations``), in file order; unknown ids are an error."""
    samples = list(samples)
    if ids is None:
        return samples
    want = [i.strip() for i in ids.split(",") if i.strip()] if isinstance(ids, str) else list(ids)
    known = {s.sample_id for s in samples}
    missing = [i for i in want if i not in known]
    if missing:
        raise LocomoDataError(f"unknown sample_id(s) {missing} (known: {sorted(known)})")
    keep = set(want)
    return [s for s in samples if s.sample_id in keep]
