"""`python -m lora_mem.lora_core.generate` (the model's generate CLI with PEFT-format adapters): each adapter answers,
and bad ones are one-line errors; `python -m lora_mem.model.generate` answers with the model alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_mem.lora_core.adapter_io import save_adapter
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules
from lora_mem.lora_core.generate import main
from lora_mem.model.generate import main as model_main
from lora_mem.model.loader import load_model
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_tiny_checkpoint(root / "ckpt", "llama")
    adapters = []
    for seed in (1, 2):
        lm = load_model(str(root / "ckpt"))
        cfg = LoRAConfig(rank=4)
        inject_lora(lm.model, cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora_modules(lm.model).values():
                m.lora_B.normal_(std=0.5, generator=g)
        adapters.append(save_adapter(lm.model, root / f"adapter{seed}", cfg, base_model=str(root / "ckpt")))
    return root / "ckpt", adapters


def answers(out: str) -> list[str]:
    blocks = out.split("> Caroline went where?\n")[1:]
    return [b.split("\n")[0] for b in blocks]


def test_each_adapter_answers_in_turn(ckpt_and_adapters, capsys):
    ckpt, (a1, a2) = ckpt_and_adapters
    main(["--model", str(ckpt), "--prompt", "Caroline went where?", "--max-new-tokens", "8"])
    base = answers(capsys.readouterr().out)
    model_main(["--model", str(ckpt), "--prompt", "Caroline went where?", "--max-new-tokens", "8", "--kernels",
                "reference"])
    assert answers(capsys.readouterr().out) == base  # the model's own CLI, no adapter
    main(["--model", str(ckpt), "--prompt", "Caroline went where?", "--max-new-tokens", "8",
          "--adapter", str(a1), "--adapter", str(a2), "--adapter", str(a1)])
    out = capsys.readouterr().out
    assert out.count("[adapter ") == 3 and "r=4, alpha=8" in out
    with_adapters = answers(out)
    assert len(base) == 1 and len(with_adapters) == 3
    assert with_adapters[0] == with_adapters[2]  # loading an adapter replaces the previous one
    assert len({base[0], with_adapters[0], with_adapters[1]}) > 1  # adapters change the answers


def test_bad_adapter_is_a_one_line_error(ckpt_and_adapters, tmp_path):
    ckpt, _ = ckpt_and_adapters
    proc = subprocess.run([sys.executable, "-m", "lora_mem.lora_core.generate", "--model", str(ckpt), "--prompt", "hi",
                           "--adapter", str(tmp_path)], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last_line = proc.stderr.strip().splitlines()[-1]  # after the loading progress bar
    assert last_line == f"error: {tmp_path}: no adapter_config.json (not a PEFT adapter directory)"
    assert "Traceback" not in proc.stderr
