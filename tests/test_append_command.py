"""`lora-mem append MEMORY_DIR CHAT` on the tiny model: a memory written from one session grows by the next ones; the
same sessions again, a broken folder or a bad chat file is one error line, before the model loads, with nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lora_mem
from lora_mem import command
from tests.tiny_models import make_tiny_checkpoint

CHAT = Path(__file__).parent / "fixtures" / "chat_small.jsonl"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> tuple[Path, Path]:
    """chat_small.jsonl's two days as two files: the first session, then the second."""
    d = tmp_path_factory.mktemp("chats")
    lines = [line for line in CHAT.read_text().splitlines() if line.strip()]
    first, second = d / "first.jsonl", d / "second.jsonl"
    first.write_text("\n".join(lines[:4]) + "\n")
    second.write_text("\n".join(lines[4:]) + "\n")
    return first, second


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run(monkeypatch, capsys, argv):
    try:
        command.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, out, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def memory_dir(ckpt, chats, tmp_path):
    out = tmp_path / "ana"
    command.main(["write", str(chats[0]), "--out", str(out), "--model", str(ckpt), "--seq-len", "64", "--rank", "4",
                  "--epochs", "1", "--quiet"])
    return out


def test_append_grows_the_memory_by_the_next_session(memory_dir, chats, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, ["append", str(memory_dir), str(chats[1]), "--quiet"])
    assert code == 0 and out.startswith(f"appended 1 session(s) to {memory_dir} (now 2, modules)")
    folder = lora_mem.read_memory_folder(memory_dir)
    assert [s.index for s in folder.manifest.sessions] == [1, 2]
    assert [w["sessions"] for w in folder.manifest.writes] == [[1], [2]]
    assert [s.sessions for s in folder.manifest.sources] == [[1], [2]]
    assert folder.conversation.sessions[1].turns[0].text == "Rex chewed my running shoes this morning."
    assert folder.conversation.sessions[1].turns[0].dia_id == "D2:1"
    assert {"modules/0001/adapter_model.safetensors", "modules/0002/adapter_model.safetensors"} <= \
        set(folder.manifest.files)  # the default growth: an adapter per append
    code, out, err = run(monkeypatch, capsys, ["ask", str(memory_dir), "What did Rex chew?", "--quiet"])
    assert code == 0 and len(out.splitlines()) == 1


def test_the_same_sessions_again_are_refused(memory_dir, chats, monkeypatch, capsys):
    before = snapshot(memory_dir)
    monkeypatch.setattr(command, "load", lambda *a: pytest.fail("the model was loaded"))
    code, out, err = run(monkeypatch, capsys, ["append", str(memory_dir), str(chats[0])])
    one_error_line(code, out, err, str(chats[0]), "already holds it", "refused")
    assert snapshot(memory_dir) == before


def test_a_broken_memory_or_chat_is_one_line_before_the_model_loads(memory_dir, chats, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(command, "load", lambda *a: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"speaker": "Ana", "text": "hi"}\n')
    before = snapshot(memory_dir)
    code, out, err = run(monkeypatch, capsys, ["append", str(memory_dir), str(bad)])
    one_error_line(code, out, err, "bad.jsonl", "time")
    weights = memory_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    code, out, err = run(monkeypatch, capsys, ["append", str(memory_dir), str(chats[1])])
    one_error_line(code, out, err, str(weights), "corrupt")
    manifest = json.loads((memory_dir / "manifest.json").read_text())
    assert manifest["files"]["adapter/adapter_model.safetensors"] != ""
    assert snapshot(memory_dir) == {**before, "adapter/adapter_model.safetensors": weights.read_bytes()}
