"""Parametric memory: write a conversation into a LoRA adapter, then answer questions from the weights alone.

    lm = load_model("smollm2-135m-instruct")
    memory = Memory(lm, MemoryConfig())          # LoRA layers put into the model once
    written = memory.write(conversation)         # a fresh adapter, trained on the recipe's data
    memory.answer(["When did Caroline go to the LGBTQ support group?"])
    memory.save("adapters/conv-26")              # PEFT format; memory.load(...) puts it back

    with memory.stacked(["adapters/conv-26", "adapters/conv-30"]):      # many adapters, one batch
        memory.answer(questions, adapter_ids=[0, 1, 1, 0, ...])

    memory = growth.open_memory(read_memory_folder("memories/demo"), lm)  # a memory folder (memory_folder)
    memory.append(session)                       # one more session, written as GrowthConfig says (growth)

A conversation is a :class:`~lora_mem.lora_core.conversation.Conversation` (speakers and dated sessions of turns);
what it is turned into for training is a :class:`~lora_mem.lora_core.recipes.Recipe`. :class:`MemoryConfig`
holds every setting of the product, each default once: the adapter's shape, the training, the recipe, answering.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_mem.lora_core.adapter_io import load_adapter, save_adapter
from lora_mem.lora_core.conversation import Conversation, Session, check_something_to_remember, conversation_only
from lora_mem.lora_core.distill import DistillSettings, SoftTargets, distill_windows, teacher_examples
from lora_mem.lora_core.generated_qa import generate_qa
from lora_mem.lora_core.inject import (
    LoRAConfig,
    inject_lora,
    lora_disabled,
    lora_modules,
    lora_parameters,
    reset_lora,
)
from lora_mem.lora_core.multi_adapter import stack_adapter_weights, stack_adapters, unstack_adapters
from lora_mem.lora_core.recipes import RECITE_TEMPLATE, Recipe, recipe_queries, training_data
from lora_mem.lora_core.train import IGNORE_INDEX, TrainConfig, TrainResult, lora_weights_problem, train_lora
from lora_mem.model.generate import MEMORY_BUDGET_MB, generate
from lora_mem.model.loader import LoadedModel

# The instruction that turns a question into a chat turn: the same in training data and at answer time.
QUESTION_TEMPLATE = "Answer the question in a few words.\nQuestion: {question}"
# Recite-then-answer: the adapter's recitation goes ahead of the question, as retrieved text would.
RECITED_CONTEXT = "Here is a message from our conversation, with its date:\n\n{recitation}\n\n"
RECITE_MAX_NEW_TOKENS = 96
GROWTH_STRATEGIES = ("rewrite", "continue", "modules")
COMPOSITIONS = ("route", "sum")
# Composed adapters stacked into the model at once when a memory of modules answers (each of rank route_top_k x r):
# bounds the memory the stacks take, whatever the number of modules.
STACK_AT_ONCE = 32
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
class GrowthConfig:
    """How a memory folder grows when sessions are appended (`growth`): a fresh adapter on every session so far
    ("rewrite"), the same adapter trained further on the new sessions and a replay sample of earlier ones
    ("continue"), or one adapter per append, composed when answering ("modules")."""

    strategy: str = "modules"  # chosen on dev, held on all ten (docs/growth.md)
    replay_ratio: float = 0.5  # continue: earlier windows replayed per new window (chosen on dev: docs/growth.md)
    keep_optimizer: bool = True  # continue: AdamW's moments go on from one append to the next
    compose: str = "route"  # modules: "route" (BM25 over each module's training questions) or "sum"
    route_top_k: int = 2  # modules, route: modules summed for each question (chosen on dev: docs/growth.md)

    def __post_init__(self):
        if self.strategy not in GROWTH_STRATEGIES:
            raise ValueError(f"growth strategy: unknown {self.strategy!r} (choose from "
                             f"{', '.join(GROWTH_STRATEGIES)})")
        if self.compose not in COMPOSITIONS:
            raise ValueError(f"compose: unknown {self.compose!r} (choose from {', '.join(COMPOSITIONS)})")
        if not 0 <= self.replay_ratio < float("inf"):
            raise ValueError(f"replay_ratio: must be a finite number >= 0, got {self.replay_ratio}")
        if self.route_top_k < 1:
            raise ValueError(f"route_top_k: must be >= 1, got {self.route_top_k}")


def _has_type(value, hint) -> bool:
    """Whether ``value`` (read from JSON) has the annotated type ``hint`` (int, float, str, bool, None, list[...]
    and unions of them); an int is a float, a bool is neither."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def settings_from_dict(kind, values, part: str):
    """The settings dataclass ``kind`` from a dict of its fields, each one's type checked against its annotation;
    a missing dict, an unknown field or a wrong type raises TypeError naming ``part`` and the field."""
    if not isinstance(values, dict):
        raise TypeError(f"{part}: must be an object of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(kind)
    for key, value in values.items():
        if key not in hints:
            raise TypeError(f"{part}: unknown setting {key!r}")
        if not _has_type(value, hints[key]):
            raise TypeError(f"{part}.{key}: must be {hints[key]}, got {type(value).__name__} {value!r:.40}")
    return kind(**values)


@dataclass(frozen=True)
class MemoryConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: Recipe = field(default_factory=Recipe)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MemoryConfig:
        """The config :meth:`to_dict` gave (a memory folder's manifest); an unknown, missing or bad field raises
        TypeError or ValueError naming it."""
        parts = {"lora": LoRAConfig, "train": TrainConfig, "recipe": Recipe, "answer": AnswerConfig,
                 "growth": GrowthConfig}
        unknown = sorted(set(d) - set(parts))
        if unknown:
            raise TypeError(f"unknown part(s) {', '.join(unknown)} (expected {', '.join(parts)})")
        optional = {"growth"}  # a memory written before memories grew: the default growth
        return cls(**{name: settings_from_dict(kind, d.get(name), name) for name, kind in parts.items()
                      if name in d or name not in optional})


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
    """Greedy answers to chat prompts, with the model as it is (or one stacked adapter per row). A prompt that leaves
    no room for ``cfg.max_new_tokens`` in the model's context window is a ValueError naming the limit."""
    window, longest = lm.config.max_position_embeddings, max(map(len, prompts), default=0)
    if longest + cfg.max_new_tokens > window:
        raise ValueError(f"a prompt of {longest} tokens + {cfg.max_new_tokens} new tokens exceeds the model's context "
                         f"window of {window} positions (max_position_embeddings)")
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
    """A model with LoRA layers that conversations are written into, one adapter at a time. Bound to a memory folder
    (``folder``: `growth.open_memory`, `growth.new_memory`), it grows one session at a time (:meth:`append`)."""

    def __init__(self, lm: LoadedModel, config: MemoryConfig = MemoryConfig()):
        if config.recipe.seq_len > lm.config.max_position_embeddings:
            raise ValueError(f"recipe seq_len {config.recipe.seq_len} exceeds the model's context window of "
                             f"{lm.config.max_position_embeddings} positions (max_position_embeddings)")
        self.lm, self.config = lm, config
        self.folder = None  # a growth.GrowingMemory once bound to a memory folder
        layers = lora_modules(lm.model)
        if not layers:
            inject_lora(lm.model, config.lora)
        elif any(m.rank != config.lora.rank for m in layers.values()):
            raise ValueError(f"the model already has LoRA layers of rank {next(iter(layers.values())).rank}; "
                             f"this memory's rank is {config.lora.rank} (load the model again)")

    def append(self, sessions: Session | list[Session], *, progress: bool = False, source=None):
        """Write one session (or several, as one block) into the memory folder, as ``config.growth`` says, and
        save the folder's next state; returns a `growth.AppendResult`. A session the memory already holds is
        refused before any work (`memory_folder.MemoryFolderError`). ``source``: the `chat_files.ChatFile` the
        sessions were read from, recorded in the manifest."""
        if self.folder is None:
            raise ValueError("append needs a memory folder: growth.open_memory(folder, lm) or "
                             "growth.new_memory(lm, config, path)")
        return self.folder.append(self, [sessions] if isinstance(sessions, Session) else list(sessions),
                                  progress=progress, source=source)

    def train(self, data: TrainingData, *, desc: str = "training", optimizer: torch.optim.Optimizer | None = None,
              progress: bool = False) -> TrainResult:
        """Train the adapter in the model on ``data``, from where it is; ``result.error`` says if training
        diverged or left non-finite weights."""
        result = train_lora(self.lm.model, data.input_ids, data.labels, self.config.train, progress=progress,
                            desc=desc, soft_targets=soft_training(data, self.config.recipe), optimizer=optimizer)
        result.error = result.error or lora_weights_problem(lora_parameters(self.lm.model))
        return result

    def training_data(self, conv: Conversation, *, progress: bool = False) -> TrainingData:
        return build_training_data(self.lm, conv, self.config.recipe, self.config.answer.question_template,
                                   seed=self.config.train.seed, progress=progress)

    def write(self, conv: Conversation, *, progress: bool = False) -> WriteResult:
        """Train a fresh adapter (same initialisation every time) on ``conv``; it stays in the model. A conversation
        with no text in it is a ConversationError ("nothing to remember")."""
        check_something_to_remember(conv)
        reset_lora(self.lm.model, torch.Generator().manual_seed(self.config.train.seed))
        data = self.training_data(conv, progress=progress)
        result = self.train(data, desc=f"train {conv.sample_id}", progress=progress)
        return WriteResult(conv.sample_id, windows=data.input_ids.shape[0],
                           target_tokens=int((data.labels != IGNORE_INDEX).sum()), train=result,
                           data_seconds=data.seconds, teacher_seconds=data.teacher_seconds, error=result.error)

    def save(self, path: str | Path) -> Path:
        return save_adapter(self.lm.model, path, self.config.lora, base_model=self.lm.name)

    def load(self, path: str | Path) -> None:
        load_adapter(self.lm.model, path)

    def answer(self, questions: list[str], *, contexts: list[str] | None = None,
               adapter_ids: list[int] | None = None, progress: bool = False, modules: int | None = None,
               route_top_k: int | None = None) -> list[str]:
        """Answers from the adapter in the model (or, inside :meth:`stacked`, each question's own adapter), in
        the configured mode. A memory of modules may answer as it stood after its first ``modules`` appends, and
        send each question to its ``route_top_k`` best modules instead of what its config says."""
        cfg = self.config.answer
        composed = self.folder is not None and self.config.growth.strategy == "modules"
        if (modules is not None or route_top_k is not None) and not composed:
            raise ValueError("modules and route_top_k apply to a memory of modules (growth strategy 'modules')")
        if cfg.mode == "recite":
            if contexts is not None or adapter_ids is not None or composed:
                raise ValueError("recite-then-answer takes the questions alone, with the adapter in the model")
            return recite_then_answer(self.lm, questions, cfg, progress=progress)[0]
        prompts = chat_prompts(self.lm, question_messages(questions, cfg, contexts))
        if composed:
            if adapter_ids is not None:
                raise ValueError("a memory of modules picks each question's modules itself (no adapter_ids)")
            routes = self.folder.routes(questions, modules=modules, top_k=route_top_k)
            return self._answer_with_modules(prompts, routes, progress)
        return answer_prompts(self.lm, prompts, cfg, adapter_ids=adapter_ids, progress=progress)

    def _answer_with_modules(self, prompts: list[list[int]], routes: list[tuple[tuple[int, ...], list[int]]],
                             progress: bool) -> list[str]:
        """Each prompt answered by the sum of its modules (``routes``: modules and the prompts they answer), the
        composed adapters stacked into the model, at most STACK_AT_ONCE of them per batch."""
        answers = [""] * len(prompts)
        for start in range(0, len(routes), STACK_AT_ONCE):
            chunk = routes[start:start + STACK_AT_ONCE]
            rows = [(j, i) for j, (_, asked) in enumerate(chunk) for i in asked]
            stack_adapter_weights(self.lm.model, [self.folder.composed_adapter(modules) for modules, _ in chunk])
            try:
                outs = answer_prompts(self.lm, [prompts[i] for _, i in rows], self.config.answer,
                                      adapter_ids=[j for j, _ in rows], progress=progress)
            finally:
                unstack_adapters(self.lm.model)
            for (_, i), out in zip(rows, outs):
                answers[i] = out
        return answers

    @contextmanager
    def stacked(self, adapter_dirs: list[str | Path]):
        """Within the block, answer with several saved adapters at once (``adapter_ids`` index this list)."""
        stack_adapters(self.lm.model, adapter_dirs)
        try:
            yield self
        finally:
            unstack_adapters(self.lm.model)
