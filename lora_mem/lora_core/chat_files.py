"""Reading conversations from files: LoCoMo's layout, or a chat as people export it.

A chat file is a list of messages ``{"speaker": ..., "text": ..., "time": ...}``: a JSON list, or JSON Lines (a
``.jsonl`` file, one message a line). ``time`` is ISO 8601 (``2023-05-08T13:56``,
``2023-05-08 13:56:00``, ``2023-05-08``; an offset is dropped: the wall-clock time the speakers saw is what a
session is dated by), LoCoMo's ``1:56 pm on 8 May, 2023``, or seconds since 1970 (UTC). Messages are grouped into
sessions (:class:`SessionSplit`): a new session each calendar day, or after a silence longer than ``gap_hours``. A
session is dated by its first message. The chat must have two speakers (the recipes ask about one speaker in the
words of the other), named in the order they first speak.

LoCoMo's layout: a list of samples ``{"sample_id", "conversation": {...}, ...}``, one such sample, or a bare
``conversation`` object (``speaker_a``, ``speaker_b``, ``session_<n>_date_time``, ``session_<n>``). Only the
conversation is read: questions, answers and summaries never leave this module.

Every problem is one :class:`ConversationError` naming the file, the line (or the sample, session and turn) and the
field, e.g. ``chat.jsonl: line 3: missing field 'time'``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from lora_mem.files import file_sha256
from lora_mem.lora_core.conversation import (
    Conversation,
    ConversationError,
    Session,
    Turn,
    nothing_to_remember,
    parse_session_datetime,
)
from lora_mem.untrusted import parse_json, read_json, slug

SESSION_SPLITS = ("day", "gap")
LAYOUTS = ("locomo", "chat")
MESSAGE_FIELDS = ("speaker", "text", "time")


@dataclass(frozen=True)
class SessionSplit:
    """How a chat's messages become sessions: ``by="day"`` starts one each calendar day, ``by="gap"`` after a
    silence of more than ``gap_hours``."""

    by: str = "day"
    gap_hours: float = 6.0

    def __post_init__(self):
        if self.by not in SESSION_SPLITS:
            raise ValueError(f"session split: unknown {self.by!r} (choose from {', '.join(SESSION_SPLITS)})")
        if not self.gap_hours > 0:
            raise ValueError(f"gap_hours: must be > 0, got {self.gap_hours}")


@dataclass(frozen=True)
class ChatFile:
    """A conversation read from a file, with what identifies the file."""

    conversation: Conversation
    path: Path
    sha256: str  # of the file's bytes
    layout: str  # "locomo" or "chat"


# ----------------------------------------------------------------------------------------------------------------
# Fields, checked one by one (the JSON itself is read strictly by lora_mem.untrusted)
# ----------------------------------------------------------------------------------------------------------------


def data_error(path: Path, where: str, msg: str) -> ConversationError:
    return ConversationError(f"{path}: {where}: {msg}")


def required_str(obj: dict, key: str, path: Path, where: str, *, allow_number: bool = False) -> str:
    if key not in obj:
        raise data_error(path, where, f"missing field {key!r}")
    v = obj[key]
    if isinstance(v, str):
        return v
    if allow_number and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise data_error(path, where, f"field {key!r} must be a string, got {type(v).__name__} {v!r:.80}")


# ----------------------------------------------------------------------------------------------------------------
# LoCoMo's layout
# ----------------------------------------------------------------------------------------------------------------

_SESSION_RE = re.compile(r"session_(\d+)")


def locomo_turn(t, path: Path, where: str) -> Turn:
    if not isinstance(t, dict):
        raise data_error(path, where, f"turn must be an object, got {type(t).__name__} {t!r:.80}")
    speaker = required_str(t, "speaker", path, where)
    text = required_str(t, "text", path, where)
    dia_id = t.get("dia_id", "")
    if isinstance(dia_id, bool) or not isinstance(dia_id, (str, int)):
        raise data_error(path, where, f"field 'dia_id' must be a string, got {type(dia_id).__name__} {dia_id!r:.80}")
    cap = t.get("blip_caption")
    if cap is not None and not isinstance(cap, str):
        raise data_error(path, where, f"field 'blip_caption' must be a string, got {type(cap).__name__} {cap!r:.80}")
    return Turn(speaker=speaker, dia_id=str(dia_id), text=text, blip_caption=cap or None)


def locomo_conversation(conv, path: Path, sid: str) -> tuple[str, str, list[Session]]:
    """(speaker_a, speaker_b, sessions) of a LoCoMo ``conversation`` object, validated field by field; a
    conversation with no sessions or no text is an error (:func:`nothing_to_remember`)."""
    where = f"sample {sid!r}"
    if not isinstance(conv, dict):
        raise data_error(path, where, f"field 'conversation' must be an object, got {type(conv).__name__}")
    speaker_a = required_str(conv, "speaker_a", path, f"{where} conversation")
    speaker_b = required_str(conv, "speaker_b", path, f"{where} conversation")
    indices = []
    for key in conv:
        if m := _SESSION_RE.fullmatch(key):
            if m.group(1) != str(int(m.group(1)[:9])):  # session_01 would be a second session 1
                raise data_error(path, f"{where} field {key!r}", "session numbers are written without leading zeros, "
                                                                 "at most 9 digits")
            indices.append(int(m.group(1)))
    indices.sort()
    sessions = []
    for n in indices:
        key = f"session_{n}"
        turns = conv[key]
        if not isinstance(turns, list):
            raise data_error(path, f"{where} field {key!r}",
                             f"session must be a list of turns, got {type(turns).__name__} {turns!r:.80}")
        dt = conv.get(f"{key}_date_time")
        if dt is not None and not isinstance(dt, str):
            raise data_error(path, f"{where} field '{key}_date_time'", f"must be a string, got {type(dt).__name__} "
                                                                       f"{dt!r:.80}")
        parsed = [locomo_turn(t, path, f"{where} {key} turn {i}") for i, t in enumerate(turns)]
        sessions.append(Session(index=n, date_time=dt, turns=parsed))
    why = nothing_to_remember(Conversation(sid, speaker_a, speaker_b, sessions))
    if why is not None:
        raise data_error(path, f"{where} conversation", why + ("" if sessions else " (no field session_<n>)"))
    return speaker_a, speaker_b, sessions


def _locomo_samples(raw, path: Path) -> list[tuple[str, object]]:
    """(sample_id, conversation object) of each sample in a LoCoMo-layout value."""
    if isinstance(raw, dict) and "speaker_a" in raw:  # a bare conversation object
        return [(slug(path.stem, "chat"), raw)]
    samples = [raw] if isinstance(raw, dict) else raw
    out, seen = [], set()
    for k, s in enumerate(samples):
        if not isinstance(s, dict):
            raise data_error(path, f"sample #{k}", f"must be an object, got {type(s).__name__}")
        if "conversation" not in s:
            raise data_error(path, f"sample #{k}", "missing field 'conversation'")
        sid = str(s.get("sample_id", path.stem if len(samples) == 1 else f"{path.stem}-{k}"))
        if sid in seen:
            raise data_error(path, f"sample #{k}", f"duplicate sample_id {sid!r}")
        seen.add(sid)
        out.append((sid, s["conversation"]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Chat exports: messages {speaker, text, time}
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    speaker: str
    text: str
    time: datetime
    line: int  # where it starts in the file (1-based)


def _json_array_items(text: str) -> list[tuple[int, object]]:
    """(line, value) of each item of the JSON array that ``text`` holds (already known to parse), so that an error
    can name the line an item starts on."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    i = space.match(text, text.index("[") + 1).end()
    items, line, counted = [], 1, 0
    while text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        value, end = decoder.raw_decode(text, i)
        items.append((line, value))
        i = space.match(text, end).end()
        if text[i] == ",":
            i = space.match(text, i + 1).end()
    return items


def parse_time(value, path: Path, where: str) -> datetime:
    """A message's ``time``: ISO 8601, LoCoMo's "1:56 pm on 8 May, 2023", or seconds since 1970 (UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, timezone.utc).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            raise data_error(path, where, f"field 'time': {value!r} is not a time in seconds since 1970") from None
    if not isinstance(value, str):
        raise data_error(path, where, f"field 'time' must be a string or a number, got {type(value).__name__} "
                                      f"{value!r:.80}")
    try:
        return datetime.fromisoformat(value.strip()).replace(tzinfo=None)
    except ValueError:
        pass
    try:
        return parse_session_datetime(value)
    except ConversationError:
        raise data_error(path, where, f"field 'time': unreadable time {value!r:.80} (expected ISO 8601 like "
                                      "'2023-05-08T13:56', or like '1:56 pm on 8 May, 2023')") from None


def _message(obj, path: Path, line: int) -> Message:
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise data_error(path, where, f"a message must be an object {{speaker, text, time}}, got "
                                      f"{type(obj).__name__} {obj!r:.80}")
    speaker = required_str(obj, "speaker", path, where)
    if not speaker.strip():
        raise data_error(path, where, "field 'speaker' is empty")
    text = required_str(obj, "text", path, where)
    if "time" not in obj:
        raise data_error(path, where, "missing field 'time'")
    return Message(speaker.strip(), text, parse_time(obj["time"], path, where), line)


def _jsonl_messages(path: Path) -> list[Message]:
    lines = path.read_bytes().splitlines()
    return [_message(parse_json(line, f"{path}: line {n}", ConversationError), path, n)
            for n, line in enumerate(lines, start=1) if line.strip()]


def locomo_date_time(t: datetime) -> str:
    """A time as LoCoMo dates its sessions: "1:56 pm on 8 May, 2023"."""
    hour = t.hour % 12 or 12
    return f"{hour}:{t.minute:02d} {'am' if t.hour < 12 else 'pm'} on {t.day} {t.strftime('%B')}, {t.year}"


def sessions_of(messages: list[Message], split: SessionSplit) -> list[list[Message]]:
    """The messages (in time order, ties in file order) grouped into sessions by ``split``."""
    ordered = sorted(messages, key=lambda m: m.time)
    sessions: list[list[Message]] = []
    for m in ordered:
        if sessions:
            last = sessions[-1][-1].time
            new = m.time.date() != last.date() if split.by == "day" else m.time - last > timedelta(
                hours=split.gap_hours)
        if not sessions or new:
            sessions.append([])
        sessions[-1].append(m)
    return sessions


def chat_conversation(messages: list[Message], path: Path, split: SessionSplit, sample_id: str) -> Conversation:
    if not messages:
        raise data_error(path, "top level", "no messages: nothing to remember")
    speakers = list(dict.fromkeys(m.speaker for m in messages))
    if len(speakers) != 2:
        named = ", ".join(repr(s) for s in speakers[:5]) + (" ..." if len(speakers) > 5 else "")
        first_other = next((m for m in messages if m.speaker not in speakers[:2]), messages[0])
        where = f"line {first_other.line}" if len(speakers) > 2 else "top level"
        raise data_error(path, where, f"field 'speaker': a chat needs two speakers, found {len(speakers)} "
                                      f"({named})")
    if not any(m.text.strip() for m in messages):
        raise data_error(path, "top level", f"no text in any of its {len(messages)} messages: nothing to remember")
    sessions = []
    for n, group in enumerate(sessions_of(messages, split), start=1):
        turns = [Turn(m.speaker, f"D{n}:{k}", m.text) for k, m in enumerate(group, start=1)]
        sessions.append(Session(n, locomo_date_time(group[0].time), turns))
    return Conversation(sample_id, speakers[0], speakers[1], sessions)


# ----------------------------------------------------------------------------------------------------------------
# Either layout
# ----------------------------------------------------------------------------------------------------------------


def is_locomo(raw) -> bool:
    """Whether a JSON value is in LoCoMo's layout (samples with a conversation, or a bare conversation)."""
    first = raw[0] if isinstance(raw, list) and raw else raw
    return isinstance(first, dict) and ("conversation" in first or "speaker_a" in first)


def read_chat(path: str | os.PathLike, split: SessionSplit = SessionSplit(),
              conversation: str | None = None) -> ChatFile:
    """The conversation in ``path`` (either layout). A LoCoMo file with several samples needs ``conversation``,
    the sample_id to read. A chat's sample_id is its file name (as :func:`lora_mem.untrusted.slug` makes it safe)."""
    path = Path(path)
    if not path.is_file():
        raise ConversationError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    raw = None if path.suffix.lower() == ".jsonl" else read_json(path, ConversationError)
    layout = "locomo" if is_locomo(raw) else "chat"
    if layout == "chat":
        if conversation is not None:
            raise ConversationError(f"{path}: a chat file holds one conversation; it has no {conversation!r} to "
                                    "choose")
        if raw is None:
            messages = _jsonl_messages(path)
        elif isinstance(raw, list):
            items = _json_array_items(path.read_text(encoding="utf-8"))
            messages = [_message(obj, path, line) for line, obj in items]
        else:
            raise data_error(path, "top level", f"must be a list of messages {{speaker, text, time}} or LoCoMo's "
                                                f"layout, got {type(raw).__name__}")
        conv = chat_conversation(messages, path, split, slug(path.stem, "chat"))
    else:
        samples = _locomo_samples(raw, path)
        ids = [sid for sid, _ in samples]
        if conversation is None and len(samples) > 1:
            raise ConversationError(f"{path}: holds {len(samples)} conversations ({', '.join(ids[:6])}"
                                    f"{' ...' if len(ids) > 6 else ''}): name one")
        chosen = samples[0] if conversation is None else next((s for s in samples if s[0] == conversation), None)
        if chosen is None:
            raise ConversationError(f"{path}: no conversation {conversation!r} (it holds {', '.join(ids[:6])}"
                                    f"{' ...' if len(ids) > 6 else ''})")
        sid, raw_conv = chosen
        a, b, sessions = locomo_conversation(raw_conv, path, sid)
        conv = Conversation(slug(sid, "chat"), a, b, sessions)
    return ChatFile(conv, path, file_sha256(path), layout)
