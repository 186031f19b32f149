import importlib
import sys

import pytest
from trl.experimental.gkd import GKDConfig, GKDTrainer

import trl_mgsr
from trl_mgsr import MGSRConfig, MGSRTrainer


def test_public_classes_subclass_gkd():
    assert issubclass(MGSRConfig, GKDConfig)
    assert issubclass(MGSRTrainer, GKDTrainer)


def test_missing_gkd_gives_one_clear_import_error(monkeypatch):
    # Simulate a TRL without `trl.experimental.gkd` (None in sys.modules makes the import fail).
    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)
    monkeypatch.delitem(sys.modules, "trl_mgsr._trl")
    with pytest.raises(ImportError, match=r"trl_mgsr needs TRL >=1\.16,<2.*pip install"):
        importlib.import_module("trl_mgsr._trl")
    monkeypatch.undo()
    importlib.import_module("trl_mgsr._trl")


def test_model_card_metadata_names_mgsr():
    assert MGSRTrainer._name == "MGSR"
    assert "mgsr" in MGSRTrainer._tag_names and "trl" in MGSRTrainer._tag_names
    assert MGSRTrainer._paper["id"] == "2407.10068"
    assert "Multi-Granularity Semantic Revision" in MGSRTrainer._paper["citation"]
    assert trl_mgsr.__version__


def test_matplotlib_is_a_core_dependency_so_the_quickstart_demo_writes_its_png():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("matplotlib") for dep in project["dependencies"])
