"""A memory that grows: each session written as it arrives, without training again on the whole history.

    memory = new_memory(lm, MemoryConfig(recipe=Recipe("text+queries")), "memories/demo")
    memory.append(session)                     # written; the memory folder holds the new state when it returns
    memory = open_memory(read_memory_folder("memories/demo"), lm)   # in another process: the same memory
    memory.append(next_session)                # bit for bit what one process appending both would hold

Three ways to grow (:class:`~lora_mem.lora_core.memory.GrowthConfig`), behind the one call:

  rewrite   a fresh adapter trained on every session so far, which is `Memory.write` of the conversation so far. The
            reference: a stream of n sessions trains on about n^2 / 2 sessions' data.
  continue  the adapter in the model trained further on the new sessions' windows and a replay sample of the
            earlier sessions' windows (``replay_ratio`` per new window, drawn without replacement with the training
            seed plus the append's number, and recorded); AdamW's state kept across appends (``keep_optimizer``) or
            fresh at each.
  modules   a fresh adapter per append, trained on its sessions alone. Answers come from the modules' updates summed
            (``compose="sum"``), or each question goes to the ``route_top_k`` modules whose own training questions
            match it best by BM25 (``compose="route"``); either way all questions go in one batch through the
            stacked-adapter path (`multi_adapter`).

What a memory keeps to go on, beside the adapter, conversation and manifest of every memory folder (`memory_folder`):

    replay.safetensors    every training window written so far (input_ids, labels, the write it came from)  continue
    optimizer.pt          AdamW's state                                                continue, keep_optimizer
    modules/<n>/          the adapter of write n (PEFT format) and questions.json, its training questions    modules

A folder without them (one `lora-mem write` made) grows too: its replay buffer is rebuilt from its conversation and
its adapter is its first module. Each append is one record of the manifest's ``writes`` (its sessions, windows,
replay sample, training tokens and seconds). A session the memory already holds (the same date and turns, whatever
its index) is refused, as is one that does not come after the last written: a memory's sessions are in the order
they were said.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lora_mem.deps import require
from lora_mem.files import atomic_write_bytes, atomic_write_json
from lora_mem.kernels.lora_reference import lora_scaling
from lora_mem.lora_core.adapter_io import load_adapter, read_adapter_config, read_adapter_weights, save_adapter
from lora_mem.lora_core.chat_files import ChatFile
from lora_mem.lora_core.conversation import Conversation, Session
from lora_mem.lora_core.inject import LoRAConfig, lora_parameters, reset_lora
from lora_mem.lora_core.memory import Memory, MemoryConfig
from lora_mem.lora_core.memory_folder import (
    ADAPTER_DIR,
    Manifest,
    MemoryFolder,
    MemoryFolderError,
    SourceRecord,
    base_model_name,
    save_memory_folder,
    session_record,
    session_sha256,
)
from lora_mem.lora_core.recipes import Recipe, recipe_queries, training_qa_pairs
from lora_mem.lora_core.train import IGNORE_INDEX, TrainResult, adamw
from lora_mem.model.loader import LoadedModel

REPLAY_NAME = "replay.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
MODULES_DIR = "modules"
QUESTIONS_NAME = "questions.json"


def module_dir(n: int) -> str:
    return f"{MODULES_DIR}/{n:04d}"


# ----------------------------------------------------------------------------------------------------------------
# What continue keeps: the replay buffer and the optimizer's state
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ReplayBuffer:
    """Every training window written so far, in the order written."""

    input_ids: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N, L)
    write: torch.Tensor  # (N,) the write (1-based, the manifest's writes) each window came from

    @classmethod
    def empty(cls, seq_len: int) -> ReplayBuffer:
        return cls(torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.long),
                   torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def extended(self, input_ids: torch.Tensor, labels: torch.Tensor, write: int) -> ReplayBuffer:
        return ReplayBuffer(torch.cat([self.input_ids, input_ids]), torch.cat([self.labels, labels]),
                            torch.cat([self.write, torch.full((input_ids.shape[0],), write, dtype=torch.long)]))

    def to_bytes(self) -> bytes:
        return save_safetensors({"input_ids": self.input_ids.contiguous(), "labels": self.labels.contiguous(),
                                 "write": self.write.contiguous()})

    @classmethod
    def from_file(cls, path: Path) -> ReplayBuffer:
        try:
            t = load_safetensors(path.read_bytes())
            buffer = cls(t["input_ids"], t["labels"], t["write"])
        except Exception as e:  # noqa: BLE001 - any unreadable buffer is one message naming the file
            raise MemoryFolderError(f"{path}: not a replay buffer ({type(e).__name__}: {e})") from None
        if buffer.labels.shape != buffer.input_ids.shape or buffer.write.shape != buffer.input_ids.shape[:1]:
            raise MemoryFolderError(f"{path}: input_ids {list(buffer.input_ids.shape)}, labels "
                                    f"{list(buffer.labels.shape)} and write {list(buffer.write.shape)} disagree")
        return buffer


def optimizer_bytes(state: dict) -> bytes:
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


def read_optimizer(data: bytes, path: Path) -> dict:
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise MemoryFolderError(f"{path}: not an optimizer state ({type(e).__name__}: {e})") from None


def replay_sample(buffer_size: int, new_windows: int, ratio: float, seed: int) -> list[int]:
    """Indices of round(ratio x new_windows) windows of the buffer (all of it if it is smaller), drawn without
    replacement, in buffer order."""
    size = min(buffer_size, round(ratio * new_windows))
    order = torch.randperm(buffer_size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:size].tolist())


# ----------------------------------------------------------------------------------------------------------------
# What modules keep: one adapter per write and the questions it was trained on
# ----------------------------------------------------------------------------------------------------------------


def training_questions(conv: Conversation, recipe: Recipe, seed: int) -> list[str]:
    """The questions a recipe trains on for ``conv`` (coverage queries, template QA), what a module is routed by;
    a recipe without questions (plain text) gives the turns' text instead."""
    questions = [q.question for q in recipe_queries(conv, recipe)] if recipe.uses_queries else []
    if recipe.has_qa and not recipe.needs_generated_qa:
        questions += [p.question for p in training_qa_pairs(conv, recipe, seed=seed)]
    return questions or [t.text for s in conv.sessions for t in s.turns if t.text.strip()]


def summed_adapter(adapters: list[tuple[LoRAConfig, dict[str, torch.Tensor]]]
                   ) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """One adapter whose update is the sum of the adapters' updates: A stacked by rows, each B scaled by its own
    alpha / r and stacked by columns, rank the sum of ranks at scaling 1."""
    if len(adapters) == 1:
        return adapters[0]
    rank = sum(c.rank for c, _ in adapters)
    config = LoRAConfig(rank=rank, alpha=float(rank), target_modules=adapters[0][0].target_modules)
    weights = {}
    for key in adapters[0][1]:
        if key.endswith(".lora_A"):
            weights[key] = torch.cat([w[key].float() for _, w in adapters])
        else:
            weights[key] = torch.cat([lora_scaling(c.rank, c.alpha, c.use_rslora) * w[key].float()
                                      for c, w in adapters], dim=1)
    return config, weights


class BM25Router:
    """BM25 (bm25s, Porter-stemmed, English stop words) over every module's training questions; a question goes
    to the modules whose best-matching training question scores highest."""

    def __init__(self, questions: list[list[str]]):
        require("bm25s", extra="rag", needed_for="routing questions to modules (compose='route')")
        import bm25s
        from nltk.stem import PorterStemmer

        stemmer = PorterStemmer()
        self._tokenize = lambda texts, **kw: bm25s.tokenize(texts, stopwords="en", show_progress=False,
                                                             stemmer=lambda ws: [stemmer.stem(w) for w in ws], **kw)
        self.owner = torch.tensor([m for m, qs in enumerate(questions) for _ in qs])  # each question's module
        self.n_modules = len(questions)
        self.index = bm25s.BM25()
        self.index.index(self._tokenize([q for qs in questions for q in qs]), show_progress=False)

    def module_scores(self, questions: list[str]) -> torch.Tensor:
        """(questions, modules): the best BM25 score among each module's training questions."""
        out = torch.zeros(len(questions), self.n_modules, dtype=torch.float64)
        for i, tokens in enumerate(self._tokenize(questions, return_ids=False)):
            if tokens:
                scores = torch.from_numpy(self.index.get_scores(tokens)).double()
                out[i] = out[i].scatter_reduce(0, self.owner, scores, reduce="amax")
        return out

    def top(self, questions: list[str], k: int) -> list[tuple[int, ...]]:
        """The k best modules (0-based) of each question; ties, and questions no module matches, go to the latest."""
        latest_first = torch.arange(self.n_modules - 1, -1, -1)
        k = min(k, self.n_modules)
        return [tuple(sorted(int(latest_first[j]) for j in row[latest_first].argsort(descending=True, stable=True)[:k]))
                for row in self.module_scores(questions)]


# ----------------------------------------------------------------------------------------------------------------
# Appending
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AppendResult:
    """One append: what it trained on and what it cost."""

    append: int  # its number among the memory's writes (1-based)
    sessions: list[int]
    windows: int  # the new sessions' windows (rewrite: every session's)
    replay: dict | None  # continue: {"seed", "indices"}: the earlier windows trained again
    target_tokens: int  # labelled positions of the new windows, per epoch
    train: TrainResult
    data_seconds: float
    seconds: float = 0.0  # the whole append: data, training, writing the folder
    error: str | None = None

    def record(self) -> dict:
        """The manifest's record of this append (one of its ``writes``)."""
        return {"sessions": self.sessions, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "append": self.append,
                "windows": self.windows, "replay": self.replay, "target_tokens": self.target_tokens,
                "data_seconds": self.data_seconds, **self.train.to_dict(), "append_seconds": self.seconds,
                "error": self.error}


class GrowingMemory:
    """A memory folder as a Memory in this process holds it: what was written, and what `append` needs to go on.
    ``folder`` is None until the first append of a memory made by :func:`new_memory` writes it."""

    def __init__(self, path: Path, folder: MemoryFolder | None, name: str, speakers: tuple[str, str] | None):
        self.path, self.folder, self.name, self.speakers = path, folder, name, speakers
        self.buffer: ReplayBuffer | None = None
        self.optimizer_state: dict | None = None
        self._modules: dict[str, tuple[LoRAConfig, dict]] = {}
        self._router: tuple[int, BM25Router] | None = None
        if folder is not None:
            files = folder.manifest.files
            if REPLAY_NAME in files:
                self.buffer = ReplayBuffer.from_file(path / REPLAY_NAME)
            if OPTIMIZER_NAME in files:
                self.optimizer_state = read_optimizer((path / OPTIMIZER_NAME).read_bytes(), path / OPTIMIZER_NAME)

    @classmethod
    def of(cls, folder: MemoryFolder) -> GrowingMemory:
        """The growing state of a folder read from disk (its replay buffer and optimizer state read and checked)."""
        return cls(folder.path, folder, folder.manifest.sample_id, tuple(folder.manifest.speakers))

    @property
    def writes(self) -> int:
        return len(self.folder.manifest.writes) if self.folder else 0

    @property
    def conversation(self) -> Conversation | None:
        return self.folder.conversation if self.folder else None

    def module_dirs(self) -> list[str]:
        """The folder's modules, oldest first; a folder written at once has its adapter as its one module."""
        if self.folder is None:
            return []
        found = sorted({"/".join(name.split("/")[:2]) for name in self.folder.manifest.files
                        if name.startswith(MODULES_DIR + "/")})
        return found or [ADAPTER_DIR]

    def check_sessions(self, sessions: list[Session]) -> None:
        """Refuse, before any work, what cannot be appended: no session, a session already held, one out of order,
        a first session without two speakers."""
        if not sessions:
            raise MemoryFolderError("no session to append")
        held = {r.sha256: r.index for r in self.folder.manifest.sessions} if self.folder else {}
        last = max(held.values(), default=0)
        for s in sessions:
            if not isinstance(s, Session):
                raise MemoryFolderError(f"append takes Session objects, got {type(s).__name__}")
            sha = session_sha256(s)
            if sha in held:
                raise MemoryFolderError(f"session {s.index}: the memory already holds it (as session {held[sha]}, "
                                        f"sha256 {sha[:12]}...): appending it again is refused")
            if s.index <= last:
                raise MemoryFolderError(f"session {s.index}: sessions are appended in the order they were said, and "
                                        f"session {last} is already written")
            if not any(t.text.strip() or t.blip_caption for t in s.turns):
                raise MemoryFolderError(f"session {s.index}: no turn says anything: nothing to remember")
            held[sha], last = s.index, s.index
        speakers = self.speakers or list(dict.fromkeys(t.speaker for s in sessions for t in s.turns))[:2]
        if self.folder is None and len(speakers) < 2:
            raise MemoryFolderError(f"session {sessions[0].index}: one speaker only; a memory has two (name them "
                                    "in new_memory)")

    def conversations(self, sessions: list[Session]) -> tuple[Conversation, Conversation]:
        """(the new sessions alone, every session so far) as conversations of the memory's speakers."""
        if self.folder is not None:
            before = self.folder.conversation
            name, a, b, earlier = before.sample_id, before.speaker_a, before.speaker_b, list(before.sessions)
        else:
            a, b = self.speakers or list(dict.fromkeys(t.speaker for s in sessions for t in s.turns))[:2]
            name, earlier = self.name, []
        return Conversation(name, a, b, list(sessions)), Conversation(name, a, b, earlier + list(sessions))

    def replay_buffer(self, memory: Memory) -> ReplayBuffer:
        """The windows written so far: the folder's buffer, or (a folder written without one) each write's windows
        built again from its sessions."""
        if self.buffer is not None:
            return self.buffer
        buffer = ReplayBuffer.empty(memory.config.recipe.seq_len)
        if self.folder is not None:
            conv = self.folder.conversation
            by_index = {s.index: s for s in conv.sessions}
            for n, write in enumerate(self.folder.manifest.writes, start=1):
                block = Conversation(conv.sample_id, conv.speaker_a, conv.speaker_b,
                                     [by_index[i] for i in write["sessions"]])
                data = memory.training_data(block)
                buffer = buffer.extended(data.input_ids, data.labels, n)
        return buffer

    def append(self, memory: Memory, sessions: list[Session], *, progress: bool = False,
               source: ChatFile | None = None) -> AppendResult:
        """Train ``memory``'s adapter(s) on ``sessions`` as its growth config says and write the folder's next
        state. A training that diverges writes nothing and puts the memory's adapter back as it was."""
        self.check_sessions(sessions)
        t0 = time.perf_counter()
        config, growth, model = memory.config, memory.config.growth, memory.lm.model
        n = self.writes + 1
        block, so_far = self.conversations(sessions)
        if growth.strategy != "continue" or self.folder is None:
            reset_lora(model, torch.Generator().manual_seed(config.train.seed))
        data = memory.training_data(so_far if growth.strategy == "rewrite" else block, progress=progress)
        train_data, replay, optimizer, buffer = data, None, None, None
        if growth.strategy == "continue":
            buffer = self.replay_buffer(memory)
            seed = config.train.seed + n
            indices = replay_sample(len(buffer), data.input_ids.shape[0], growth.replay_ratio, seed)
            replay = {"seed": seed, "indices": indices}
            train_data = dataclasses.replace(data, input_ids=torch.cat([data.input_ids, buffer.input_ids[indices]]),
                                             labels=torch.cat([data.labels, buffer.labels[indices]]))
            optimizer = adamw(lora_parameters(model), config.train, model.lm_head.weight.dtype)
            if growth.keep_optimizer and self.optimizer_state is not None:
                optimizer.load_state_dict(self.optimizer_state)
        train = memory.train(train_data, desc=f"append {n}", optimizer=optimizer, progress=progress)
        result = AppendResult(n, [s.index for s in sessions], data.input_ids.shape[0], replay,
                              int((data.labels != IGNORE_INDEX).sum()), train, data.seconds, error=train.error)
        if train.error is not None:
            self.restore(memory)
            result.seconds = time.perf_counter() - t0
            return result
        state_bytes = optimizer_bytes(optimizer.state_dict()) if growth.strategy == "continue" \
            and growth.keep_optimizer else None
        if buffer is not None:
            buffer = buffer.extended(data.input_ids, data.labels, n)
        self._save(memory, n, sessions, so_far, block, buffer, state_bytes, result, source, t0)
        self.buffer = buffer
        # what another process reads back from the file, so that both go on from the same state
        self.optimizer_state = read_optimizer(state_bytes, self.path / OPTIMIZER_NAME) if state_bytes else None
        return result

    def _save(self, memory: Memory, n: int, sessions: list[Session], so_far: Conversation, block: Conversation,
              buffer: ReplayBuffer | None, state_bytes: bytes | None, result: AppendResult,
              source: ChatFile | None, t0: float) -> None:
        config, lm = memory.config, memory.lm
        previous = self.folder

        def write_parts(staging: Path) -> None:
            if buffer is not None:
                atomic_write_bytes(staging / REPLAY_NAME, buffer.to_bytes())
            if state_bytes is not None:
                atomic_write_bytes(staging / OPTIMIZER_NAME, state_bytes)
            if config.growth.strategy == "modules":
                modules = self.module_dirs()
                for number, old in enumerate(modules, start=1):  # earlier modules, linked as they are
                    link_tree(self.path / old, staging / module_dir(number))
                    if old == ADAPTER_DIR:  # a folder written at once: its adapter is its first module
                        atomic_write_json(staging / module_dir(number) / QUESTIONS_NAME, training_questions(
                            previous.conversation, config.recipe, config.train.seed))
                new = staging / module_dir(len(modules) + 1)
                save_adapter(lm.model, new, config.lora, base_model=lm.name)
                atomic_write_json(new / QUESTIONS_NAME, training_questions(block, config.recipe, config.train.seed))
            result.seconds = time.perf_counter() - t0  # everything but the manifest and the folder's rename
            manifest.writes[-1]["append_seconds"] = result.seconds

        sources = list(previous.manifest.sources) if previous else []
        if source is not None:
            sources.append(SourceRecord(str(source.path.resolve()), source.sha256, source.layout, result.sessions))
        records = [session_record(s) for s in sessions]
        if previous is None:
            manifest = Manifest(so_far.sample_id, [so_far.speaker_a, so_far.speaker_b], base_model_name(lm.name),
                                records, sources, config.to_dict(), [result.record()])
        else:
            manifest = dataclasses.replace(previous.manifest, sessions=previous.manifest.sessions + records,
                                           sources=sources, writes=previous.manifest.writes + [result.record()])
        save_memory_folder(self.path, memory, so_far, manifest, replace=previous is not None,
                           write_parts=write_parts)
        self.folder = MemoryFolder(self.path, manifest, so_far)
        self._router = None

    def restore(self, memory: Memory) -> None:
        """Put the memory's adapter back into the model (a fresh one, whose update is zero, before any write)."""
        if self.folder is not None:
            load_adapter(memory.lm.model, self.path / ADAPTER_DIR)
        else:
            reset_lora(memory.lm.model, torch.Generator().manual_seed(memory.config.train.seed))

    # ------------------------------------------------------------------------------------------------------------
    # Answering with modules
    # ------------------------------------------------------------------------------------------------------------

    def module(self, name: str) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
        if name not in self._modules:
            self._modules[name] = (read_adapter_config(self.path / name), read_adapter_weights(self.path / name))
        return self._modules[name]

    def module_questions(self, name: str, memory_config: MemoryConfig) -> list[str]:
        if name == ADAPTER_DIR:
            return training_questions(self.folder.conversation, memory_config.recipe, memory_config.train.seed)
        path = self.path / name / QUESTIONS_NAME
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MemoryFolderError(f"{path}: unreadable ({type(e).__name__}: {e})") from None

    def routes(self, questions: list[str], *, modules: int | None = None,
               top_k: int | None = None) -> list[tuple[tuple[int, ...], list[int]]]:
        """Which modules (1-based, oldest first) answer which questions: [(modules, indices of their questions)],
        in order of first use. ``modules``: only the first n, the memory as it stood after its n-th append (default:
        all); ``top_k``: route each question to its k best modules whatever the memory's own composition says
        (default: its ``compose`` and ``route_top_k``)."""
        dirs = self.module_dirs()
        if not dirs:
            raise MemoryFolderError(f"{self.path}: the memory holds no session yet")
        n = len(dirs) if modules is None else modules
        if not 1 <= n <= len(dirs) or (top_k is not None and top_k < 1):
            raise ValueError(f"{self.path}: holds {len(dirs)} modules; cannot route among the first {n} to the "
                             f"best {top_k}")
        config = MemoryConfig.from_dict(self.folder.manifest.config)
        if top_k is None and config.growth.compose == "sum":
            return [(tuple(range(1, n + 1)), list(range(len(questions))))]
        if self._router is None or self._router[0] != n:
            self._router = (n, BM25Router([self.module_questions(m, config) for m in dirs[:n]]))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, top in enumerate(self._router[1].top(questions, top_k or config.growth.route_top_k)):
            groups.setdefault(tuple(m + 1 for m in top), []).append(i)
        return list(groups.items())

    def composed_adapter(self, modules: tuple[int, ...]) -> tuple[str, LoRAConfig, dict[str, torch.Tensor]]:
        """The adapter that answers for these modules (their sum), named for messages, as
        `multi_adapter.stack_adapter_weights` takes it."""
        dirs = self.module_dirs()
        config, weights = summed_adapter([self.module(dirs[n - 1]) for n in modules])
        return f"{self.path}/{'+'.join(dirs[n - 1] for n in modules)}", config, weights


def link_tree(src: Path, dst: Path) -> None:
    """dst a copy of the files of src, hard-linked where the file system allows (an unchanged module is not
    written again)."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                atomic_write_bytes(target, f.read_bytes())


# ----------------------------------------------------------------------------------------------------------------
# Memories bound to a folder
# ----------------------------------------------------------------------------------------------------------------


def check_growth(config: MemoryConfig) -> None:
    """A ValueError if ``config`` cannot grow: 'continue' replays hard-label windows, which a distill recipe has not."""
    if config.growth.strategy == "continue" and "distill" in config.recipe.parts:
        raise ValueError("growth strategy 'continue' replays hard-label windows; a distill recipe grows by "
                         "'rewrite' or 'modules'")


def new_memory(lm: LoadedModel, config: MemoryConfig, path: str | os.PathLike, *, name: str | None = None,
               speakers: tuple[str, str] | None = None) -> Memory:
    """A memory that its first append writes into the folder ``path`` (which must not exist, or be empty);
    ``speakers``: default the first two of the first session appended."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MemoryFolderError(f"{path}: already exists and is not empty (open it to append to it)")
    if speakers is not None and len(speakers) != 2:
        raise MemoryFolderError(f"speakers: a memory has two, got {speakers!r}")
    check_growth(config)
    memory = Memory(lm, config)
    memory.folder = GrowingMemory(path, None, name or path.name, tuple(speakers) if speakers else None)
    memory.folder.restore(memory)
    return memory


def open_memory(folder: MemoryFolder, lm: LoadedModel) -> Memory:
    """The memory in ``folder`` (`memory_folder.read_memory_folder`), its adapter loaded into ``lm``'s model, ready
    to answer and to grow."""
    check_growth(folder.manifest.memory_config)
    memory = Memory(lm, folder.manifest.memory_config)
    memory.folder = GrowingMemory.of(folder)
    memory.folder.restore(memory)
    return memory


def after(sessions: list[Session], folder: MemoryFolder) -> list[Session]:
    """``sessions`` (read from a file, numbered from 1) numbered on from the folder's last session, each turn's id
    with them (D<session>:<turn>, as LoCoMo's)."""
    last = max((r.index for r in folder.manifest.sessions), default=0)
    return [Session(last + k, s.date_time, [dataclasses.replace(t, dia_id=f"D{last + k}:{j}")
                                           for j, t in enumerate(s.turns, start=1)])
            for k, s in enumerate(sessions, start=1)]
