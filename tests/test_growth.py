"""A memory that grows (lora_mem/lora_core/growth.py) on a tiny model: appending in two processes
equals one, a damaged folder is one error naming the file with nothing written, a session appended twice is
refused, the replay sample is seeded, recorded and trained on, and each strategy is what it says it is."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_mem.lora_core.growth as growth_module
from bench.locomo_data import load_locomo
from lora_mem.lora_core.adapter_io import read_adapter_weights
from lora_mem.lora_core.conversation import Conversation, Session, Turn, conversation_only
from lora_mem.lora_core.growth import new_memory, open_memory, replay_sample, summed_adapter
from lora_mem.lora_core.inject import LoRAConfig, lora_modules
from lora_mem.lora_core.memory import GrowthConfig, Memory, MemoryConfig
from lora_mem.lora_core.memory_folder import (MemoryFolderError, new_manifest, read_memory_folder,
                                              save_memory_folder, session_sha256)
from lora_mem.lora_core.recipes import Recipe
from lora_mem.lora_core.train import TrainConfig, TrainResult
from lora_mem.model.loader import load_model
from tests.tiny_models import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


@pytest.fixture(scope="module")
def conversation() -> Conversation:
    """tiny-1's two sessions and a third made of tiny-2's turns (said by tiny-1's speakers), so that a stream has
    an append with something to replay and one after it."""
    samples = load_locomo(FIXTURE)
    conv = conversation_only(samples[0])
    a, b = conv.speaker_a, conv.speaker_b
    other = samples[1].sessions[0]
    third = Session(3, "4:00 pm on 3 June, 2023", [Turn(a if i % 2 == 0 else b, f"D3:{i + 1}", t.text)
                                                    for i, t in enumerate(other.turns)])
    return Conversation(conv.sample_id, a, b, list(conv.sessions) + [third])


def config(strategy: str, **growth) -> MemoryConfig:
    return MemoryConfig(lora=LoRAConfig(rank=4), train=TrainConfig(epochs=1),
                        recipe=Recipe("text+queries", seq_len=128), growth=GrowthConfig(strategy, **growth))


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


TIMES = ("seconds", "written_at", "tokens_per_second")


def without_timings(manifest: dict) -> dict:
    writes = [{k: v for k, v in w.items() if not k.endswith(TIMES)} for w in manifest["writes"]]
    return {**manifest, "writes": writes}


def grow(ckpt, path: Path, cfg: MemoryConfig, sessions: list[Session]) -> Memory:
    memory = new_memory(load_model(str(ckpt)), cfg, path, name="tiny-1")
    for s in sessions:
        assert memory.append(s).error is None
    return memory


APPEND_IN_A_NEW_PROCESS = """
import json, sys
from lora_mem.lora_core.conversation import Session, Turn
from lora_mem.lora_core.growth import open_memory
from lora_mem.lora_core.memory_folder import read_memory_folder
from lora_mem.model.loader import load_model
memory = open_memory(read_memory_folder(sys.argv[2]), load_model(sys.argv[1]))
raw = json.loads(sys.argv[3])
session = Session(raw["index"], raw["date_time"], [Turn(**t) for t in raw["turns"]])
assert memory.append(session).error is None
"""


@pytest.mark.parametrize("strategy, growth", [("continue", {}), ("modules", {}), ("rewrite", {})])
def test_appending_in_a_new_process_equals_one_process(ckpt, conversation, tmp_path, strategy, growth):
    cfg = config(strategy, **growth)
    one = tmp_path / "one"
    grow(ckpt, one, cfg, conversation.sessions)
    two = tmp_path / "two"
    grow(ckpt, two, cfg, conversation.sessions[:2])
    third = conversation.sessions[2]
    raw = {"index": third.index, "date_time": third.date_time,
           "turns": [{"speaker": t.speaker, "dia_id": t.dia_id, "text": t.text} for t in third.turns]}
    subprocess.run([sys.executable, "-c", APPEND_IN_A_NEW_PROCESS, str(ckpt), str(two), json.dumps(raw)],
                   cwd=REPO, check=True)
    a, b = snapshot(one), snapshot(two)
    assert sorted(a) == sorted(b)
    for name in a:  # every adapter, replay buffer, optimizer state, module and the conversation, byte for byte
        if name != "manifest.json":
            assert a[name] == b[name], name
    assert without_timings(json.loads(a["manifest.json"])) == without_timings(json.loads(b["manifest.json"]))


def test_rewrite_is_the_all_at_once_write(ckpt, conversation, tmp_path):
    grow(ckpt, tmp_path / "mem", config("rewrite"), conversation.sessions)
    written = Memory(load_model(str(ckpt)), config("rewrite"))
    written.write(conversation)
    written.save(tmp_path / "all-at-once")
    grown = read_adapter_weights(tmp_path / "mem" / "adapter")
    once = read_adapter_weights(tmp_path / "all-at-once")
    assert grown.keys() == once.keys() and all(torch.equal(grown[k], once[k]) for k in once)


def test_first_continue_append_is_a_write_of_its_session(ckpt, conversation, tmp_path):
    memory = grow(ckpt, tmp_path / "mem", config("continue"), conversation.sessions[:1])
    written = Memory(load_model(str(ckpt)), config("continue"))
    written.write(Conversation(conversation.sample_id, conversation.speaker_a, conversation.speaker_b,
                               conversation.sessions[:1]))
    grown = {n: m.lora_B.detach().clone() for n, m in lora_modules(memory.lm.model).items()}
    assert all(torch.equal(grown[n], m.lora_B) for n, m in lora_modules(written.lm.model).items())


@pytest.mark.parametrize("strategy", ["continue", "modules"])
def test_a_folder_written_at_once_grows_as_if_appended(ckpt, conversation, tmp_path, strategy):
    """A memory folder `lora-mem write` made (no replay buffer, no modules) grows: its replay buffer is built
    again from its conversation, its adapter is its first module; the result is that of appending its sessions
    as one block (the optimizer fresh, as a write leaves none)."""
    cfg = config(strategy, keep_optimizer=False)
    first = Conversation("tiny-1", conversation.speaker_a, conversation.speaker_b, conversation.sessions[:2])
    memory = Memory(load_model(str(ckpt)), cfg)
    result = memory.write(first)
    save_memory_folder(tmp_path / "written", memory, first, new_manifest(memory, first, result))
    grown = open_memory(read_memory_folder(tmp_path / "written"), load_model(str(ckpt)))
    assert grown.append(conversation.sessions[2]).error is None
    appended = new_memory(load_model(str(ckpt)), cfg, tmp_path / "appended", name="tiny-1")
    appended.append(conversation.sessions[:2])
    appended.append(conversation.sessions[2])
    a, b = snapshot(tmp_path / "written"), snapshot(tmp_path / "appended")
    for name in b:
        if name.endswith((".safetensors", "questions.json")):
            assert a[name] == b[name], name
    routed = grown.folder.routes(["What did Alice adopt?"]) if strategy == "modules" else None
    assert routed is None or routed[0][1] == [0]


def test_replay_sample_is_seeded_recorded_and_trained_on(ckpt, conversation, tmp_path, monkeypatch):
    memory = new_memory(load_model(str(ckpt)), config("continue", replay_ratio=0.5), tmp_path / "mem")
    trained_on = []
    real_train = Memory.train

    def capture(self, data, **kw):
        trained_on.append(data.input_ids.clone())
        return real_train(self, data, **kw)

    monkeypatch.setattr(Memory, "train", capture)
    for s in conversation.sessions:
        memory.append(s)
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    buffer = memory.folder.buffer
    for record, batch in zip(manifest["writes"], trained_on):
        replay = record["replay"]
        n_earlier = int((buffer.write < record["append"]).sum())
        assert replay["seed"] == record["append"] + memory.config.train.seed
        assert replay["indices"] == replay_sample(n_earlier, record["windows"], 0.5, replay["seed"])
        assert len(replay["indices"]) == min(n_earlier, round(0.5 * record["windows"]))
        # what was trained: the append's own windows, then exactly the recorded earlier ones
        assert torch.equal(batch[record["windows"]:], buffer.input_ids[replay["indices"]])
        assert torch.equal(batch[:record["windows"]], buffer.input_ids[buffer.write == record["append"]])
    assert manifest["writes"][-1]["replay"]["indices"], "the last append replays something"
    assert replay_sample(40, 10, 0.5, 1) != replay_sample(40, 10, 0.5, 2)  # the seed decides


def test_the_same_session_twice_is_refused_with_nothing_written(ckpt, conversation, tmp_path):
    path = tmp_path / "mem"
    memory = grow(ckpt, path, config("continue"), conversation.sessions[:2])
    before = snapshot(path)
    first = conversation.sessions[0]
    renumbered = Session(7, first.date_time, first.turns)  # the same words under another number: still held
    for again in (conversation.sessions[1], renumbered):
        with pytest.raises(MemoryFolderError, match="already holds it .* refused"):
            memory.append(again)
    with pytest.raises(MemoryFolderError, match="in the order they were said"):
        memory.append(Session(1, "1:00 pm on 1 June, 2023", [Turn("Alice", "x", "Something new altogether.")]))
    assert snapshot(path) == before
    assert session_sha256(renumbered) == session_sha256(first)


@pytest.mark.parametrize("damage", ["missing-adapter", "corrupt-replay", "corrupt-optimizer", "corrupt-manifest",
                                    "missing-manifest", "missing-module"])
def test_a_damaged_folder_is_one_error_naming_the_file(ckpt, conversation, tmp_path, damage):
    strategy = "modules" if damage == "missing-module" else "continue"
    path = tmp_path / "mem"
    grow(ckpt, path, config(strategy), conversation.sessions[:2])
    target = {"missing-adapter": path / "adapter" / "adapter_model.safetensors",
              "corrupt-replay": path / "replay.safetensors", "corrupt-optimizer": path / "optimizer.pt",
              "corrupt-manifest": path / "manifest.json", "missing-manifest": path / "manifest.json",
              "missing-module": path / "modules" / "0001" / "questions.json"}[damage]
    if damage.startswith("missing"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:-3] + b"xyz")
    before = snapshot(path)
    with pytest.raises(MemoryFolderError) as e:
        read_memory_folder(path)
    assert str(target) in str(e.value) and "\n" not in str(e.value)
    assert snapshot(path) == before


def test_a_diverged_append_writes_nothing_and_keeps_the_adapter(ckpt, conversation, tmp_path, monkeypatch):
    path = tmp_path / "mem"
    memory = grow(ckpt, path, config("continue"), conversation.sessions[:1])
    before = snapshot(path)
    kept = {n: m.lora_B.detach().clone() for n, m in lora_modules(memory.lm.model).items()}
    real_train = Memory.train

    def diverge(self, data, **kw):
        real_train(self, data, **kw)
        return TrainResult(error="non-finite loss nan at epoch 0, step 1")

    monkeypatch.setattr(Memory, "train", diverge)
    result = memory.append(conversation.sessions[1])
    assert result.error and snapshot(path) == before
    assert all(torch.equal(kept[n], m.lora_B) for n, m in lora_modules(memory.lm.model).items())


def test_modules_route_each_question_to_the_module_that_trained_on_it(ckpt, conversation, tmp_path):
    memory = grow(ckpt, tmp_path / "mem", config("modules", route_top_k=1), conversation.sessions)
    per_module = [json.loads((tmp_path / "mem" / "modules" / f"{n:04d}" / "questions.json").read_text())
                  for n in (1, 2, 3)]
    assert (tmp_path / "mem" / "adapter" / "adapter_model.safetensors").read_bytes() == \
           (tmp_path / "mem" / "modules" / "0003" / "adapter_model.safetensors").read_bytes()  # the latest
    asked = [per_module[0][0], per_module[2][0], per_module[1][-1]]
    routes = dict(memory.folder.routes(asked))
    assert routes == {(1,): [0], (3,): [1], (2,): [2]}
    # as the memory stood after two appends: module 3's question goes to one of the two that exist
    assert {m for ms, _ in memory.folder.routes(asked, modules=2) for m in ms} <= {1, 2}
    before = dict(memory.folder.routes(asked, modules=2))
    assert 0 in before[(1,)] and 2 in before[(2,)]  # the questions of modules 1 and 2 still go to them
    assert dict(memory.folder.routes(asked, top_k=3)) == {(1, 2, 3): [0, 1, 2]}
    with pytest.raises(ValueError, match="first 4"):
        memory.folder.routes(asked, modules=4)
    answers = memory.answer(asked)
    for n, i in ((1, 0), (3, 1), (2, 2)):  # each answered as its module alone would answer it
        alone = Memory(load_model(str(ckpt)), config("modules", route_top_k=1))
        alone.load(tmp_path / "mem" / "modules" / f"{n:04d}")
        assert alone.answer([asked[i]]) == [answers[i]]


def test_summed_modules_add_their_updates():
    g = torch.Generator().manual_seed(0)
    adapters = [(LoRAConfig(rank=r, alpha=a), {"l.lora_A": torch.randn(r, 6, generator=g),
                                               "l.lora_B": torch.randn(5, r, generator=g)})
                for r, a in ((2, 4), (3, 9))]
    cfg, w = summed_adapter(adapters)
    delta = (cfg.alpha / cfg.rank) * w["l.lora_B"] @ w["l.lora_A"]
    expected = sum((c.alpha / c.rank) * x["l.lora_B"] @ x["l.lora_A"] for c, x in adapters)
    torch.testing.assert_close(delta, expected)
    assert cfg.rank == 5


def test_sum_composition_answers_with_every_module_at_once(ckpt, conversation, tmp_path, monkeypatch):
    memory = grow(ckpt, tmp_path / "mem", config("modules", compose="sum"), conversation.sessions)
    stacked = []
    real = growth_module.GrowingMemory.composed_adapter
    monkeypatch.setattr(growth_module.GrowingMemory, "composed_adapter",
                        lambda self, modules: stacked.append(modules) or real(self, modules))
    memory.answer(["What did Alice adopt?", "What is Bob learning?"])
    assert stacked == [(1, 2, 3)]


def test_growth_settings_are_checked():
    with pytest.raises(ValueError, match="growth strategy: unknown 'grow'"):
        GrowthConfig("grow")
    with pytest.raises(ValueError, match="replay_ratio"):
        GrowthConfig(replay_ratio=-1)
    distill = MemoryConfig(recipe=Recipe("text+distill"), growth=GrowthConfig("continue"))  # written once: fine
    with pytest.raises(ValueError, match="distill"):
        growth_module.check_growth(distill)  # but it cannot grow by replaying hard-label windows
    growth_module.check_growth(dataclasses.replace(distill, growth=GrowthConfig("modules")))
