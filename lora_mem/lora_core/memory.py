"""Parametric memory: write a conversation into a LoRA adapter, then answer questions from the weights alone.

    lm = load_model("smollm2-135m-instruct")
    memory = Memory(lm, MemoryConfig())          # LoRA layers put into the model once
    written = memory.write(conversation)         # a fresh adapter, trained on the recipe's data
    memory.answer(["When did Caroline go to the LGBTQ support group?"])
    memory.save("adapters/conv-26")              # PEFT format; memory.load(...) puts it back

    with memory.stacked(["adapters/conv-26", "adapters/conv-30"]):      # many adapters, one batch
        memory.answer(questions, adapter_ids=[0, 1, 1, 0, ...])

A conversation is a :class:`~lora_mem.lora_core.conversation.Conversation` (speakers and dated sessions of turns);
what it is turned into for training is a :class:`~lora_mem.lora_core.recipes.Recipe`. :class:`MemoryConfig`
holds every setting of the product, each default once: the adapter's shape, the training, the recipe, answering.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_mem.lora_core.adapter_io import load_adapter, save_adapter
from lora_mem.lora_core.conversation import Conversation, conversation_only
from lora_mem.lora_core.distill import DistillSettings, SoftTargets, distill_windows, teacher_examples
from lora_mem.lora_core.generated_qa import generate_qa
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_disabled, lora_parameters, reset_lora
from lora_mem.lora_core.multi_adapter import stack_adapters, unstack_adapters
from lora_mem.lora_core.recipes import RECITE_TEMPLATE, Recipe, recipe_queries, training_data
from lora_mem.lora_core.train import IGNORE_INDEX, TrainConfig, TrainResult, train_lora
from lora_mem.model.generate import MEMORY_BUDGET_MB, generate
from lora_mem.model.loader import LoadedModel

# The instruction that turns a question into a chat turn: the same in training data and at answer time.
QUESTION_TEMPLATE = "Answer the question in a few words.\nQuestion: {question}"
# Recite-then-answer: the adapter's recitation goes ahead of the question, as retrieved text would.
RECITED_CONTEXT = "Here is a message from our conversation, with its date:\n\n{recitation}\n\n"
RECITE_MAX_NEW_TOKENS = 96
ANSWER_MODES = ("direct", "recite")


@dataclass(frozen=True)
class AnswerConfig:
    """How questions are answered. ``mode``: "direct" (the question alone) or "recite" (the adapter first recites
    the turn the question is about, `recipes.RECITE_TEMPLATE`; the base model then answers with that recitation
    ahead of the question: nothing is retrieved from outside the weights)."""

    question_template: str = QUESTION_TEMPLATE
    max_new_tokens: int = 32
    batch_size: int = 64  # questions decoded at once at most (greedy, continuous batching)
    mode: str = "direct"
    # keys, values and prefill activations of answering stay within it (fewer rows, prefill in passes; the same
    # answers); None: no limit (batch_size rows)
    memory_budget_mb: float | None = MEMORY_BUDGET_MB

    def __post_init__(self):
        if "{question}" not in self.question_template:
            raise ValueError(f"question_template: must contain {{question}}, got {self.question_template!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens}, "
                             f"{self.batch_size}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb: must be > 0 (or None: no limit), got {self.memory_budget_mb}")
        if self.mode not in ANSWER_MODES:
            raise ValueError(f"answer mode: unknown {self.mode!r} (choose from {', '.join(ANSWER_MODES)})")


@dataclass(frozen=True)
class MemoryConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: Recipe = field(default_factory=Recipe)
    answer: AnswerConfig = field(default_factory=AnswerConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingData:
    input_ids: torch.Tensor  # (N, L) windows
    labels: torch.Tensor  # (N, L) next-token targets, IGNORE_INDEX where unsupervised
    soft_targets: SoftTargets | None = None  # the teacher's distributions (distill recipes)
    teacher_seconds: float = 0.0  # the teacher's part of building it (0 when cached)
    seconds: float = 0.0  # building all of it


@dataclass
class WriteResult:
    """One conversation written into the adapter: the data it was trained on and how training went."""

    sample_id: str
    windows: int
    target_tokens: int  # labelled positions per epoch
    train: TrainResult
    data_seconds: float  # building the training data (the teacher's and model-written questions included)
    teacher_seconds: float = 0.0
    error: str | None = None  # training diverged or left non-finite weights: the adapter is not a result

    def to_dict(self) -> dict:
        return {"sample_id": self.sample_id, "windows": self.windows, "target_tokens": self.target_tokens,
                "data_seconds": self.data_seconds, "teacher_seconds": self.teacher_seconds, **self.train.to_dict(),
                "error": self.error}


def chat_prompts(lm: LoadedModel, user_messages: list[str]) -> list[list[int]]:
    """Each user turn as the token ids of a chat prompt (the model's system turn, the user turn, the assistant's
    opening)."""
    return [lm.tokenizer.encode_chat([{"role": "user", "content": u}]) for u in user_messages]


def answer_prompts(lm: LoadedModel, prompts: list[list[int]], cfg: AnswerConfig = AnswerConfig(),
                   adapter_ids: list[int] | None = None, *, progress: bool = False) -> list[str]:
    """Greedy answers to chat prompts, with the model as it is (or one stacked adapter per row)."""
    tok = lm.tokenizer
    outs = generate(lm.model, prompts, cfg.max_new_tokens, tok.stop_ids, tok.pad_id, batch_size=cfg.batch_size,
                    progress=progress, adapter_ids=adapter_ids, memory_budget_mb=cfg.memory_budget_mb)
    return [tok.decode(o).strip() for o in outs]


def question_messages(questions: list[str], cfg: AnswerConfig = AnswerConfig(),
                      contexts: list[str] | None = None) -> list[str]:
    """The user turn of each question: its context block (retrieved text, for instance) if any, then the
    instruction with the question."""
    asks = [cfg.question_template.format(question=q) for q in questions]
    if contexts is None:
        return asks
    if len(contexts) != len(asks):
        raise ValueError(f"{len(contexts)} contexts for {len(asks)} questions")
    return [c + a for c, a in zip(contexts, asks)]


def recite_then_answer(lm: LoadedModel, questions: list[str], cfg: AnswerConfig = AnswerConfig(), *,
                       progress: bool = False) -> tuple[list[str], list[str], list[list[int]]]:
    """The adapter recites the turn each question is about; the base model answers with that recitation ahead of
    the question. Returns (answers, recitations, the answering prompts)."""
    recite = dataclasses.replace(cfg, max_new_tokens=RECITE_MAX_NEW_TOKENS)
    recitations = answer_prompts(lm, chat_prompts(lm, [RECITE_TEMPLATE.format(question=q) for q in questions]),
                                 recite, progress=progress)
    prompts = chat_prompts(lm, question_messages(questions, cfg, [RECITED_CONTEXT.format(recitation=r)
                                                                   for r in recitations]))
    with lora_disabled(lm.model):
        answers = answer_prompts(lm, prompts, cfg, progress=progress)
    return answers, recitations, prompts


def adapter_is_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in lora_parameters(model))


def build_training_data(lm: LoadedModel, conv: Conversation, recipe: Recipe, question_template: str = QUESTION_TEMPLATE,
                        *, seed: int = 0, progress: bool = False) -> TrainingData:
    """The windows ``recipe`` makes of ``conv``, built from the conversation alone: the base model writes questions
    first where the recipe asks for them (`generated_qa`), and the distill part asks it holding each session in
    context (`distill`; adapters are off while it does)."""
    t0 = time.perf_counter()
    conv = conversation_only(conv)
    generated = generate_qa(conv, lm, progress=progress).pairs if recipe.needs_generated_qa else None
    ids, labels = training_data(conv, lm.tokenizer, recipe, question_template, seed=seed, generated=generated)
    if "distill" not in recipe.parts:
        return TrainingData(ids, labels, seconds=time.perf_counter() - t0)
    t1 = time.perf_counter()
    settings = DistillSettings(recipe.distill_top_k, recipe.distill_temperature, recipe.distill_answers)
    examples = teacher_examples(lm, conv, recipe_queries(conv, recipe), settings, question_template,
                                progress=progress)
    teacher_seconds = time.perf_counter() - t1
    d_ids, d_labels, d_soft = distill_windows(examples, lm.tokenizer, recipe.seq_len, question_template)
    soft = SoftTargets.cat([SoftTargets.hard(labels, recipe.distill_top_k), d_soft])
    return TrainingData(torch.cat([ids, d_ids]), torch.cat([labels, d_labels]), soft, teacher_seconds,
                        time.perf_counter() - t0)


def soft_training(data: TrainingData, recipe: Recipe) -> tuple[SoftTargets, float, float] | None:
    """train_lora's soft_targets argument for this data (None: plain cross-entropy)."""
    if data.soft_targets is None:
        return None
    return data.soft_targets, recipe.distill_temperature, recipe.distill_hard_weight


class Memory:
    """A model with LoRA layers that conversations are written into, one adapter at a time."""

    def __init__(self, lm: LoadedModel, config: MemoryConfig = MemoryConfig()):
        self.lm, self.config = lm, config
        inject_lora(lm.model, config.lora)

    def training_data(self, conv: Conversation, *, progress: bool = False) -> TrainingData:
        return build_training_data(self.lm, conv, self.config.recipe, self.config.answer.question_template,
                                   seed=self.config.train.seed, progress=progress)

    def write(self, conv: Conversation, *, progress: bool = False) -> WriteResult:
        """Train a fresh adapter (same initialisation every time) on ``conv``; it stays in the model."""
        reset_lora(self.lm.model, torch.Generator().manual_seed(self.config.train.seed))
        data = self.training_data(conv, progress=progress)
        result = train_lora(self.lm.model, data.input_ids, data.labels, self.config.train, progress=progress,
                            desc=f"train {conv.sample_id}", soft_targets=soft_training(data, self.config.recipe))
        error = result.error
        if error is None and not adapter_is_finite(self.lm.model):
            error = "the trained adapter has non-finite weights"
        return WriteResult(conv.sample_id, windows=data.input_ids.shape[0],
                           target_tokens=int((data.labels != IGNORE_INDEX).sum()), train=result,
                           data_seconds=data.seconds, teacher_seconds=data.teacher_seconds, error=error)

    def save(self, path: str | Path) -> Path:
        return save_adapter(self.lm.model, path, self.config.lora, base_model=self.lm.name)

    def load(self, path: str | Path) -> None:
        load_adapter(self.lm.model, path)

    def answer(self, questions: list[str], *, contexts: list[str] | None = None,
               adapter_ids: list[int] | None = None, progress: bool = False) -> list[str]:
        """Answers from the adapter in the model (or, inside :meth:`stacked`, each question's own adapter), in
        the configured mode."""
        cfg = self.config.answer
        if cfg.mode == "recite":
            if contexts is not None or adapter_ids is not None:
                raise ValueError("recite-then-answer takes the questions alone, with the adapter in the model")
            return recite_then_answer(self.lm, questions, cfg, progress=progress)[0]
        prompts = chat_prompts(self.lm, question_messages(questions, cfg, contexts))
        return answer_prompts(self.lm, prompts, cfg, adapter_ids=adapter_ids, progress=progress)

    @contextmanager
    def stacked(self, adapter_dirs: list[str | Path]):
        """Within the block, answer with several saved adapters at once (``adapter_ids`` index this list)."""
        stack_adapters(self.lm.model, adapter_dirs)
        try:
            yield self
        finally:
            unstack_adapters(self.lm.model)
