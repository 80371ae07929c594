"""bench.capacity: the synthetic facts, the exact-match normaliser, the training windows, and the grid end to
end on a tiny model (files, resume, settings mismatch, input errors), plus memorisation on a tiny model."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import bench.capacity as capacity
from bench.common import read_jsonl
from bench.capacity import (
    ATTRIBUTES,
    CapacityError,
    exact_match,
    generate_facts,
    generate_people,
    normalize,
    training_windows,
)
from lora_mem.lora_core.train import IGNORE_INDEX
from lora_mem.model.loader import load_model
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


@pytest.fixture(scope="module")
def sharp_ckpt(tmp_path_factory):
    """A tiny Qwen2 (untied head) whose LM head is scaled up: the random init's logits are nearly flat
    (|logit| < ~1 over 320 tokens), so greedy decoding could not follow a trained answer reliably."""
    d = tmp_path_factory.mktemp("tiny-qwen2-sharp")
    model = make_tiny_checkpoint(d, "qwen2")
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(d, safe_serialization=True)
    return d


# -- facts -----------------------------------------------------------------------------------

def test_facts_are_deterministic_unique_and_nested():
    a = generate_facts(300, seed=0)
    assert a == generate_facts(300, seed=0)
    assert a != generate_facts(300, seed=1)
    assert generate_facts(30, seed=0) == a[:30]  # smaller grids train on a prefix of the same stream
    assert len(a) == 300 and [f.attribute for f in a[:6]] == list(ATTRIBUTES) * 2
    people = generate_people(3334, seed=0)  # what 10,000 facts need
    names = [p.name for p in people]
    assert len(set(names)) == len(names)
    for p in people[:200]:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", p.name), p.name
        assert re.fullmatch(r"[A-Z][a-z]+", p.home_town), p.home_town
        assert re.fullmatch(r"([1-9]|1[0-9]|2[0-8]) [A-Z][a-z]+ (19[2-9][0-9]|200[0-5])", p.birth_date), p.birth_date
    # Invented names, not a list of common ones: almost every first name and surname is new.
    assert len({n.split()[0] for n in names}) > 0.95 * len(names)
    # The stream is pinned (the module docstring shows its first person): same facts on every machine.
    assert [(f.question, f.answer) for f in a[:3]] == [
        ("When was Vaipous Draexmouov born?", "23 October 1938"),
        ("Which town is Vaipous Draexmouov from?", "Xexyuthmar"),
        ("What is Vaipous Draexmouov's profession?", "cheesemaker")]
    f = a[0]
    assert f.subject in f.question and f.subject in f.statement and f.answer in f.statement


def test_attribute_selection_and_errors():
    facts = generate_facts(5, seed=3, attributes=["birth_date"])
    assert len({f.subject for f in facts}) == 5 and {f.attribute for f in facts} == {"birth_date"}
    assert [f.answer for f in facts] == [p.birth_date for p in generate_people(5, seed=3)]
    with pytest.raises(CapacityError, match="unknown attribute.*shoe_size"):
        generate_facts(5, attributes=["birth_date", "shoe_size"])


# -- scoring ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gold, ok", [
    ("14 March 1987", "14 March 1987", True),
    ("  14 march 1987. ", "14 March 1987", True),
    ("14  March\n1987", "14 March 1987", True),
    ("CARTOGRAPHER.", "cartographer", True),
    ("14 March 1987", "14 March 1988", False),
    ("He was born on 14 March 1987.", "14 March 1987", False),
    ("", "14 March 1987", False),
])
def test_exact_match_normaliser(pred, gold, ok):
    assert exact_match(pred, gold) is ok


def test_normalize_and_scores():
    assert normalize(" Draskelholm.. ") == "draskelholm"
    facts = generate_facts(3, seed=0)
    rows, agg = capacity.score_answers(facts, [facts[0].answer + ".", "no idea", f"It is {facts[2].answer}"])
    assert [r["exact"] for r in rows] == [True, False, False]
    assert [r["contains"] for r in rows] == [True, False, True]
    assert agg["exact_match"] == pytest.approx(1 / 3) and agg["facts_recalled"] == 1
    assert agg["by_attribute"]["birth_date"]["exact_match"] == 1.0
    assert 0 < rows[2]["f1"] < 1
    assert "recitation_contains" not in agg
    said = [f"On 5 May 2023, {facts[0].subject} said: I was born on {facts[0].answer}.", "Hi!", facts[2].answer]
    rows, agg = capacity.score_answers(facts, ["?", "?", "?"], said)
    assert [r["recitation"] for r in rows] == said and agg["recitation_contains"] == pytest.approx(2 / 3)


# -- training windows ------------------------------------------------------------------------

def test_one_fact_per_window_as_it_is_asked(ckpt):
    lm = load_model(str(ckpt), device="cpu")
    tok = lm.tokenizer
    facts = generate_facts(4, seed=0)
    ids, targets = training_windows(facts, lm, "qa", seq_len=128)
    assert ids.shape[0] == 4 and ids.shape[1] < 128  # trimmed after the last supervised position
    for f, row, tgt in zip(facts, ids, targets):
        prompt = tok.encode_chat([{"role": "user", "content": f.question}])
        assert row[:len(prompt)].tolist() == prompt  # exactly the prompt the question is asked with
        supervised = tgt[tgt != IGNORE_INDEX].tolist()
        assert tok.decode(supervised) == f.answer and supervised[-1] == tok.im_end_id
    packed, packed_targets = training_windows(facts, lm, "qa", seq_len=128, pack=True)
    assert packed.shape[0] < 4 and int((packed_targets == tok.im_end_id).sum()) == 4
    both, _ = training_windows(facts, lm, "qa+statements", seq_len=128)
    assert both.shape[0] == 8
    with pytest.raises(CapacityError, match="too short"):
        training_windows(facts, lm, "qa", seq_len=20)


# -- the grid end to end ---------------------------------------------------------------------

def run(ckpt, out, *extra):
    return capacity.main(["--model", str(ckpt), "--out", str(out), "--quiet", "--ranks", "1,2", "--facts", "2,4",
                          "--epochs", "1", "--min-steps", "0", "--seq-len", "128", "--max-new-tokens", "6", *extra])


def test_grid_files_resume_and_mismatch(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    results_file = tmp_path / "results" / "capacity_tiny.json"
    results = run(ckpt, out, "--results-file", str(results_file))
    for r in (1, 2):
        for n in (2, 4):
            cell = json.loads((out / "cells" / f"r{r}-n{n}.json").read_text())
            assert cell["rank"] == r and cell["n_facts"] == n and cell["error"] is None
            assert cell["train_tokens"] > 0 and cell["train_seconds"] > 0 and cell["final_loss"] > 0
            assert cell["lora_params"] > 0 and cell["alpha"] == 2.0 * r
            assert 0.0 <= cell["exact_match"] <= 1.0 and cell["steps"] == len(cell["losses"])
            rows = read_jsonl(out / "cells" / f"r{r}-n{n}.predictions.jsonl")
            assert [x["question"] for x in rows] == [f.question for f in generate_facts(n, seed=0)]
    assert json.loads((out / "cells" / "r2-n2.json").read_text())["lora_params"] == \
        2 * json.loads((out / "cells" / "r1-n2.json").read_text())["lora_params"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(results_file.read_text())
    assert saved["grid"] == {"ranks": [1, 2], "facts": [2, 4]} and len(saved["cells"]) == 4
    assert saved["settings"]["lr"] == 2e-3 and saved["settings"]["preset"] == "cpu"
    assert saved["versions"]["torch"] and saved["device"] and saved["dtype"] == "float32"
    assert saved["base_by_facts"]["4"]["n"] == 4 and set(saved["capacity"]) == {"1", "2"}
    assert "losses" not in saved["cells"][0]
    table = (out / "table.md").read_text()
    assert table.startswith("| exact-match recall (%) | 2 facts | 4 facts |") and "| r=2 |" in table
    assert results["table"] == table.strip()
    if _has_matplotlib():
        assert (out / "capacity.png").stat().st_size > 1000
        assert results_file.with_suffix(".png").is_file()

    # Resume: nothing left to train; one cell removed is trained again, alone.
    calls = []
    real_train = capacity.train_lora

    def counting_train(*a, **k):
        calls.append(1)
        return real_train(*a, **k)

    monkeypatch.setattr(capacity, "train_lora", counting_train)
    again = run(ckpt, out)
    assert calls == [] and again["cells"] == saved["cells"]
    (out / "cells" / "r2-n4.json").unlink()
    again = run(ckpt, out)
    assert len(calls) == 1
    redone = {(c["rank"], c["n_facts"]): c for c in again["cells"]}[(2, 4)]
    old = {(c["rank"], c["n_facts"]): c for c in saved["cells"]}[(2, 4)]
    assert redone["final_loss"] == pytest.approx(old["final_loss"], rel=1e-5)  # same seeded init and order
    # The grid may grow under the same settings.
    grown = run(ckpt, out, "--ranks", "1,2,3")
    assert len(calls) == 3 and grown["grid"]["ranks"] == [1, 2, 3]

    with pytest.raises(capacity.RunConfigMismatch, match="lr: saved 0.002 vs now 0.001"):
        run(ckpt, out, "--lr", "1e-3")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "0,4"], "--ranks: every value must be >= 1, got 0"),
    (["--facts", "10,x"], "--facts: 'x' is not an integer"),
    (["--facts", "-5"], "--facts: every value must be >= 1, got -5"),
    (["--preset", "tpu"], "unknown preset 'tpu' (choose from cpu, gpu)"),
    (["--attributes", "eye_colour"], "unknown attribute(s) eye_colour"),
    (["--train-format", "prose"], "unknown --train-format 'prose'"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    (["--lr", "0"], "--lr: must be a finite number in (0, 3.40282e+38], got 0"),
    (["--answer-mode", "recite"], "--answer-mode recite applies to --facts-as conversation"),
    (["--facts-as", "conversation", "--train-format", "text+queries", "--answer-mode", "recite"],
     "--answer-mode recite needs an adapter trained to recite (a --train-format with recite, got 'text+queries')"),
])
def test_cli_reports_bad_input_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.capacity", *argv])
    with pytest.raises(SystemExit) as e:
        capacity.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_reports_a_settings_mismatch_in_one_line(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    capacity.main(["--model", str(ckpt), "--out", str(out), "--quiet", "--ranks", "1", "--facts", "1",
                   "--epochs", "1", "--min-steps", "0", "--no-base", "--max-new-tokens", "2"])
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["bench.capacity", "--model", str(ckpt), "--out", str(out), "--quiet",
                                      "--ranks", "1", "--facts", "1", "--epochs", "2", "--min-steps", "0",
                                      "--no-base", "--max-new-tokens", "2"])
    with pytest.raises(SystemExit) as e:
        capacity.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "(epochs: saved 1 vs now 2)" in err and str(out) in err


def test_cli_names_a_corrupt_cell_file_before_loading_the_model(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--out", str(out), "--quiet", "--ranks", "1", "--facts", "1,2", "--epochs", "1",
            "--min-steps", "0", "--no-base", "--max-new-tokens", "2"]
    capacity.main(argv)
    capsys.readouterr()
    cell = out / "cells" / "r1-n1.json"
    cell.write_text('{"rank": 1,')
    (out / "cells" / "r1-n2.json").unlink()  # a cell left to do: nothing may train before the error
    monkeypatch.setattr(capacity, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sys, "argv", ["bench.capacity", *argv])
    with pytest.raises(SystemExit) as e:
        capacity.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"{cell}: malformed JSON" in err
    assert cell.read_text() == '{"rank": 1,' and not (out / "cells" / "r1-n2.json").exists()


def test_remove_lora_restores_the_base_model(ckpt):
    from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules

    lm = load_model(str(ckpt), device="cpu")
    x = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        before = lm.model(x)
        inject_lora(lm.model, LoRAConfig(rank=2))
        for m in lora_modules(lm.model).values():
            m.lora_B.normal_()
        assert not torch.equal(lm.model(x), before)
        capacity.remove_lora(lm.model)
        assert not lora_modules(lm.model)
        assert torch.equal(lm.model(x), before)
    inject_lora(lm.model, LoRAConfig(rank=4))  # and another rank goes in
    assert all(m.rank == 4 for m in lora_modules(lm.model).values())


# -- memorisation ----------------------------------------------------------------------------

def test_training_writes_facts_the_base_model_does_not_know(sharp_ckpt, tmp_path):
    """Three invented birth dates, one adapter trained long enough: recalled exactly, which the base is not."""
    results = capacity.main(["--model", str(sharp_ckpt), "--out", str(tmp_path / "mem"), "--quiet",
                             "--ranks", "8", "--facts", "3", "--attributes", "birth_date", "--epochs", "1",
                             "--min-steps", "200", "--lr", "3e-3", "--batch-size", "1", "--max-new-tokens", "24"])
    cell = results["cells"][0]
    assert results["base_by_facts"]["3"]["exact_match"] == 0.0
    assert cell["exact_match"] == 1.0, cell
    assert cell["epochs_loss"][-1] < 0.01 * cell["epochs_loss"][0]


def test_shared_prefix_trains_the_same_cell_for_fewer_positions(ckpt, tmp_path):
    """--share-prefix (the default) computes what every window of a micro-batch opens with once: the same losses
    up to rounding, the same windows' tokens, fewer positions computed; --no-share-prefix computes them all."""
    cells = {}
    for flag in ("--share-prefix", "--no-share-prefix"):
        results = capacity.main(["--model", str(ckpt), "--out", str(tmp_path / flag), "--quiet", "--ranks", "2",
                                 "--facts", "8", "--attributes", "birth_date", "--epochs", "2", "--min-steps", "0",
                                 "--batch-size", "4", "--seq-len", "128", "--max-new-tokens", "4", "--no-base", flag])
        (cells[flag],) = results["cells"]
    shared, unshared = cells["--share-prefix"], cells["--no-share-prefix"]
    assert shared["train_tokens"] == unshared["train_tokens"] == unshared["train_tokens_computed"]
    assert shared["train_tokens_computed"] < 0.9 * shared["train_tokens"]
    assert shared["steps"] == unshared["steps"] == 4
    assert shared["epochs_loss"] == pytest.approx(unshared["epochs_loss"], rel=1e-4)
    assert shared["final_loss"] == pytest.approx(unshared["final_loss"], rel=1e-4)


def test_facts_as_a_conversation_are_said_by_their_people_and_asked_as_locomo_asks(ckpt, tmp_path):
    """--facts-as conversation: the facts become first-person turns, a memory recipe builds the training data
    from that conversation alone, and every fact is asked with LoCoMo's instruction (not a training template)."""
    from lora_mem.lora_core.memory import QUESTION_TEMPLATE as LOCOMO_TEMPLATE
    from lora_mem.lora_core.queries import coverage_queries

    facts = generate_facts(6)
    conv = capacity.facts_conversation(facts)
    said = [t for s in conv.sessions for t in s.turns]
    assert [t.speaker for t in said] == [f.subject for f in facts]
    assert all(f.answer in t.text for f, t in zip(facts, said))
    asked = {q.question for q in coverage_queries(conv, phrasings=2)}
    assert f"When was {facts[0].subject} born?" in asked and f"Where is {facts[1].subject} from?" in asked
    assert not asked & {f.question for f in facts if f.attribute != "birth_date"}  # other forms than it is asked in
    results = run(ckpt, tmp_path / "conv", "--facts-as", "conversation", "--train-format", "text+queries",
                  "--ranks", "2", "--facts", "3", "--seq-len", "128")
    assert results["settings"]["facts_as"] == "conversation" and results["question_template"] == LOCOMO_TEMPLATE
    cell = results["cells"][0]
    assert cell["error"] is None and cell["windows"] >= 2 and cell["n_facts"] == 3
    rows = read_jsonl(tmp_path / "conv" / "cells" / "r2-n3.predictions.jsonl")
    assert [r["question"] for r in rows] == [f.question for f in facts[:3]]


def test_recite_then_answer_cells_keep_the_recitation_and_resume_older_runs(ckpt, tmp_path):
    """--answer-mode recite: each fact is answered by the base model reading what the adapter recited for it (the
    predictions keep the recitation); a run directory written before --answer-mode existed resumes as direct."""
    from lora_mem.lora_core.memory import RECITED_CONTEXT, AnswerConfig, recite_then_answer

    out = tmp_path / "recite"
    results = run(ckpt, out, "--facts-as", "conversation", "--train-format", "text+recite", "--answer-mode", "recite",
                  "--ranks", "1", "--facts", "3", "--no-base")
    assert results["settings"]["answer_mode"] == "recite" and results["cells"][0]["error"] is None
    rows = read_jsonl(out / "cells" / "r1-n3.predictions.jsonl")
    facts = generate_facts(3)
    assert [r["question"] for r in rows] == [f.question for f in facts]
    # The same adapter, retrained from the same seed, recites and answers the same way outside the benchmark.
    lm = load_model(ckpt)
    args = capacity.parse_args(["--model", str(ckpt), "--facts-as", "conversation", "--train-format", "text+recite",
                                "--answer-mode", "recite", "--ranks", "1", "--facts", "3", "--epochs", "1",
                                "--min-steps", "0", "--seq-len", "128", "--max-new-tokens", "6", "--quiet"])
    capacity.inject_lora(lm.model, capacity.lora_config(args, 1))
    capacity.run_cell(lm, facts, 1, args, tmp_path / "again")
    cfg = AnswerConfig(question_template=args.question_template, max_new_tokens=6, batch_size=args.answer_batch_size,
                       mode="recite")
    answers, recitations, prompts = recite_then_answer(lm, [f.question for f in facts], cfg)
    assert [r["recitation"] for r in rows] == recitations and [r["prediction"] for r in rows] == answers
    stored = sum(capacity.normalize(f.answer) in capacity.normalize(r) for f, r in zip(facts, recitations)) / 3
    assert results["cells"][0]["recitation_contains"] == stored
    assert all(RECITED_CONTEXT.format(recitation=r).strip() in lm.tokenizer.decode(p)
               for r, p in zip(recitations, prompts))

    direct = tmp_path / "direct"
    run(ckpt, direct, "--ranks", "1", "--facts", "2", "--no-base")
    config = json.loads((direct / "run_config.json").read_text())
    del config["answer_mode"]
    (direct / "run_config.json").write_text(json.dumps(config))
    assert len(run(ckpt, direct, "--ranks", "1", "--facts", "2", "--no-base")["cells"]) == 1
    with pytest.raises(capacity.RunConfigMismatch, match="answer_mode: saved 'direct' vs now 'recite'"):
        run(ckpt, direct, "--ranks", "1", "--facts", "2", "--no-base", "--facts-as", "conversation",
            "--train-format", "text+recite", "--answer-mode", "recite")


def test_facts_as_a_conversation_with_the_parser_built_questions(ckpt, tmp_path, monkeypatch):
    """--queries-from parser: the cell trains the parser's questions of the facts' turns, and records the setting
    (an older run directory, which has no such setting, resumes as rules)."""
    pytest.importorskip("spacy")
    import lora_mem.lora_core.recipes as recipes

    trained = []
    real = recipes.chat_qa_windows
    monkeypatch.setattr(recipes, "chat_qa_windows", lambda pairs, *a: trained.extend(pairs) or real(pairs, *a))
    facts = generate_facts(3)
    results = run(ckpt, tmp_path / "parser", "--facts-as", "conversation", "--train-format", "queries",
                  "--queries-from", "parser", "--query-phrasings", "2", "--ranks", "2", "--facts", "3",
                  "--seq-len", "128")
    assert results["settings"]["queries_from"] == "parser" and results["settings"]["query_phrasings"] == 2
    asked = {(p.question, p.answer) for p in trained}
    assert (f"When was {facts[0].subject} born?", facts[0].answer) in asked
    assert (f"Where is {facts[1].subject} from?", facts[1].answer) in asked
    assert (f"What is {facts[2].subject}'s job?", facts[2].answer) in asked  # "I work as a ...": the second wording
