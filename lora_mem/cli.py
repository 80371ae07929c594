"""What every command line of the project shares: value checks in the parser, and one line per error.

A bad value is rejected while the arguments are parsed, before a model loads or a file is written, with one line
that names the option, the value and what is allowed:

    error: --rank: must be an integer >= 1, got 0
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: ...`` (the usage is in --help), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, *, low_open: bool = True, high_open: bool = False):
    """A finite float in the interval (low, high] by default; nan and inf are never accepted."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"

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


def fail(message: str, status: int = 2):
    """Print one ``error:`` line and exit (the CLIs' answer to a bad input found after parsing)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
