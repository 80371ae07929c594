"""Continuous batching (lora_mem.model.generate.decode_queue): a finished answer's row is given to the next
prompt, slots no live row attends are cut off, rows move right to make space for a longer prompt.
Every prompt must still decode exactly as it does alone, and the machinery must really run."""

from __future__ import annotations

import pytest
import torch

import lora_mem.model.generate as gen
from lora_mem.kernels.policy import KernelPolicy
from lora_mem.lora_core.adapter_io import load_adapter
from lora_mem.lora_core.multi_adapter import stack_adapters
from lora_mem.model.generate import compute_prefix, generate, generate_batch
from lora_mem.model.loader import load_model
from tests.test_shared_batches import make_adapters, rand_tokens
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(d, request.param)
    return d


@pytest.fixture
def spy(monkeypatch):
    """Counts RowPool.admit calls (with their row counts) and column shifts (+ right, - left)."""
    seen = {"admitted": [], "shifts": [], "grown": 0}
    admit, shift, grow = gen.RowPool.admit, gen.RowPool.shift, gen.RowPool.grow

    def admit_spy(self, rows, *a, **k):
        seen["admitted"].append(len(rows))
        return admit(self, rows, *a, **k)

    def shift_spy(self, by):
        seen["shifts"].append(by)
        return shift(self, by)

    def grow_spy(self, needed):
        seen["grown"] += 1
        return grow(self, needed)

    monkeypatch.setattr(gen.RowPool, "admit", admit_spy)
    monkeypatch.setattr(gen.RowPool, "shift", shift_spy)
    monkeypatch.setattr(gen.RowPool, "grow", grow_spy)
    return seen


def varied_prompts(g: torch.Generator, head: list[int], lengths) -> list[list[int]]:
    return [head + rand_tokens(n, g) for n in lengths]


def stops_for(free: list[list[int]]) -> list[int]:
    """Stop tokens that end several answers early, at different steps."""
    return sorted({free[0][1], free[2][0], free[4][3], free[6][2], free[8][1]})


@pytest.mark.parametrize("head_len", [0, 5])
def test_refilled_rows_decode_as_each_prompt_alone(tiny_dir, spy, monkeypatch, head_len):
    monkeypatch.setattr(gen, "REFILL_FRACTION", 0.25)  # batch 4: refill as soon as one row is free
    monkeypatch.setattr(gen, "TRIM_COLUMNS", 3)
    lm = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(7)
    prompts = varied_prompts(g, rand_tokens(head_len, g), (2, 3, 1, 4, 3, 3, 12, 1, 2, 5, 4, 2, 3, 3, 2, 4, 1, 3))
    free = [generate_batch(lm.model, [p], 12, [], pad_id=0)[0] for p in prompts]
    stop = stops_for(free)
    alone = [generate_batch(lm.model, [p], 12, stop, pad_id=0)[0] for p in prompts]
    assert len({len(a) for a in alone}) >= 2  # answers end at different steps
    spy["admitted"].clear(), spy["shifts"].clear()
    assert generate(lm.model, prompts, 12, stop, pad_id=0, batch_size=4) == alone
    assert spy["admitted"][0] == 4 and len(spy["admitted"]) > len(prompts) // 4  # rows were refilled
    assert sum(spy["admitted"]) == len(prompts)
    assert any(by < 0 for by in spy["shifts"])  # dead columns were cut off


def test_a_longer_prompt_moves_the_rows_right(tiny_dir, spy, monkeypatch):
    """Prompt 0 stops at once, prompt 1 runs on; prompt 2 (20 tokens) takes row 0 while row 1's slots
    end at column 2, so the rows move right to give it 20 columns before the write pointer."""
    monkeypatch.setattr(gen, "REFILL_FRACTION", 0.5)
    lm = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(12)
    prompts = varied_prompts(g, [], (1, 1, 20))
    first = generate_batch(lm.model, [prompts[0]], 1, [], pad_id=0)[0][0]
    alone = [generate_batch(lm.model, [p], 6, [first], pad_id=0)[0] for p in prompts]
    assert alone[0] == [] and len(alone[1]) >= 2
    spy["shifts"].clear()
    assert gen.decode_queue(lm.model, prompts, [0, 1, 2], 6, [first], 0, 2) == alone
    assert spy["admitted"][-1] == 1 and spy["shifts"][1] > 0


def test_stop_as_first_token_frees_the_row_at_once(tiny_dir, monkeypatch):
    monkeypatch.setattr(gen, "REFILL_FRACTION", 0.5)
    lm = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(8)
    prompts = varied_prompts(g, [], (3, 5, 2, 6, 4, 7, 1))
    firsts = [generate_batch(lm.model, [p], 1, [], pad_id=0)[0][0] for p in prompts]
    stop = [firsts[1], firsts[4]]
    alone = [generate_batch(lm.model, [p], 6, stop, pad_id=0)[0] for p in prompts]
    assert [] in alone
    assert generate(lm.model, prompts, 6, stop, pad_id=0, batch_size=2) == alone
    assert generate(lm.model, prompts, 1, stop, pad_id=0, batch_size=3) == [a[:1] for a in alone]


def test_caches_grow_when_they_are_full(tiny_dir, spy, monkeypatch):
    """The pool's first capacity covers every prompt; force a tiny one to run the growth path."""
    real = gen.RowPool

    class TinyPool(real):
        def __init__(self, model, n_rows, capacity, prefix, pad_id):
            super().__init__(model, n_rows, 2, prefix, pad_id)

    monkeypatch.setattr(gen, "RowPool", TinyPool)
    lm = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(9)
    prompts = varied_prompts(g, rand_tokens(4, g), (1, 6, 3, 8, 2))
    alone = [generate_batch(lm.model, [p], 9, [], pad_id=0)[0] for p in prompts]
    assert generate(lm.model, prompts, 9, [], pad_id=0, batch_size=3) == alone
    assert spy["grown"] >= 2


def test_refill_with_a_cascade_prefix(tiny_dir, spy, monkeypatch):
    monkeypatch.setattr(gen, "REFILL_FRACTION", 0.34)
    monkeypatch.setattr(gen, "TRIM_COLUMNS", 2)
    lm = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(10)
    context = rand_tokens(30, g)
    prompts = varied_prompts(g, context, (1, 5, 3, 9, 2, 6, 4, 1, 7))
    free = [generate_batch(lm.model, [p], 8, [], pad_id=0)[0] for p in prompts]
    stop = stops_for(free)
    alone = [generate_batch(lm.model, [p], 8, stop, pad_id=0)[0] for p in prompts]
    prefix = compute_prefix(lm.model, context, cascade_min_tokens=1)
    assert prefix.cascade
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    got = gen.decode_queue(lm.model, prompts, order, 8, stop, 0, 3, prefix=prefix)
    assert got == alone
    assert len(spy["admitted"]) > 3 and any(by < 0 for by in spy["shifts"])


def test_refilled_rows_keep_their_own_adapters(tiny_dir, tmp_path, spy, monkeypatch):
    reference = KernelPolicy(kernels="reference")
    monkeypatch.setattr(gen, "REFILL_FRACTION", 0.34)
    monkeypatch.setattr(gen, "TRIM_COLUMNS", 2)
    dirs = make_adapters(tiny_dir, tmp_path, 3)
    g = torch.Generator().manual_seed(11)
    prompts = varied_prompts(g, rand_tokens(6, g), (3, 1, 8, 5, 2, 7, 4, 6, 9, 2, 5))
    owner = [0, 1, 2, 2, 0, 1, 1, 2, 0, 1, 0]
    singles = []
    for d in dirs:
        single = load_model(str(tiny_dir), policy=reference)
        load_adapter(single.model, d)
        singles.append(single.model)

    def each_alone(stop):
        return [generate_batch(singles[owner[i]], [p], 8, stop, pad_id=0)[0] for i, p in enumerate(prompts)]

    free = each_alone([])
    stop = sorted({free[0][2], free[3][1], free[5][0], free[8][4]})
    expected = each_alone(stop)
    assert len({len(e) for e in expected}) >= 2
    shared = load_model(str(tiny_dir), policy=reference)
    stack_adapters(shared.model, dirs)
    spy["admitted"].clear()
    assert generate(shared.model, prompts, 8, stop, pad_id=0, batch_size=3, adapter_ids=owner) == expected
    assert len(spy["admitted"]) > 3
    # each row's adapter goes with every forward call: nothing per row is left in the model
    assert not any(hasattr(m, "row_adapter_ids") for m in shared.model.modules())


def test_empty_inputs():
    assert generate(None, [], 5) == []  # type: ignore[arg-type]
