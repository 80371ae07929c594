"""Reading conversations from files (lora_mem.lora_core.chat_files): chat exports grouped into sessions, LoCoMo's
layout, and one error naming the file, the line and the field for each kind of bad input."""

import json
from pathlib import Path

import pytest

from lora_mem import ConversationError, SessionSplit, read_chat
from lora_mem.lora_core.chat_files import locomo_date_time
from lora_mem.lora_core.conversation import parse_session_datetime

FIXTURES = Path(__file__).parent / "fixtures"
CHAT = FIXTURES / "chat_small.jsonl"
LOCOMO = FIXTURES / "locomo_tiny.json"


def write_lines(path: Path, messages: list) -> Path:
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    return path


def message(speaker="Ana", text="hello there", time="2024-03-02T09:15:00"):
    return {"speaker": speaker, "text": text, "time": time}


def test_jsonl_chat_grouped_by_day():
    chat = read_chat(CHAT)
    conv = chat.conversation
    assert chat.layout == "chat" and conv.sample_id == "chat_small"
    assert (conv.speaker_a, conv.speaker_b) == ("Ana", "Ben")
    assert [len(s.turns) for s in conv.sessions] == [4, 4]
    assert [s.date_time for s in conv.sessions] == ["9:15 am on 2 March, 2024", "6:02 pm on 9 March, 2024"]
    assert conv.sessions[1].turns[0].text == "Rex chewed my running shoes this morning."
    assert [t.dia_id for t in conv.sessions[0].turns] == ["D1:1", "D1:2", "D1:3", "D1:4"]
    assert len(chat.sha256) == 64


def test_json_list_equals_jsonl(tmp_path):
    messages = [json.loads(line) for line in CHAT.read_text().splitlines() if line.strip()]
    as_json = tmp_path / "chat_small.json"
    as_json.write_text(json.dumps(messages, indent=2))
    assert read_chat(as_json).conversation == read_chat(CHAT).conversation


def test_sessions_by_gap(tmp_path):
    times = ["2024-03-02T09:00", "2024-03-02T10:00", "2024-03-02T18:00", "2024-03-03T01:00"]
    path = write_lines(tmp_path / "c.jsonl", [message("Ana" if i % 2 == 0 else "Ben", f"m{i}", t)
                                              for i, t in enumerate(times)])
    by_day = read_chat(path).conversation
    assert [len(s.turns) for s in by_day.sessions] == [3, 1]  # 2 and 3 March
    by_gap = read_chat(path, SessionSplit("gap", gap_hours=6)).conversation
    assert [len(s.turns) for s in by_gap.sessions] == [2, 1, 1]  # silences of 1, 8 and 7 hours
    assert [len(s.turns) for s in read_chat(path, SessionSplit("gap", 7.5)).conversation.sessions] == [2, 2]
    assert [len(s.turns) for s in read_chat(path, SessionSplit("gap", 9)).conversation.sessions] == [4]


def test_messages_sorted_by_time_and_time_formats(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [message("Ben", "second", "1:56 pm on 8 May, 2023"),
                                              message("Ana", "first", 1683550000)])  # 12:46 UTC, 8 May 2023
    conv = read_chat(path).conversation
    assert [t.text for t in conv.sessions[0].turns] == ["first", "second"]
    assert (conv.speaker_a, conv.speaker_b) == ("Ben", "Ana")  # named in the order of the file


def test_session_date_round_trips():
    for text in ("12:05 am on 1 January, 2024", "12:30 pm on 29 February, 2024", "11:59 pm on 31 December, 1999"):
        assert locomo_date_time(parse_session_datetime(text)) == text


def test_locomo_file_needs_a_conversation_named():
    with pytest.raises(ConversationError, match=r"holds 2 conversations \(tiny-1, tiny-2\): name one"):
        read_chat(LOCOMO)
    chat = read_chat(LOCOMO, conversation="tiny-2")
    assert chat.layout == "locomo" and chat.conversation.sample_id == "tiny-2"
    assert not hasattr(chat.conversation, "qa")  # the questions stay in the file
    with pytest.raises(ConversationError, match="no conversation 'conv-9'"):
        read_chat(LOCOMO, conversation="conv-9")


def test_locomo_single_sample_and_bare_conversation(tmp_path):
    sample = json.loads(LOCOMO.read_text())[0]
    one = tmp_path / "one.json"
    one.write_text(json.dumps(sample))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(sample["conversation"]))
    assert read_chat(one).conversation.sessions == read_chat(bare).conversation.sessions
    assert read_chat(one).conversation.sample_id == "tiny-1"


BAD_JSONL = [
    ('{"speaker": "Ana", "text": "hi", "time": "2024-03-02"}\n{"speaker": "Ben", "text": "yo"}\n',
     "line 2: missing field 'time'"),
    ('{"speaker": "Ana", "text": "hi", "time": "2024-03-02"}\n{"speaker": "Ben", "time": "2024-03-02"}\n',
     "line 2: missing field 'text'"),
    ('\n\n{"text": "hi", "time": "2024-03-02"}\n', "line 3: missing field 'speaker'"),
    ('{"speaker": "Ana", "text": 5, "time": "2024-03-02"}\n', "line 1: field 'text' must be a string, got int 5"),
    ('{"speaker": "Ana", "text": "hi", "time": "next tuesday"}\n', "line 1: field 'time': unreadable time"),
    ('{"speaker": "Ana", "text": "hi", "time": [1]}\n', "line 1: field 'time' must be a string or a number"),
    ('{"speaker": "Ana", "text": "hi", "time": "2024-03-02"}\n{"speaker": "Ben", "text": "hi",\n',
     "line 2: malformed JSON"),
    ('["Ana", "hi", "2024-03-02"]\n', "line 1: a message must be an object {speaker, text, time}"),
    ('{"speaker": " ", "text": "hi", "time": "2024-03-02"}\n', "line 1: field 'speaker' is empty"),
    ('{"speaker": "Ana", "text": "hi", "time": "2024-03-02"}\n{"speaker": "Ana", "text": "again", '
     '"time": "2024-03-03"}\n', "a chat needs two speakers, found 1 ('Ana')"),
    ('{"speaker": "Ana", "text": "hi", "time": "2024-03-02"}\n{"speaker": "Ben", "text": "yo", "time": "2024-03-02"}\n'
     '{"speaker": "Cy", "text": "hey", "time": "2024-03-02"}\n', "line 3: field 'speaker': a chat needs two speakers, "
                                                              "found 3"),
    ('{"speaker": "Ana", "text": " ", "time": "2024-03-02"}\n{"speaker": "Ben", "text": "", "time": "2024-03-02"}\n',
     "no text in any of its 2 messages: nothing to remember"),
    ("\n\n", "no messages: nothing to remember"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "line 1: JSON nested too deeply to read"),
]


@pytest.mark.parametrize("content, needle", BAD_JSONL)
def test_bad_jsonl_is_one_error_naming_file_line_and_field(tmp_path, content, needle):
    path = tmp_path / "chat.jsonl"
    path.write_text(content)
    with pytest.raises(ConversationError) as e:
        read_chat(path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_json_list_names_the_line_of_the_item(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text('[\n  {"speaker": "Ana", "text": "hi", "time": "2024-03-02"},\n\n  {"speaker": "Ben",\n'
                    '   "text": "yo"}\n]\n')
    with pytest.raises(ConversationError, match=r"chat.json: line 4: missing field 'time'"):
        read_chat(path)


@pytest.mark.parametrize("content, needle", [
    ('{"speaker": "Ana"', "malformed JSON at line 1 column 18"),
    ('"hello"', "top level: must be a list of messages {speaker, text, time} or LoCoMo's layout, got str"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
])
def test_bad_json_file(tmp_path, content, needle):
    path = tmp_path / "chat.json"
    path.write_text(content)
    with pytest.raises(ConversationError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        read_chat(path)


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"speaker": "\xff"}\n')
    with pytest.raises(ConversationError, match="not UTF-8"):
        read_chat(path)
    with pytest.raises(ConversationError, match="nope.json: no such file"):
        read_chat(tmp_path / "nope.json")
    with pytest.raises(ConversationError, match="not a file"):
        read_chat(tmp_path)


def test_locomo_layout_errors_name_the_field(tmp_path):
    sample = json.loads(LOCOMO.read_text())[0]
    del sample["conversation"]["session_1"][0]["text"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([sample]))
    with pytest.raises(ConversationError, match=r"sample 'tiny-1' session_1 turn 0: missing field 'text'"):
        read_chat(path)


def test_session_split_checks_its_settings():
    with pytest.raises(ValueError, match="unknown 'week'"):
        SessionSplit("week")
    with pytest.raises(ValueError, match="gap_hours: must be > 0"):
        SessionSplit("gap", 0)
