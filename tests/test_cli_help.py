"""Every command line of the project (each module with a ``__main__`` block) shows each option's help and its default
once: through lora_mem.cli's Parser and HelpFormatter, which adds "(default: X)" unless the help already says it."""

import argparse
import importlib
import re
from pathlib import Path

import pytest

from lora_mem.cli import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for folder in ("lora_mem", "bench") for p in (REPO / folder).rglob("*.py")
    if 'if __name__ == "__main__":' in p.read_text() and p.name != "__main__.py"
)


class Captured(Exception):
    pass


def parsers_of(module_name: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser a module's main() builds (and its subcommands'), caught when main() starts parsing."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Captured):
        importlib.import_module(module_name).main(["--help"])
    out = [seen[0]]
    for action in seen[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += list(action.choices.values())
    return out


def test_every_command_line_is_found():
    assert {"bench.locomo", "bench.capacity", "lora_mem.command", "lora_mem.model.generate",
            "bench.perf.kernels", "bench.analysis.splits"} <= set(CLI_MODULES)


@pytest.mark.parametrize("module_name", CLI_MODULES)
def test_each_option_has_help_and_its_default_once(module_name, monkeypatch):
    for parser in parsers_of(module_name, monkeypatch):
        assert issubclass(parser.formatter_class, HelpFormatter), parser.prog
        formatter = parser.formatter_class(parser.prog)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{parser.prog} {name}: no help"
            shown = " ".join(formatter._expand_help(action).split()) if action.help else ""
            assert "(default: None)" not in shown, f"{parser.prog} {name}: {shown}"
            assert len(re.findall(r"\(default: ", shown)) <= 1, f"{parser.prog} {name}: {shown}"
            has_default = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
            if has_default:
                assert "default" in shown.lower(), f"{parser.prog} {name}: its default {action.default!r} not shown"
            # the formatter adds "(default: X)" only to a help that does not speak of its default already
            assert shown.lower().count("default") <= action.help.lower().count("default") + 1, shown


def test_formatter_adds_a_default_only_where_the_help_is_silent():
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    ap.add_argument("--device", default=None, help="cpu or cuda")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    text = " ".join(ap.format_help().split())
    assert "LoRA rank (default: 8)" in text and "(default: 2 x rank)" in text and text.count("default") == 3
    assert "seed (default: 0)" in text and "None" not in text and "False" not in text
