"""Answering in bounded memory (lora_mem.model.generate.plan_decode): a budget sets how many rows decode at once and
how many tokens a prefill pass takes; prompts are prefilled in groups and long ones in chunks. The answers must be
those of answering without a limit, token for token, and the limit must really hold."""

from __future__ import annotations

import pytest
import torch

import lora_mem.model.generate as gen
from lora_mem.lora_core.memory import AnswerConfig
from lora_mem.lora_core.multi_adapter import stack_adapters
from lora_mem.model.generate import (
    generate,
    kv_bytes_per_slot,
    plan_decode,
    prefill_groups,
)
from lora_mem.model.loader import load_model
from tests.test_shared_batches import make_adapters, rand_tokens
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(d, request.param)
    return d


@pytest.fixture
def passes(monkeypatch):
    """Every forward pass of the decoder (batch x new tokens), and every row pool built (rows, columns)."""
    from lora_mem.model.qwen2 import Qwen2Model

    seen = {"passes": [], "pools": []}
    real = Qwen2Model.forward

    def spy(self, input_ids, *a, **k):
        seen["passes"].append(tuple(input_ids.shape))
        return real(self, input_ids, *a, **k)

    real_pool = gen.RowPool.__init__

    def pool_spy(self, model, n_rows, capacity, prefix, pad_id):
        seen["pools"].append((n_rows, capacity))
        return real_pool(self, model, n_rows, capacity, prefix, pad_id)

    monkeypatch.setattr(Qwen2Model, "forward", spy)
    monkeypatch.setattr(gen.RowPool, "__init__", pool_spy)
    return seen


def prompts_of(lengths, head: int = 0, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = rand_tokens(head, g)
    return [shared + rand_tokens(n, g) for n in lengths]


LENGTHS = (3, 17, 5, 40, 9, 2, 26, 11, 7, 33, 4, 14)


@pytest.mark.parametrize("head", [0, 6])
def test_a_budget_gives_the_answers_of_no_limit(tiny_dir, passes, head):
    """Fewer rows, prefill in groups and the longest prompts in chunks: the same tokens as decoding every prompt
    in one batch with each admission prefilled at once."""
    lm = load_model(str(tiny_dir))
    prompts = prompts_of(LENGTHS, head)
    free = generate(lm.model, prompts, 10, [], pad_id=0, memory_budget_mb=None)
    stop = sorted({free[0][2], free[3][1], free[6][4]})
    unlimited = generate(lm.model, prompts, 10, stop, pad_id=0, batch_size=16, memory_budget_mb=None)
    assert len({len(a) for a in unlimited}) >= 2  # answers end at different steps
    assert passes["pools"][-1][0] == len(prompts)

    budget_mb = 0.45
    plan = plan_decode(lm.config, 4, [len(p) for p in prompts], 0 if head == 0 else head, 1, 10, 16, budget_mb)
    assert 1 < plan.rows < len(prompts) and plan.prefill_tokens < max(len(p) for p in prompts)
    passes["passes"].clear(), passes["pools"].clear()
    assert generate(lm.model, prompts, 10, stop, pad_id=0, batch_size=16, memory_budget_mb=budget_mb) == unlimited
    (rows, _), = passes["pools"]
    assert rows == plan.rows
    prefill_passes = [(b, t) for b, t in passes["passes"] if t > 1]
    assert prefill_passes and all(b * t <= plan.prefill_tokens for b, t in prefill_passes)
    longest = max(len(p) for p in prompts) - head
    assert sum(t for b, t in prefill_passes if b == 1) >= longest  # the longest prompt went in chunks


def test_stacked_adapters_within_a_budget(tiny_dir, tmp_path):
    lm = load_model(str(tiny_dir))
    dirs = make_adapters(tiny_dir, tmp_path, 3, ranks=(2, 4, 3))
    stack_adapters(lm.model, dirs)
    prompts = prompts_of(LENGTHS, head=5, seed=8)
    owners = [i % 3 for i in range(len(prompts))]
    unlimited = generate(lm.model, prompts, 8, [], pad_id=0, adapter_ids=owners, memory_budget_mb=None)
    assert generate(lm.model, prompts, 8, [], pad_id=0, adapter_ids=owners, memory_budget_mb=0.2) == unlimited


def test_the_plan_stays_within_the_budget():
    from lora_mem.model.config import PRESETS

    cfg = PRESETS["smollm2-135m"]  # the default model's shapes
    kv = kv_bytes_per_slot(cfg, 4)
    assert kv == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    rag = [700 + (i % 200) for i in range(300)]  # retrieval prompts
    plans = {mb: plan_decode(cfg, 4, rag, 40, 1, 32, 64, mb) for mb in (256, 512, 1024, 2048)}
    for mb, plan in plans.items():
        assert plan.planned_bytes <= mb * 2**20
    assert [p.rows for p in plans.values()] == sorted(p.rows for p in plans.values())  # more budget, more rows
    assert plans[256].rows < plans[2048].rows <= 64
    assert plan_decode(cfg, 2, rag, 40, 1, 32, 64, 512).rows > plans[512].rows  # bf16 keys and values: half
    # short prompts: the batch size is the limit, as without a budget
    assert plan_decode(cfg, 4, [60] * 300, 40, 1, 32, 64, 1024).rows == 64
    assert plan_decode(cfg, 4, rag, 40, 1, 32, 64, None) == gen.DecodePlan(rows=64, prefill_tokens=None)
    # too small for one row: one row still, the budget is exceeded rather than nothing answered
    assert plan_decode(cfg, 4, [8000], 0, 1, 32, 64, 1).rows == 1


def test_prefill_groups():
    assert prefill_groups([3, 4, 4, 9, 2], None) == [[0, 1, 2, 3, 4]]
    assert prefill_groups([3, 4, 4, 9, 2], 12) == [[0, 1, 2], [3], [4]]  # 3 rows x 4 wide; 9 alone; then 2
    assert prefill_groups([20, 2], 8) == [[0], [1]]  # wider than a pass: alone (in chunks)


def test_the_budget_is_an_answer_setting(tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match="memory_budget_mb"):
        AnswerConfig(memory_budget_mb=0)
    assert AnswerConfig().memory_budget_mb == gen.MEMORY_BUDGET_MB
    with pytest.raises(ValueError, match="memory_budget_mb"):
        generate(load_model(str(tiny_dir)).model, [[5, 6]], 2, memory_budget_mb=-1)

    from lora_mem.lora_core import memory

    seen = []
    real = memory.generate
    monkeypatch.setattr(memory, "generate", lambda *a, **k: seen.append(k["memory_budget_mb"]) or real(*a, **k))
    lm = load_model(str(tiny_dir))
    memory.answer_prompts(lm, [[5, 6, 7]], AnswerConfig(memory_budget_mb=3.5, max_new_tokens=2))
    assert seen == [3.5]
