"""Where lora-mem keeps what it builds once and reuses: ``$LORA_MEM_HOME``, by default ``~/.cache/lora-mem``.

    models/        packaged models, built from their wheels (lora_mem.model.packaged)
    wheels/        the wheels those models are built from (sha256-checked)
    data/          locomo10.json, downloaded at a pinned commit (bench.locomo_data)
    teacher/       the distill recipe's teacher outputs, per model and session (lora_mem.lora_core.distill)
    generated-qa/  question-answer pairs the base model wrote, per model and conversation (lora_core.generated_qa)
    questions/     question sets built by a parser, per conversation

Everything under it can be deleted: it is built again (or downloaded again) when next needed. Caches are keyed by
what made them (model, settings, the conversation's text), so a stale entry is never read for new inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "LORA_MEM_HOME"


def home() -> Path:
    """``$LORA_MEM_HOME`` if set, else ``~/.cache/lora-mem``."""
    env = os.environ.get(HOME_VARIABLE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora-mem"


def cache_dir(kind: str) -> Path:
    """One of the folders listed above, e.g. ``cache_dir("teacher")``."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"unknown cache {kind!r} (known: {', '.join(CACHE_KINDS)})")
    return home() / kind


CACHE_KINDS = ("models", "wheels", "data", "teacher", "generated-qa", "questions")
