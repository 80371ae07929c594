"""Input from users' files made safe to use: ids that become file names, output paths that must stay inside their
folder, and JSON read strictly and checked field by field against a schema. (Names the project makes itself, such as
cache keys, are mapped to safe ones by `slug` instead.)

Every check raises the caller's error type (a ValueError subclass) with one line that names the id, the path or the
file and field, so that command lines print it as one ``error:`` line:

    check_name("../../escape", "sample_id")
    -> UnsafeNameError: sample_id '../../escape' is not a safe file name: it contains '/'
    path_inside(out, "conversations", sample_id)          # out/conversations/<sample_id>, confirmed inside out
    read_json_as(path, AdapterConfigFile, AdapterError)   # parsed strictly, then validated
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

# Longest id accepted as a file name, in UTF-8 bytes: file systems allow 255 per name, and the project adds a
# prefix and suffix of its own to some (temporary files, cache keys).
MAX_NAME_BYTES = 128

Schema = TypeVar("Schema", bound=BaseModel)


class UnsafeNameError(ValueError):
    """An id that cannot be used as a file name."""


class UnsafePathError(ValueError):
    """An output path that would land outside its folder, or that is in the way (a file where a folder goes)."""


class JSONFileError(ValueError):
    """A JSON file that cannot be read, or whose fields are not what they must be."""


# ----------------------------------------------------------------------------------------------------------------
# Ids as file names
# ----------------------------------------------------------------------------------------------------------------

def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one file name in a folder of ours (None if it can)."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name.strip():
        return "it is empty"
    for bad in ("/", "\\"):
        if bad in name:
            return f"it contains {bad!r}"
    if name.startswith("."):  # '.', '..' and hidden names
        return "it starts with '.'"
    if not name.isprintable():  # control characters, line breaks, invisible format characters
        c = next(c for c in name if not c.isprintable())
        return f"it contains the control character U+{ord(c):04X} ({unicodedata.name(c, 'unnamed')})"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"it is {len(name.encode('utf-8', 'surrogatepass'))} bytes long (at most {MAX_NAME_BYTES})"
    if name != name.strip():
        return "it begins or ends with white space"
    return None


def check_name(name: object, what: str, error: type[Exception] = UnsafeNameError) -> str:
    """``name`` itself if it is a safe file name, else ``error`` naming ``what`` and the id."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"{what} {name!r:.80} is not a safe file name: {problem}")
    return name


def name_key(name: str) -> str:
    """What a file system that ignores case and Unicode normalisation (macOS, Windows) sees of a name: two ids with
    one key would share a folder there."""
    return unicodedata.normalize("NFC", name).casefold()


def slug(text: str, fallback: str = "x") -> str:
    """Any text as a safe file name, for names the project makes itself (cache files): runs of other characters
    become '_', and the result never starts with '.'."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:MAX_NAME_BYTES]
    return text or fallback


# ----------------------------------------------------------------------------------------------------------------
# Output paths inside their folder
# ----------------------------------------------------------------------------------------------------------------

def path_inside(root: Path, *names: str, what: str = "a path", error: type[Exception] = UnsafePathError) -> Path:
    """``root / names[0] / ...``, each name checked as a file name and the result resolved (symlinks followed) and
    confirmed to lie inside ``root`` resolved: a name or a link on the way cannot lead out of it."""
    for name in names:
        check_name(name, what, error)
    return confirm_inside(Path(root), Path(root).joinpath(*names), error)


def confirm_inside(root: Path, path: Path, error: type[Exception] = UnsafePathError) -> Path:
    """``path`` if, symlinks resolved, it lies inside ``root`` (resolved likewise), else ``error``."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise error(f"{path} leads outside {root} (it resolves to {real}): a symlink in the way? Nothing is "
                    "written outside the output folder")
    return path


def check_writable(root: Path, files: list[Path], folders: list[Path],
                   error: type[Exception] = UnsafePathError) -> None:
    """Before anything is written: every file and folder a run will write lies inside ``root``, and whatever of them
    exists already is of its kind (a folder where a folder goes) and can be written."""
    for path in folders:
        confirm_inside(root, path, error)
        if path.exists() and not path.is_dir():
            raise error(f"{path} is in the way: a folder goes there (move it away or use another output folder)")
    for path in files:
        confirm_inside(root, path, error)
        if path.exists() and not path.is_file():
            raise error(f"{path} is in the way: a file goes there (move it away or use another output folder)")
    for folder in {p for p in folders if p.is_dir()} | {p.parent for p in files if p.parent.is_dir()}:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise error(f"{folder} is not writable")


# ----------------------------------------------------------------------------------------------------------------
# JSON, strictly
# ----------------------------------------------------------------------------------------------------------------

def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str | bytes, source: str, error: type[Exception] = JSONFileError) -> Any:
    """JSON as RFC 8259 defines it: UTF-8, no NaN or Infinity, no number beyond float64's range, and nesting that
    Python can parse; anything else is ``error`` naming ``source``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{source}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to read") from None
    except ValueError as e:  # NaN, Infinity, 1e999, an integer of more than 4300 digits
        raise error(f"{source}: not valid JSON ({e})") from None


def read_json(path: Path, error: type[Exception] = JSONFileError) -> Any:
    """The JSON value in the file at ``path`` (see parse_json); a missing or unreadable file is ``error`` too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_json(data, str(path), error)


def read_json_lines(path: Path, error: type[Exception] = JSONFileError) -> list[Any]:
    """One JSON value per non-blank line; a bad line is ``error`` naming the file and the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return [parse_json(line, f"{path} line {i}", error) for i, line in enumerate(data.splitlines(), 1)
            if line.strip()]


def validated(value: Any, schema: type[Schema], source: str, error: type[Exception] = JSONFileError) -> Schema:
    """``value`` checked against ``schema`` (a pydantic model); the first problem is ``error`` naming ``source`` and
    the field."""
    try:
        return schema.model_validate(value)
    except ValidationError as e:
        raise error(f"{source}: {describe(e)}") from None


def read_json_as(path: Path, schema: type[Schema], error: type[Exception] = JSONFileError) -> Schema:
    return validated(read_json(path, error), schema, str(path), error)


def describe(e: ValidationError) -> str:
    """The first problem of a pydantic ValidationError as a phrase: "field 'r': input should be greater than or equal
    to 1, got int 0"."""
    err = e.errors(include_url=False)[0]
    # a union's errors carry the member tried ('list[str]', 'function-after[...]') in loc: not a field
    parts = [p for p in err["loc"] if isinstance(p, int) or not re.search(r"[\[\]()]", p)]
    field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))
    if err["type"] == "missing":
        return f"missing field '{field}'"
    if not field and err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        message = "must be a JSON object"
    elif err["type"] == "value_error":  # our own validators' messages, which name what they refuse
        message = str(err["ctx"]["error"])
        return f"field '{field}': {message}" if field else message
    else:
        message = err["msg"][:1].lower() + err["msg"][1:]
    got = err.get("input")
    got = "null" if got is None else f"{type(got).__name__} {got!r:.60}"
    return f"field '{field}': {message}, got {got}" if field else f"{message}, got {got}"
