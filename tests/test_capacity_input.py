"""bench.capacity where it shares bench.locomo's input paths (issue 29): the device and float32 ranges in the
parser, an earlier invocation's files read and typed before the model loads, paths in --out that lead elsewhere or
are in the way, the model's window, Ctrl-C. Each refusal is one `error:` line, exit 2, nothing changed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import bench.capacity as capacity
from tests.test_locomo_cli import assert_one_error_line, snapshot


def argv(tiny_ckpt, out):
    return ["--model", str(tiny_ckpt), "--out", str(out), "--quiet", "--ranks", "1", "--facts", "2", "--epochs", "1",
            "--min-steps", "0", "--max-new-tokens", "2", "--seq-len", "64"]


@pytest.fixture(scope="module")
def finished(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    capacity.main(argv(tiny_ckpt, out))
    return out


def cli(monkeypatch, capsys, args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["bench.capacity", *args])
    with pytest.raises(SystemExit) as e:
        capacity.cli()
    return e.value.code, capsys.readouterr().err


def refused(monkeypatch, capsys, tmp_path, args, *needles):
    before = snapshot(tmp_path)
    monkeypatch.setattr(capacity, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = cli(monkeypatch, capsys, args)
    assert code == 2
    assert_one_error_line(err, *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("extra, needle", [
    (["--lr", "1e39"], "--lr: must be a finite number in (0, 3.40282e+38], got 1e39"),
    (["--seed", str(2**64)], "--seed: must be an integer in [0, 18446744073709551615]"),
    (["--seq-len", "300"], "--seq-len 300: longer than the model's context window of 256 positions"),
])
def test_settings_out_of_range_are_refused_before_anything_is_written(tiny_ckpt, tmp_path, monkeypatch, capsys, extra,
                                                                      needle):
    refused(monkeypatch, capsys, tmp_path, argv(tiny_ckpt, tmp_path / "out") + extra, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tiny_ckpt, tmp_path, monkeypatch, capsys):
    refused(monkeypatch, capsys, tmp_path, argv(tiny_ckpt, tmp_path / "out") + ["--device", "cuda"],
            "--device: cuda: no CUDA device on this machine")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, needle", [
    ("base.json", '{"n": "2"}', "base.json: field 'n': input should be a valid integer, got str '2'"),
    ("base.json", "[]", "base.json: must be a JSON object, got list"),
    ("base.predictions.jsonl", '{"attribute": "x"}\n', "base.predictions.jsonl row 1: missing field 'answer'"),
    ("cells/r1-n2.json", '{"rank": "1"}', "r1-n2.json: field 'rank': input should be a valid integer"),
    ("cells/r1-n2.json", "[" * 100_000, "r1-n2.json: JSON nested too deeply"),
    ("cells/r1-n2.predictions.jsonl", "", "r1-n2.predictions.jsonl: 0 rows, 2 facts were asked"),
])
def test_an_earlier_invocations_file_is_typed_before_the_model_loads(tiny_ckpt, finished, tmp_path, monkeypatch, capsys,
                                                                     name, content, needle):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / name).write_text(content)
    refused(monkeypatch, capsys, tmp_path, argv(tiny_ckpt, out), needle, "move it away" if "rows" not in needle else "")


def test_paths_in_out_that_lead_elsewhere_or_are_in_the_way(tiny_ckpt, tmp_path, monkeypatch, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "cells").symlink_to(elsewhere)
    refused(monkeypatch, capsys, tmp_path, argv(tiny_ckpt, out), "leads outside")
    (out / "cells").unlink()
    (out / "cells").write_text("a file where the cells go")
    refused(monkeypatch, capsys, tmp_path, argv(tiny_ckpt, out), "cells is in the way: a folder goes there")


def test_ctrl_c_while_loading_writes_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(capacity, "load_model", interrupted)
    code, err = cli(monkeypatch, capsys, argv(tiny_ckpt, tmp_path / "out"))
    assert code == 130
    assert_one_error_line(err, "interrupted: finished cells are kept in --out; rerun the same command to resume")
    assert not (tmp_path / "out").exists()


def test_a_resume_reads_the_checked_files_unchanged(tiny_ckpt, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = snapshot(out / "cells")
    results = capacity.main(argv(tiny_ckpt, out))
    assert snapshot(out / "cells") == before and results["errors"] == {}
    assert json.loads(Path(out / "base.json").read_text())["n"] == 2
