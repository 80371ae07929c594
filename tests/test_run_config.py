"""bench.common.check_or_write_run_config: the one guard both resumable benchmarks put on --out."""

import json

import pytest

from bench.common import RunConfigMismatch, RunFileError, check_or_write_run_config

KEYS = ("rank", "lr", "answer_mode", "threads")


def test_writes_then_resumes_with_the_same_settings(tmp_path):
    settings = {"rank": 8, "lr": 1e-3, "answer_mode": "direct", "threads": 2}
    check_or_write_run_config(tmp_path, settings, KEYS, write=False)
    assert not (tmp_path / "run_config.json").exists()  # a dry check writes nothing
    check_or_write_run_config(tmp_path, settings, KEYS)
    assert json.loads((tmp_path / "run_config.json").read_text()) == settings
    check_or_write_run_config(tmp_path, dict(settings), KEYS)  # the same settings resume


def test_a_changed_setting_is_named_with_both_values(tmp_path):
    check_or_write_run_config(tmp_path, {"rank": 8, "lr": 1e-3}, KEYS)
    with pytest.raises(RunConfigMismatch, match=r"rank: saved 8 vs now 4.*use another --out"):
        check_or_write_run_config(tmp_path, {"rank": 4, "lr": 1e-3}, KEYS)
    # a setting outside `keys` (the run's label, say) does not block a resume
    check_or_write_run_config(tmp_path, {"rank": 8, "lr": 1e-3, "label": "x"}, KEYS)


def test_older_run_directories_resume_when_the_newer_setting_is_off(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"rank": 8, "lr": 1e-3}))
    added_later = {"answer_mode": "direct"}
    recorded_later = ("threads",)
    check_or_write_run_config(tmp_path, {"rank": 8, "lr": 1e-3, "answer_mode": "direct", "threads": 2}, KEYS,
                              added_later, recorded_later)
    check_or_write_run_config(tmp_path, {"rank": 8, "lr": 1e-3, "answer_mode": None, "threads": 16}, KEYS,
                              added_later, recorded_later)
    with pytest.raises(RunConfigMismatch, match="answer_mode: saved 'direct' vs now 'recite'"):
        check_or_write_run_config(tmp_path, {"rank": 8, "lr": 1e-3, "answer_mode": "recite", "threads": 2}, KEYS,
                                  added_later, recorded_later)
    with pytest.raises(RunConfigMismatch, match="threads: saved None vs now 2"):  # not declared: checked
        check_or_write_run_config(tmp_path, {"rank": 8, "lr": 1e-3, "threads": 2}, KEYS)


def test_an_unreadable_run_config_is_named_and_left_in_place(tmp_path):
    (tmp_path / "run_config.json").write_text('{"rank": 8,')
    with pytest.raises(RunFileError, match=r"run_config.json: malformed JSON.*move it away"):
        check_or_write_run_config(tmp_path, {"rank": 8}, KEYS)
    assert (tmp_path / "run_config.json").read_text() == '{"rank": 8,'
