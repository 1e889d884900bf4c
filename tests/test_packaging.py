"""The repo's own promises: pixi and pyproject agree, CI runs the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pixi():
    return tomllib.loads((ROOT / "pixi.toml").read_text())


def _as_map(requirements):
    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in requirements}


def test_pixi_declares_the_pyproject_dependencies():
    py = _pyproject()["project"]
    pixi = _pixi()
    deps = {k.lower(): v for k, v in pixi["pypi-dependencies"].items() if k != "lm_probe"}
    assert {k: str(Requirement(f"{k}{v}").specifier) for k, v in deps.items()} == _as_map(py["dependencies"])
    dev = pixi["feature"]["dev"]["pypi-dependencies"]
    assert {k: str(Requirement(f"{k}{v}").specifier) for k, v in dev.items()} == _as_map(
        py["optional-dependencies"]["dev"])


def test_pixi_tasks():
    tasks = _pixi()["tasks"]
    assert tasks["test"] == "pytest"
    assert "demo" in tasks


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in readme_commands() if c.endswith("pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    assert "pip install torch==2.13.0" in test_command.split("&&")[2]
