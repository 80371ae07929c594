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
    assert 'load_model("smollm2-135m-instruct")' in code and 'memory.save("adapters/demo")' in code
    ckpt = tmp_path / "tiny"
    make_tiny_checkpoint(ckpt, "llama")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code.replace('"smollm2-135m-instruct"', repr(str(ckpt))), "README.md", "exec"), names)
    assert (tmp_path / "adapters" / "demo" / "adapter_config.json").is_file()
    assert "[" in capsys.readouterr().out  # the losses and the answers were printed
    written = names["written"]
    assert written.error is None and written.windows > 0 and written.target_tokens > 0
    assert written.train.epochs_loss and all(math.isfinite(loss) for loss in written.train.epochs_loss)


def test_readme_states_the_two_commands():
    text = README.read_text()
    assert "python -m bench.locomo --rank 8" in text and "python -m pytest tests -q" in text
    assert len(text.splitlines()) < 200
