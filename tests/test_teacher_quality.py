"""bench.analysis.teacher_quality: the distill teacher's answers beside the rule-made answers (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.analysis import teacher_quality
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


def test_compare_scores_agreement_length_and_dates():
    r = teacher_quality.compare(["7 May 2023", "On 9 June 2023, she went", "a dog"],
                                ["7 May 2023", "9 June 2023", "a puppy named Biscuit"],
                                ["When did Alice adopt?", "When did she go?", "What did Alice adopt?"])
    assert r["queries"] == 3 and r["when_queries"] == 2 and r["when_date_given"] == pytest.approx(100.0)
    assert r["exact"] == pytest.approx(100 / 3)
    assert 0 < r["f1"] < 100
    assert r["teacher_words"] == pytest.approx((3 + 6 + 2) / 3)


def test_runs_on_the_tiny_model_and_writes_its_files(tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny"
    make_tiny_checkpoint(ckpt, "llama")
    monkeypatch.setenv("LORA_MEM_HOME", str(tmp_path / "cache"))
    result = teacher_quality.main(["--data", str(FIXTURE), "--model", str(ckpt), "--conversations", "tiny-1",
                                   "--out", str(tmp_path / "tq")])
    saved = json.loads((tmp_path / "tq.json").read_text())
    assert saved["all"] == result["all"] and result["all"]["queries"] > 0
    assert "tiny-1" in (tmp_path / "tq.md").read_text()
    # the teacher outputs land in the cache that bench.locomo distill runs share
    assert list((tmp_path / "cache" / "teacher").rglob("*.pt"))


def test_unknown_conversation_is_one_line(capsys):
    with pytest.raises(SystemExit):
        teacher_quality.main(["--data", str(FIXTURE), "--conversations", "conv-999"])
    assert "conv-999" in capsys.readouterr().err
