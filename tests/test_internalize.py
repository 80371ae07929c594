"""Internalisation data is built from the conversation alone, and the QA format supervises answers only."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench.internalize import TRAIN_FORMATS, template_qa, training_data
from bench.locomo import QUESTION_TEMPLATE
from bench.locomo_data import QA, load_locomo
from lora_core.train import IGNORE_INDEX
from model.tokenizer import Tokenizer
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tiny_checkpoint(d, "llama")
    return Tokenizer.from_dir(d)


@pytest.mark.parametrize("train_format", TRAIN_FORMATS)
def test_training_data_ignores_annotations(tok, tmp_path, train_format):
    """Changing every annotation (qa, observation, summaries) leaves the training data unchanged."""
    raw = json.loads(FIXTURE.read_text())
    altered = copy.deepcopy(raw)
    for s in altered:
        s["observation"] = {"x": "other observation"}
        s["session_summary"] = {"x": "other summary"}
        s["event_summary"] = {"x": "other events"}
        for qa in s["qa"]:
            qa["question"] = "A different question?"
            if "answer" in qa:
                qa["answer"] = "a different answer"
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    for a, b in zip(load_locomo(FIXTURE), load_locomo(tmp_path / "altered.json")):
        ids_a, labels_a = training_data(a, tok, train_format, 256, timestamps=False, question_template=QUESTION_TEMPLATE)
        ids_b, labels_b = training_data(b, tok, train_format, 256, timestamps=False, question_template=QUESTION_TEMPLATE)
        assert torch.equal(ids_a, ids_b) and torch.equal(labels_a, labels_b)
        assert ids_a.shape[1] == 256 and (labels_a != IGNORE_INDEX).any()
    # and the annotation text never appears in what is trained on
    sample = load_locomo(FIXTURE)[0]
    ids, _ = training_data(sample, tok, train_format, 256, timestamps=True, question_template=QUESTION_TEMPLATE)
    text = tok.decode(ids.flatten().tolist())
    assert "LEAK" not in text
    for qa in sample.qa:
        assert qa.question not in text


def test_template_qa_covers_who_what_when(tok):
    sample = load_locomo(FIXTURE)[0]
    pairs = template_qa(sample)
    first = next(t for s in sample.sessions for t in s.turns if len(t.text.split()) >= 4)
    whos = [p for p in pairs if p.question.startswith("Who said")]
    whens = [p for p in pairs if p.question.startswith(f"When did {first.speaker} say")]
    assert whos and whos[0].answer == first.speaker
    assert whens and any(ch.isdigit() for ch in whens[0].answer)  # a date like "8 May 2023"
    assert any("share a photo of" in p.question for p in pairs)
    # the sample's own QA is not consulted at all
    stripped = dataclasses.replace(sample, qa=[QA("q", "a", 4, [], None)])
    assert template_qa(stripped) == pairs


def test_qa_windows_supervise_only_answers(tok):
    sample = load_locomo(FIXTURE)[0]
    ids, labels = training_data(sample, tok, "qa", 256, timestamps=False, question_template=QUESTION_TEMPLATE)
    pairs = template_qa(sample)
    supervised = tok.decode([t for t in labels.flatten().tolist() if t != IGNORE_INDEX], skip_special_tokens=False)
    assert pairs[0].answer in supervised and "Who said" not in supervised
    # every window starts with the system turn and asks in the benchmark's chat format
    first_window = tok.decode(ids[0].tolist(), skip_special_tokens=False)
    assert first_window.startswith("<|im_start|>")
    assert "Answer the question in a few words.\nQuestion: Who said" in first_window
    # targets are the next tokens: wherever a label is set, it equals the following input token
    pos = (labels != IGNORE_INDEX).nonzero()
    for i, t in pos[:50].tolist():
        assert labels[i, t] == ids[i, t + 1]
