"""A conversation, the library's input: speakers, dated sessions of turns, and the one place its text is formatted.

Layout follows LoCoMo's ``conversation`` field (``speaker_a``, ``speaker_b``, ``session_<n>_date_time``,
``session_<n>``: turns ``{speaker, dia_id, text[, blip_caption]}``); any source of conversations builds these
dataclasses (`bench.locomo_data` reads LoCoMo files). A :class:`Conversation` holds only what was said: no questions,
answers or summaries, so whatever is built from it (training text, queries, recitations) cannot leak annotations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Callable


class ConversationError(ValueError):
    """A conversation that cannot be used: messages name the sample, field and value."""


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
        """The parsed ``date_time`` (raises :class:`ConversationError` if absent or unparseable)."""
        if self.date_time is None:
            raise ConversationError(f"session_{self.index} has no date_time")
        return parse_session_datetime(self.date_time)


@dataclass(frozen=True)
class Conversation:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: list[Session]  # numeric session order (session_2 before session_10)

    @property
    def num_turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def nothing_to_remember(conv: Conversation) -> str | None:
    """Why ``conv`` gives training nothing (no sessions, or no text in any turn), or None."""
    if not conv.sessions:
        return "no sessions: nothing to remember"
    if not any(t.text.strip() or (t.blip_caption or "").strip() for s in conv.sessions for t in s.turns):
        return f"no text in any of its {len(conv.sessions)} sessions: nothing to remember"
    return None


def check_something_to_remember(conv: Conversation) -> None:
    why = nothing_to_remember(conv)
    if why is not None:
        raise ConversationError(f"conversation {conv.sample_id!r}: {why}")


def conversation_only(conv: Conversation) -> Conversation:
    """A plain :class:`Conversation` of ``conv``'s speakers and sessions: whatever a subclass carries beside them
    (a benchmark's questions and answers) stays behind, so it cannot reach anything built from the result."""
    return Conversation(sample_id=conv.sample_id, speaker_a=conv.speaker_a, speaker_b=conv.speaker_b,
                        sessions=conv.sessions)


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
        raise ConversationError(f"unparseable session date {s!r} (expected like '1:56 pm on 8 May, 2023')")
    mon = _MONTHS.get(m.group("mon").lower())
    if mon is None:
        raise ConversationError(f"unparseable session date {s!r}: unknown month {m.group('mon')!r}")
    hour, minute = 0, 0
    if m.group("h") is not None:
        hour, minute = int(m.group("h")), int(m.group("mi") or 0)
        if not 1 <= hour <= 12 or minute > 59:
            raise ConversationError(f"unparseable session date {s!r}: bad time")
        hour = hour % 12 + (12 if m.group("ap").lower() == "p" else 0)
    try:
        return datetime(int(m.group("y")), mon, int(m.group("d")), hour, minute)
    except ValueError as e:
        raise ConversationError(f"unparseable session date {s!r}: {e}") from e


def _day_month_year(dt: datetime) -> str:
    return f"{dt.day} {dt.strftime('%B')} {dt.year}"  # "8 May 2023" (locale-independent for C/en locales)


def parsed_date_time(date_time: str | None) -> datetime | None:
    """A session's ``date_time`` parsed, or None if it has none or it does not parse."""
    if not date_time:
        return None
    try:
        return parse_session_datetime(date_time)
    except ConversationError:
        return None


def session_date(date_time: str | None) -> str | None:
    """A session's day as LoCoMo's gold answers write it ("7 May 2023"), or None."""
    dt = parsed_date_time(date_time)
    return None if dt is None else _day_month_year(dt)


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
def _raw_header(conv: Conversation, session: Session) -> str | None:
    return None


def _raw_turn(conv: Conversation, session: Session, turn: Turn) -> str:
    return f"{turn.speaker}: {_turn_body(turn)}"


def _ts_header(conv: Conversation, session: Session) -> str | None:
    return f"Session {session.index} — {session.date_time}" if session.date_time else f"Session {session.index}"


def _session_datetime(conv: Conversation, session: Session) -> datetime | None:
    """The session's parsed date (None if it has none); an unparseable one names the conversation and field."""
    if not session.date_time:
        return None
    try:
        return parse_session_datetime(session.date_time)
    except ConversationError as e:
        raise ConversationError(f"sample {conv.sample_id!r} session_{session.index}_date_time: {e}") from None


def _ts_turn(conv: Conversation, session: Session, turn: Turn) -> str:
    dt = _session_datetime(conv, session)
    if dt is None:
        return f"{turn.speaker} said: {_turn_body(turn)}"
    return f"On {_day_month_year(dt)}, {turn.speaker} said: {_turn_body(turn)}"


def _ts_dates_turn(conv: Conversation, session: Session, turn: Turn) -> str:
    dt = _session_datetime(conv, session)
    if dt is None:  # nothing to resolve against
        return f"{turn.speaker} said: {_turn_body(turn)}"
    return f"On {_day_month_year(dt)}, {turn.speaker} said: {_turn_body(turn, resolve_at=dt)}"


FORMATS: dict[str, tuple[Callable[[Conversation, Session], str | None], Callable[[Conversation, Session, Turn], str]]] = {
    "raw": (_raw_header, _raw_turn),  # the original experiment: "Speaker: text", no dates
    "timestamped": (_ts_header, _ts_turn),  # session header with date + "On 8 May 2023, X said: text"
    # as "timestamped", and "yesterday" -> "yesterday (7 May 2023)" from the session date (resolve_relative_dates)
    "timestamped+dates": (_ts_header, _ts_dates_turn),
}


def session_texts(conv: Conversation, timestamps: bool = False, *, format: str | None = None) -> list[str]:
    """One string per session (same formatting as :func:`conversation_text`), e.g. for per-session chunking."""
    name = format or ("timestamped" if timestamps else "raw")
    if name not in FORMATS:
        raise ValueError(f"unknown conversation format {name!r} (known: {sorted(FORMATS)})")
    header, line = FORMATS[name]
    out = []
    for session in conv.sessions:
        lines = []
        h = header(conv, session)
        if h is not None:
            lines.append(h)
        lines.extend(line(conv, session, t) for t in session.turns)
        out.append("\n".join(lines))
    return out


def conversation_text(conv: Conversation, timestamps: bool = False, *, format: str | None = None) -> str:
    """The training text of one conversation.

    Default (``"raw"``, faithful to the original experiment): ``Speaker: text`` one turn per line, sessions in
    order separated by a blank line, no dates; a shared photo adds ``[shares a photo of ...]`` from its BLIP
    caption. ``timestamps=True`` (``"timestamped"``): each session opens with ``Session 3 — 1:56 pm on 8 May, 2023``
    and each turn reads ``On 8 May 2023, Caroline said: text``. ``format="timestamped+dates"``: the timestamped
    text with relative dates resolved from the session date (:func:`resolve_relative_dates`), e.g. ``On 8 May
    2023, Caroline said: I went to a LGBTQ support group yesterday (7 May 2023) and it was so powerful.``
    """
    return "\n\n".join(session_texts(conv, timestamps, format=format))

