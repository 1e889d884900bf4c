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

__all__ = ["load_model"]


def load_model(model: Any, tokenizer: Any = None, **kwargs: Any) -> Any:
    """Wrap or load a model as an nnsight ``TransformersModel`` ready for probing.

    Args:
        model: A Hugging Face hub id, a local folder, a loaded ``transformers`` model
            (then pass ``tokenizer``), or an nnsight model.
        tokenizer: The tokenizer for a loaded model (default: loaded from the model's
            ``name_or_path``).
        **kwargs: Passed to ``TransformersModel`` when loading (``dtype``,
            ``device_map``, ``revision``...).

    Returns:
        The nnsight model, in eval mode, with a pad token set.
    """
    from nnsight import NNsight, TransformersModel

    if isinstance(model, NNsight):
        wrapped = model
    elif isinstance(model, torch.nn.Module):
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
        wrapped = TransformersModel(model, tokenizer=tokenizer)
    elif isinstance(model, (str, Path)):
        source = str(model)
        if Path(source).exists():
            logger.info("loading model from the folder {}", source)
        else:
            logger.info("loading model {!r} from the Hugging Face hub", source)
        wrapped = TransformersModel(source, tokenizer=tokenizer, dispatch=True, **kwargs)
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
