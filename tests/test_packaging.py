"""The package as a library: a small core (torch and numpy), optional parts behind extras that say how to
install them, and the Hydra configs inside the package (the built wheel runs the CLI: `make wheel-smoke`,
called by .ci/run)."""

import importlib.util
import tomllib
from pathlib import Path

import pytest

import fdiv_align
from fdiv_align.extras import EXTRAS, require

ROOT = Path(fdiv_align.__file__).parent


def test_the_core_needs_torch_and_numpy_only_and_every_extra_is_declared():
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"]) == ["numpy", "torch"]
    assert not any("==" in d for d in project["dependencies"])  # a range: a user's torch stays
    assert set(EXTRAS) <= set(project["optional-dependencies"])
    assert "fdiv_align[" in " ".join(project["optional-dependencies"]["all"])


def test_a_missing_extra_names_the_pip_install_that_adds_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vaderSentiment" else real(name, *a))
    with pytest.raises(ImportError, match=r"task sentiment.*vaderSentiment.*pip install 'fdiv_align\[tasks\]'"):
        from fdiv_align.targets.tasks import get_task

        get_task("sentiment")
    require("train", "the trainer")  # present here: no error
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require("gpu", "x")


def test_the_configs_ship_inside_the_package():
    from fdiv_align.cli import _config_dir

    conf = Path(_config_dir())
    assert conf.parent == ROOT and (conf / "config.yaml").exists()
    groups = {p.parent.name for p in conf.glob("*/*.yaml")}
    assert {"model", "divergence", "task", "trainer", "logger"} <= groups
    package_data = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"conf/*.yaml", "conf/*/*.yaml"} <= set(package_data["fdiv_align"])


def test_a_deprecation_warned_at_our_code_fails_the_suite():
    """pyproject's filterwarnings: FutureWarning/DeprecationWarning attributed to a module of fdiv_align is an
    error in the tests; one attributed to another package is not."""
    import warnings

    with pytest.raises(FutureWarning):
        warnings.warn_explicit("a deprecated argument", FutureWarning, "policy.py", 1, module="fdiv_align.lm.policy")
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("a deprecated call", DeprecationWarning, "cli.py", 1, module="fdiv_align.cli")
    with warnings.catch_warnings(record=True) as caught:  # the suite's filters, not an error
        warnings.warn_explicit("theirs", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    assert len(caught) == 1
