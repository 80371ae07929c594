"""An option that needs an optional package it cannot find stops while its arguments are parsed, before any model
loads or file is written, with one line naming the extra to install (lora_mem.deps, lora_mem.cli.Parser.require)."""

import importlib.util

import pytest

REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def without(monkeypatch):
    """Make the named top-level packages look uninstalled to lora_mem.deps."""

    def hide(*names):
        def find_spec(name, *args, **kwargs):
            return None if name.split(".")[0] in names else REAL_FIND_SPEC(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return hide


def one_error_line(capsys, run) -> str:
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("method", ["rag", "lora+rag"])
def test_locomo_retrieval_without_bm25s(without, capsys, tmp_path, method):
    from bench import locomo

    without("bm25s")
    out = tmp_path / "run"
    line = one_error_line(capsys, lambda: locomo.main(["--method", method, "--out", str(out)]))
    assert f"--method {method} needs bm25s, which is not installed" in line and 'pip install -e ".[rag]"' in line
    assert not out.exists()


def test_locomo_without_retrieval_needs_no_bm25s(without):
    from bench import locomo

    without("bm25s")
    _, config = locomo.parse_args(["--method", "base"])
    assert config.method == "base"


def test_retriever_itself_names_the_extra(without):
    from bench.context import BM25Retriever
    from bench.locomo_data import load_locomo
    from lora_mem.deps import MissingDependency
    from tests.test_command import LOCOMO

    without("bm25s")
    with pytest.raises(MissingDependency, match=r"retrieval \(BM25\) needs bm25s.*\[rag\]"):
        BM25Retriever(load_locomo(LOCOMO)[0])


def test_plots_without_matplotlib(without, capsys, tmp_path):
    from bench import capacity
    from bench.analysis import capacity_combine, report

    without("matplotlib")
    line = one_error_line(capsys, lambda: capacity.parse_args(["--out", str(tmp_path / "cap")]))
    assert "the capacity plot (or --no-plot) needs matplotlib" in line and '".[plot]"' in line
    assert capacity.parse_args(["--out", str(tmp_path / "cap"), "--no-plot"]).no_plot
    line = one_error_line(capsys, lambda: report.main(["runs/x", "--out", str(tmp_path / "r")]))
    assert "needs matplotlib" in line
    line = one_error_line(capsys, lambda: capacity_combine.main(["a.json", "--out", str(tmp_path / "c")]))
    assert "needs matplotlib" in line
    assert not list(tmp_path.iterdir())


def test_require_sees_what_is_installed():
    """The checks above hide packages that this environment has: the test extra installs both."""
    assert REAL_FIND_SPEC("bm25s") is not None and REAL_FIND_SPEC("matplotlib") is not None
