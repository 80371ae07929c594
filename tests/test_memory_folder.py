"""A memory folder (lora_mem.lora_core.memory_folder) on the tiny model: written whole, read back with every part
checked, and the memory reopened in a fresh model answers as the one that wrote it."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import lora_mem
from lora_mem import MemoryConfig, MemoryFolderError, Recipe, read_chat, read_memory_folder
from lora_mem.lora_core.inject import LoRAConfig
from lora_mem.lora_core.growth import open_memory
from lora_mem.lora_core.memory_folder import (ADAPTER_DIR, CONVERSATION_NAME, MANIFEST_NAME, new_manifest,
                                              save_memory_folder, session_sha256)
from lora_mem.lora_core.train import TrainConfig
from tests.tiny_models import make_tiny_checkpoint

CHAT = Path(__file__).parent / "fixtures" / "chat_small.jsonl"
QUESTIONS = ["What did Ana adopt?", "When did Ben start pottery classes?"]
CONFIG = MemoryConfig(lora=LoRAConfig(rank=4), train=TrainConfig(epochs=1),
                      recipe=Recipe("text+queries", seq_len=64))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


def question_logits(memory) -> torch.Tensor:
    """The model's logits on the first question's chat prompt (the tiny model's greedy answers are often empty,
    so these tell adapters apart where the answers cannot)."""
    ids = memory.lm.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    with torch.no_grad():
        return memory.lm.model(torch.tensor([ids]))


@pytest.fixture(scope="module")
def written(ckpt, tmp_path_factory):
    """(folder, the answers and question logits of the memory that wrote it)."""
    chat = read_chat(CHAT)
    memory = lora_mem.Memory(lora_mem.load_model(str(ckpt)), CONFIG)
    result = memory.write(chat.conversation)
    assert result.error is None
    folder = tmp_path_factory.mktemp("memories") / "chat"
    save_memory_folder(folder, memory, chat.conversation, new_manifest(memory, chat.conversation, result, chat))
    return folder, (memory.answer(QUESTIONS), question_logits(memory))


def test_folder_holds_adapter_conversation_and_manifest(written, ckpt):
    folder, _ = written
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_DIR, CONVERSATION_NAME, MANIFEST_NAME])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    read = read_memory_folder(folder)
    m = read.manifest
    assert m.speakers == ["Ana", "Ben"] and m.sample_id == "chat_small" and m.base_model == str(ckpt.resolve())
    assert [(s.index, s.turns) for s in m.sessions] == [(1, 4), (2, 4)]
    assert m.sources[0].sha256 == read_chat(CHAT).sha256 and m.sources[0].layout == "chat"
    assert m.memory_config == CONFIG
    assert m.writes[0]["sessions"] == [1, 2] and m.writes[0]["error"] is None
    assert read.conversation.sessions == read_chat(CHAT).conversation.sessions


def test_reopened_memory_answers_as_the_writer(written, ckpt):
    folder, (answers, logits) = written
    memory = open_memory(read_memory_folder(folder), lora_mem.load_model(str(ckpt)))
    assert memory.answer(QUESTIONS) == answers
    torch.testing.assert_close(question_logits(memory), logits, rtol=0, atol=0)
    base = lora_mem.Memory(lora_mem.load_model(str(ckpt)), CONFIG)  # fresh LoRA layers: B = 0, the base model
    assert (question_logits(base) - logits).abs().max() > 1e-3  # so the equality above is the adapter's doing


def test_memory_config_round_trips():
    assert MemoryConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(TypeError, match="lora: unknown setting 'ranks'"):
        MemoryConfig.from_dict({**CONFIG.to_dict(), "lora": {"ranks": 4}})
    for part, key, value in [("lora", "rank", "four"), ("lora", "rank", True), ("train", "lr", "0.1"),
                             ("lora", "target_modules", [1]), ("recipe", "qa_per_turn", 1.5)]:
        with pytest.raises(TypeError, match=f"{part}.{key}: must be"):
            MemoryConfig.from_dict({**CONFIG.to_dict(), part: {**CONFIG.to_dict()[part], key: value}})
    loose = {**CONFIG.to_dict(), "lora": {**CONFIG.to_dict()["lora"], "alpha": 8, "target_modules": "q_proj"}}
    assert MemoryConfig.from_dict(loose).lora.target_modules == "q_proj"  # an int is a float; a regex is a str
    with pytest.raises(TypeError, match="unknown part"):
        MemoryConfig.from_dict({**CONFIG.to_dict(), "extra": {}})


def test_existing_folder_is_refused_unless_replaced(written, ckpt, tmp_path):
    folder, _ = written
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    chat = read_chat(CHAT)
    memory = open_memory(read_memory_folder(copy), lora_mem.load_model(str(ckpt)))
    manifest = read_memory_folder(copy).manifest
    before = (copy / MANIFEST_NAME).read_bytes()
    with pytest.raises(MemoryFolderError, match="already exists and is not empty"):
        save_memory_folder(copy, memory, chat.conversation, manifest)
    assert (copy / MANIFEST_NAME).read_bytes() == before
    manifest.writes.append({"sessions": [], "note": "a second write"})
    save_memory_folder(copy, memory, chat.conversation, manifest, replace=True)
    assert read_memory_folder(copy).manifest.writes[-1]["note"] == "a second write"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # the replaced folder is gone


def break_manifest(key, value):
    def edit(folder):
        raw = json.loads((folder / MANIFEST_NAME).read_text())
        raw[key] = value
        (folder / MANIFEST_NAME).write_text(json.dumps(raw))
    return edit


def break_session(folder):
    raw = json.loads((folder / CONVERSATION_NAME).read_text())
    raw["session_2"][0]["text"] = "Something never said."
    (folder / CONVERSATION_NAME).write_text(json.dumps(raw))


def break_rank(folder):
    raw = json.loads((folder / ADAPTER_DIR / "adapter_config.json").read_text())
    raw["r"] = 8
    (folder / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("damage, needle", [
    (lambda f: (f / MANIFEST_NAME).unlink(), "manifest.json: missing"),
    (lambda f: (f / MANIFEST_NAME).write_text("{"), "manifest.json: malformed JSON at line 1"),
    (lambda f: (f / MANIFEST_NAME).write_text("[]"), "manifest.json: must be a JSON object, got list"),
    (break_manifest("format", "something else"), "field 'format' must be 'lora-mem memory'"),
    (break_manifest("version", 99), "field 'version' 99 is not one this lora-mem reads"),
    (break_manifest("speakers", ["Ana"]), "field 'speakers' must be two names"),
    (break_manifest("sessions", [{"index": "1"}]), "sessions[0]: field 'index' must be int, got str"),
    (break_manifest("base_model", None), "field 'base_model' must be str, got NoneType"),
    (break_manifest("config", {"lora": {"rank": 4}}), "field 'config': train: must be an object of settings"),
    (break_manifest("writes", [1]), "field 'writes' must be a list of objects"),
    (lambda f: (f / ADAPTER_DIR / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
    (lambda f: (f / CONVERSATION_NAME).unlink(), "conversation.json: missing"),
    (break_session, "conversation.json: corrupt (its sha256 differs from the one in"),
    (break_rank, "adapter_config.json: corrupt (its sha256 differs from the one in"),
])
def test_broken_folder_is_one_error_naming_the_file(written, tmp_path, damage, needle):
    folder, _ = written
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    damage(copy)
    with pytest.raises(MemoryFolderError) as e:
        read_memory_folder(copy)
    assert needle in str(e.value) and str(copy) in str(e.value), str(e.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(MemoryFolderError, match="no such memory folder"):
        read_memory_folder(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MemoryFolderError, match="not a folder"):
        read_memory_folder(tmp_path / "file")


def test_session_digest_ignores_position_not_words():
    conv = read_chat(CHAT).conversation
    s1, s2 = conv.sessions
    moved = type(s1)(index=7, date_time=s1.date_time, turns=[type(t)(t.speaker, "X", t.text) for t in s1.turns])
    assert session_sha256(moved) == session_sha256(s1) != session_sha256(s2)
    reworded = type(s1)(s1.index, s1.date_time, [type(t)(t.speaker, t.dia_id, t.text + "!") for t in s1.turns])
    assert session_sha256(reworded) != session_sha256(s1)
