"""Context distillation: the soft-target loss against its plain reference (value and gradient), the teacher's scores
with a shared prefix against a plain forward, the student's windows, the cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lora_mem.lora_core.distill import DistillSettings, TeacherExample, distill_windows, score_answers, teacher_examples
from lora_mem.lora_core.losses import SoftTargets, soft_target_loss, soft_target_loss_reference
from lora_mem.lora_core.memory import QUESTION_TEMPLATE
from lora_mem.lora_core.queries import coverage_queries
from lora_mem.lora_core.train import IGNORE_INDEX
from lora_mem.model.loader import load_model
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


def random_soft(labels: torch.Tensor, V: int, k: int, generator) -> SoftTargets:
    """Teacher-like targets: k distinct ids per position with probabilities summing below 1, and some positions
    holding a hard label (one token, log q = 0)."""
    soft = SoftTargets.hard(labels, k)
    for i in range(labels.shape[0]):
        if labels[i] == IGNORE_INDEX or i % 3 == 0:
            continue
        ids = torch.randperm(V, generator=generator)[:k]
        p = torch.rand(k, generator=generator, dtype=torch.float64)
        p = p / p.sum() * 0.9
        soft.top_ids[i], soft.top_logprobs[i] = ids, p.log().float()
    return soft


@pytest.mark.parametrize("temperature, hard_weight", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.3), (0.7, 0.5)])
def test_soft_target_loss_matches_reference_value_and_gradient(temperature, hard_weight):
    g = torch.Generator().manual_seed(0)
    N, C, V, k = 23, 16, 50, 4
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 7, 11]] = IGNORE_INDEX
    soft = random_soft(labels, V, k, g)
    ours = soft_target_loss(hidden, weight, labels, soft, temperature, hard_weight, chunk_size=5)
    ours.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    ref = soft_target_loss_reference(hidden @ weight.T, labels, soft, temperature, hard_weight)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-5, atol=1e-8)
    assert grad[[2, 7, 11]].abs().sum() == 0  # unlabelled positions get nothing


def test_hard_targets_are_cross_entropy():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (9,), generator=g)
    loss = soft_target_loss(hidden, weight, labels, SoftTargets.hard(labels, 3))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ weight.T, labels))


def test_a_trainable_head_is_refused():
    w = torch.randn(30, 8, requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="no gradient to the LM head"):
        soft_target_loss(torch.randn(4, 8), w, labels, SoftTargets.hard(labels, 2))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-long")
    make_tiny_checkpoint(d, "llama")
    import json
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    return load_model(str(d))


def test_scores_with_a_shared_prefix_equal_a_plain_forward(lm):
    tok = lm.tokenizer
    head = tok.encode_chat([{"role": "user", "content": "A long shared context about Alice and her puppy. " * 3}])[:-3]
    prompts = [head + tok.encode(q) for q in ("Who?", "When did it happen?", "What")]
    answers = [tok.encode(a) for a in ("Alice", "on 8 May", "a puppy named Biscuit")]
    scored = score_answers(lm.model, prompts, answers, top_k=5, temperature=1.5, batch_size=2)
    for p, a, (ids, logp) in zip(prompts, answers, scored):
        logits = lm.model(torch.tensor([p + a]))[0, len(p) - 1:len(p) - 1 + len(a)] / 1.5
        values, index = torch.log_softmax(logits.float(), -1).topk(5, -1)
        torch.testing.assert_close(logp, values, rtol=1e-4, atol=1e-5)
        assert torch.equal(ids, index)


def test_student_windows_align_targets_with_the_teacher(lm):
    tok = lm.tokenizer
    k = 3
    examples = [TeacherExample(q, tok.encode(a) + tok.encode("<|im_end|>"),
                               torch.arange(k).repeat(len(tok.encode(a)) + 1, 1) + j,
                               torch.full((len(tok.encode(a)) + 1, k), math.log(0.2)))
                for j, (q, a) in enumerate([("Who?", "Alice"), ("When?", "8 May 2023"), ("What?", "a puppy")])]
    ids, labels, soft = distill_windows(examples, tok, 256, QUESTION_TEMPLATE)
    assert ids.shape[0] == 1
    labelled = labels[0] != IGNORE_INDEX
    answer_tokens = sum(len(e.answer_ids) for e in examples)
    assert int(labelled.sum()) == answer_tokens
    # each labelled position holds its example's distribution, and predicts the next token of the window
    positions = labelled.nonzero().squeeze(1)
    assert torch.equal(labels[0, positions], ids[0, positions + 1])
    assert (soft.top_logprobs[0, positions] > -1e9).all() and (soft.top_logprobs[0, ~labelled] == -math.inf).all()
    firsts = [int(soft.top_ids[0, positions[sum(len(e.answer_ids) for e in examples[:j])], 0]) for j in range(3)]
    assert firsts == [0, 1, 2]


def test_teacher_examples_are_cached_per_session(lm, tmp_path, monkeypatch):
    import lora_mem.lora_core.distill as distill
    from bench.locomo_data import load_locomo
    from lora_mem.lora_core.conversation import conversation_only

    conv = conversation_only(load_locomo(FIXTURE)[0])
    queries = coverage_queries(conv, phrasings=1)
    assert queries
    settings = DistillSettings(top_k=4, answers="reference")
    first = teacher_examples(lm, conv, queries, settings, QUESTION_TEMPLATE, cache_dir=tmp_path)
    assert len(first) == len(queries) and all(e.top_ids.shape == (len(e.answer_ids), 4) for e in first)
    assert len(list(tmp_path.rglob("*.pt"))) == len({q.session for q in queries})
    monkeypatch.setattr(distill, "score_answers", lambda *a, **k: pytest.fail("must come from the cache"))
    again = teacher_examples(lm, conv, queries, settings, QUESTION_TEMPLATE, cache_dir=tmp_path)
    assert [e.question for e in again] == [e.question for e in first]
    assert all(torch.equal(a.top_logprobs, b.top_logprobs) for a, b in zip(again, first))
