"""The lora-mem command (lora_mem.command) on the tiny model: write, ask and info; one error line, exit status 2 and
nothing written for each kind of bad input; and the console script, installed with pip in a fresh environment."""

import io
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import lora_mem
from lora_mem import command
from lora_mem.files import file_sha256
from lora_mem.lora_core import memory as memory_api
from lora_mem.lora_core.memory_folder import MANIFEST_NAME
from tests.tiny_models import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
CHAT = FIXTURES / "chat_small.jsonl"
LOCOMO = FIXTURES / "locomo_tiny.json"
QUESTIONS = ["What did Ana adopt?", "When did Ben start pottery classes?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d


def write_args(ckpt, chat, out, *extra):
    return ["write", str(chat), "--out", str(out), "--model", str(ckpt), "--seq-len", "64", "--rank", "4",
            "--epochs", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def memory_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem") / "ana"
    assert command.main(write_args(ckpt, CHAT, out)) == out
    return out


def run(monkeypatch, capsys, argv, stdin: str | None = None):
    """(exit status, stdout, stderr) of the command."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        command.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------------------
# write, ask, info
# ----------------------------------------------------------------------------------------------------------------


def test_write_makes_a_memory_folder(memory_dir, ckpt):
    folder = lora_mem.read_memory_folder(memory_dir)
    m = folder.manifest
    assert m.speakers == ["Ana", "Ben"] and len(m.sessions) == 2 and m.base_model == str(ckpt.resolve())
    config = m.memory_config
    assert config.recipe.train_format == command.WRITE_CONFIG.recipe.train_format == "text+queries"
    assert (config.lora.rank, config.lora.alpha, config.train.epochs, config.recipe.seq_len) == (4, 8.0, 1, 64)
    assert m.sources[0].sha256 == file_sha256(CHAT)


def test_ask_answers_from_the_memory(memory_dir, ckpt, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, ["ask", str(memory_dir), *QUESTIONS, "--quiet"])
    memory = lora_mem.open_memory(lora_mem.read_memory_folder(memory_dir), lora_mem.load_model(str(ckpt)))
    expected = memory.answer(QUESTIONS)
    assert code == 0 and out == "\n".join(expected) + "\n"


def test_ask_interactive_reads_questions_until_an_empty_line(memory_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n\nnot asked\n"))
    answers = command.main(["ask", str(memory_dir), "--interactive", "--quiet"])
    out = capsys.readouterr().out
    assert len(answers) == 2 and out.count("> ") == 3  # two questions, then the empty line that ends it
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTIONS[0]))  # end of input ends it too
    assert command.main(["ask", str(memory_dir), "--interactive", "--quiet"]) == answers[:1]


def test_info_says_what_the_memory_holds(memory_dir, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, ["info", str(memory_dir)])
    assert code == 0
    assert "speakers    Ana, Ben" in out
    assert "sessions    2, 8 turns (9:15 am on 2 March, 2024 to 6:02 pm on 9 March, 2024)" in out
    assert "recipe      text+queries" in out and "LoRA r=4, alpha 8" in out
    assert f"sha256 {file_sha256(CHAT)}" in out and str(CHAT.resolve()) in out
    code, out, _ = run(monkeypatch, capsys, ["info", str(memory_dir), "--json"])
    assert json.loads(out) == json.loads((memory_dir / MANIFEST_NAME).read_text())


def test_write_a_locomo_conversation_by_session_gap(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny-2"
    code, stdout, _ = run(monkeypatch, capsys, write_args(ckpt, LOCOMO, out, "--conversation", "tiny-2"))
    assert code == 0 and stdout.startswith(f"wrote {out}: ")
    m = lora_mem.read_memory_folder(out).manifest
    assert m.sample_id == "tiny-2" and m.sources[0].layout == "locomo"
    gap = tmp_path / "gap"
    run(monkeypatch, capsys, write_args(ckpt, CHAT, gap, "--session-gap", "200"))
    assert len(lora_mem.read_memory_folder(gap).manifest.sessions) == 1  # a week apart: one session of 8 turns


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written
# ----------------------------------------------------------------------------------------------------------------


def bad_chat(tmp_path, text, name="chat.jsonl"):
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


GOOD = '{"speaker": "Ana", "text": "hi there", "time": "2024-03-02T09:00"}\n'
BAD_WRITES = [
    ("missing file", lambda t: (t / "nope.jsonl", []), "nope.jsonl: no such file"),
    ("malformed line", lambda t: (bad_chat(t, GOOD + '{"speaker": "Ben",\n'), []), "chat.jsonl: line 2: malformed JSON"),
    ("missing field", lambda t: (bad_chat(t, GOOD + '{"speaker": "Ben", "text": "yo"}\n'), []),
     "chat.jsonl: line 2: missing field 'time'"),
    ("bad time", lambda t: (bad_chat(t, GOOD + '{"speaker": "Ben", "text": "yo", "time": "soon"}\n'), []),
     "chat.jsonl: line 2: field 'time': unreadable time 'soon'"),
    ("one speaker", lambda t: (bad_chat(t, GOOD), []), "a chat needs two speakers, found 1"),
    ("locomo, none chosen", lambda t: (LOCOMO, []), "holds 2 conversations (tiny-1, tiny-2): name one"),
    ("locomo, unknown", lambda t: (LOCOMO, ["--conversation", "conv-1"]), "no conversation 'conv-1'"),
    ("recipe", lambda t: (CHAT, ["--recipe", "text+facts"]), "argument --recipe: parts joined by '+'"),
    ("rank", lambda t: (CHAT, ["--rank", "0"]), "argument --rank: must be an integer >= 1, got 0"),
    ("gap", lambda t: (CHAT, ["--session-gap", "0"]), "argument --session-gap: must be a finite number in (0, 3.40282e+38], got 0"),
    ("seq-len", lambda t: (CHAT, ["--seq-len", "8"]), "argument --seq-len: must be an integer >= 16"),
]


def assert_one_error_line(code, out, err, needle, status=2):
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert out == ""


@pytest.mark.parametrize("case, make, needle", BAD_WRITES, ids=[c[0] for c in BAD_WRITES])
def test_bad_write_input(ckpt, tmp_path, monkeypatch, capsys, case, make, needle):
    chat, extra = make(tmp_path)
    out = tmp_path / "mem"
    code, stdout, err = run(monkeypatch, capsys, write_args(ckpt, chat, out, *extra))
    assert_one_error_line(code, stdout, err, needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) in (["in"], [])


def test_write_refuses_a_folder_that_holds_something(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mem"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run(monkeypatch, capsys, write_args(ckpt, CHAT, out))
    assert_one_error_line(code, stdout, err, f"--out {out}: already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_write_refuses_a_model_that_is_not_there(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mem"
    code, stdout, err = run(monkeypatch, capsys, write_args(tmp_path / "no-model", CHAT, out))
    assert_one_error_line(code, stdout, err, "--model")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_write_refuses_cuda_without_a_gpu(ckpt, tmp_path, monkeypatch, capsys):
    code, stdout, err = run(monkeypatch, capsys, write_args(ckpt, CHAT, tmp_path / "m", "--device", "cuda"))
    assert_one_error_line(code, stdout, err, "argument --device: cuda: no CUDA device on this machine")


def test_failed_training_writes_nothing(ckpt, tmp_path, monkeypatch, capsys):
    real = memory_api.train_lora

    def diverge(*args, **kwargs):
        result = real(*args, **kwargs)
        result.error = "non-finite loss at step 1"
        return result

    monkeypatch.setattr(memory_api, "train_lora", diverge)
    out = tmp_path / "mem"
    code, stdout, err = run(monkeypatch, capsys, write_args(ckpt, CHAT, out))
    assert_one_error_line(code, stdout, err, "non-finite loss at step 1; nothing was written", status=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_ask_and_info_input(memory_dir, tmp_path, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, ["ask", str(tmp_path / "none"), "q?"])
    assert_one_error_line(code, out, err, "none: no such memory folder")
    code, out, err = run(monkeypatch, capsys, ["ask", str(memory_dir)])
    assert_one_error_line(code, out, err, "ask: give a QUESTION or --interactive")
    code, out, err = run(monkeypatch, capsys, ["ask", str(memory_dir), " "])
    assert_one_error_line(code, out, err, "ask: a QUESTION is empty")
    code, out, err = run(monkeypatch, capsys, ["info", str(tmp_path)])
    assert_one_error_line(code, out, err, "manifest.json: missing (a memory folder holds manifest.json")


def test_memory_whose_base_model_is_gone(memory_dir, tmp_path, monkeypatch, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(memory_dir, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["base_model"] = str(tmp_path / "moved-model")
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, out, err = run(monkeypatch, capsys, ["ask", str(copy), "q?"])
    assert_one_error_line(code, out, err, f"the base model of {copy / MANIFEST_NAME}: {tmp_path / 'moved-model'}")


def test_broken_memory_is_refused_before_the_model_loads(memory_dir, tmp_path, monkeypatch, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(memory_dir, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["config"]["lora"]["rank"] = "four"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    monkeypatch.setattr(command, "load", lambda *a: pytest.fail("the model was loaded"))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    code, out, err = run(monkeypatch, capsys, ["ask", str(copy), "q?"])
    assert_one_error_line(code, out, err, "manifest.json: field 'config'")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------------------------------
# --help: each option's help and default, once
# ----------------------------------------------------------------------------------------------------------------


def subparsers():
    ap = command.build_parser()
    (sub,) = [a for a in ap._actions if a.dest == "command"]
    return sub.choices


@pytest.mark.parametrize("name", ["write", "ask", "info"])
def test_every_option_has_help_and_its_default_once(name):
    parser = subparsers()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        assert action.help, action.dest
        if action.option_strings and action.default not in (None, False) and action.dest != "help":
            assert f"(default: {action.default})" in text or "default" in action.help, action.dest
    assert text.count("(default: 8)") == (name == "write")  # --rank's
    assert "None" not in text
    if name == "write":
        assert "(default: a new session each calendar day)" in text


# ----------------------------------------------------------------------------------------------------------------
# The console script, installed with pip into a fresh environment
# ----------------------------------------------------------------------------------------------------------------


def test_console_script_from_a_fresh_install(ckpt, tmp_path):
    """`pip install -e .` in a new virtual environment puts `lora-mem` on its PATH; write then ask works with it.
    The new environment borrows this one's installed packages (torch, ...) through a path file, so no network is
    needed, but lora-mem itself and its entry point come only from the install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps",
                              "--no-build-isolation", "-e", str(REPO)], env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    script = venv / "bin" / "lora-mem"
    assert script.is_file()
    mem = tmp_path / "MEM"
    elsewhere = tmp_path / "cwd"  # not the checkout: lora_mem is imported from the install
    elsewhere.mkdir()
    written = subprocess.run([script, *write_args(ckpt, CHAT, mem)], cwd=elsewhere, env=env, capture_output=True,
                             text=True)
    assert written.returncode == 0, written.stderr
    asked = subprocess.run([script, "ask", str(mem), QUESTIONS[0], "--quiet"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert asked.returncode == 0 and asked.stdout.count("\n") == 1, asked.stderr
    where = subprocess.run([venv / "bin" / "python", "-c", "import lora_mem; print(lora_mem.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True).stdout.strip()
    assert Path(where) == REPO / "lora_mem" / "__init__.py"
    bad = subprocess.run([script, "write", str(tmp_path / "nope.json"), "--out", str(tmp_path / "M2")],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "M2").exists()
