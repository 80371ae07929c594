"""Context distillation: the model holding a chunk of the conversation in its context is the teacher; the model with
the adapter and no context learns to answer as the teacher does (Knowledge Modules / deep context distillation,
Caccia et al. 2025; Cartridges' self-study, Eyuboglu et al. 2025).

    teacher:  [system] [user: <session text> + Answer the question in a few words. Question: q] [assistant: a]
    student:  [system] [user:                  Answer the question in a few words. Question: q] [assistant: a]

For each session (the chunk: its dated turns, relative dates resolved) and each query built from it
(`queries.coverage_queries`), the answer ``a`` is the teacher's own greedy answer (``answers="teacher"``) or the
query's rule-made answer (``"reference"``). The teacher's next-token distribution at every answer position is kept
as its top ``k`` log-probabilities (temperature ``tau``); the student is trained on

    L = (1 - w) tau^2 KL(q_tau || s_tau) + w CE(a),

the KL over the top-k tokens plus one bucket for the rest of the vocabulary (the teacher's remaining mass against the
student's), ``w`` the weight of the hard labels. The teacher is the frozen base model: adapters are off while it
runs. A session's prefix (system turn, its text) is computed once and attended in place by all its queries (cascade
attention, `KVCache.set_prefix`). Teacher outputs are cached on disk per session, keyed by the model, the session's
text, its queries and the settings, so a rerun (or another rank) reads them instead.

Gradient of one position (see `losses.SoftTargetLoss`): with s = softmax(z / tau), the KL's gradient with respect to the
logits z is (s - t) / tau, where t is the teacher's q on the top-k tokens and q_rest * s_j / s_rest elsewhere (the
rest mass spread as the student spreads it). A hard label is the target q = onehot, for which KL is CE.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_mem.home import cache_dir as lora_mem_cache
from lora_mem.lora_core.conversation import Conversation, conversation_only, session_texts
from lora_mem.lora_core.inject import lora_disabled
from lora_mem.lora_core.losses import SoftTargets
from lora_mem.lora_core.queries import Query
from lora_mem.lora_core.recipes import pack_chat_windows
from lora_mem.model.generate import Prefix, batch_prefix, common_prefix_len, compute_prefix, generate_batch
from lora_mem.untrusted import slug

TEACHER_CONTEXT = "Here is part of a conversation between {a} and {b}, with the date of each message:\n\n{context}\n\n"
CACHE_VERSION = 1  # bump when what the teacher computes changes
ANSWER_SOURCES = ("teacher", "reference")
TEACHER_MAX_NEW_TOKENS = 24  # answers are meant to be a few words
TEACHER_BATCH = 32  # queries scored at once


@dataclass(frozen=True)
class DistillSettings:
    top_k: int = 16
    temperature: float = 1.0
    answers: str = "teacher"

    def __post_init__(self):
        if self.top_k < 1 or not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"distill top_k must be >= 1 and temperature > 0, got {self.top_k}, {self.temperature}")
        if self.answers not in ANSWER_SOURCES:
            raise ValueError(f"distill answers: unknown {self.answers!r} (choose from {', '.join(ANSWER_SOURCES)})")


@dataclass
class TeacherExample:
    """One query with the teacher's answer and its distribution at each answer position (end marker included)."""

    question: str
    answer_ids: list[int]
    top_ids: torch.Tensor  # (n, k) int64
    top_logprobs: torch.Tensor  # (n, k) float32, log q at temperature tau


# ----------------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------------


def _teacher_prompts(lm, conv: Conversation, context: str, questions: list[str], question_template: str):
    user = TEACHER_CONTEXT.format(a=conv.speaker_a, b=conv.speaker_b, context=context)
    return [lm.tokenizer.encode_chat([{"role": "user", "content": user + question_template.format(question=q)}])
            for q in questions]


@torch.no_grad()
def score_answers(model, prompts: list[list[int]], answers: list[list[int]], top_k: int, temperature: float,
                  batch_size: int = TEACHER_BATCH, prefix: Prefix | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's top-k log-probabilities (at ``temperature``) at every position of each answer given its prompt:
    (top_ids (n, k), top_logprobs (n, k)) per answer of n tokens. The prompts' common head is computed once (or
    taken from ``prefix``, the one their generation computed) and attended in place by every row."""
    device = model.lm_head.weight.device
    if prefix is None:
        P = common_prefix_len(prompts) if len(prompts) > 1 else max(len(prompts[0]) - 1, 0)
        prefix = compute_prefix(model, prompts[0][:P]) if P else None
    P = len(prefix) if prefix is not None else 0
    prefix_caches = prefix.caches if prefix is not None else None
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [p[P:] + a for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, device=device)  # right padding: causal rows never see it
        position_ids = torch.arange(P, P + T, device=device).expand(len(rows), T)
        caches = model.new_kv_caches(len(rows), T)
        if prefix_caches is not None:
            for cache, prefix in zip(caches, prefix_caches):
                cache.set_prefix(prefix.k, prefix.v)
        hidden = model.model(ids, position_ids, None, caches, 0)  # (B, T, C)
        for i, (p, a) in enumerate(zip(prompts[start:start + batch_size], answers[start:start + batch_size])):
            first = len(p) - P - 1  # the position that predicts the answer's first token
            logits = (hidden[i, first:first + len(a)] @ model.lm_head.weight.T).float() / temperature
            values, index = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
            out.append((index.cpu(), values.cpu()))
    return out


def _cache_key(model_id: str, settings: DistillSettings, question_template: str, context: str,
               queries: list[Query]) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, model_id, settings.__dict__, question_template, TEACHER_CONTEXT,
                                   TEACHER_MAX_NEW_TOKENS, context, [q.pair for q in queries]]).encode())
    return h.hexdigest()[:16]


def teacher_examples(lm, conv: Conversation, queries: list[Query], settings: DistillSettings, question_template: str,
                     *, cache_dir: Path | None = None, progress: bool = False) -> list[TeacherExample]:
    """The teacher's answers and distributions for ``queries`` (each asked with its own session in context), cached
    per session. Queries whose teacher answer is empty are dropped."""
    source = conversation_only(conv)
    tok = lm.tokenizer
    end = tok.encode("<|im_end|>")
    model_id = f"{lm.name}@{lm.path}"
    cache = (Path(cache_dir) if cache_dir is not None else lora_mem_cache("teacher")) / slug(lm.name, "model")
    contexts = dict(zip((s.index for s in source.sessions), session_texts(source, format="timestamped+dates")))
    by_session: dict[int, list[Query]] = {}
    for q in queries:
        by_session.setdefault(q.session, []).append(q)
    examples = []
    for index, qs in by_session.items():
        context = contexts[index]
        path = cache / f"{slug(source.sample_id, 'model')}-s{index}-{_cache_key(model_id, settings, question_template, context, qs)}.pt"
        if path.is_file():
            examples += [TeacherExample(**e) for e in torch.load(path, weights_only=False)]
            continue
        prompts = _teacher_prompts(lm, source, context, [q.question for q in qs], question_template)
        with lora_disabled(lm.model):  # the teacher is the base model, whatever adapter is loaded
            prefix = batch_prefix(lm.model, prompts, None)  # the session: computed once, for answering and scoring
            if settings.answers == "teacher":
                outs = generate_batch(lm.model, prompts, TEACHER_MAX_NEW_TOKENS, tok.stop_ids, tok.pad_id,
                                      prefix=prefix)
                answers = [[t for t in o if t not in tok.stop_ids] for o in outs]
            else:
                answers = [tok.encode(q.answer) for q in qs]
            keep = [i for i, a in enumerate(answers) if a]
            answers = [answers[i] + end for i in keep]
            scored = score_answers(lm.model, [prompts[i] for i in keep], answers, settings.top_k,
                                   settings.temperature, prefix=prefix) if keep else []
        session_examples = [TeacherExample(qs[i].question, a, ids, logp)
                            for i, a, (ids, logp) in zip(keep, answers, scored)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save([e.__dict__ for e in session_examples], tmp)
        tmp.replace(path)
        examples += session_examples
    return examples


# ----------------------------------------------------------------------------------------------------------------
# The student's windows and loss
# ----------------------------------------------------------------------------------------------------------------


def distill_windows(examples: list[TeacherExample], tok, seq_len: int,
                    question_template: str) -> tuple[torch.Tensor, torch.Tensor, SoftTargets]:
    """The student's side of the examples packed into chat windows as every QA part is (`recipes.pack_chat_windows`),
    with the teacher's distribution at every answer position and the answer tokens as the hard labels."""
    if not examples:
        raise ValueError("no teacher examples to train on")
    packed = pack_chat_windows([(e.question, e.answer_ids) for e in examples], tok, seq_len, question_template)
    k = examples[0].top_ids.shape[1]
    soft = SoftTargets(torch.zeros(*packed.targets.shape, k, dtype=torch.long),
                       torch.full((*packed.targets.shape, k), -math.inf))
    for i, window, first in packed.placed:
        n = len(examples[i].answer_ids)
        soft.top_ids[window, first:first + n] = examples[i].top_ids
        soft.top_logprobs[window, first:first + n] = examples[i].top_logprobs
    return packed.input_ids, packed.targets, soft
