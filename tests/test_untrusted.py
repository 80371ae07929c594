"""lora_mem.untrusted: ids checked before they become file names, output paths confirmed inside their folder, JSON
read strictly and checked against a schema; every problem one line naming the id, path or file and field."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import BaseModel, ConfigDict

from lora_mem.untrusted import (
    MAX_NAME_BYTES,
    JSONFileError,
    UnsafeNameError,
    UnsafePathError,
    check_name,
    check_writable,
    parse_json,
    path_inside,
    read_json,
    read_json_as,
    read_json_lines,
)


@pytest.mark.parametrize("name, why", [
    ("../../escape", "it contains '/'"),
    ("/etc", "it contains '/'"),
    ("a/b", "it contains '/'"),
    ("a\\b", "it contains '\\\\'"),
    ("..", "it starts with '.'"),
    (".", "it starts with '.'"),
    (".hidden", "it starts with '.'"),
    ("", "it is empty"),
    ("   ", "it is empty"),
    (" conv-26", "white space"),
    ("conv\x00", "U+0000"),
    ("conv\n26", "U+000A"),
    ("conv\u202e62", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("x" * (MAX_NAME_BYTES + 1), f"{MAX_NAME_BYTES + 1} bytes long (at most {MAX_NAME_BYTES})"),
    ("é" * 65, f"130 bytes long (at most {MAX_NAME_BYTES})"),
    (26, "it is a int, not a string"),
    (None, "it is a NoneType, not a string"),
])
def test_unsafe_names_are_refused_naming_the_id(name, why):
    with pytest.raises(UnsafeNameError) as e:
        check_name(name, "sample_id")
    message = str(e.value)
    assert message.startswith(f"sample_id {name!r:.80} is not a safe file name: ") and why in message, message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["conv-26", "Conv_26.v2", "Ünïcode 会话", "x" * MAX_NAME_BYTES, "a..b"])
def test_safe_names_pass_unchanged(name):
    assert check_name(name, "sample_id") == name


def test_path_inside_confirms_the_resolved_path(tmp_path):
    out = tmp_path / "out"
    (out / "conversations").mkdir(parents=True)
    assert path_inside(out, "conversations", "conv-26") == out / "conversations" / "conv-26"
    with pytest.raises(UnsafePathError, match="is not a safe file name: it contains '/'"):
        path_inside(out, "conversations", "../../escape")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "conversations" / "conv-26").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match=f"leads outside {out}.*resolves to {elsewhere}"):
        path_inside(out, "conversations", "conv-26")
    (out / "adapters").symlink_to(out / "conversations")  # a link that stays inside is fine
    assert path_inside(out, "adapters", "conv-30") == out / "adapters" / "conv-30"


def test_check_writable_finds_what_is_in_the_way(tmp_path):
    (tmp_path / "conversations").write_text("a file where a folder goes")
    with pytest.raises(UnsafePathError, match="conversations is in the way: a folder goes there"):
        check_writable(tmp_path, [], [tmp_path / "conversations"])
    (tmp_path / "results.json").mkdir()
    with pytest.raises(UnsafePathError, match="results.json is in the way: a file goes there"):
        check_writable(tmp_path, [tmp_path / "results.json"], [])
    check_writable(tmp_path, [tmp_path / "table.md"], [tmp_path / "adapters"])  # nothing there yet: fine


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_writable_finds_a_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(UnsafePathError, match="ro is not writable"):
        check_writable(tmp_path, [tmp_path / "ro" / "x.json"], [])


@pytest.mark.parametrize("text, why", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    ('{"lr": NaN}', "NaN is not JSON"),
    ('{"lr": Infinity}', "Infinity is not JSON"),
    ('{"lr": -Infinity}', "-Infinity is not JSON"),
    ('{"lr": 1e999}', "the number 1e999 is out of range"),
    ('{"r": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the limit"),
    ('{"r": 8', "malformed JSON at line 1"),
    (b'{"r": "\xff"}', "not UTF-8 text"),
])
def test_strict_json_is_one_line(text, why):
    with pytest.raises(JSONFileError) as e:
        parse_json(text, "f.json")
    assert str(e.value).startswith("f.json: ") and why in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_read_json_names_the_file_and_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(JSONFileError, match=r"rows.jsonl line 3: malformed JSON"):
        read_json_lines(tmp_path / "rows.jsonl")
    with pytest.raises(JSONFileError, match=r"missing.json: cannot be read \(No such file or directory\)"):
        read_json(tmp_path / "missing.json")


class Adapterish(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    r: int
    targets: list[str]


@pytest.mark.parametrize("value, why", [
    (None, "f.json: must be a JSON object, got null"),
    ([], "f.json: must be a JSON object, got list []"),
    ({"targets": []}, "f.json: missing field 'r'"),
    ({"r": "abc", "targets": []}, "f.json: field 'r': input should be a valid integer, got str 'abc'"),
    ({"r": True, "targets": []}, "f.json: field 'r': input should be a valid integer, got bool True"),
    ({"r": 8, "targets": ["q", 3]}, "f.json: field 'targets[1]': input should be a valid string, got int 3"),
])
def test_schema_problems_name_file_and_field(tmp_path, value, why):
    path = tmp_path / "f.json"
    path.write_text(json.dumps(value))
    with pytest.raises(JSONFileError) as e:
        read_json_as(path, Adapterish)
    assert str(e.value) == why.replace("f.json", str(path))
