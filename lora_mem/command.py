"""The ``lora-mem`` command: write one's own chat into a memory, ask it, see what it holds.

    lora-mem write chat.jsonl --out memories/ana       # a chat export, or a file in LoCoMo's layout
    lora-mem append memories/ana later.jsonl           # its sessions written into the memory after the others
    lora-mem ask memories/ana "When did Ana adopt Rex?"
    lora-mem ask memories/ana --interactive
    lora-mem info memories/ana

A memory is a folder (lora_mem.lora_core.memory_folder): the adapter in PEFT format, the conversation and a
manifest. Every input is read and checked before the model loads; a problem is one ``error: ...`` line naming the
file, line and field (exit status 2), and nothing is written. ``write`` builds the folder beside ``--out`` and
renames it into place when training has finished, so an interrupted or failed write leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from lora_mem.cli import (
    Parser,
    device_name,
    fail,
    int_at_least,
    output_dir,
    positive_float,
    positive_int,
    seed,
    threads,
    train_format,
)
from lora_mem.lora_core.chat_files import ChatFile, SessionSplit, read_chat
from lora_mem.lora_core.conversation import ConversationError
from lora_mem.lora_core.memory import MemoryConfig
from lora_mem.lora_core.memory_folder import MANIFEST_NAME, MemoryFolder, MemoryFolderError, read_memory_folder
from lora_mem.lora_core.recipes import MIN_SEQ_LEN, Recipe

PROG = "lora-mem"
DEFAULT_MODEL = "smollm2-135m-instruct"
# What `lora-mem write` trains by default: the recipe that answers best from the weights alone (README, Results),
# with every other setting MemoryConfig's.
WRITE_CONFIG = MemoryConfig(recipe=Recipe("text+queries"))


def build_parser() -> Parser:
    ap = Parser(prog=PROG,
                description="Write one's own chat into a LoRA adapter (a memory folder), then ask it: the answers "
                            "come from the weights alone. 'lora-mem COMMAND --help' for each command's options.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    lora, train, recipe = WRITE_CONFIG.lora, WRITE_CONFIG.train, WRITE_CONFIG.recipe

    w = sub.add_parser("write", help="write a chat into a new memory folder",
                       description="Write a chat into a new memory folder: an adapter trained on it, the "
                                   "conversation and a manifest.")
    w.add_argument("chat", metavar="CHAT", help="a chat export: JSON list or JSON Lines of {speaker, text, time}; "
                                                "or a file in LoCoMo's layout")
    w.add_argument("--out", required=True, type=output_dir, metavar="MEMORY_DIR",
                   help="the memory folder to create (must not exist, or be empty)")
    w.add_argument("--conversation", metavar="ID", help="LoCoMo files with several conversations: the sample_id "
                                                        "to write")
    w.add_argument("--session-gap", type=positive_float, metavar="HOURS", help="a chat's sessions: a new one after "
                   "a silence of more than HOURS (default: a new session each calendar day)")
    w.add_argument("--model", default=DEFAULT_MODEL, help="packaged name, local checkpoint dir or hub id")
    w.add_argument("--recipe", type=train_format, default=recipe.train_format,
                   help="what the chat is trained as: parts joined by '+' (text, qa, queries, distill, recite)")
    w.add_argument("--rank", type=positive_int, default=lora.rank, help="LoRA rank (alpha is 2 x rank)")
    w.add_argument("--epochs", type=positive_int, default=train.epochs, help="passes over the training data")
    w.add_argument("--lr", type=positive_float, default=train.lr, help="peak learning rate (AdamW)")
    w.add_argument("--seq-len", type=int_at_least(MIN_SEQ_LEN), default=recipe.seq_len,
                   help="tokens per training window")
    w.add_argument("--seed", type=seed, default=train.seed, help="adapter initialisation and data order")
    w.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    w.add_argument("--threads", type=threads, help="torch CPU threads (default: torch's, all cores)")
    w.add_argument("--quiet", action="store_true", help="no progress bars")

    g = sub.add_parser("append", help="write more sessions into a memory folder",
                       description="Write the sessions of a chat file into a memory folder, after the sessions it "
                                   "holds, the way the memory grows (its manifest's growth settings: by default "
                                   "a new adapter for the new sessions, the best two routed to each question). "
                                   "A session the memory already holds is refused.")
    g.add_argument("memory", metavar="MEMORY_DIR", help="a memory folder written by lora-mem write")
    g.add_argument("chat", metavar="CHAT", help="the sessions to append: a chat export (JSON list or JSON Lines of "
                                                "{speaker, text, time}) or a file in LoCoMo's layout")
    g.add_argument("--conversation", metavar="ID", help="LoCoMo files with several conversations: the sample_id "
                                                        "to append from")
    g.add_argument("--session-gap", type=positive_float, metavar="HOURS", help="a chat's sessions: a new one after "
                   "a silence of more than HOURS (default: a new session each calendar day)")
    g.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    g.add_argument("--threads", type=threads, help="torch CPU threads (default: torch's, all cores)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    a = sub.add_parser("ask", help="answer questions from a memory's weights",
                       description="Answer questions from a memory folder's adapter alone: no retrieval, no "
                                   "context.")
    a.add_argument("memory", metavar="MEMORY_DIR", help="a memory folder written by lora-mem write")
    a.add_argument("questions", nargs="*", metavar="QUESTION", help="questions to answer, one answer a line")
    a.add_argument("--interactive", action="store_true", help="then read questions from the terminal, one a "
                                                              "line, until an empty line or end of input")
    a.add_argument("--max-new-tokens", type=positive_int, default=WRITE_CONFIG.answer.max_new_tokens,
                   help="the longest answer, in tokens")
    a.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="what a memory holds",
                       description="What a memory folder holds: speakers, sessions, recipe, rank, the source "
                                   "file's sha256.")
    i.add_argument("memory", metavar="MEMORY_DIR", help="a memory folder written by lora-mem write")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return ap


# ----------------------------------------------------------------------------------------------------------------
# Checks before anything loads
# ----------------------------------------------------------------------------------------------------------------


def write_config(args: argparse.Namespace) -> MemoryConfig:
    c = WRITE_CONFIG
    return dataclasses.replace(
        c, lora=dataclasses.replace(c.lora, rank=args.rank, alpha=None),
        train=dataclasses.replace(c.train, epochs=args.epochs, lr=args.lr, seed=args.seed),
        recipe=dataclasses.replace(c.recipe, train_format=args.recipe, seq_len=args.seq_len))


def check_write(ap: Parser, args: argparse.Namespace) -> tuple[ChatFile, MemoryConfig]:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        ap.error(f"--out {args.out}: already exists and is not empty (a memory is written into a new folder)")
    split = SessionSplit() if args.session_gap is None else SessionSplit("gap", args.session_gap)
    try:
        chat = read_chat(args.chat, split, args.conversation)
        config = write_config(args)
    except (ConversationError, ValueError) as e:
        ap.error(str(e))
    return chat, config


def check_memory(ap: Parser, folder: str) -> MemoryFolder:
    try:
        return read_memory_folder(folder)
    except MemoryFolderError as e:
        ap.error(str(e))


def check_append(ap: Parser, args: argparse.Namespace, folder: MemoryFolder) -> tuple[ChatFile, list]:
    """The chat's sessions, numbered after the memory's last one; refused (one line) if the memory already holds
    one of them, or if the memory's parts do not read."""
    from lora_mem.lora_core.growth import GrowingMemory, after

    split = SessionSplit() if args.session_gap is None else SessionSplit("gap", args.session_gap)
    try:
        growing = GrowingMemory.of(folder)
        chat = read_chat(args.chat, split, args.conversation)
    except (ConversationError, MemoryFolderError) as e:
        ap.error(str(e))
    sessions = after(chat.conversation.sessions, folder)
    try:
        growing.check_sessions(sessions)
    except MemoryFolderError as e:
        ap.error(f"{args.chat}: {e}")
    return chat, sessions


# ----------------------------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------------------------


def load(model: str, device: str | None, quiet: bool, named_by: str = "--model"):
    """The base model; a model that cannot be loaded is one error line naming ``named_by`` (before anything is
    written)."""
    from lora_mem.model.config import ConfigError
    from lora_mem.model.loader import CheckpointError, load_model
    from lora_mem.model.packaged import PackagedModelError
    from lora_mem.model.tokenizer import TokenizerError

    try:
        return load_model(model, device=device, progress=not quiet)
    except (ConfigError, CheckpointError, PackagedModelError, TokenizerError, OSError) as e:
        fail(f"{named_by} {model}: {e}")


def write(args: argparse.Namespace, chat: ChatFile, config: MemoryConfig) -> Path:
    import torch

    from lora_mem.lora_core.memory import Memory
    from lora_mem.lora_core.memory_folder import new_manifest, save_memory_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    conv = chat.conversation
    lm = load(args.model, args.device, args.quiet)
    if config.recipe.seq_len > lm.config.max_position_embeddings:
        fail(f"--seq-len {config.recipe.seq_len}: longer than the model's context window "
             f"({lm.config.max_position_embeddings} tokens)")
    memory = Memory(lm, config)
    t0 = time.perf_counter()
    result = memory.write(conv, progress=not args.quiet)
    if result.error is not None:
        fail(f"writing {chat.path} failed: {result.error}; nothing was written", status=1)
    folder = save_memory_folder(args.out, memory, conv, new_manifest(memory, conv, result, chat))
    losses = result.train.epochs_loss
    print(f"wrote {folder}: {len(conv.sessions)} sessions, {conv.num_turns} turns of {conv.speaker_a} and "
          f"{conv.speaker_b}; recipe {config.recipe.train_format}, r={config.lora.rank}; loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} in {time.perf_counter() - t0:.0f} s")
    return folder


def append(args: argparse.Namespace, folder: MemoryFolder, chat: ChatFile, sessions: list) -> Path:
    import torch

    from lora_mem.lora_core.growth import open_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(folder.manifest.base_model, args.device, args.quiet)
    memory = open_memory(folder, lm)
    result = memory.append(sessions, progress=not args.quiet, source=chat)
    if result.error is not None:
        fail(f"appending {chat.path} failed: {result.error}; the memory is as it was", status=1)
    losses = result.train.epochs_loss
    growth = memory.config.growth
    print(f"appended {len(sessions)} session(s) to {folder.path} (now {len(folder.manifest.sessions) + len(sessions)}"
          f", {growth.strategy}): {result.windows} windows"
          + (f" and {len(result.replay['indices'])} replayed" if result.replay else "")
          + f"; loss {losses[0]:.3f} -> {losses[-1]:.3f} in {result.seconds:.0f} s")
    return folder.path


def questions_from_terminal():
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if not line:
            return
        yield line


def ask(args: argparse.Namespace, folder: MemoryFolder) -> list[str]:
    from lora_mem.lora_core.growth import open_memory

    lm = load(folder.manifest.base_model, args.device, args.quiet,
              named_by=f"the base model of {folder.path / MANIFEST_NAME}:")
    memory = open_memory(folder, lm)
    memory.config = dataclasses.replace(memory.config, answer=dataclasses.replace(
        memory.config.answer, max_new_tokens=args.max_new_tokens))
    answers = []
    if args.questions:
        answers += memory.answer(args.questions)
        print("\n".join(answers))
    if args.interactive:
        for question in questions_from_terminal():
            (answer,) = memory.answer([question])
            print(answer, flush=True)
            answers.append(answer)
    return answers


def info_lines(folder: MemoryFolder) -> list[str]:
    m = folder.manifest
    config = m.memory_config
    sessions = m.sessions
    span = f" ({sessions[0].date_time} to {sessions[-1].date_time})" if sessions else ""
    targets = config.lora.target_modules
    lines = [
        f"memory      {folder.path} ({m.sample_id})",
        f"speakers    {', '.join(m.speakers)}",
        f"sessions    {len(sessions)}, {sum(s.turns for s in sessions)} turns{span}",
        f"recipe      {config.recipe.train_format}",
        f"adapter     LoRA r={config.lora.rank}, alpha {config.lora.alpha:g}, on "
        f"{', '.join(targets) if isinstance(targets, list) else targets}",
        f"base model  {m.base_model}",
    ]
    for s in m.sources:
        lines += [f"source      {s.path} ({s.layout}, sessions {', '.join(map(str, s.sessions))})",
                  f"            sha256 {s.sha256}"]
    if m.writes:
        last = m.writes[-1]
        loss = last.get("epochs_loss") or []
        trained = f", loss {loss[0]:.3f} -> {loss[-1]:.3f}" if loss else ""
        lines.append(f"written     {last.get('written_at', '?')}: {len(m.writes)} write(s), "
                     f"{last.get('windows', '?')} windows{trained}")
    return lines


def main(argv: list[str] | None = None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "write":
        chat, config = check_write(ap, args)
        return write(args, chat, config)
    folder = check_memory(ap, args.memory)
    if args.command == "append":
        chat, sessions = check_append(ap, args, folder)
        return append(args, folder, chat, sessions)
    if args.command == "info":
        print(json.dumps(folder.manifest.to_dict(), indent=2) if args.json else "\n".join(info_lines(folder)))
        return folder
    if not args.questions and not args.interactive:
        ap.error("ask: give a QUESTION or --interactive")
    if any(not q.strip() for q in args.questions):
        ap.error("ask: a QUESTION is empty")
    return ask(args, folder)


def cli() -> None:
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
