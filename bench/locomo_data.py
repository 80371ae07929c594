"""LoCoMo files: locating (and downloading, pinned and checked), loading and validating them, and selecting questions.

Layout of the canonical ``locomo10.json`` (see ``/work/shared/docs/mission.md``): a list of samples, each with
``sample_id``, ``conversation`` (``speaker_a``, ``speaker_b``, ``session_<n>_date_time``, ``session_<n>``: list of
turns ``{speaker, dia_id, text[, img_url, blip_caption, query]}``), ``observation``, ``session_summary``,
``event_summary`` and ``qa`` (``{question, answer, evidence, category[, adversarial_answer]}``).

Leakage rule: ONLY the ``conversation`` field may feed training. The loader keeps nothing of ``observation``,
``session_summary`` or ``event_summary``; a :class:`Sample` is a :class:`~lora_mem.lora_core.conversation.Conversation`
plus its ``qa``, and :func:`~lora_mem.lora_core.conversation.conversation_only` gives the library the conversation
alone.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lora_mem.files import file_sha256
from lora_mem.home import cache_dir
from lora_mem.lora_core.chat_files import data_error, locomo_conversation, required_str
from lora_mem.lora_core.conversation import (  # noqa: F401  (re-exported: the harness reads conversations through here)
    FORMATS,
    Conversation,
    ConversationError,
    Session,
    Turn,
    conversation_text,
    nothing_to_remember,
    parse_session_datetime,
    photo_note,
    resolve_relative_dates,
    session_texts,
)
from lora_mem.untrusted import check_name, name_key, read_json

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
# Recipes and settings are chosen on these two conversations; the other eight are the test split.
DEV_SPLIT = ("conv-26", "conv-30")

# The official file at a fixed commit, and the sha256 of its bytes: a download is checked before it is cached.
LOCOMO_COMMIT = "3eb6f2c585f5e1699204e3c3bdf7adc5c28cb376"
LOCOMO_URL = f"https://raw.githubusercontent.com/snap-research/locomo/{LOCOMO_COMMIT}/data/locomo10.json"
LOCOMO_SHA256 = "79fa87e90f04081343b8c8debecb80a9a6842b76a7aa537dc9fdf651ea698ff4"

_HOW_TO_GET = (
    "Get locomo10.json from the official LoCoMo repository "
    f"({LOCOMO_URL}, repo https://github.com/snap-research/locomo) and pass it with --data PATH "
    "or the LOCOMO_DATA environment variable."
)

# One error type for conversation data, whether a file or a conversation in it is at fault.
LocomoDataError = ConversationError


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # always a string (numbers in the JSON are str()-ed); "" for category 5 without an answer
    category: int
    evidence: list[str] = field(default_factory=list)
    adversarial_answer: str | None = None

    @property
    def category_name(self) -> str:
        return CATEGORY_NAMES[self.category]


@dataclass(frozen=True)
class Sample(Conversation):
    """A LoCoMo sample: the conversation and the questions asked about it."""

    qa: list[QA] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Locating the file
# ----------------------------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``locomo10.json`` in lora-mem's data cache (``$LORA_MEM_HOME/data/``, see ``lora_mem.home``)."""
    return cache_dir("data") / "locomo10.json"


def download_file(url: str, dest: Path, *, timeout: float = 60.0, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, then rename), with a tqdm bar.

    The payload must parse as a JSON list (guards against caching an HTML error page). Raises on any failure;
    callers turn that into a :class:`LocomoDataError`.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and (got := file_sha256(tmp)) != sha256:
            raise ValueError(f"downloaded content from {url} has sha256 {got}, expected {sha256}")
        with open(tmp, encoding="utf-8") as f:
            if not isinstance(json.load(f), list):
                raise ValueError(f"downloaded content from {url} is not a JSON list")
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dest


def resolve_data_path(data: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Where locomo10.json is: ``--data PATH``, else ``$LOCOMO_DATA``, else the cache, else download into the cache.

    An explicit path (``data`` or ``LOCOMO_DATA``) that does not exist is an error naming it; it never falls
    through to the download. A failing download (offline, ...) raises one clear :class:`LocomoDataError`.
    """
    if data is not None and str(data) != "":
        p = Path(data).expanduser()
        if not p.is_file():
            raise LocomoDataError(f"--data {str(data)!r}: no such file. {_HOW_TO_GET}")
        return p
    env = os.environ.get("LOCOMO_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise LocomoDataError(f"LOCOMO_DATA={env!r}: no such file. {_HOW_TO_GET}")
        return p
    cached = default_cache_path()
    if cached.is_file():
        return cached
    if not download:
        raise LocomoDataError(f"LoCoMo data not found (no --data, no LOCOMO_DATA, no cache at {cached}). {_HOW_TO_GET}")
    try:
        download_file(LOCOMO_URL, cached, sha256=LOCOMO_SHA256)
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear message
        raise LocomoDataError(
            f"LoCoMo data not found locally (no --data, no LOCOMO_DATA, no cache at {cached}) and the download "
            f"from {LOCOMO_URL} failed ({type(e).__name__}: {e}). {_HOW_TO_GET}"
        ) from e
    return cached


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------

def _parse_qa(q, path: Path, sid: str, i: int) -> QA:
    where = f"sample {sid!r} qa[{i}]"
    if not isinstance(q, dict):
        raise data_error(path, where, f"qa entry must be an object, got {type(q).__name__}")
    question = required_str(q, "question", path, where)
    if "category" not in q:
        raise data_error(path, where, "missing field 'category'")
    cat = q["category"]
    if isinstance(cat, bool) or not isinstance(cat, int) or cat not in CATEGORY_NAMES:
        raise data_error(path, where, f"field 'category' has unknown value {cat!r} (expected one of {sorted(CATEGORY_NAMES)})")
    if cat == 5:
        answer = "" if q.get("answer") is None else required_str(q, "answer", path, where, allow_number=True)
        adv = q.get("adversarial_answer")
        adv = None if adv is None else required_str(q, "adversarial_answer", path, where, allow_number=True)
    else:
        answer = required_str(q, "answer", path, where, allow_number=True)
        adv = None
    ev = q.get("evidence", [])
    if not isinstance(ev, list) or not all(isinstance(e, str) for e in ev):
        raise data_error(path, where, f"field 'evidence' must be a list of strings, got {type(ev).__name__} {ev!r:.80}")
    return QA(question=question, answer=answer, category=cat, evidence=list(ev), adversarial_answer=adv)


def load_locomo(path: str | os.PathLike) -> list[Sample]:
    """Load and validate a LoCoMo JSON file. Every problem raises :class:`LocomoDataError`."""
    path = Path(path)
    if not path.is_file():
        raise LocomoDataError(f"{path}: no such file. {_HOW_TO_GET}")
    raw = read_json(path, LocomoDataError)
    if not isinstance(raw, list):
        raise LocomoDataError(f"{path}: top level must be a list of samples, got {type(raw).__name__}")
    if not raw:
        raise LocomoDataError(f"{path}: no samples (the list is empty): nothing to remember")
    samples = []
    seen: dict[str, str] = {}  # name_key -> sample_id: ids that would share a folder
    for k, s in enumerate(raw):
        if not isinstance(s, dict):
            raise data_error(path, f"sample #{k}", f"must be an object, got {type(s).__name__}")
        if "sample_id" not in s:
            raise data_error(path, f"sample #{k}", "missing field 'sample_id'")
        sid = s["sample_id"]
        sid = str(sid) if isinstance(sid, int) and not isinstance(sid, bool) else sid
        check_name(sid, f"{path}: sample #{k}: sample_id", LocomoDataError)  # it names the sample's folders
        if name_key(sid) in seen:
            same = "" if seen[name_key(sid)] == sid else f" (as {seen[name_key(sid)]!r} is, where case is ignored)"
            raise data_error(path, f"sample #{k}", f"duplicate sample_id {sid!r}{same}")
        seen[name_key(sid)] = sid
        for key in ("conversation", "qa"):
            if key not in s:
                raise data_error(path, f"sample {sid!r}", f"missing field {key!r}")
        if not isinstance(s["qa"], list):
            raise data_error(path, f"sample {sid!r}", f"field 'qa' must be a list, got {type(s['qa']).__name__}")
        a, b, sessions = locomo_conversation(s["conversation"], path, sid)
        qa = [_parse_qa(q, path, sid, i) for i, q in enumerate(s["qa"])]
        samples.append(Sample(sample_id=sid, speaker_a=a, speaker_b=b, sessions=sessions, qa=qa))
    return samples


def select_questions(sample: Sample, with_adversarial: bool = False, max_questions: int | None = None) -> list[QA]:
    """Questions of categories 1-4 (plus 5 with ``with_adversarial``), in file order, at most ``max_questions``."""
    cats = {1, 2, 3, 4, 5} if with_adversarial else {1, 2, 3, 4}
    out = [q for q in sample.qa if q.category in cats]
    return out if max_questions is None else out[: max(0, max_questions)]


def iter_samples(samples: Iterable[Sample], ids: Iterable[str] | str | None = None) -> list[Sample]:
    """Samples whose ``sample_id`` is in ``ids`` (all if None; a string is a comma-separated list, as the CLIs'
    ``--conversations``), in file order; unknown ids are an error."""
    samples = list(samples)
    if ids is None:
        return samples
    want = [i.strip() for i in ids.split(",") if i.strip()] if isinstance(ids, str) else list(ids)
    if not want:
        raise LocomoDataError(f"no sample ids given (known: {sorted(s.sample_id for s in samples)})")
    known = {s.sample_id for s in samples}
    missing = [i for i in want if i not in known]
    if missing:
        raise LocomoDataError(f"unknown sample_id(s) {missing} (known: {sorted(known)})")
    keep = set(want)
    return [s for s in samples if s.sample_id in keep]
