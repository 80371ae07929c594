"""The library against untrusted input (issue 29): a conversation with nothing to remember, a question longer than
the window, adapter configs checked field by field against the tensors, divergence found in the weights after any
step; each a ValueError-type error of one line that names what is wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_mem.lora_core.adapter_io import AdapterError, load_adapter, read_adapter
from lora_mem.lora_core.conversation import Conversation, ConversationError, Session, Turn
from lora_mem.lora_core.inject import LoRAConfig, lora_modules, lora_parameters
from lora_mem.lora_core.memory import Memory, MemoryConfig
from lora_mem.lora_core.multi_adapter import stack_adapters
from lora_mem.lora_core.recipes import Recipe
from lora_mem.lora_core.train import MAX_LORA_WEIGHT, TrainConfig, lora_weights_problem, train_lora
from lora_mem.model.loader import load_model


@pytest.fixture(scope="module")
def saved_adapter(tiny_ckpt, tmp_path_factory):
    memory = Memory(load_model(str(tiny_ckpt)), MemoryConfig(lora=LoRAConfig(rank=4), recipe=Recipe(seq_len=64),
                                                        train=TrainConfig(epochs=1)))
    memory.write(conversation([["Alice", "My puppy is called Biscuit."]]))
    return memory.save(tmp_path_factory.mktemp("adapter") / "a")


def conversation(*sessions: list[list[str]]) -> Conversation:
    return Conversation("c", "Alice", "Bob", [Session(i + 1, "1:56 pm on 8 May, 2023",
                                                      [Turn(sp, f"D{i + 1}:{j}", text) for j, (sp, text) in
                                                       enumerate(turns)]) for i, turns in enumerate(sessions)])


# ---------------------------------------------------------------------------------------------
# Memory.write on a conversation with nothing in it: the command line's error, not ZeroDivisionError
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv, needle", [
    (conversation(), "conversation 'c': no sessions: nothing to remember"),
    (conversation([]), "conversation 'c': no text in any of its 1 sessions: nothing to remember"),
    (conversation([], []), "no text in any of its 2 sessions: nothing to remember"),
    (conversation([["Alice", "   "]]), "no text in any of its 1 sessions: nothing to remember"),
    (conversation([["Alice", ""], ["Bob", "\n\t"]]), "no text in any of its 1 sessions: nothing to remember"),
])
def test_writing_a_conversation_with_nothing_to_remember(tiny_ckpt, conv, needle):
    memory = Memory(load_model(str(tiny_ckpt)), MemoryConfig(lora=LoRAConfig(rank=2), recipe=Recipe(seq_len=64)))
    with pytest.raises(ConversationError) as e:
        memory.write(conv)
    assert str(e.value) == needle or needle in str(e.value)


def test_train_lora_refuses_no_windows(tiny_ckpt):
    lm = load_model(str(tiny_ckpt))
    Memory(lm, MemoryConfig(lora=LoRAConfig(rank=2), recipe=Recipe(seq_len=64)))
    empty = torch.zeros(0, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="no training windows: nothing to train on"):
        train_lora(lm.model, empty, empty, TrainConfig())


# ---------------------------------------------------------------------------------------------
# The context window
# ---------------------------------------------------------------------------------------------

def test_a_question_longer_than_the_window_names_the_limit(tiny_ckpt):
    memory = Memory(load_model(str(tiny_ckpt)), MemoryConfig(lora=LoRAConfig(rank=2), recipe=Recipe(seq_len=64)))
    assert len(memory.answer(["What is the puppy called?"])) == 1
    with pytest.raises(ValueError, match=r"a prompt of \d+ tokens \+ 32 new tokens exceeds the model's context "
                                         r"window of 256 positions \(max_position_embeddings\)"):
        memory.answer(["why " * 300])


def test_training_windows_longer_than_the_window_are_refused(tiny_ckpt):
    with pytest.raises(ValueError, match="recipe seq_len 512 exceeds the model's context window of 256 positions"):
        Memory(load_model(str(tiny_ckpt)), MemoryConfig(recipe=Recipe(seq_len=512)))


# ---------------------------------------------------------------------------------------------
# Divergence, found in the weights after any step
# ---------------------------------------------------------------------------------------------

def test_lora_weights_problem():
    fine = [torch.zeros(2, 3), torch.full((3, 2), MAX_LORA_WEIGHT)]
    assert lora_weights_problem(fine) is None
    assert lora_weights_problem([torch.zeros(2), torch.tensor([0.0, math.nan])]) == "a LoRA weight is non-finite (nan)"
    assert lora_weights_problem([torch.tensor([-math.inf])]) == "a LoRA weight is non-finite (inf)"
    assert lora_weights_problem([torch.tensor([1e30])]) == "a LoRA weight reached 1e+30 (beyond 1000: diverged)"


def test_one_step_that_leaves_huge_weights_fails_the_write(tiny_ckpt):
    """A single optimizer step at lr 1e30 moves every weight by ~1e30 with a finite loss: the weights say so."""
    memory = Memory(load_model(str(tiny_ckpt)), MemoryConfig(lora=LoRAConfig(rank=2), recipe=Recipe(seq_len=64),
                                                        train=TrainConfig(epochs=1, lr=1e30, batch_size=64,
                                                                          warmup_ratio=0.0)))
    written = memory.write(conversation([["Alice", "My puppy is called Biscuit."]]))
    assert written.error == "a LoRA weight reached 1e+30 (beyond 1000: diverged) at epoch 0, step 0"
    assert written.train.losses == []


def test_more_micro_batches_per_step_than_an_epoch_has_is_one_step_per_epoch(tiny_ckpt):
    """--grad-accum 10**15 once built a list of 10**15 micro-batches; a step takes at most an epoch's."""
    conv = conversation([["Alice", "My puppy is called Biscuit. " * 6]])

    def write(grad_accum: int):
        train = TrainConfig(epochs=2, batch_size=1, grad_accum=grad_accum)
        memory = Memory(load_model(str(tiny_ckpt)), MemoryConfig(lora=LoRAConfig(rank=2), recipe=Recipe(seq_len=64),
                                                                 train=train))
        return memory.write(conv)

    huge = write(10**15)
    assert huge.windows > 1 and len(huge.train.losses) == 2  # one step an epoch
    assert huge.train.losses == write(huge.windows).train.losses  # as many micro-batches as the epoch has


def test_weights_poisoned_after_training_fail_the_write(tiny_ckpt, monkeypatch):
    import lora_mem.lora_core.memory as memory_api

    real = memory_api.train_lora

    def poison(model, *a, **k):
        result = real(model, *a, **k)
        with torch.no_grad():
            lora_parameters(model)[0][0, 0] = 5e3
        return result

    monkeypatch.setattr(memory_api, "train_lora", poison)
    memory = Memory(load_model(str(tiny_ckpt)), MemoryConfig(lora=LoRAConfig(rank=2), recipe=Recipe(seq_len=64),
                                                        train=TrainConfig(epochs=1)))
    assert memory.write(conversation([["Alice", "Biscuit."]])).error == \
        "a LoRA weight reached 5e+03 (beyond 1000: diverged)"


# ---------------------------------------------------------------------------------------------
# Adapter configs, field by field, against the tensors: load_adapter, stack_adapters and read_adapter share it
# ---------------------------------------------------------------------------------------------

def broken_copy(src: Path, dst: Path, edit=None, raw: bytes | None = None) -> Path:
    dst.mkdir(parents=True)
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    config = json.loads((src / "adapter_config.json").read_text())
    if edit:
        edit(config)
    (dst / "adapter_config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    return dst


@pytest.mark.parametrize("edit, raw, needle", [
    (lambda c: c.update(r="abc"), None, "field 'r': input should be a valid integer, got str 'abc'"),
    (lambda c: c.update(r=0), None, "field 'r': input should be greater than or equal to 1, got int 0"),
    (lambda c: c.update(r=[4]), None, "field 'r': input should be a valid integer, got list [4]"),
    (lambda c: c.update(r=True), None, "field 'r': input should be a valid integer, got bool True"),
    (lambda c: c.pop("r"), None, "missing field 'r'"),
    (lambda c: c.update(r=8), None, "lora_A: file [4, 64] vs model [8, 64] (rank r=8 in config"),
    (lambda c: c.update(lora_alpha=0), None, "field 'lora_alpha': input should be greater than 0"),
    (lambda c: c.update(lora_alpha=-1.0), None, "field 'lora_alpha': input should be greater than 0"),
    (lambda c: c.update(lora_alpha="8"), None, "field 'lora_alpha': input should be a valid number"),
    (None, b'{"r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}', "not valid JSON (NaN is not JSON)"),
    (None, b'{"r": 4, "lora_alpha": 1e999, "target_modules": ["q_proj"]}', "the number 1e999 is out of range"),
    (lambda c: c.update(lora_dropout=1.5), None, "field 'lora_dropout': input should be less than 1"),
    (lambda c: c.update(use_rslora="yes"), None, "field 'use_rslora': input should be a valid boolean"),
    (lambda c: c.update(target_modules=["q_proj", "nope_proj"]), None,
     "target_modules 'nope_proj' select no linear layer of the model"),
    (lambda c: c.update(target_modules=[]), None, "field 'target_modules': must be a non-empty list of module names"),
    (lambda c: c.update(target_modules=5), None, "field 'target_modules': must be a non-empty list of module names"),
    (lambda c: c.update(target_modules="(q_proj"), None, "field 'target_modules': not a valid regular expression"),
    (lambda c: c.update(target_modules=["q_proj"]), None, "weights for modules target_modules does not select"),
    (lambda c: c.update(peft_type="IA3"), None, "peft_type 'IA3' is not LORA"),
    (lambda c: c.update(use_dora=True), None, "'use_dora' adapters are not supported"),
    (lambda c: c.update(bias="all"), None, "bias='all' is not supported"),
    (None, b"null", "adapter_config.json: must be a JSON object, got null"),
    (None, b'{"r": 4, "target_modules": ["q_proj"], "x": "\xff"}', "not UTF-8 text"),
    (None, b"[" * 100_000, "JSON nested too deeply to read"),
])
def test_an_adapter_config_is_checked_field_by_field(tiny_ckpt, saved_adapter, tmp_path, edit, raw, needle):
    bad = broken_copy(saved_adapter, tmp_path / "bad", edit, raw)
    model = load_model(str(tiny_ckpt)).model
    for load in (lambda: load_adapter(model, bad), lambda: stack_adapters(model, [saved_adapter, bad])):
        with pytest.raises(AdapterError) as e:
            load()
        assert str(bad) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not lora_modules(model)  # a refused adapter leaves the model as it was


@pytest.mark.parametrize("edit_tensors, needle", [
    (lambda t: t.update({k: t[k].to(torch.int32) for k in list(t)[:1]}), "not a floating-point matrix"),
    (lambda t: t.update({k: t[k][0] for k in list(t)[:1]}), "is a 1-d float32 tensor, not a floating-point matrix"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.bias": torch.zeros(3)}),
     "base_model.model.model.layers.0.mlp.up_proj.bias is not a LoRA weight"),
    (lambda t: t.update({"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}),
     "weights for modules the model lacks: model.layers.9.mlp.up_proj"),
    (lambda t: t.pop("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"),
     "weights missing from the file: model.layers.0.mlp.down_proj.lora_A"),
])
def test_adapter_tensors_are_checked_against_the_config_and_the_model(tiny_ckpt, saved_adapter, tmp_path, edit_tensors,
                                                                      needle):
    from safetensors.torch import load_file, save_file

    from lora_mem.lora_core.adapter_io import linear_layers
    from lora_mem.model.loader import inspect_checkpoint

    bad = broken_copy(saved_adapter, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    edit_tensors(tensors)
    save_file(tensors, bad / "adapter_model.safetensors")
    layers = linear_layers(inspect_checkpoint(str(tiny_ckpt)).structure)  # the model's layers, no weight loaded
    with pytest.raises(AdapterError, match=needle.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        read_adapter(bad, layers)
    with pytest.raises(AdapterError, match=needle.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_adapter(load_model(str(tiny_ckpt)).model, bad)


def test_lora_config_checks_its_own_fields():
    for kwargs, needle in ((dict(rank=0), "rank must be an integer >= 1"), (dict(rank="8"), "rank must be"),
                           (dict(alpha=math.nan), "alpha must be a finite number > 0"),
                           (dict(alpha=-1.0), "alpha must be"), (dict(dropout=1.0), "dropout must be in [0, 1)")):
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(")", r"\)")):
            LoRAConfig(**kwargs)
