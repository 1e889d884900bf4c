"""``import lm_probe`` stays cheap (issue 16): the public names load from their modules at
first use, so the heavy dependencies are imported by what needs them, not by the package."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lm_probe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "transformers.trainer", "transformers.trainer_callback", "nnsight", "sklearn",
         "scipy", "pandas", "datasets", "matplotlib")


def fresh(code: str) -> object:
    """Run ``code`` in a new interpreter on this checkout; it prints one JSON value."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_import_lm_probe_loads_no_heavy_module():
    loaded = fresh(f"import json, sys, lm_probe; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert loaded == []


def test_reading_experiment_files_loads_no_diffusion_code():
    """The CLI builds its help from lm_probe.app.experiment: no k-NN graph code for that."""
    loaded = fresh("import json, sys, lm_probe.app.experiment; print(json.dumps([m for m in "
                   "('lm_probe.functional.diffusion', 'sklearn.neighbors', 'sklearn.decomposition') "
                   "if m in sys.modules]))")
    assert loaded == []


def test_the_public_names_and_submodules_resolve_after_a_plain_import():
    """Everything in __all__ (runner, probes, gauges...) loads without transformers.Trainer, and
    the submodules are attributes of the package, as when the package imported them itself."""
    seen = fresh("import json, sys, lm_probe\n"
                 "names = [n for n in lm_probe.__all__ if getattr(lm_probe, n) is not None]\n"
                 "trainer = 'transformers.trainer' in sys.modules\n"
                 "subs = [lm_probe.integrations.GaugeCallback.__name__, lm_probe.embedded.rotten_tomatoes.__name__,"
                 " lm_probe.architectures.sites.__name__]\n"
                 "print(json.dumps([sorted(names), trainer, subs, sorted(set(lm_probe.__all__) - set(dir(lm_probe))),"
                 " 'integrations' in dir(lm_probe)]))")
    assert seen == [sorted(lm_probe.__all__), False, ["GaugeCallback", "rotten_tomatoes", "sites"], [], True]


def test_each_public_name_is_the_object_of_its_module():
    for name, module in lm_probe._EXPORTS.items():
        assert getattr(lm_probe, name) is getattr(importlib.import_module(f"lm_probe.{module}"), name), name
    assert lm_probe.IGNORE == -100 and lm_probe.LinearProbe is lm_probe.Probe
    with pytest.raises(AttributeError, match="module 'lm_probe' has no attribute 'no_such_name'"):
        lm_probe.no_such_name


def test_the_type_checking_imports_are_the_lazy_names():
    """The ``if TYPE_CHECKING`` block (for editors) names each export from its module."""
    tree = ast.parse((ROOT / "lm_probe" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                 "TYPE_CHECKING")
    imported = {alias.name: node.module for node in block.body for alias in node.names}
    assert imported == lm_probe._EXPORTS
