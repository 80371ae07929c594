"""The files of a bench.locomo run directory (--out): where each lies, what each must hold, and the check of an
earlier invocation's files before a run loads the model or writes anything.

    <out>/run_config.json                      settings of the run (a resume must match them)
    <out>/conversations/<sample_id>/           train.json (loss curve), predictions.jsonl, result.json (written last)
    <out>/adapters/<sample_id>/                the adapter, in PEFT format
    <out>/results.json, predictions.jsonl, table.md     the whole run, written at the end

A sample_id names folders, so every path is built by `lora_mem.untrusted.path_inside` (the id checked as a file name,
the path confirmed inside --out, symlinks resolved). Each file kind has one schema here; `inspect_out` reads every
file this run will use with it, and checks every path it will write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from bench.common import MOVE_IT_AWAY, RunFileError, read_jsonl, read_run_file
from lora_mem.lora_core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from lora_mem.untrusted import check_writable, path_inside

Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]

RUN_FILES = ("run_config.json", "results.json", "predictions.jsonl", "table.md")
CONVERSATION_FILES = ("train.json", "predictions.jsonl", "result.json")


class RunFile(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # the fields read are checked; others are kept as written


class TrainFile(RunFile):
    """conversations/<id>/train.json: how the conversation's adapter was trained (its presence and no error: the
    adapter in adapters/<id> is complete)."""

    tokens: Count
    seconds: Seconds
    data_seconds: Seconds = 0.0
    teacher_seconds: Seconds = 0.0
    losses: list[float]
    epochs_loss: list[float]
    error: str | None = None


class ResultFile(RunFile):
    """conversations/<id>/result.json: the conversation's outcome (its presence: finished, or failed with error)."""

    sample_id: str
    n_questions: Count
    error: str | None = None
    train_tokens: Count = 0
    train_seconds: Seconds = 0.0
    data_seconds: Seconds = 0.0
    teacher_seconds: Seconds = 0.0
    answer_seconds: Seconds = 0.0


class PredictionRow(RunFile):
    """One line of a predictions.jsonl: a question, its gold answer, the prediction and its score."""

    sample_id: str
    question: str
    answer: str
    category: Annotated[int, Field(ge=1, le=5)]
    prediction: str
    f1: Annotated[float, Field(ge=0, le=1)]
    prompt_tokens: Count


class ResultsFile(RunFile):
    """results.json of an earlier invocation: only its wall time is carried over."""

    wall_seconds_this_invocation: Seconds = 0.0
    wall_seconds_all_invocations: Seconds | None = None


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def conversation_dir(out: Path, sample_id: str) -> Path:
    return path_inside(out, "conversations", sample_id, what="sample_id")


def adapter_dir(run_dir: Path, sample_id: str) -> Path:
    """A run's adapter of a conversation (this run's, or the --adapters-from run's)."""
    return path_inside(run_dir, "adapters", sample_id, what="sample_id")


def check_out_paths(out: Path, sample_ids: list[str], with_adapters: bool) -> None:
    """Every file and folder a run writes lies inside `out`, and what exists of them already is of its kind."""
    folders = [out / "conversations"] + [conversation_dir(out, sid) for sid in sample_ids]
    files = [out / name for name in RUN_FILES]
    files += [conversation_dir(out, sid) / name for sid in sample_ids for name in CONVERSATION_FILES]
    if with_adapters:
        folders += [out / "adapters"] + [adapter_dir(out, sid) for sid in sample_ids]
        files += [adapter_dir(out, sid) / name for sid in sample_ids for name in (CONFIG_NAME, WEIGHTS_NAME)]
    check_writable(out, files, folders)


# ---------------------------------------------------------------------------------------------
# Reading an earlier invocation's files
# ---------------------------------------------------------------------------------------------

def read_train(out: Path, sample_id: str) -> dict | None:
    path = conversation_dir(out, sample_id) / "train.json"
    return read_run_file(path, TrainFile) if path.is_file() else None


def read_result(out: Path, sample_id: str) -> dict | None:
    path = conversation_dir(out, sample_id) / "result.json"
    if not path.is_file():
        return None
    result = read_run_file(path, ResultFile)
    if result["sample_id"] != sample_id:
        raise RunFileError(f"{path}: field 'sample_id' is {result['sample_id']!r}, not {sample_id!r} (a file of "
                           f"another conversation?); {MOVE_IT_AWAY}")
    return result


def read_predictions(out: Path, sample_id: str, n_questions: int) -> list[dict]:
    """A finished conversation's predictions: a row per question, each of this conversation."""
    path = conversation_dir(out, sample_id) / "predictions.jsonl"
    if not path.is_file():
        raise RunFileError(f"{path}: missing, though result.json says the conversation finished; {MOVE_IT_AWAY}")
    rows = read_jsonl(path, PredictionRow)
    if len(rows) != n_questions or any(r["sample_id"] != sample_id for r in rows):
        raise RunFileError(f"{path}: {len(rows)} rows of {sorted({r['sample_id'] for r in rows})}, result.json "
                           f"says {n_questions} questions of {sample_id!r} (truncated, or another conversation's?); "
                           f"{MOVE_IT_AWAY}")
    return rows


def previous_wall_seconds(out: Path) -> float:
    """The wall time of earlier invocations of this run (0 for a new run)."""
    path = out / "results.json"
    if not path.is_file():
        return 0.0
    previous = read_run_file(path, ResultsFile)
    return previous.get("wall_seconds_all_invocations") or previous.get("wall_seconds_this_invocation", 0.0)


@dataclass
class OutState:
    """What an earlier invocation left in --out, every file read and checked."""

    states: dict[str, str]  # sample_id -> "finished", "failed" (retried) or "todo"
    wall_seconds: float  # of the earlier invocations


def inspect_out(out: Path, sample_ids: list[str], with_adapters: bool,
                layers: dict[str, tuple[int, int]]) -> OutState:
    """Check every path this run writes, and read every file of an earlier invocation that it will use (an adapter
    a resume loads instead of training, against the model's linear `layers`), so that any problem is found before
    the model loads."""
    check_out_paths(out, sample_ids, with_adapters)
    states = {}
    for sid in sample_ids:
        train, result = read_train(out, sid), read_result(out, sid)
        if result is not None and not result["error"]:
            read_predictions(out, sid, result["n_questions"])
            states[sid] = "finished"
            continue
        states[sid] = "todo" if result is None else "failed"
        if with_adapters and train is not None and not train["error"] and adapter_dir(out, sid).is_dir():
            read_adapter(adapter_dir(out, sid), layers)
    return OutState(states, previous_wall_seconds(out))
