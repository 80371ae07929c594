"""bench.locomo end to end on a tiny LoCoMo-format fixture and a tiny model: base and lora runs,
the files they write, resuming after an interruption, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.locomo as locomo
import lora_mem.lora_core.memory as memory_api
import lora_mem.lora_core.recipes as recipes
from bench.common import read_jsonl
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"
N_QUESTIONS_1_TO_4 = 7 + 7  # tiny-1 and tiny-2, category 5 left out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


def run(ckpt, out, *extra):
    return locomo.main(["--model", str(ckpt), "--data", str(FIXTURE), "--out", str(out), "--quiet",
                        "--epochs", "2", "--seq-len", "64", "--batch-size", "2", "--max-new-tokens", "6",
                        "--rank", "4", *extra])


def test_lora_run_writes_table_and_files(ckpt, tmp_path, capsys):
    out = tmp_path / "lora"
    results = run(ckpt, out)
    printed = capsys.readouterr().out
    assert "| Method | SingleHop | MultiHop | OpenDom | Temporal | Avg F1 |" in printed
    assert "| LoRA-Mem (r=4) |" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["scores"]["n"] == N_QUESTIONS_1_TO_4
    assert saved["settings"]["rank"] == 4 and saved["settings"]["alpha"] == 8.0
    assert saved["train_tokens_per_second"] > 0 and saved["answer_questions_per_second"] > 0
    assert saved["versions"]["torch"] and saved["device"]
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == N_QUESTIONS_1_TO_4
    assert set(rows[0]) == {"sample_id", "question", "answer", "category", "prediction", "f1", "prompt_tokens"}
    assert {r["category"] for r in rows} == {1, 2, 3, 4}
    for sid in ("tiny-1", "tiny-2"):
        adapter = out / "adapters" / sid
        assert (adapter / "adapter_model.safetensors").is_file()
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
        train = json.loads((out / "conversations" / sid / "train.json").read_text())
        assert len(train["losses"]) == 2 * -(-train["windows"] // 2)  # epochs x ceil(windows / batch)
        assert train["error"] is None
    assert (out / "table.md").read_text().startswith("| Method |")
    assert results["scores"] == saved["scores"]

    from bench.analysis import report
    md = report.main([str(out), "--published", "--out", str(tmp_path / "report")])
    assert "| LoRA-Mem (r=4) (" in md and "| Published: LoRA-Mem (r=8), Qwen2.5-1.5B | 10.44 |" in md
    assert f"| {results['prompt_tokens_mean']:.0f} ({results['prompt_tokens_max']}) |" in md  # prompt size per method
    assert (tmp_path / "report.md").read_text() == md
    # results copied for committing keep loss curves as loss/<sample_id>.json; the report reads both layouts
    from bench.analysis import keep
    committed = tmp_path / "committed"
    written = keep.main([str(out), str(committed)])
    assert sorted(p.relative_to(committed).as_posix() for p in written) == [
        "loss/tiny-1.json", "loss/tiny-2.json", "predictions.jsonl", "results.json", "table.md"]
    assert report.loss_curves(committed) == report.loss_curves(out) and len(report.loss_curves(out)) == 2
    assert report.load_run(committed)[0] == saved
    with pytest.raises(SystemExit):  # not a finished run
        keep.main([str(out / "conversations"), str(tmp_path / "nothing")])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "report_f1.png").stat().st_size > 1000
    assert (tmp_path / "report_loss.png").stat().st_size > 1000


def test_base_run_and_adversarial(ckpt, tmp_path):
    out = tmp_path / "base"
    results = run(ckpt, out, "--method", "base", "--with-adversarial")
    assert not (out / "adapters").exists()
    assert results["method"] == "Base (no context) [+cat 5]"
    assert results["scores"]["adversarial_n"] == 2
    assert len(read_jsonl(out / "predictions.jsonl")) == N_QUESTIONS_1_TO_4 + 2

    from bench.analysis import report
    md = report.main([str(out)])
    # category 5 in its own column, then how often the answerable questions were declined
    preds = read_jsonl(out / "predictions.jsonl")
    declined = 100.0 * sum("not mentioned" in p["prediction"].lower() for p in preds if p["category"] != 5) / N_QUESTIONS_1_TO_4
    assert report.abstained_answerable(out) == pytest.approx(declined)
    assert f"| {results['scores']['adversarial_acc']:.2f} (2) | {declined:.1f} |" in md
    (out / "predictions.jsonl").write_text(
        "".join(json.dumps({**p, "prediction": "Not mentioned in the conversation."}) + "\n" for p in preds))
    assert report.abstained_answerable(out) == 100.0

    # a no-op resume (everything finished) keeps the time the run took: all invocations are summed
    again = run(ckpt, out, "--method", "base", "--with-adversarial")
    assert again["wall_seconds_all_invocations"] == pytest.approx(
        results["wall_seconds_all_invocations"] + again["wall_seconds_this_invocation"])
    assert results["wall_seconds_all_invocations"] == results["wall_seconds_this_invocation"]


def test_resume_after_interruption_gives_identical_results(ckpt, tmp_path, monkeypatch):
    full = run(ckpt, tmp_path / "full")

    out = tmp_path / "interrupted"
    real_answer = locomo.answer_prompts
    calls = {"answer": 0, "train": 0}

    def crash_on_second(lm, prompts, cfg, adapter_ids=None, **kw):
        calls["answer"] += 1
        if calls["answer"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_answer(lm, prompts, cfg, adapter_ids, **kw)

    monkeypatch.setattr(locomo, "answer_prompts", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, out)
    assert (out / "conversations" / "tiny-1" / "result.json").is_file()
    assert not (out / "conversations" / "tiny-2" / "result.json").exists()
    assert not (out / "results.json").exists()

    monkeypatch.setattr(locomo, "answer_prompts", real_answer)
    real_train = memory_api.train_lora

    def counting_train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    monkeypatch.setattr(memory_api, "train_lora", counting_train)
    resumed = run(ckpt, out)
    # tiny-2's adapter was trained and saved before the interruption (in answering): it is loaded, not retrained
    assert (out / "conversations" / "tiny-2" / "train.json").is_file()
    assert calls["train"] == 0
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(tmp_path / "full" / "predictions.jsonl")
    assert resumed["scores"] == full["scores"]


def test_resume_with_other_settings_is_refused(ckpt, tmp_path):
    out = tmp_path / "run"
    run(ckpt, out, "--conversations", "tiny-1", "--max-questions", "1")
    with pytest.raises(locomo.RunConfigMismatch, match="rank: saved 4 vs now 8"):
        run(ckpt, out, "--conversations", "tiny-1", "--max-questions", "1", "--rank", "8")


def test_training_text_comes_from_the_conversation_only(ckpt, tmp_path, monkeypatch):
    seen = []
    real = recipes.make_lm_windows

    def capture(token_ids, seq_len, pad_id):
        seen.append(token_ids)
        return real(token_ids, seq_len, pad_id)

    monkeypatch.setattr(recipes, "make_lm_windows", capture)
    run(ckpt, tmp_path / "run", "--epochs", "1")
    from lora_mem.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt)
    texts = [tok.decode(ids) for ids in seen]
    data = json.loads(FIXTURE.read_text())
    assert len(texts) == 2
    for text, sample in zip(texts, data):
        assert "LEAK" not in text  # observation, session_summary, event_summary
        for qa in sample["qa"]:
            assert qa["question"] not in text
        first_turn = sample["conversation"]["session_1"][0]
        assert f"{first_turn['speaker']}: {first_turn['text'][:20]}" in text


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"sample_id\": \"x\"")
    with pytest.raises(SystemExit) as e:
        import sys

        sys.argv = ["bench.locomo", "--data", str(bad), "--out", str(tmp_path / "o")]
        locomo.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err


def test_torchrun_two_cpu_processes_match_single_process(ckpt, tmp_path):
    """Conversations sharded over 2 gloo ranks give the files of a single-process run."""
    import os
    import subprocess
    import sys

    single = run(ckpt, tmp_path / "single")
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "bench.locomo", "--model", str(ckpt), "--data", str(FIXTURE), "--out", str(out), "--quiet",
           "--epochs", "2", "--seq-len", "64", "--batch-size", "2", "--max-new-tokens", "6", "--rank", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(tmp_path / "single" / "predictions.jsonl")
    dist = json.loads((out / "results.json").read_text())
    assert dist["scores"] == single["scores"] and dist["world_size"] == 2
    for sid in ("tiny-1", "tiny-2"):
        assert (out / "adapters" / sid / "adapter_model.safetensors").is_file()


def test_qa_train_format_runs(ckpt, tmp_path):
    results = run(ckpt, tmp_path / "qa", "--train-format", "text+qa", "--seq-len", "256", "--epochs", "1",
                  "--conversations", "tiny-1", "--max-questions", "2", "--timestamps")
    assert results["method"] == "LoRA-Mem (r=4, timestamps, text+qa)"
    train = json.loads((tmp_path / "qa" / "conversations" / "tiny-1" / "train.json").read_text())
    assert train["windows"] >= 2 and train["error"] is None
    assert results["settings"]["train_format"] == "text+qa"


# ---------------------------------------------------------------------------------------------
# Context baselines, adapters reused from a run, shared multi-adapter batches
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_ckpt(ckpt, tmp_path_factory):
    """The tiny model with a 2048-position window (rotary positions extend; the byte-level tiny
    tokenizer needs room for a context)."""
    import shutil

    d = tmp_path_factory.mktemp("tiny-llama-long")
    shutil.copytree(ckpt, d, dirs_exist_ok=True)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    return d


@pytest.fixture(scope="module")
def lora_run(long_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    run(long_ckpt, out)
    return out


def prompts_seen(monkeypatch):
    """Capture the decoded user turns the model is asked (icl/rag put their context there)."""
    seen = []
    real = locomo.answer_prompts

    def capture(lm, prompts, cfg, adapter_ids=None, **kw):
        seen.extend(lm.tokenizer.decode(p) for p in prompts)
        return real(lm, prompts, cfg, adapter_ids, **kw)

    monkeypatch.setattr(locomo, "answer_prompts", capture)
    return seen


def test_icl_keeps_the_latest_sessions_that_fit(long_ckpt, tmp_path, monkeypatch):
    seen = prompts_seen(monkeypatch)
    data = json.loads(FIXTURE.read_text())
    results = run(long_ckpt, tmp_path / "icl", "--method", "icl", "--context-tokens", "300",
                  "--conversations", "tiny-1")
    assert results["method"] == "ICL (latest 300 tokens)" and results["settings"]["context_tokens"] == 300
    assert results["settings"]["rank"] is None  # training settings do not apply
    conv = data[0]["conversation"]
    last_turn, first_turn = conv["session_2"][-1]["text"], conv["session_1"][0]["text"]
    assert seen and all(last_turn in p and first_turn not in p for p in seen)
    assert all(conv["session_2_date_time"] in p for p in seen)  # the session's date comes with it
    for qa in data[0]["qa"]:  # never the annotations
        assert all(str(qa.get("answer", "@@")) not in p.split("Question:")[0] or str(qa.get("answer")) in
                   " ".join(t["text"] for k, v in conv.items() if k.startswith("session_") and isinstance(v, list)
                            for t in v) for p in seen)
    context = results["conversations"][0]["context"]
    assert 0 < context["context_tokens"] <= 300 and context["turns_kept"] < context["turns_total"]
    assert results["prompt_tokens_mean"] > context["context_tokens"]
    # the default budget is the model's window less a reserve for the question and answer
    default = run(long_ckpt, tmp_path / "icl-default", "--method", "icl", "--conversations", "tiny-1",
                  "--max-questions", "1")
    assert default["settings"]["context_tokens"] == 2048 - locomo.ICL_RESERVE_TOKENS
    assert default["conversations"][0]["context"]["turns_kept"] == context["turns_total"]  # all of it fits


def test_rag_puts_the_retrieved_turns_with_dates_into_the_prompt(ckpt, long_ckpt, tmp_path, monkeypatch):
    seen = prompts_seen(monkeypatch)
    results = run(long_ckpt, tmp_path / "rag", "--method", "rag", "--top-k", "2", "--conversations", "tiny-1")
    assert results["method"] == "RAG (BM25 top-2 turns)"
    rows = read_jsonl(tmp_path / "rag" / "predictions.jsonl")
    assert all(len(r["retrieved"]) == 2 and r["retrieved"] == sorted(r["retrieved"]) for r in rows)
    data = json.loads(FIXTURE.read_text())
    puppy = next(i for i, r in enumerate(rows) if r["question"] == "What is the name of Alice's puppy?")
    assert "Biscuit" in seen[puppy] and "On " in seen[puppy]  # the turn that names the puppy, dated
    assert all(r["prompt_tokens"] > 0 for r in rows)
    # a model with a short window: the retrieved turns are cut to fit it, and counted
    short = run(ckpt, tmp_path / "rag-short", "--method", "rag", "--top-k", "2", "--conversations", "tiny-1")
    assert short["failed"] == {} and short["questions_with_context_cut"] > 0
    assert results["questions_with_context_cut"] == 0
    assert data  # fixture read


def test_lora_rag_reuses_a_runs_adapters_without_training(long_ckpt, lora_run, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_api, "train_lora", lambda *a, **k: pytest.fail("must not train"))
    results = run(long_ckpt, tmp_path / "lr", "--method", "lora+rag", "--top-k", "2", "--adapters-from", str(lora_run),
                  "--rank", "8")  # the rank comes from the source run, not the command line
    assert results["method"] == "LoRA-Mem (r=4) + RAG (BM25 top-2 turns)"
    assert results["settings"]["adapters_from"] == str(lora_run) and results["settings"]["rank"] == 4
    with pytest.raises(locomo.RunConfigMismatch, match="no run_config.json"):
        run(long_ckpt, tmp_path / "x", "--method", "lora+rag", "--adapters-from", str(tmp_path))


def test_shared_batches_give_the_predictions_of_one_adapter_at_a_time(long_ckpt, lora_run, tmp_path):
    one_at_a_time = read_jsonl(lora_run / "predictions.jsonl")
    reused = run(long_ckpt, tmp_path / "shared", "--shared-batches", "--adapters-from", str(lora_run),
                 "--answer-batch-size", "5")
    assert read_jsonl(tmp_path / "shared" / "predictions.jsonl") == one_at_a_time
    assert all(c["answered_in_shared_batches"] for c in reused["conversations"])
    # training in the same invocation, then answering all conversations together
    run(long_ckpt, tmp_path / "shared-train", "--shared-batches")
    assert read_jsonl(tmp_path / "shared-train" / "predictions.jsonl") == one_at_a_time


def test_runs_made_before_newer_settings_still_resume(ckpt, tmp_path):
    """A run_config.json without settings added later (they were off) resumes; a real change is refused."""
    out = tmp_path / "old"
    run(ckpt, out, "--conversations", "tiny-1", "--max-questions", "1")
    cfg = json.loads((out / "run_config.json").read_text())
    for k in locomo.SETTINGS_ADDED_LATER:
        cfg.pop(k, None)
    (out / "run_config.json").write_text(json.dumps(cfg))
    run(ckpt, out, "--conversations", "tiny-1", "--max-questions", "1")
    with pytest.raises(locomo.RunConfigMismatch, match="resolve_dates"):
        run(ckpt, out, "--conversations", "tiny-1", "--max-questions", "1", "--resolve-dates")
    # its adapters serve another run, which takes over its settings (those added later: off)
    reused = run(ckpt, tmp_path / "reuse", "--conversations", "tiny-1", "--max-questions", "1",
                 "--adapters-from", str(out), "--with-adversarial")
    assert reused["method"] == "LoRA-Mem (r=4) [+cat 5]"
    assert reused["settings"]["qa_source"] == "templates" and reused["settings"]["train_format"] == "text"


def test_internalisation_options_reach_the_training_data(ckpt, tmp_path, monkeypatch):
    seen = {}
    real = memory_api.training_data

    def capture(conv, tok, recipe, template, **k):  # the options as they reach the data builder
        seen.update({f: getattr(recipe, f) for f in ("resolve_dates", "qa_per_turn", "abstention",
                                                      "abstention_ratio", "qa_source", "abstention_style")}, **k)
        return real(conv, tok, recipe, template, **k)

    monkeypatch.setattr(memory_api, "training_data", capture)
    results = run(ckpt, tmp_path / "opts", "--train-format", "qa", "--qa-per-turn", "1", "--resolve-dates",
                  "--train-abstention", "--abstention-ratio", "0.5", "--seq-len", "256", "--epochs", "1",
                  "--conversations", "tiny-1", "--max-questions", "1")
    assert seen == {"resolve_dates": True, "qa_per_turn": 1, "abstention": True, "abstention_ratio": 0.5, "seed": 0,
                    "qa_source": "templates", "generated": None, "abstention_style": "unmentioned"}
    assert results["method"] == "LoRA-Mem (r=4, timestamps+dates, qa (1/turn), abstention 0.5)"
    # the contrastive style reaches the data, the label and the run config; a resume with the other style is refused
    seen.clear()
    results = run(ckpt, tmp_path / "contrastive", "--train-abstention", "--abstention-style", "contrastive",
                  "--abstention-ratio", "1", "--seq-len", "256", "--epochs", "1", "--conversations", "tiny-1",
                  "--max-questions", "1")
    assert seen["abstention_style"] == "contrastive" and results["settings"]["abstention_style"] == "contrastive"
    assert results["method"] == "LoRA-Mem (r=4, contrastive abstention 1)"
    with pytest.raises(locomo.RunConfigMismatch, match="abstention_style"):
        run(ckpt, tmp_path / "contrastive", "--train-abstention", "--abstention-ratio", "1", "--seq-len", "256",
            "--epochs", "1", "--conversations", "tiny-1", "--max-questions", "1")
    with pytest.raises(SystemExit):
        run(ckpt, tmp_path / "bad", "--qa-per-turn", "0")


def test_qa_source_both_generates_with_the_base_model_and_caches(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_MEM_HOME", str(tmp_path / "cache"))
    results = run(ckpt, tmp_path / "both", "--train-format", "qa", "--qa-source", "both", "--epochs", "1",
                  "--seq-len", "128", "--conversations", "tiny-1", "--max-questions", "2")
    assert results["method"] == "LoRA-Mem (r=4, qa by templates + base model)"
    assert results["settings"]["qa_source"] == "both" and not results["errors"]
    cached = list((tmp_path / "cache" / "generated-qa").glob("*/tiny-1-*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["raw"]) > 0
    with pytest.raises(SystemExit):  # templates are the only source for plain text training
        run(ckpt, tmp_path / "bad", "--qa-source", "model")


def test_distill_and_recite_recipes_run_end_to_end(long_ckpt, tmp_path, monkeypatch):
    """text+distill+recite trains with the teacher's soft targets (cached on disk), and --answer-mode recite
    answers after reciting: each prediction keeps its recitation."""
    monkeypatch.setenv("LORA_MEM_HOME", str(tmp_path / "cache"))
    args = ["--train-format", "text+distill+recite", "--answer-mode", "recite", "--seq-len", "256",
            "--epochs", "1", "--conversations", "tiny-1", "--max-questions", "3", "--distill-top-k", "4"]
    results = run(long_ckpt, tmp_path / "dr", *args)
    assert not results["failed"]
    assert results["method"] == "LoRA-Mem (r=4, text+distill+recite, answers from teacher, recite-then-answer)"
    assert results["settings"]["distill_top_k"] == 4 and results["settings"]["answer_mode"] == "recite"
    assert results["config"]["memory"]["recipe"]["train_format"] == "text+distill+recite"
    rows = read_jsonl(tmp_path / "dr" / "predictions.jsonl")
    assert len(rows) == 3 and all("recitation" in r for r in rows)
    train = json.loads((tmp_path / "dr" / "conversations" / "tiny-1" / "train.json").read_text())
    assert train["error"] is None and train["teacher_seconds"] > 0
    assert results["teacher_seconds"] == results["conversations"][0]["teacher_seconds"] == train["teacher_seconds"]
    cached = list((tmp_path / "cache" / "teacher").rglob("*.pt"))
    assert cached
    # a second run reads the teacher from the cache (same settings, another --out) and trains the same adapter
    again = run(long_ckpt, tmp_path / "dr2", *args)
    assert sorted((tmp_path / "cache" / "teacher").rglob("*.pt")) == sorted(cached)
    assert read_jsonl(tmp_path / "dr2" / "predictions.jsonl") == rows and again["scores"] == results["scores"]
    with pytest.raises(SystemExit):  # reciting needs an adapter trained to recite
        run(long_ckpt, tmp_path / "bad", "--answer-mode", "recite")


def test_fact_rag_puts_the_parser_built_facts_into_the_prompt(long_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("spacy")
    seen = prompts_seen(monkeypatch)
    results = run(long_ckpt, tmp_path / "fr", "--method", "fact-rag", "--top-k", "3", "--conversations", "tiny-1")
    assert results["method"] == "fact-RAG (BM25 top-3 facts)"
    assert results["settings"]["rag_unit"] is None  # the unit is the method's, not --rag-unit's
    rows = read_jsonl(tmp_path / "fr" / "predictions.jsonl")
    puppy = next(i for i, r in enumerate(rows) if r["question"] == "What is the name of Alice's puppy?")
    # the fact, asked and answered as the adapters learn it, not the turn it came from
    assert "What is the name of Alice's puppy? Biscuit" in seen[puppy] and "Hi Bob!" not in seen[puppy]
    assert all(len(r["retrieved"]) == 3 for r in rows)


def test_parser_recipe_trains_the_parser_built_questions(long_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("spacy")
    trained = []
    real = recipes.chat_qa_windows
    monkeypatch.setattr(recipes, "chat_qa_windows", lambda pairs, *a: trained.extend(pairs) or real(pairs, *a))
    results = run(long_ckpt, tmp_path / "parser", "--train-format", "queries", "--queries-from", "parser",
                  "--queries-per-turn", "all", "--conversations", "tiny-1")
    assert results["settings"]["queries_from"] == "parser" and results["settings"]["queries_per_turn"] is None
    asked = {(p.question, p.answer) for p in trained}
    assert ("What is the name of Alice's puppy?", "Biscuit") in asked
    assert ("When did Alice adopt a puppy?", "7 May 2023") in asked
    assert results["method"] == "LoRA-Mem (r=4, queries by parser)"
    lora_plus_facts = run(long_ckpt, tmp_path / "lfr", "--method", "lora+fact-rag", "--top-k", "2",
                          "--adapters-from", str(tmp_path / "parser"), "--conversations", "tiny-1")
    assert lora_plus_facts["method"].endswith("+ fact-RAG (BM25 top-2 facts)")
    assert lora_plus_facts["settings"]["queries_from"] == "parser"  # taken over from the adapters' run
