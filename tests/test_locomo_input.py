"""bench.locomo against untrusted input (issue 29): ids are names, never paths; every file a run reads is read and
checked before the model loads; nothing is written before every check has passed. Each refusal is one `error:` line
naming the file and field (or id), exit status 2, with the model never loaded and nothing changed anywhere in the
test's folder, --out included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import bench.locomo as locomo
from bench.common import read_jsonl
from tests.test_locomo_cli import FIXTURE, assert_one_error_line, base_args, run_cli, snapshot

WINDOW = 256  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def finished(tiny_ckpt, tmp_path_factory):
    """A finished lora run of tiny-1 (two questions), copied by each test that resumes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    locomo.main(base_args(tiny_ckpt, out) + ["--conversations", "tiny-1", "--max-questions", "2"])
    return out


def resume_args(tiny_ckpt, out, data=FIXTURE):
    return base_args(tiny_ckpt, out, data) + ["--conversations", "tiny-1", "--max-questions", "2"]


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "runs" / "out"
    shutil.copytree(finished, out)
    return out


def data_file(tmp_path: Path, edit) -> Path:
    data = json.loads(FIXTURE.read_text())
    edit(data)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def refused(monkeypatch, capsys, tmp_path, argv, *needles):
    """The command is refused with one line holding every needle, exit 2, before the model loads; nothing in
    tmp_path (the run directory, its neighbours, the data) changes."""
    before = snapshot(tmp_path)
    monkeypatch.setattr(locomo, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, stdout, err = run_cli(monkeypatch, capsys, argv)
    assert code == 2 and stdout == "", err
    assert_one_error_line(err, *needles)
    assert snapshot(tmp_path) == before
    return err


# ---------------------------------------------------------------------------------------------
# 1. A sample_id is a name, never a path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample_id, why", [
    ("../../escape", "it contains '/'"),
    ("ABSOLUTE", "it contains '/'"),
    ("..", "it starts with '.'"),
    ("a\\b", "it contains '\\\\'"),
    ("", "it is empty"),
    ("conv\n26", "control character U+000A"),
    ("x" * 200, "200 bytes long (at most 128)"),
    (["conv-26"], "it is a list, not a string"),
])
def test_a_sample_id_that_is_not_a_file_name_is_refused(tiny_ckpt, tmp_path, monkeypatch, capsys, sample_id, why):
    if sample_id == "ABSOLUTE":
        sample_id = str(tmp_path / "abs-target")
    data = data_file(tmp_path, lambda d: d[0].update(sample_id=sample_id))
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "runs" / "out", data),
            f"{data}: sample #0: sample_id", "is not a safe file name", why)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "abs-target").exists()


def test_an_id_aimed_at_another_run_leaves_it_untouched(tiny_ckpt, finished, tmp_path, monkeypatch, capsys):
    other = copy_run(finished, tmp_path)  # runs/out: the other run
    data = data_file(tmp_path, lambda d: d[0].update(sample_id="../../out/conversations/tiny-1"))
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "runs" / "new", data),
            "sample_id '../../out/conversations/tiny-1' is not a safe file name")
    assert snapshot(other) == snapshot(finished)


@pytest.mark.parametrize("ids, needle", [
    (("tiny-1", "tiny-1"), "sample #1: duplicate sample_id 'tiny-1'"),
    (("Conv-1", "conv-1"), "sample #1: duplicate sample_id 'conv-1' (as 'Conv-1' is, where case is ignored)"),
    ((26, "26"), "sample #1: duplicate sample_id '26'"),
])
def test_sample_ids_that_would_share_a_folder_are_refused(tiny_ckpt, tmp_path, monkeypatch, capsys, ids, needle):
    data = data_file(tmp_path, lambda d: [s.update(sample_id=i) for s, i in zip(d, ids)])
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out", data), str(data), needle)


def symlinked_conversations(out: Path, elsewhere: Path):
    (out / "conversations").symlink_to(elsewhere)


def symlinked_adapter(out: Path, elsewhere: Path):
    (out / "adapters").mkdir()
    (out / "adapters" / "tiny-2").symlink_to(elsewhere)


def conversation_folder_is_a_file(out: Path, elsewhere: Path):
    (out / "conversations").mkdir()
    (out / "conversations" / "tiny-2").write_text("x")


def results_file_is_a_folder(out: Path, elsewhere: Path):
    (out / "results.json").mkdir()


@pytest.mark.parametrize("arrange, needle", [
    (symlinked_conversations, "leads outside"),
    (symlinked_adapter, "leads outside"),
    (conversation_folder_is_a_file, "tiny-2 is in the way: a folder goes there"),
    (results_file_is_a_folder, "results.json is in the way: a file goes there"),
])
def test_paths_in_out_that_lead_elsewhere_or_are_in_the_way(tiny_ckpt, tmp_path, monkeypatch, capsys, arrange, needle):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    arrange(out, elsewhere)
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, out), needle)
    assert not any(elsewhere.iterdir())


# ---------------------------------------------------------------------------------------------
# 2, 3. Device and float32 ranges: refused before anything is written, so the corrected command runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_then_the_corrected_command_runs(tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = resume_args(tiny_ckpt, out)
    refused(monkeypatch, capsys, tmp_path, args + ["--device", "cuda"], "--device: cuda: no CUDA device on this "
            "machine", "use --device cpu")
    assert not out.exists()
    monkeypatch.undo()
    assert locomo.main(args + ["--device", "cpu"])["failed"] == {}


def test_a_learning_rate_beyond_float32_is_refused_before_any_work(tiny_ckpt, tmp_path, monkeypatch, capsys):
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out") + ["--lr", "1e39"],
            "--lr: must be a finite number in (0, 3.40282e+38], got 1e39")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 4, 5. Deeply nested JSON; the model directory's files
# ---------------------------------------------------------------------------------------------

def test_deeply_nested_data_is_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    data = tmp_path / "deep.json"
    data.write_text("[" * 100_000 + "]" * 100_000)
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out", data),
            f"{data}: JSON nested too deeply to read")


@pytest.fixture
def model_copy(tiny_ckpt, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_ckpt, d)
    return d


@pytest.mark.parametrize("edit, needle", [
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json: cannot be read by `tokenizers`"),
    (lambda d: (d / "config.json").write_text("null"), "config.json: must be a JSON object, got null"),
    (lambda d: (d / "config.json").write_text("[]"), "config.json: must be a JSON object, got list"),
    (lambda d: edit_json(d / "config.json", vocab_size="320"),
     "config.json: field 'vocab_size': input should be a valid integer, got str '320'"),
    (lambda d: edit_json(d / "config.json", max_position_embeddings=-1),
     "config.json: field 'max_position_embeddings': input should be greater than or equal to 2"),
    (lambda d: edit_json(d / "config.json", num_key_value_heads=3),
     "config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (lambda d: edit_json(d / "config.json", vocab_size=100), "tokenizer.json: 320 tokens, more than the model's "
     "vocab_size 100"),
    (lambda d: edit_json(d / "config.json", hidden_size=10**12), "checkpoint does not match the config"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": 5}'),
     "tokenizer_config.json: field 'eos_token': must be a token string"),
    (lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "two"}'),
     "generation_config.json: field 'eos_token_id': must be a token id or a list of token ids"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../x.safetensors"}}'),
     "model.safetensors.index.json: field 'weight_map': shard file '../../x.safetensors' is not a safe file name"),
])
def test_a_model_directory_with_bad_files_is_one_line(model_copy, tmp_path, monkeypatch, capsys, edit, needle):
    edit(model_copy)
    argv = base_args(model_copy, tmp_path / "out")
    refused(monkeypatch, capsys, tmp_path, argv, needle)


def edit_json(path: Path, **fields):
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


# ---------------------------------------------------------------------------------------------
# 6, 7, 8. An earlier invocation's files: read and typed before the model loads
# ---------------------------------------------------------------------------------------------

CONV = "conversations/tiny-1"


@pytest.mark.parametrize("name, content, needle", [
    ("run_config.json", "[]", "run_config.json: must be a JSON object, got list"),
    ("run_config.json", "[" * 100_000, "run_config.json: JSON nested too deeply"),
    ("results.json", "{not json", "results.json: malformed JSON at line 1"),
    ("results.json", '{"wall_seconds_all_invocations": "long"}',
     "results.json: field 'wall_seconds_all_invocations': input should be a valid number"),
    (f"{CONV}/result.json", "[]", "result.json: must be a JSON object, got list"),
    (f"{CONV}/result.json", '{"sample_id": "tiny-1", "n_questions": 2, "error": 5}',
     "result.json: field 'error': input should be a valid string, got int 5"),
    (f"{CONV}/result.json", '{"sample_id": "tiny-2", "n_questions": 2, "error": null}',
     "result.json: field 'sample_id' is 'tiny-2', not 'tiny-1'"),
    (f"{CONV}/train.json", '{"tokens": 1, "seconds": 1, "losses": "low", "epochs_loss": []}',
     "train.json: field 'losses': input should be a valid list, got str 'low'"),
    (f"{CONV}/train.json", '{"tokens": 1, "seconds": NaN, "losses": [], "epochs_loss": []}',
     "train.json: not valid JSON (NaN is not JSON)"),
])
def test_a_file_of_the_wrong_shape_in_out_is_one_line(tiny_ckpt, finished, tmp_path, monkeypatch, capsys, name, content,
                                                      needle):
    out = copy_run(finished, tmp_path)
    (out / name).write_text(content)
    refused(monkeypatch, capsys, tmp_path, resume_args(tiny_ckpt, out), str(out / name.rsplit("/", 1)[0]), needle,
            "move it away")


@pytest.mark.parametrize("cut, needle", [
    (lambda text: text[:-20], "predictions.jsonl line 2: malformed JSON"),
    (lambda text: text.splitlines(keepends=True)[0], "predictions.jsonl: 1 rows of ['tiny-1'], result.json says 2 "
     "questions of 'tiny-1' (truncated"),
    (lambda text: text.replace('"f1": ', '"f1": "x", "was": '), "predictions.jsonl row 1: field 'f1': input should "
     "be a valid number"),
    (lambda text: "", "predictions.jsonl: 0 rows"),
])
def test_a_truncated_predictions_file_of_a_finished_conversation(tiny_ckpt, finished, tmp_path, monkeypatch, capsys,
                                                                 cut, needle):
    out = copy_run(finished, tmp_path)
    path = out / CONV / "predictions.jsonl"
    path.write_text(cut(path.read_text()))
    refused(monkeypatch, capsys, tmp_path, resume_args(tiny_ckpt, out), needle)


@pytest.mark.parametrize("break_adapter, needle", [
    (lambda a: (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:-99]),
     "adapter_model.safetensors: cannot be read"),
    (lambda a: edit_json(a / "adapter_config.json", r="abc"),
     "adapter_config.json: field 'r': input should be a valid integer, got str 'abc'"),
])
def test_the_adapter_an_unfinished_conversation_resumes_from_is_checked_first(tiny_ckpt, finished, tmp_path,
                                                                            monkeypatch, capsys, break_adapter,
                                                                            needle):
    out = copy_run(finished, tmp_path)
    (out / CONV / "result.json").unlink()  # trained, not answered: a resume loads its adapter
    break_adapter(out / "adapters" / "tiny-1")
    refused(monkeypatch, capsys, tmp_path, resume_args(tiny_ckpt, out), needle)


# ---------------------------------------------------------------------------------------------
# 9. Ctrl-C before the run starts writes nothing, and says so
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["load_model", "load_locomo", "inspect_checkpoint"])
def test_ctrl_c_before_training_says_nothing_was_written_and_that_is_true(tiny_ckpt, tmp_path, monkeypatch, capsys,
                                                                          where):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(locomo, where, interrupted)
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, base_args(tiny_ckpt, out))
    assert code == 130
    assert_one_error_line(err, "interrupted before the run started: nothing was written to the run directory")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 10. Divergence within one step
# ---------------------------------------------------------------------------------------------

def test_a_single_step_that_blows_up_the_weights_fails_the_conversation(tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = base_args(tiny_ckpt, out) + ["--conversations", "tiny-1", "--lr", "1e30", "--batch-size", "64",
                                   "--warmup-ratio", "0"]
    code, stdout, _ = run_cli(monkeypatch, capsys, argv)
    assert code == 1
    assert "FAILED tiny-1: training failed: a LoRA weight reached 1e+30 (beyond 1000: diverged) at epoch 0, " \
           "step 0" in stdout
    assert not (out / "adapters" / "tiny-1").exists()
    assert json.loads((out / CONV / "train.json").read_text())["losses"] == []  # the one step did not count


# ---------------------------------------------------------------------------------------------
# 11. A 1 MB turn with --method rag: cut to fit, counted, the run goes on
# ---------------------------------------------------------------------------------------------

def test_a_huge_retrieved_turn_is_cut_to_fit_and_counted(tiny_ckpt, tmp_path):
    def huge_turn(d):
        d[0]["conversation"]["session_1"][0]["text"] = "Alice's puppy Biscuit " * 48_000  # ~1 MB

    data = data_file(tmp_path, huge_turn)
    assert data.stat().st_size > 1_000_000
    out = tmp_path / "out"
    results = locomo.main(base_args(tiny_ckpt, out, data) + ["--method", "rag", "--top-k", "3"])
    assert results["failed"] == {} and results["questions_with_context_cut"] >= 1
    rows = read_jsonl(out / "predictions.jsonl")
    assert {r["sample_id"] for r in rows} == {"tiny-1", "tiny-2"}
    assert all(r["prompt_tokens"] + 4 <= WINDOW for r in rows)  # every prompt and its 4 new tokens fit
    huge = max(rows, key=lambda r: r["context_tokens_cut"])
    assert huge["sample_id"] == "tiny-1" and huge["context_tokens_cut"] > 900_000
    result = json.loads((out / CONV / "result.json").read_text())
    assert result["context"]["questions_with_context_cut"] == sum(
        1 for r in rows if r["context_tokens_cut"] and r["sample_id"] == "tiny-1")


def test_cut_to_fit_keeps_short_documents_whole(tiny_ckpt):
    from bench.context import cut_to_fit
    from lora_mem.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_ckpt)
    docs = ["short one", "x " * 500, "another short"]
    kept, cut = cut_to_fit(docs, tok, 60)
    assert kept[0] == docs[0] and kept[2] == docs[2] and docs[1].startswith(kept[1]) and kept[1]
    assert len(tok.encode("\n".join(kept))) <= 60 and cut > 0
    assert cut_to_fit(docs, tok, 10**6) == (docs, 0)


# ---------------------------------------------------------------------------------------------
# 12. Adapter configs, field by field, in the loader the benchmark shares (via --adapters-from)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("write, needle", [
    (lambda p: edit_json(p, r="abc"), "field 'r': input should be a valid integer, got str 'abc'"),
    (lambda p: edit_json(p, r=0), "field 'r': input should be greater than or equal to 1, got int 0"),
    (lambda p: edit_json(p, r=[4]), "field 'r': input should be a valid integer, got list [4]"),
    (lambda p: edit_json(p, target_modules=["q_proj", "nope_proj"]), "target_modules 'nope_proj' select no linear "
     "layer of the model"),
    (lambda p: p.write_bytes(b'{"r": 4, "target_modules": ["q_proj"], "x": "\xff"}'), "not UTF-8 text"),
    (lambda p: p.write_text(p.read_text().replace('"lora_alpha": 8.0', '"lora_alpha": NaN')), "NaN is not JSON"),
    (lambda p: edit_json(p, lora_alpha=0), "field 'lora_alpha': input should be greater than 0"),
])
def test_a_bad_adapter_config_in_adapters_from_is_refused_before_loading(tiny_ckpt, finished, tmp_path, monkeypatch,
                                                                         capsys, write, needle):
    source = copy_run(finished, tmp_path)
    write(source / "adapters" / "tiny-1" / "adapter_config.json")
    argv = resume_args(tiny_ckpt, tmp_path / "new") + ["--adapters-from", str(source)]
    refused(monkeypatch, capsys, tmp_path, argv, str(source / "adapters" / "tiny-1"), needle)


def test_a_source_run_config_with_a_bad_setting_is_refused(tiny_ckpt, finished, tmp_path, monkeypatch, capsys):
    source = copy_run(finished, tmp_path)
    edit_json(source / "run_config.json", rank="abc")
    argv = resume_args(tiny_ckpt, tmp_path / "new") + ["--adapters-from", str(source)]
    refused(monkeypatch, capsys, tmp_path, argv, "run_config.json: field 'rank': must be an integer >= 1, got 'abc'")


# ---------------------------------------------------------------------------------------------
# 13 (command line) and beyond: settings against the model, data fields
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--seq-len", "300"], "--seq-len 300: longer than the model's context window of 256 positions"),
    (["--rank", "33"], "--rank 33: more than the narrowest adapted layer's 32 features"),
    (["--train-format", "text+distill", "--distill-top-k", "1000"], "--distill-top-k 1000: more than the model's 320 "
     "tokens"),
    (["--max-new-tokens", "250"], "+ 250 new tokens (--max-new-tokens): more than the model's context window of 256"),
    (["--method", "icl", "--context-tokens", "250"], "+ 250 of conversation (--context-tokens)"),
    (["--method", "icl"], "leaves no room for ICL's default budget: set --context-tokens"),
])
def test_settings_that_do_not_fit_the_model_are_refused_before_loading(tiny_ckpt, tmp_path, monkeypatch, capsys, extra,
                                                                       needle):
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out") + extra, needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d[0]["conversation"].update(session_01=[]), "field 'session_01': session numbers are written without "
     "leading zeros"),
    (lambda d: d[0]["conversation"].update({"session_" + "9" * 5000: []}), "session numbers are written without"),
    (lambda d: d[0]["conversation"]["session_1"][0].update(speaker=["Alice"]), "field 'speaker' must be a string"),
    (lambda d: d[0]["conversation"]["session_1"][0].update(dia_id={"a": 1}), "field 'dia_id' must be a string"),
    (lambda d: d[0]["qa"][0].update(evidence=[1]), "field 'evidence' must be a list of strings"),
    (lambda d: d[0]["conversation"].update(session_1=[{"speaker": "A", "text": "   "}], session_2=[]),
     "no text in any of its 2 sessions: nothing to remember"),
])
def test_data_that_cannot_be_used_is_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys, edit, needle):
    data = data_file(tmp_path, edit)
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out", data), str(data), needle)


def test_a_question_longer_than_the_window_is_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    data = data_file(tmp_path, lambda d: d[0]["qa"][0].update(question="why " * 300))
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out", data),
            "sample 'tiny-1': the question 'why why",
            "tokens + 4 new tokens (--max-new-tokens): more than the model's context window of 256 positions")


def test_nan_in_the_data_file_is_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    data = tmp_path / "nan.json"
    data.write_text(FIXTURE.read_text().replace('"category": 4', '"category": NaN', 1))
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out", data), f"{data}: not valid JSON "
            "(NaN is not JSON)")


def test_an_empty_data_file_is_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    refused(monkeypatch, capsys, tmp_path, base_args(tiny_ckpt, tmp_path / "out", data),
            f"{data}: no samples (the list is empty): nothing to remember")


def test_a_conversation_without_questions_is_run_and_resumed(tiny_ckpt, tmp_path):
    data = data_file(tmp_path, lambda d: d[0].update(qa=[]))
    args = base_args(tiny_ckpt, tmp_path / "out", data) + ["--conversations", "tiny-1"]
    first = locomo.main(args)
    assert first["failed"] == {} and first["conversations"][0]["n_questions"] == 0
    again = locomo.main(args)  # its empty predictions file is read back as the 0 rows it should hold
    assert again["failed"] == {} and again["scores"] == first["scores"]


def test_a_resume_after_the_checks_still_gives_the_finished_run(tiny_ckpt, finished, tmp_path):
    """The checks read an earlier invocation's files without changing them: a resume over a finished run adds
    nothing and scores the same."""
    out = copy_run(finished, tmp_path)
    before = snapshot(out / "conversations")
    results = locomo.main(resume_args(tiny_ckpt, out))
    assert snapshot(out / "conversations") == before and results["failed"] == {}
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(finished / "predictions.jsonl")
