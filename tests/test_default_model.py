"""The real default model (SmolLM2-135M-Instruct, built once from the packaged GGUF) through
lora-mem's own engine: it talks, its chat format and logits equal the transformers reference, and
loading streams (peak memory under 1.5x the model's size)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_mem.model.generate import generate
from lora_mem.model.loader import load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m-instruct")


def test_capital_of_france(lm):
    tok = lm.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    (answer,) = generate(lm.model, [prompt], 24, tok.stop_ids, tok.pad_id)
    assert "Paris" in tok.decode(answer)


def test_chat_format_and_logits_match_transformers(lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(str(lm.path))
    messages = [{"role": "user", "content": "When did Caroline go to the LGBTQ support group? 7 May 2023?"}]
    ours = lm.tokenizer.format_chat(messages)
    assert ours == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    ids = lm.tokenizer.encode(ours)
    assert ids == ref_tok(ours, add_special_tokens=False)["input_ids"]

    ref = AutoModelForCausalLM.from_pretrained(str(lm.path), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


def test_generate_cli_prints_answer_and_speed():
    proc = subprocess.run(
        [sys.executable, "-m", "lora_mem.model.generate", "--model", "smollm2-135m-instruct", "--prompt",
         "What is the capital of France?", "--max-new-tokens", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout and "tokens/s" in proc.stdout


MEMORY_PROBE = """
import os, sys
sys.path.insert(0, {root!r})
from lora_mem.model.loader import load_model, resolve_checkpoint
resolve_checkpoint("smollm2-135m-instruct")  # built already; not part of the measurement
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
lm = load_model("smollm2-135m-instruct")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve from the (large) forking pytest process.
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
print((peak - before) / size)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_loading_peak_memory_under_1_5x_model_size(lm):
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=str(ROOT))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio = float(proc.stdout.strip().splitlines()[-1])
    assert 0.9 < ratio < 1.5, f"loading took {ratio:.2f}x the model's size in resident memory"


def test_batched_chat_questions_equal_one_at_a_time(lm):
    """Real chat prompts share their system prompt (computed once) and differ in length."""
    tok = lm.tokenizer
    questions = ["When did Caroline go to the LGBTQ support group?", "What is 2+2?",
                 "Where did Melanie camp with her kids last summer, and what did they see there?",
                 "Who painted the sunrise?", "Name three colours.", "What did Jon lose?"]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    alone = [generate(lm.model, [p], 12, tok.stop_ids, tok.pad_id)[0] for p in prompts]
    assert generate(lm.model, prompts, 12, tok.stop_ids, tok.pad_id) == alone
