"""What every command line of the project shares: value checks in the parser, one line per error, and --help.

A bad value is rejected while the arguments are parsed, before a model loads or a file is written, with one line
that names the option, the value and what is allowed:

    error: --rank: must be an integer >= 1, got 0

An option that needs an optional package checks it then too (:meth:`Parser.require`), and --help shows each
option's help with its default once (:class:`HelpFormatter`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default once: "(default: X)" is added to its help unless the help already says it, or there is
    none to say (a flag is off; a None default is described in the help or means "not set")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: ...`` (the usage is in --help), exit status 2, and whose
    --help is :class:`HelpFormatter`'s."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def require(self, *modules: str, extra: str, needed_for: str, packages: dict[str, str] | None = None) -> None:
        """:func:`lora_mem.deps.require` as a parse error: a chosen option's missing package is one line naming the
        extra that installs it."""
        from lora_mem.deps import MissingDependency, require

        try:
            require(*modules, extra=extra, needed_for=needed_for, packages=packages)
        except MissingDependency as e:
            self.error(str(e))


# The largest float32: every float option ends up in float32 arithmetic (a learning rate of 1e39 is inf there).
FLOAT32_MAX = 3.4028234663852886e38
# torch's CPU thread pool: 1,024 threads run; 100,000 crash the process.
MAX_THREADS = 1024
# torch.Generator.manual_seed takes an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1


def int_at_least(low: int, high: int | None = None):
    """An integer >= low (and <= high, if given)."""
    what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
seed = int_at_least(0, MAX_SEED)
threads = int_at_least(1, MAX_THREADS)


def positive_int_or_all(text: str) -> int | None:
    """An integer >= 1, or 'all' (None: no limit)."""
    return None if text == "all" else positive_int(text)


def float_in(low: float, high: float = FLOAT32_MAX, *, low_open: bool = True, high_open: bool = False):
    """A finite float in the interval (low, high] by default, high at most FLOAT32_MAX; nan and inf are never
    accepted."""
    high = min(high, FLOAT32_MAX)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


positive_float = float_in(0.0)
fraction = float_in(0.0, 1.0, low_open=False)  # [0, 1]


def id_list(text: str) -> str:
    """A comma-separated list of ids ("conv-26,conv-30"), at least one."""
    ids = [i.strip() for i in text.split(",") if i.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"must name at least one id (comma-separated), got {text!r}")
    return ",".join(ids)


def train_format(text: str) -> str:
    """A recipe's train_format: parts joined by '+', each once (lora_mem.lora_core.recipes.TRAIN_PARTS)."""
    from lora_mem.lora_core.recipes import TRAIN_PARTS

    parts = text.split("+")
    if not text or any(p not in TRAIN_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"parts joined by '+', each once, from {', '.join(TRAIN_PARTS)}; got "
                                         f"{text!r}")
    return text


def positive_int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 ("1,4,16"; "1_000" is 1000), at least one: sorted, each once."""
    values = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not an integer (expected e.g. 1,4,16)") from None
    if not values:
        raise argparse.ArgumentTypeError(f"no values given (expected e.g. 1,4,16), got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {min(values)}")
    return sorted(set(values))


def output_dir(text: str) -> str:
    """A directory to write results into: an existing writable directory, or a path whose nearest existing
    parent is a writable directory. Nothing is created here."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a directory path, got ''")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text} is not writable")
        return text
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text} cannot be created: {parent} is not a writable directory")
    return text


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N, CUDA only where torch sees such a device."""
    import torch

    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if text != "cpu" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine ({why}); use --device cpu")
    if text.startswith("cuda:") and int(text[5:]) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def fail(message: str, status: int = 2):
    """Print one ``error:`` line and exit (the CLIs' answer to a bad input found after parsing)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
