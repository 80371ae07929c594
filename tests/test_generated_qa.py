"""QA written by the base model (`--qa-source model`): parsing, the grounding filter, the cache, the base
model writing it (adapters disabled), and prompts built from the conversation alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lora_mem.lora_core.generated_qa as gq
from lora_mem.lora_core.recipes import QAPair, Recipe, training_data, training_qa_pairs
from lora_mem.lora_core.memory import QUESTION_TEMPLATE
from bench.locomo_data import LocomoDataError, Turn, load_locomo
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_disabled, lora_modules
from lora_mem.lora_core.train import IGNORE_INDEX
from lora_mem.model.loader import load_model
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return load_model(str(d), device="cpu", progress=False)


@pytest.mark.parametrize("text, pair", [
    (" What is the name of Alice's puppy?\nAnswer: Biscuit\n\nQuestion: ...", QAPair("What is the name of Alice's puppy?", "Biscuit")),
    (" Where does Bob live?\n\nAnswer:  Lisbon ", QAPair("Where does Bob live?", "Lisbon")),
    (" What a wonderful question.", None),  # no answer line
    (" Where does Bob live\nAnswer: Lisbon", None),  # not a question
    (" Where does Bob live?\nAnswer:", None),  # empty answer
])
def test_parse_generated(text, pair):
    assert gq.parse_generated(text) == pair


TURN = Turn("Alice", "D1:1", "Hi Bob! I adopted a puppy named Biscuit yesterday.")


@pytest.mark.parametrize("pair, keep", [
    (QAPair("What is the name of the puppy Alice adopted?", "Biscuit"), True),
    (QAPair("When did Alice adopt a puppy?", "8 May 2023"), True),  # the session date counts as in the turn
    (QAPair("What is the name of the puppy Alice adopted?", "Rex"), False),  # not in the turn
    (QAPair("Who adopted Biscuit?", "Biscuit"), False),  # the answer is in the question
    (QAPair("What did Alice adopt?", "the"), False),  # no content word
    (QAPair("What is the name of the puppy that was adopted?", "Alice"), False),  # only the speaker's name
    (QAPair("What did Tom get from the shelter?", "a puppy"), False),  # about the prompt's example, not the turn
])
def test_grounding_filter(pair, keep):
    assert gq.grounded(pair, "8 May 2023", TURN, ("Alice", "Bob")) is keep


def test_an_addressed_speaker_is_not_an_answer():
    pair = QAPair("What is the name of the puppy that was adopted?", "Bob")  # "Hi Bob!" is in the turn
    assert gq.grounded(pair, "8 May 2023", TURN) and not gq.grounded(pair, "8 May 2023", TURN, ("Alice", "Bob"))


def fake_generate(outputs: dict[str, str], calls: list):
    """generate() that answers each prompt by the speaker/text it holds, and records the prompts."""
    def run(model, prompts, max_new_tokens, stop_ids, pad_id, batch_size=64, progress=False):
        calls.append(prompts)
        tok = run.tok
        texts = [tok.decode(p) for p in prompts]
        return [tok.encode(next((v for k, v in outputs.items() if k in t), " nothing")) for t in texts]
    return run


def test_generate_qa_keeps_grounded_pairs_and_caches_them(lm, tmp_path, monkeypatch):
    calls = []
    gen = fake_generate({"puppy named Biscuit": " What is the name of Alice's puppy?\nAnswer: Biscuit",
                         "violin": " What did Bob start learning?\nAnswer: the piano"}, calls)
    gen.tok = lm.tokenizer
    monkeypatch.setattr(gq, "generate", gen)
    sample = load_locomo(FIXTURE)[0]
    out = gq.generate_qa(sample, lm, cache_dir=tmp_path)
    assert out.pairs == [QAPair("What is the name of Alice's puppy?", "Biscuit")]
    assert out.generated == len(gq.askable_turns(sample)) and out.kept == 1 and len(calls) == 1
    saved = json.loads(out.cache_file.read_text())
    assert saved["settings"] == {"max_new_tokens": 40, "batch_size": 64} and saved["model"].startswith(lm.name)
    assert len(saved["raw"]) == out.generated and [r["raw"] for r in out.records] == saved["raw"]
    assert any(r["answer"] == "the piano" and not r["kept"] for r in out.records)  # recorded, not trained
    # the second time it comes from the cache; other settings are another cache entry
    again = gq.generate_qa(sample, lm, cache_dir=tmp_path)
    assert again.pairs == out.pairs and again.records == out.records and len(calls) == 1
    # the filter runs again on every read: a stricter one needs no new generation
    monkeypatch.setattr(gq, "grounded", lambda *a: False)
    assert gq.generate_qa(sample, lm, cache_dir=tmp_path).pairs == [] and len(calls) == 1
    monkeypatch.undo()
    monkeypatch.setattr(gq, "generate", gen)
    other = gq.generate_qa(sample, lm, gq.GenerationSettings(max_new_tokens=20), cache_dir=tmp_path)
    assert len(calls) == 2 and other.cache_file != out.cache_file


def test_generation_prompts_ignore_annotations(lm, tmp_path, monkeypatch):
    raw = json.loads(FIXTURE.read_text())
    altered = copy.deepcopy(raw)
    for s in altered:
        s["observation"] = {"x": "LEAK observation"}
        s["session_summary"] = {"x": "LEAK summary"}
        for qa in s["qa"]:
            qa["question"], qa["evidence"] = "LEAK question?", ["D1:1"]
            if "answer" in qa:
                qa["answer"] = "LEAK answer"
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    prompts = {}
    for name, path in (("original", FIXTURE), ("altered", tmp_path / "altered.json")):
        calls = []
        gen = fake_generate({}, calls)
        gen.tok = lm.tokenizer
        monkeypatch.setattr(gq, "generate", gen)
        for sample in load_locomo(path):
            gq.generate_qa(sample, lm, cache_dir=tmp_path / name)
        prompts[name] = calls
    assert prompts["original"] == prompts["altered"]
    assert not any("LEAK" in lm.tokenizer.decode(p) for batch in prompts["altered"] for p in batch)


def test_lora_disabled_gives_the_base_model(lm):
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        base = lm.model(ids)
    inject_lora(lm.model, LoRAConfig(rank=2, alpha=4.0))
    try:
        for m in lora_modules(lm.model).values():
            torch.nn.init.normal_(m.lora_B, std=0.5)
        with torch.no_grad():
            adapted = lm.model(ids)
            with lora_disabled(lm.model):
                disabled = lm.model(ids)
            after = lm.model(ids)
        assert not torch.allclose(adapted, base, atol=1e-3)
        assert torch.equal(disabled, base) and torch.equal(after, adapted)
    finally:
        from lora_mem.lora_core.inject import remove_lora

        remove_lora(lm.model, lora_modules(lm.model))


def test_qa_source_in_training_pairs():
    sample = load_locomo(FIXTURE)[0]
    generated = [QAPair("What is the name of Alice's puppy?", "Biscuit")]
    templates = training_qa_pairs(sample, Recipe("qa"))
    assert training_qa_pairs(sample, Recipe("qa", qa_source="model"), generated=generated) == generated
    both = training_qa_pairs(sample, Recipe("qa", qa_source="both"), generated=generated)
    assert len(both) == len(templates) + 1 and generated[0] in both and set(templates) <= set(both)
    with pytest.raises(ValueError, match="needs the generated pairs"):
        training_qa_pairs(sample, Recipe("qa", qa_source="model"))


def test_no_grounded_pair_is_a_clear_error(lm):
    sample = load_locomo(FIXTURE)[0]
    ids, labels = training_data(sample, lm.tokenizer, Recipe("qa", 128, False, qa_source="model"), QUESTION_TEMPLATE, generated=[QAPair("What is the name of Alice's puppy?", "Biscuit")])
    assert ids.shape[0] == 1 and (labels != IGNORE_INDEX).any()
    with pytest.raises(LocomoDataError, match=r"tiny-1: no training data .*qa_source='model'"):
        training_data(sample, lm.tokenizer, Recipe("qa", 128, False, qa_source="model"), QUESTION_TEMPLATE, generated=[])
