"""The README's quick start runs as written (on a tiny checkpoint in place of the default model)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from tests.tiny_models import make_tiny_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    (code,) = python_blocks(README.read_text())
    assert code.startswith("import lora_mem\n")
    assert 'load_model("smollm2-135m-instruct")' in code and 'memory.save("adapters/demo")' in code
    ckpt = tmp_path / "tiny"
    make_tiny_checkpoint(ckpt, "llama")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    # the tiny model's window is 256 positions: the recipe's windows are cut to fit it, as a user of a small model would
    code = code.replace('"smollm2-135m-instruct"', repr(str(ckpt))).replace('Recipe("text+queries")',
                                                                           'Recipe("text+queries", seq_len=128)')
    exec(compile(code, "README.md", "exec"), names)
    assert (tmp_path / "adapters" / "demo" / "adapter_config.json").is_file()
    assert "[" in capsys.readouterr().out  # the losses and the answers were printed
    written = names["written"]
    assert written.error is None and written.windows > 0 and written.target_tokens > 0
    assert written.train.epochs_loss and all(math.isfinite(loss) for loss in written.train.epochs_loss)
    grown = names["lora_mem"].read_memory_folder(tmp_path / "memories" / "demo").manifest
    assert [s.index for s in grown.sessions] == [1, 2, 3] and len(grown.writes) == 3  # grew by two sessions


def test_readme_states_the_two_commands():
    text = README.read_text()
    assert "python -m bench.locomo --rank 8" in text and "python -m pytest tests -q" in text
    assert len(text.splitlines()) < 200


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of each row of the first markdown table after ``heading``."""
    section = text[text.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # after the header and the rule


def test_results_table_numbers_are_those_of_the_splits_file():
    """Each measured row of the README's results table (not the published ones) is a row of
    bench/results/locomo/splits.md: Avg F1, question-specific and temporal question-specific on all ten
    conversations, Avg F1 and question-specific on the test split."""
    splits = (README.parent / "bench" / "results" / "locomo" / "splits.md").read_text()
    every = {(r[2], r[7], r[8]) for r in _table_rows(splits, "### all conversations")}
    test = {(r[2], r[7]) for r in _table_rows(splits, "### test")}
    rows = [r for r in _table_rows(README.read_text(), "| Method | Avg F1 |") if not r[0].startswith("Published")]
    assert len(rows) >= 8
    for r in rows:
        assert (r[1], r[2], r[3]) in every, r[0]
        assert (r[4], r[5]) in test, r[0]
