"""LoCoMo loading, validation, data-path resolution and training-text formatting (bench/locomo_data.py)."""

import copy
import hashlib
import json
import os
import re
import urllib.error
from datetime import date, datetime
from pathlib import Path

import pytest

import bench.locomo_data as ld
from bench.locomo_data import (
    CATEGORY_NAMES,
    LocomoDataError,
    conversation_text,
    load_locomo,
    parse_session_datetime,
    resolve_data_path,
    resolve_relative_dates,
    select_questions,
    session_texts,
)
from lora_mem.lora_core.conversation import conversation_only

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture
def tiny():
    return load_locomo(FIXTURE)


@pytest.fixture
def raw():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _write(tmp_path, obj, name="data.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


# ---------------------------------------------------------------------------- loading the fixture


def test_fixture_loads(tiny):
    assert [s.sample_id for s in tiny] == ["tiny-1", "tiny-2"]
    a = tiny[0]
    assert (a.speaker_a, a.speaker_b) == ("Alice", "Bob")
    assert [s.index for s in a.sessions] == [1, 2]
    assert a.sessions[0].date_time == "1:56 pm on 8 May, 2023"
    assert a.num_turns == 6
    t = a.sessions[0].turns[2]
    assert (t.speaker, t.dia_id, t.blip_caption) == ("Alice", "D1:3", "a photo of a dog running on a beach")
    assert a.sessions[0].turns[0].blip_caption is None
    assert len(a.qa) == 8 and len(tiny[1].qa) == 8
    assert {q.category for s in tiny for q in s.qa} == {1, 2, 3, 4, 5}


def test_numeric_answer_is_string(tiny):
    q = tiny[0].qa[3]
    assert q.question == "In which year did Bob move to Lisbon?"
    assert q.answer == "2022" and isinstance(q.answer, str)


def test_adversarial_qa(tiny):
    q = tiny[0].qa[6]
    assert q.category == 5 and q.category_name == "adversarial"
    assert q.answer == "" and q.adversarial_answer == "Biscuit"
    assert q.evidence == ["D1:1"]
    assert CATEGORY_NAMES == {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


def test_select_questions(tiny):
    a = tiny[0]
    default = select_questions(a)
    assert len(default) == 7 and all(q.category != 5 for q in default)
    assert default == [q for q in a.qa if q.category != 5]  # file order
    assert len(select_questions(a, with_adversarial=True)) == 8
    assert select_questions(a, with_adversarial=True) == a.qa
    assert select_questions(a, max_questions=3) == a.qa[:3]
    assert select_questions(a, max_questions=0) == []


def test_sessions_in_numeric_order(tmp_path, raw):
    s = raw[0]
    conv = s["conversation"]
    turn = {"speaker": "Alice", "dia_id": "D10:1", "text": "tenth"}
    # keys deliberately out of order, and session_10 sorts before session_2 lexicographically
    s["conversation"] = {
        "speaker_a": "Alice",
        "speaker_b": "Bob",
        "session_10_date_time": "1:00 pm on 1 July, 2023",
        "session_10": [turn],
        "session_2_date_time": conv["session_2_date_time"],
        "session_2": conv["session_2"],
        "session_1_date_time": conv["session_1_date_time"],
        "session_1": conv["session_1"],
    }
    (a,) = load_locomo(_write(tmp_path, [s]))
    assert [x.index for x in a.sessions] == [1, 2, 10]
    assert conversation_text(a).endswith("\n\nAlice: tenth")


# ---------------------------------------------------------------------------- training text

TINY1_RAW = """\
Alice: Hi Bob! I adopted a puppy named Biscuit yesterday.
Bob: Congrats Alice! I started learning the violin last week.
Alice: Here he is at the beach. [shares a photo of a dog running on a beach]

Bob: I moved to Lisbon in 2022, and I love it.
Alice: Biscuit and I ran a 5k charity race on Sunday.
Bob: Amazing! I performed at my first violin recital."""

TINY1_TS = """\
Session 1 — 1:56 pm on 8 May, 2023
On 8 May 2023, Alice said: Hi Bob! I adopted a puppy named Biscuit yesterday.
On 8 May 2023, Bob said: Congrats Alice! I started learning the violin last week.
On 8 May 2023, Alice said: Here he is at the beach. [shares a photo of a dog running on a beach]

Session 2 — 10:37 am on 27 June, 2023
On 27 June 2023, Bob said: I moved to Lisbon in 2022, and I love it.
On 27 June 2023, Alice said: Biscuit and I ran a 5k charity race on Sunday.
On 27 June 2023, Bob said: Amazing! I performed at my first violin recital."""

TINY2_RAW = """\
Maya: Happy new year, Tom! I just started a pottery class.
Tom: Happy new year! I'm training for the Berlin marathon in September.
Maya: [shares a photo of a clay bowl on a wheel]

Tom: I ran 30 kilometers this morning, a new personal best.
Maya: Great job! My pottery teacher, Mr. Hale, says my bowls are improving.
Tom: You should sell them at the spring market in April."""


def test_conversation_text_default(tiny):
    assert conversation_text(tiny[0]) == TINY1_RAW
    # empty text + photo: just the note; BLIP's "a photography of" reads as "a photo of"
    assert conversation_text(tiny[1]) == TINY2_RAW
    assert conversation_text(tiny[0], format="raw") == TINY1_RAW


def test_conversation_text_timestamps(tiny):
    assert conversation_text(tiny[0], timestamps=True) == TINY1_TS
    assert conversation_text(tiny[0], format="timestamped") == TINY1_TS
    ts2 = conversation_text(tiny[1], timestamps=True)
    assert ts2.splitlines()[0] == "Session 1 — 9:15 am on 3 January, 2024"
    assert "On 3 January 2024, Maya said: [shares a photo of a clay bowl on a wheel]" in ts2.splitlines()
    assert "On 14 February 2024, Tom said: You should sell them at the spring market in April." in ts2


# "timestamped+dates": the timestamped text, relative dates resolved from the session date. 8 May 2023 is a
# Monday, 27 June 2023 a Tuesday ("ran ... on Sunday" is past tense: 25 June), 14 February 2024 a Wednesday.
TINY1_TSD = """\
Session 1 — 1:56 pm on 8 May, 2023
On 8 May 2023, Alice said: Hi Bob! I adopted a puppy named Biscuit yesterday (7 May 2023).
On 8 May 2023, Bob said: Congrats Alice! I started learning the violin last week (the week before 8 May 2023).
On 8 May 2023, Alice said: Here he is at the beach. [shares a photo of a dog running on a beach]

Session 2 — 10:37 am on 27 June, 2023
On 27 June 2023, Bob said: I moved to Lisbon in 2022, and I love it.
On 27 June 2023, Alice said: Biscuit and I ran a 5k charity race on Sunday (25 June 2023).
On 27 June 2023, Bob said: Amazing! I performed at my first violin recital."""


def test_conversation_text_timestamped_dates(tiny):
    assert conversation_text(tiny[0], format="timestamped+dates") == TINY1_TSD
    tsd2 = conversation_text(tiny[1], format="timestamped+dates").splitlines()
    ts2 = conversation_text(tiny[1], timestamps=True).splitlines()
    changed = [(a, b) for a, b in zip(ts2, tsd2) if a != b]
    assert changed == [("On 14 February 2024, Tom said: I ran 30 kilometers this morning, a new personal best.",
                        "On 14 February 2024, Tom said: I ran 30 kilometers this morning (14 February 2024), a new "
                        "personal best.")]  # "in September", "in April", "Happy new year" are not relative
    # the photo note is never resolved, only the turn's words
    assert "On 3 January 2024, Maya said: [shares a photo of a clay bowl on a wheel]" in tsd2


def test_timestamped_dates_without_session_date(tmp_path, raw):
    del raw[0]["conversation"]["session_1_date_time"]
    a = load_locomo(_write(tmp_path, raw))[0]
    lines = conversation_text(a, format="timestamped+dates").splitlines()
    assert lines[:2] == ["Session 1", "Alice said: Hi Bob! I adopted a puppy named Biscuit yesterday."]


def test_session_texts_join_to_conversation_text(tiny):
    for s in tiny:
        for ts in (False, True):
            parts = session_texts(s, ts)
            assert len(parts) == 2
            assert "\n\n".join(parts) == conversation_text(s, ts)
        parts = session_texts(s, format="timestamped+dates")
        assert "\n\n".join(parts) == conversation_text(s, format="timestamped+dates")


def test_unknown_format(tiny):
    with pytest.raises(ValueError, match="unknown conversation format 'nope'"):
        conversation_text(tiny[0], format="nope")


def test_no_leakage_into_training_text(tiny):
    for s in tiny:
        src = conversation_only(s)
        assert getattr(src, "qa", []) == [] and s.qa  # the training view has no QA; the original keeps its QA
        assert type(src) is ld.Conversation and src.sessions == s.sessions
        for fmt in ("raw", "timestamped", "timestamped+dates"):
            text = conversation_text(s, format=fmt)
            assert conversation_text(src, format=fmt) == text
            assert "LEAK" not in text  # observation / session_summary / event_summary never loaded
            for q in s.qa:
                assert q.question not in text
        assert not hasattr(s, "observation") and not hasattr(s, "session_summary")


def test_turn_whitespace_collapsed(tmp_path, raw):
    raw[0]["conversation"]["session_1"][0]["text"] = "  Hi Bob!\n\nI adopted   a puppy. "
    (a, _) = load_locomo(_write(tmp_path, raw))
    assert conversation_text(a).splitlines()[0] == "Alice: Hi Bob! I adopted a puppy."


def test_photo_note_other_caption():
    assert ld.photo_note("a photo of a cat") == "[shares a photo of a cat]"
    assert ld.photo_note("a photography of a sign") == "[shares a photo of a sign]"
    assert ld.photo_note("sunset over a lake") == "[shares a photo: sunset over a lake]"


# ---------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    "s, dt",
    [
        ("1:56 pm on 8 May, 2023", datetime(2023, 5, 8, 13, 56)),
        ("10:37 am on 27 June, 2023", datetime(2023, 6, 27, 10, 37)),
        ("12:05 am on 1 January, 2023", datetime(2023, 1, 1, 0, 5)),
        ("12:30 pm on 1 January, 2023", datetime(2023, 1, 1, 12, 30)),
        ("7:00 PM on 3 Sept 2022", datetime(2022, 9, 3, 19, 0)),
        ("8 May, 2023", datetime(2023, 5, 8)),
    ],
)
def test_parse_session_datetime(s, dt):
    assert parse_session_datetime(s) == dt


@pytest.mark.parametrize("bad", ["yesterday afternoon", "1:56 pm on 8 Maytember, 2023", "1:56 pm on 31 February, 2023", "13:00 pm on 1 May, 2023", ""])
def test_parse_session_datetime_bad(bad):
    with pytest.raises(LocomoDataError) as e:
        parse_session_datetime(bad)
    assert repr(bad) in str(e.value) and "unparseable session date" in str(e.value)


def test_bad_date_in_timestamped_text(tmp_path, raw):
    raw[0]["conversation"]["session_2_date_time"] = "sometime in summer"
    a = load_locomo(_write(tmp_path, raw))[0]
    assert conversation_text(a) == TINY1_RAW  # the default format never reads dates
    with pytest.raises(LocomoDataError) as e:
        conversation_text(a, timestamps=True)
    msg = str(e.value)
    assert "tiny-1" in msg and "session_2_date_time" in msg and "'sometime in summer'" in msg


# ---------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(LocomoDataError) as e:
        load_locomo(p)
    assert str(p) in str(e.value) and "no such file" in str(e.value)


def test_malformed_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"sample_id": "x",\n  "qa": [}]', encoding="utf-8")
    with pytest.raises(LocomoDataError) as e:
        load_locomo(p)
    msg = str(e.value)
    assert str(p) in msg and "malformed JSON" in msg and "line 2 column" in msg
    assert isinstance(e.value, ValueError)


def test_top_level_not_list(tmp_path):
    with pytest.raises(LocomoDataError, match="top level must be a list"):
        load_locomo(_write(tmp_path, {"sample_id": "x"}))


def _mutate(raw, fn):
    raw = copy.deepcopy(raw)
    fn(raw)
    return raw


@pytest.mark.parametrize(
    "mutation, needles",
    [
        (lambda r: r[1].pop("conversation"), ["tiny-2", "'conversation'", "missing"]),
        (lambda r: r[0].pop("sample_id"), ["sample #0", "'sample_id'"]),
        (lambda r: r[0].pop("qa"), ["tiny-1", "'qa'"]),
        (lambda r: r[0]["qa"][2].update(category=7), ["tiny-1", "qa[2]", "'category'", "7"]),
        (lambda r: r[1]["qa"][0].update(category="4"), ["tiny-2", "qa[0]", "'category'", "'4'"]),
        (lambda r: r[0]["qa"][1].pop("question"), ["tiny-1", "qa[1]", "'question'"]),
        (lambda r: r[0]["qa"][0].pop("answer"), ["tiny-1", "qa[0]", "'answer'"]),
        (lambda r: r[0]["conversation"].update(session_2="oops"), ["tiny-1", "'session_2'", "list", "'oops'"]),
        (lambda r: r[0]["conversation"]["session_1"][1].pop("text"), ["tiny-1", "session_1 turn 1", "'text'"]),
        (lambda r: r[1]["conversation"]["session_2"][0].pop("speaker"), ["tiny-2", "session_2 turn 0", "'speaker'"]),
        (lambda r: r[1]["conversation"].pop("speaker_b"), ["tiny-2", "'speaker_b'"]),
        (lambda r: r.append(copy.deepcopy(r[0])), ["duplicate sample_id", "tiny-1"]),
    ],
)
def test_validation_errors(tmp_path, raw, mutation, needles):
    p = _write(tmp_path, _mutate(raw, mutation))
    with pytest.raises(LocomoDataError) as e:
        load_locomo(p)
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, (n, msg)


# ---------------------------------------------------------------------------- resolve_data_path


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """Isolated cache, and a download function that fails loudly if called."""
    monkeypatch.setenv("LORA_MEM_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LOCOMO_DATA", raising=False)

    def boom(url, dest, **kw):
        raise AssertionError("download must not be attempted")

    monkeypatch.setattr(ld, "download_file", boom)
    return tmp_path / "cache" / "data" / "locomo10.json"


def test_data_flag_takes_precedence_over_env(no_download, monkeypatch, tmp_path):
    other = _write(tmp_path, [], "other.json")
    monkeypatch.setenv("LOCOMO_DATA", str(other))
    assert resolve_data_path(str(FIXTURE)) == FIXTURE
    assert resolve_data_path(None) == other


def test_missing_data_flag_is_an_error_not_a_download(no_download, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCOMO_DATA", str(FIXTURE))
    missing = tmp_path / "missing.json"
    with pytest.raises(LocomoDataError) as e:
        resolve_data_path(str(missing))
    assert str(missing) in str(e.value) and "--data" in str(e.value)


def test_missing_env_path_is_an_error(no_download, monkeypatch, tmp_path):
    missing = tmp_path / "missing.json"
    monkeypatch.setenv("LOCOMO_DATA", str(missing))
    with pytest.raises(LocomoDataError) as e:
        resolve_data_path(None)
    assert str(missing) in str(e.value) and "LOCOMO_DATA" in str(e.value)


def test_cache_used(no_download):
    no_download.parent.mkdir(parents=True)
    no_download.write_text("[]")
    assert resolve_data_path(None) == no_download


def test_default_cache_location(monkeypatch):
    monkeypatch.delenv("LORA_MEM_HOME", raising=False)
    assert ld.default_cache_path() == Path(os.path.expanduser("~")) / ".cache" / "lora-mem" / "data" / "locomo10.json"


def test_offline_download_failure_message(no_download, monkeypatch):
    def offline(url, dest, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(ld, "download_file", offline)
    with pytest.raises(LocomoDataError) as e:
        resolve_data_path(None)
    msg = str(e.value)
    for needle in ("download", "failed", "snap-research/locomo", "--data", "LOCOMO_DATA", str(no_download)):
        assert needle in msg, (needle, msg)
    assert not no_download.exists()
    with pytest.raises(LocomoDataError, match="not found"):
        resolve_data_path(None, download=False)


def test_download_goes_to_cache(no_download, monkeypatch):
    calls = []

    def fake(url, dest, **kw):
        calls.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text("[]")
        return dest

    monkeypatch.setattr(ld, "download_file", fake)
    assert resolve_data_path(None) == no_download
    assert calls == [ld.LOCOMO_URL]
    assert resolve_data_path(None) == no_download and len(calls) == 1  # cached now


def test_download_file_atomic(tmp_path):
    dest = tmp_path / "dl" / "locomo10.json"
    ld.download_file(FIXTURE.as_uri(), dest)
    assert dest.read_bytes() == FIXTURE.read_bytes()
    bad = tmp_path / "bad.html"
    bad.write_text("<html>rate limited</html>")
    dest2 = tmp_path / "dl2" / "locomo10.json"
    with pytest.raises(Exception):
        ld.download_file(bad.as_uri(), dest2)
    assert not dest2.exists() and list(dest2.parent.iterdir()) == []  # no partial file left


# ---------------------------------------------------------------------------- real data (LOCOMO_DATA)


def _real_path():
    p = os.environ.get("LOCOMO_DATA")
    if not p or not Path(p).is_file():
        pytest.skip("LOCOMO_DATA unset or absent")
    return p


def test_real_data_counts():
    samples = load_locomo(_real_path())
    assert len(samples) == 10
    assert [s.sample_id for s in samples][:2] == ["conv-26", "conv-30"]
    assert sum(len(s.qa) for s in samples) == 1986
    assert sum(len(select_questions(s)) for s in samples) == 1540
    assert sum(len(select_questions(s, with_adversarial=True)) for s in samples) == 1986
    cats = {c: sum(q.category == c for s in samples for q in s.qa) for c in CATEGORY_NAMES}
    assert cats == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
    assert all(isinstance(q.answer, str) for s in samples for q in s.qa)
    assert all(q.answer for s in samples for q in select_questions(s))


def test_real_data_text():
    samples = load_locomo(_real_path())
    conv26 = samples[0]
    assert [s.index for s in conv26.sessions] == list(range(1, 20))
    for s in samples:
        assert [x.index for x in s.sessions] == sorted(x.index for x in s.sessions)
        for x in s.sessions:
            x.parsed_datetime()  # every real date parses
        raw_text = conversation_text(s)
        ts_text = conversation_text(s, timestamps=True)
        assert len(raw_text.splitlines()) == s.num_turns + len(s.sessions) - 1
        assert len(ts_text.splitlines()) == s.num_turns + 2 * len(s.sessions) - 1
        assert "\n\n\n" not in raw_text
    first = conversation_text(conv26).splitlines()[0]
    assert first == "Caroline: Hey Mel! Good to see you! How have you been?"
    assert conversation_text(conv26, timestamps=True).splitlines()[:2] == [
        "Session 1 — 1:56 pm on 8 May, 2023",
        "On 8 May 2023, Caroline said: Hey Mel! Good to see you! How have you been?",
    ]


def test_real_data_raw_and_timestamped_text_pinned():
    """The "raw" and "timestamped" formats are frozen: runs made with them must stay reproducible."""
    samples = load_locomo(_real_path())
    digests = {fmt: hashlib.sha256("\n\n\n".join(conversation_text(s, format=fmt) for s in samples).encode()).hexdigest()
               for fmt in ("raw", "timestamped")}
    assert digests == {
        "raw": "f6f631d7071ee51f3ffa8ad9a07d264c68cf052bf23f6af03713b22cabe97881",
        "timestamped": "a1915071c728b50af898bd5b4f8c464dfd90afbc531a5604fda6cb125dc00210",
    }
    raw_lines = conversation_text(samples[0]).splitlines()
    ts_lines = conversation_text(samples[0], timestamps=True).splitlines()
    assert raw_lines[2] == "Caroline: I went to a LGBTQ support group yesterday and it was so powerful."
    assert raw_lines[13] == "Melanie: Yeah, I painted that lake sunrise last year! It's special to me."
    assert raw_lines[11].endswith("By the way, take a look at this. [shares a photo of a painting of a sunset over a lake]")
    assert ts_lines[3] == "On 8 May 2023, Caroline said: I went to a LGBTQ support group yesterday and it was so powerful."
    assert ts_lines[14] == "On 8 May 2023, Melanie said: Yeah, I painted that lake sunrise last year! It's special to me."
    tsd_lines = conversation_text(samples[0], format="timestamped+dates").splitlines()
    assert tsd_lines[3] == ("On 8 May 2023, Caroline said: I went to a LGBTQ support group yesterday (7 May 2023) and "
                            "it was so powerful.")
    assert tsd_lines[14] == ("On 8 May 2023, Melanie said: Yeah, I painted that lake sunrise last year (2022)! It's "
                             "special to me.")


# Every note the resolver writes, to strip them again: "(7 May 2023)", "(the week before 8 May 2023)", "(2022)",
# "(April 2023)", "(summer 2022)", "(winter 2022-2023)", "(a few days before 8 May 2023)", ...
_NOTE = re.compile(r" \((?:the week (?:before|of|after) |the weekend of |(?:a few|several|a couple of|a couple|couple of)"
                   r" \w+ before |(?:spring|summer|fall|autumn|winter) )?(?:\d{1,2} )?(?:[A-Z][a-z]+ )?\d{4}(?:-\d{4})?\)")


def test_real_data_timestamped_dates_only_inserts_notes():
    samples = load_locomo(_real_path())
    changed = 0
    for s in samples:
        ts = conversation_text(s, format="timestamped").splitlines()
        tsd = conversation_text(s, format="timestamped+dates").splitlines()
        assert len(ts) == len(tsd)
        for a, b in zip(ts, tsd):
            if a != b:
                changed += 1
                assert _NOTE.sub("", b) == _NOTE.sub("", a), (a, b)  # the same words, notes added
                assert len(_NOTE.findall(b)) > len(_NOTE.findall(a))
    assert 450 < changed < 600  # 513 turns (of 5,882) carry a relative date on this data


# ---------------------------------------------------------------------------- relative dates

MON = datetime(2023, 5, 8, 13, 56)  # Monday 8 May 2023, 1:56 pm


@pytest.mark.parametrize(
    "text, when, expected",
    [
        # days
        ("I went to a support group yesterday.", MON, "I went to a support group yesterday (7 May 2023)."),
        ("Yesterday, I ran.", MON, "Yesterday (7 May 2023), I ran."),
        ("YESTERDAY!", MON, "YESTERDAY (7 May 2023)!"),
        ("I spent yesterday morning on a hike", MON, "I spent yesterday morning (7 May 2023) on a hike"),
        ("I bought it the day before yesterday.", MON, "I bought it the day before yesterday (6 May 2023)."),
        ("I leave the day after tomorrow evening.", MON, "I leave the day after tomorrow evening (10 May 2023)."),
        ("I did it today", MON, "I did it today (8 May 2023)"),
        ("What's cooking tonight?", MON, "What's cooking tonight (8 May 2023)?"),
        ("I ran 5k this morning, then yoga this evening.", MON,
         "I ran 5k this morning (8 May 2023), then yoga this evening (8 May 2023)."),
        ("See you tomorrow!", MON, "See you tomorrow (9 May 2023)!"),
        ("Last night was amazing", MON, "Last night (7 May 2023) was amazing"),
        ("It was two days ago.", MON, "It was two days ago (6 May 2023)."),
        ("It was 3 days ago.", MON, "It was 3 days ago (5 May 2023)."),
        ("a couple of days ago", MON, "a couple of days ago (6 May 2023)"),
        ("I started a few days ago.", MON, "I started a few days ago (a few days before 8 May 2023)."),
        ("I started few days ago.", MON, "I started few days ago (a few days before 8 May 2023)."),
        ("I saw it the other day.", MON, "I saw it the other day (a few days before 8 May 2023)."),
        # weekdays: "last" strictly before, "next" strictly after; 8 May 2023 is a Monday
        ("Last Friday, I went to a meeting.", MON, "Last Friday (5 May 2023), I went to a meeting."),
        ("I did it last Monday", MON, "I did it last Monday (1 May 2023)"),
        ("I did it last Sunday night", MON, "I did it last Sunday night (7 May 2023)"),
        ("last Fri and last tues", MON, "last Fri (5 May 2023) and last tues (2 May 2023)"),
        ("Wanna see my moves next Fri?", MON, "Wanna see my moves next Fri (12 May 2023)?"),
        ("Let's meet next Monday.", MON, "Let's meet next Monday (15 May 2023)."),
        ("I won my tournament on Friday!", MON, "I won my tournament on Friday (5 May 2023)!"),
        ("On Sunday I am going on a picnic.", datetime(2023, 10, 28), "On Sunday (29 October 2023) I am going on a picnic."),
        ("I will call you on Friday.", MON, "I will call you on Friday (12 May 2023)."),
        ("I had a great accomplishment this Tuesday!", datetime(2022, 11, 5),
         "I had a great accomplishment this Tuesday (1 November 2022)!"),
        ("Are you free this Friday?", MON, "Are you free this Friday (12 May 2023)?"),
        # weeks and weekends (a weekend is named by its Saturday)
        ("I started learning the violin last week.", MON,
         "I started learning the violin last week (the week before 8 May 2023)."),
        ("this past week was wild", MON, "this past week (the week before 8 May 2023) was wild"),
        ("This week has been busy", MON, "This week (the week of 8 May 2023) has been busy"),
        ("Our opener is next week", MON, "Our opener is next week (the week after 8 May 2023)"),
        ("It happened two weeks ago.", MON, "It happened two weeks ago (the week of 24 April 2023)."),
        ("I had a blast last weekend.", MON, "I had a blast last weekend (the weekend of 6 May 2023)."),
        ("I had a blast last weekend.", datetime(2023, 5, 7), "I had a blast last weekend (the weekend of 29 April 2023)."),
        ("that roadtrip this past weekend", MON, "that roadtrip this past weekend (the weekend of 6 May 2023)"),
        ("I'm hiking this weekend.", datetime(2023, 5, 10), "I'm hiking this weekend (the weekend of 13 May 2023)."),
        ("We tried snowshoeing this weekend.", datetime(2024, 1, 10),
         "We tried snowshoeing this weekend (the weekend of 6 January 2024)."),
        ("This weekend I'm heading out.", datetime(2023, 8, 19), "This weekend (the weekend of 19 August 2023) I'm heading out."),
        ("Let's go next weekend", MON, "Let's go next weekend (the weekend of 13 May 2023)"),
        ("camping two weekends ago", datetime(2023, 7, 17), "camping two weekends ago (the weekend of 8 July 2023)"),
        # months, years, seasons
        ("We had a blast last month.", MON, "We had a blast last month (April 2023)."),
        ("We're going camping next month.", MON, "We're going camping next month (June 2023)."),
        ("a conference this month", MON, "a conference this month (May 2023)"),
        ("I moved three months ago", MON, "I moved three months ago (February 2023)"),
        ("I painted that last year!", MON, "I painted that last year (2022)!"),
        ("It was ten years ago, and a year ago, and 3 years ago.", MON,
         "It was ten years ago (2013), and a year ago (2022), and 3 years ago (2020)."),
        ("Let's go next year", MON, "Let's go next year (2024)"),
        ("I did a bit of coding a few years back.", MON, "I did a bit of coding a few years back (a few years before 2023)."),
        ("several months ago", MON, "several months ago (several months before May 2023)"),
        ("camping last summer", datetime(2023, 8, 11), "camping last summer (summer 2022)"),
        ("camping last summer", datetime(2023, 10, 17), "camping last summer (summer 2023)"),
        ("a snowy one last winter", datetime(2023, 10, 13), "a snowy one last winter (winter 2022-2023)"),
        ("a snowy one last winter", datetime(2024, 1, 15), "a snowy one last winter (winter 2022-2023)"),
        ("a family outing this summer?", datetime(2023, 8, 17), "a family outing this summer (summer 2023)?"),
        ("a reunion next summer", datetime(2023, 12, 9), "a reunion next summer (summer 2024)"),
        ("last autumn", MON, "last autumn (autumn 2022)"),
        ("Last August I told you", datetime(2023, 12, 8), "Last August (August 2023) I told you"),
        ("Last August I told you", datetime(2023, 8, 8), "Last August (August 2022) I told you"),
        ("next March", MON, "next March (March 2024)"),
        # possessives: annotated after the "'s", except the often generic "today's"
        ("Can't wait for tomorrow's grand opening!", MON, "Can't wait for tomorrow's (9 May 2023) grand opening!"),
        ("during last week's scrimmage", MON, "during last week's (the week before 8 May 2023) scrimmage"),
        ("in today's world", MON, "in today's world"),
        # several in one text, in brackets and quotes
        ("Yesterday I ran; tomorrow I rest.", MON, "Yesterday (7 May 2023) I ran; tomorrow (9 May 2023) I rest."),
        ('(yesterday) and "last week"', MON, '(yesterday (7 May 2023)) and "last week (the week before 8 May 2023)"'),
    ],
)
def test_resolve_relative_dates(text, when, expected):
    assert resolve_relative_dates(text, when) == expected


@pytest.mark.parametrize(
    "text, when, expected",
    [
        ("yesterday", datetime(2023, 1, 1), "yesterday (31 December 2022)"),
        ("tomorrow", datetime(2023, 12, 31), "tomorrow (1 January 2024)"),
        ("last month", datetime(2023, 1, 15), "last month (December 2022)"),
        ("next month", datetime(2023, 12, 20), "next month (January 2024)"),
        ("last month", datetime(2024, 3, 31), "last month (February 2024)"),  # no day overflow into March
        ("last week", datetime(2023, 1, 1), "last week (the week before 1 January 2023)"),
        ("last Friday", datetime(2023, 5, 2), "last Friday (28 April 2023)"),
        ("next Saturday", datetime(2023, 12, 30), "next Saturday (6 January 2024)"),
        ("two weeks ago", datetime(2023, 1, 3), "two weeks ago (the week of 20 December 2022)"),
        ("three months ago", datetime(2023, 2, 10), "three months ago (November 2022)"),
        ("last December", datetime(2024, 1, 5), "last December (December 2023)"),
        ("next January", datetime(2023, 12, 5), "next January (January 2024)"),
        # leap years
        ("yesterday", datetime(2024, 3, 1), "yesterday (29 February 2024)"),
        ("yesterday", datetime(2023, 3, 1), "yesterday (28 February 2023)"),
        ("tomorrow", datetime(2024, 2, 28), "tomorrow (29 February 2024)"),
        ("two days ago", datetime(2024, 3, 1), "two days ago (28 February 2024)"),
        ("a year ago", datetime(2024, 2, 29), "a year ago (2023)"),
        ("last weekend", datetime(2024, 3, 1), "last weekend (the weekend of 24 February 2024)"),
    ],
)
def test_resolve_relative_dates_boundaries(text, when, expected):
    assert resolve_relative_dates(text, when) == expected
    assert resolve_relative_dates(text, when.date()) == expected  # a date works as well as a datetime


@pytest.mark.parametrize(
    "text",
    [
        "Hey Mel! Good to see you! How have you been?",
        "My last week at the old job was hard.",  # "final", not a date
        "I loved the last weekend of June.",
        "Over the next month or so I'll paint.",
        "It's been a while since we last talked, and the last time was fun.",
        "When I last sat down, the last sun of summer was out.",
        "I go every Friday; on Fridays I swim. Friday night was fun.",
        "Lately I've been busy; recently I moved.",
        "I spent two weeks back home.",
        "The yesterdays and Tomorrowland, non-yesterday, todays.",
        "What next, maybe a trip next to the lake? This may be fine: last may be first.",
        "I moved to Lisbon in 2022 and will go in September.",
        "",
    ],
)
def test_resolve_relative_dates_leaves_other_text_alone(text):
    assert resolve_relative_dates(text, MON) == text


def test_resolve_relative_dates_uses_only_the_date():
    a = resolve_relative_dates("yesterday and next month", datetime(2023, 5, 8, 0, 1))
    b = resolve_relative_dates("yesterday and next month", datetime(2023, 5, 8, 23, 59))
    assert a == b == "yesterday (7 May 2023) and next month (June 2023)"
    assert resolve_relative_dates("yesterday", date(2023, 5, 8)) == "yesterday (7 May 2023)"
