"""The one helper that checks optional dependencies (lora_mem.deps) and the one cache home (lora_mem.home)."""

from pathlib import Path

import pytest

from lora_mem.deps import MissingDependency, missing_modules, require
from lora_mem.home import CACHE_KINDS, cache_dir, home


def test_require_names_the_missing_module_and_the_extra():
    require("json", "pytest", extra="test", needed_for="nothing")  # present: no error
    with pytest.raises(MissingDependency) as e:
        require("json", "no_such_module_xyz", extra="rag", needed_for="--method rag")
    message = str(e.value)
    assert message == ('--method rag needs no_such_module_xyz, which is not installed: pip install -e ".[rag]" '
                       "(or: pip install no_such_module_xyz)")


def test_require_uses_pip_names_and_counts():
    with pytest.raises(MissingDependency, match=r"needs nope_a, nope_b, which are not installed: .*\[facts\].*"
                                                r"pip install nope-a-wheel==1.0 nope_b\)"):
        require("nope_a", "nope_b", extra="facts", needed_for="the facts recipe",
                packages={"nope_a": "nope-a-wheel==1.0"})


def test_missing_modules_looks_without_importing():
    assert missing_modules("json", "no_such_module_xyz", "no_such_parent.child") == ["no_such_module_xyz",
                                                                                      "no_such_parent.child"]


def test_home_is_lora_mem_home_or_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_MEM_HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h" and cache_dir("teacher") == tmp_path / "h" / "teacher"
    monkeypatch.delenv("LORA_MEM_HOME")
    assert home() == Path.home() / ".cache" / "lora-mem"
    assert set(CACHE_KINDS) >= {"models", "teacher", "generated-qa", "questions", "data"}
    with pytest.raises(ValueError, match="unknown cache 'weights'"):
        cache_dir("weights")
