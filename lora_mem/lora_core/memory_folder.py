"""A memory on disk: one folder with the adapter, the conversation written into it, and a manifest.

    MEMORY_DIR/
      manifest.json       what the memory holds and how it was made (below)
      adapter/            the LoRA adapter in PEFT format (Memory.save; peft.PeftModel.from_pretrained loads it)
      conversation.json   the sessions written, in LoCoMo's ``conversation`` layout: what a later write starts from
      ...                 what a memory that grows keeps to go on (`growth`): replay.safetensors, optimizer.pt,
                          modules/<n>/

manifest.json:

    format, version       "lora-mem memory", MANIFEST_VERSION
    sample_id, speakers   the conversation's id and its two speakers
    base_model            the model the adapter belongs to (a packaged name, a hub id or an absolute directory)
    sessions              one record per session written: index, date_time, turns, sha256 (session_sha256)
    sources               one record per file read: path, sha256 of its bytes, layout, the sessions it gave
    config                every setting (MemoryConfig.to_dict): adapter shape, training, recipe, answering, growth
    writes                one record per write or append: the sessions trained on and how training went
    files                 every other file of the folder with its sha256

A folder is written whole or not at all: everything goes into a hidden folder beside it, which is renamed into
place last, so a reader never sees a memory without its manifest. :func:`read_memory_folder` reads and checks
every part (each manifest field's type, every file against its sha256, the adapter's config, the conversation
against the session digests) without a model, so a command can refuse a broken folder before anything loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lora_mem.files import atomic_write_json, file_sha256
from lora_mem.lora_core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_adapter_config
from lora_mem.lora_core.chat_files import ChatFile, locomo_conversation
from lora_mem.lora_core.conversation import Conversation, ConversationError, Session
from lora_mem.lora_core.memory import Memory, MemoryConfig, WriteResult
from lora_mem.untrusted import read_json

MANIFEST_NAME = "manifest.json"
ADAPTER_DIR = "adapter"
CONVERSATION_NAME = "conversation.json"
MANIFEST_FORMAT = "lora-mem memory"
MANIFEST_VERSION = 1


class MemoryFolderError(ValueError):
    """A memory folder that cannot be used: the message names the file and the field."""


@dataclass(frozen=True)
class SessionRecord:
    index: int
    date_time: str | None
    turns: int
    sha256: str


@dataclass(frozen=True)
class SourceRecord:
    path: str
    sha256: str
    layout: str
    sessions: list[int]  # the indices of the sessions this file gave


@dataclass
class Manifest:
    sample_id: str
    speakers: list[str]
    base_model: str
    sessions: list[SessionRecord]
    sources: list[SourceRecord]
    config: dict
    writes: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # path in the folder -> sha256 (save_memory_folder fills it)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def memory_config(self) -> MemoryConfig:
        return MemoryConfig.from_dict(self.config)


@dataclass
class MemoryFolder:
    """A memory folder as read from disk (checked; no model needed)."""

    path: Path
    manifest: Manifest
    conversation: Conversation

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR


# ----------------------------------------------------------------------------------------------------------------
# Sessions and conversations as JSON
# ----------------------------------------------------------------------------------------------------------------


def session_sha256(session: Session) -> str:
    """A digest of what a session says: its date and each turn's speaker, text and photo caption (not its index or
    turn ids, which depend on where it sits), so the same session read twice has the same digest."""
    said = [session.date_time, [[t.speaker, t.text, t.blip_caption] for t in session.turns]]
    return hashlib.sha256(json.dumps(said, ensure_ascii=False).encode()).hexdigest()


def session_record(session: Session) -> SessionRecord:
    return SessionRecord(session.index, session.date_time, len(session.turns), session_sha256(session))


def conversation_json(conv: Conversation) -> dict:
    """``conv`` in LoCoMo's ``conversation`` layout (what :func:`chat_files.locomo_conversation` reads)."""
    out: dict = {"speaker_a": conv.speaker_a, "speaker_b": conv.speaker_b}
    for s in conv.sessions:
        if s.date_time is not None:
            out[f"session_{s.index}_date_time"] = s.date_time
        out[f"session_{s.index}"] = [{"speaker": t.speaker, "dia_id": t.dia_id, "text": t.text,
                                      **({"blip_caption": t.blip_caption} if t.blip_caption else {})}
                                     for t in s.turns]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def base_model_name(name: str) -> str:
    """How a memory names its base model: a local directory as an absolute path (so the memory can be asked from
    anywhere), a packaged name or hub id as it is."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def write_record(result: WriteResult, sessions: list[int]) -> dict:
    return {"sessions": sessions, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **result.to_dict()}


def new_manifest(memory: Memory, conv: Conversation, result: WriteResult, source: ChatFile | None = None) -> Manifest:
    """The manifest of a memory that ``memory.write(conv)`` (returning ``result``) just wrote; ``source``: the file
    ``conv`` was read from."""
    indices = [s.index for s in conv.sessions]
    sources = [] if source is None else [SourceRecord(str(source.path.resolve()), source.sha256, source.layout,
                                                      indices)]
    return Manifest(conv.sample_id, [conv.speaker_a, conv.speaker_b], base_model_name(memory.lm.name),
                    [session_record(s) for s in conv.sessions], sources, memory.config.to_dict(),
                    [write_record(result, indices)])


def save_memory_folder(folder: str | os.PathLike, memory: Memory, conv: Conversation, manifest: Manifest, *,
                       replace: bool = False, write_parts: Callable[[Path], None] | None = None) -> Path:
    """Write the adapter in ``memory``'s model, ``conv`` and ``manifest`` as the memory folder ``folder``;
    ``write_parts(new_folder)`` writes whatever else the memory keeps, and ``manifest.files`` lists every file with
    its sha256.

    The folder must not exist (or be empty) unless ``replace``; the new folder is built beside it and renamed into
    place, and a replaced folder is removed only once the new one is in place."""
    folder = Path(folder)
    if folder.exists() and not replace and (not folder.is_dir() or any(folder.iterdir())):
        raise MemoryFolderError(f"{folder}: already exists and is not empty")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.writing-", dir=folder.parent))
    try:
        memory.save(staging / ADAPTER_DIR)
        atomic_write_json(staging / CONVERSATION_NAME, conversation_json(conv))
        if write_parts is not None:
            write_parts(staging)
        manifest.files = {f.relative_to(staging).as_posix(): file_sha256(f) for f in sorted(staging.rglob("*"))
                          if f.is_file()}
        atomic_write_json(staging / MANIFEST_NAME, manifest.to_dict())
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.replaced-{os.getpid()}"
            os.replace(folder, old)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Reading, with every part checked
# ----------------------------------------------------------------------------------------------------------------


def _field(raw: dict, key: str, kind, path: Path, where: str = ""):
    if key not in raw:
        raise MemoryFolderError(f"{path}: {where}missing field {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise MemoryFolderError(f"{path}: {where}field {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                                f"got {type(value).__name__} {value!r:.80}")
    return value


def _records(raw: dict, key: str, path: Path, fields: dict, make):
    out = []
    for i, item in enumerate(_field(raw, key, list, path)):
        where = f"{key}[{i}]: "
        if not isinstance(item, dict):
            raise MemoryFolderError(f"{path}: {where}must be an object, got {type(item).__name__}")
        out.append(make(**{k: _field(item, k, kind, path, where) for k, kind in fields.items()}))
    return out


def parse_manifest(raw, path: Path) -> Manifest:
    """A manifest.json's content, each field's type checked; errors name the file and the field."""
    if not isinstance(raw, dict):
        raise MemoryFolderError(f"{path}: must be a JSON object, got {type(raw).__name__}")
    if raw.get("format") != MANIFEST_FORMAT:
        raise MemoryFolderError(f"{path}: field 'format' must be {MANIFEST_FORMAT!r}, got {raw.get('format')!r:.80} "
                                "(not a lora-mem memory folder)")
    if raw.get("version") != MANIFEST_VERSION:
        raise MemoryFolderError(f"{path}: field 'version' {raw.get('version')!r:.40} is not one this lora-mem reads "
                                f"({MANIFEST_VERSION})")
    speakers = _field(raw, "speakers", list, path)
    if len(speakers) != 2 or not all(isinstance(s, str) for s in speakers):
        raise MemoryFolderError(f"{path}: field 'speakers' must be two names, got {speakers!r:.80}")
    sessions = _records(raw, "sessions", path, {"index": int, "date_time": (str, type(None)), "turns": int,
                                                "sha256": str}, SessionRecord)
    sources = _records(raw, "sources", path, {"path": str, "sha256": str, "layout": str, "sessions": list},
                       SourceRecord)
    writes = _field(raw, "writes", list, path)
    if not all(isinstance(w, dict) for w in writes):
        raise MemoryFolderError(f"{path}: field 'writes' must be a list of objects")
    files = _field(raw, "files", dict, path)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise MemoryFolderError(f"{path}: field 'files' must map each file to its sha256")
    manifest = Manifest(_field(raw, "sample_id", str, path), speakers, _field(raw, "base_model", str, path),
                        sessions, sources, _field(raw, "config", dict, path), writes, files)
    try:
        manifest.memory_config
    except (TypeError, ValueError, KeyError) as e:
        raise MemoryFolderError(f"{path}: field 'config': {e}") from None
    return manifest


def _read(path: Path):
    if not path.is_file():
        raise MemoryFolderError(f"{path}: missing (a memory folder holds {MANIFEST_NAME}, {ADAPTER_DIR}/ and "
                                f"{CONVERSATION_NAME})")
    return read_json(path, MemoryFolderError)


def read_memory_folder(folder: str | os.PathLike) -> MemoryFolder:
    """Read and check a memory folder (no model needed): the manifest, the adapter's files and config, and the
    conversation against the manifest's sessions. Every problem is one :class:`MemoryFolderError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MemoryFolderError(f"{folder}: no such memory folder" if not folder.exists()
                                else f"{folder}: not a folder (a memory is a folder written by lora-mem write)")
    manifest_path = folder / MANIFEST_NAME
    manifest = parse_manifest(_read(manifest_path), manifest_path)
    for name, sha in manifest.files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise MemoryFolderError(f"{manifest_path}: field 'files' names {name!r}, outside the folder")
        f = folder / name
        if not f.is_file():
            raise MemoryFolderError(f"{f}: missing (listed in {manifest_path})")
        if file_sha256(f) != sha:
            raise MemoryFolderError(f"{f}: corrupt (its sha256 differs from the one in {manifest_path})")
    adapter = folder / ADAPTER_DIR
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (adapter / name).is_file():
            raise MemoryFolderError(f"{adapter / name}: missing (the memory's adapter)")
    try:
        lora = read_adapter_config(adapter)
    except AdapterError as e:
        raise MemoryFolderError(str(e)) from None
    if lora.rank != manifest.memory_config.lora.rank:
        raise MemoryFolderError(f"{adapter / CONFIG_NAME}: r={lora.rank}, but {manifest_path} says rank "
                                f"{manifest.memory_config.lora.rank}")
    conv_path = folder / CONVERSATION_NAME
    try:
        a, b, sessions = locomo_conversation(_read(conv_path), conv_path, manifest.sample_id)
    except ConversationError as e:
        raise MemoryFolderError(str(e)) from None
    conversation = Conversation(manifest.sample_id, a, b, sessions)
    if [a, b] != manifest.speakers:
        raise MemoryFolderError(f"{conv_path}: speakers {a!r}, {b!r} differ from {manifest_path}'s "
                                f"{manifest.speakers}")
    recorded = {r.index: r.sha256 for r in manifest.sessions}
    found = {s.index: session_sha256(s) for s in sessions}
    if recorded != found:
        differ = sorted(i for i in set(recorded) | set(found) if recorded.get(i) != found.get(i))
        raise MemoryFolderError(f"{conv_path}: session(s) {', '.join(map(str, differ))} differ from the sha256 in "
                                f"{manifest_path}")
    return MemoryFolder(folder, manifest, conversation)
