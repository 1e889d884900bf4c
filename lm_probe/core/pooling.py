"""Pooling: from a site's token activations to one row per example.

Every function takes the activations ``hidden`` of shape ``(batch, tokens, hidden)``
and the attention mask ``(batch, tokens)`` (1 for real tokens, 0 for padding) and
returns ``(batch, hidden)`` float32. Padding never enters a result, whichever side it
is on, so a padded example pools to the same vector as the example run alone.
Padding positions are masked with ``torch.where`` rather than multiplied by zero, as
some attention kernels leave NaN in fully masked (padding) rows.

``"none"`` keeps every real token as its own row: ``(n_real_tokens, hidden)``, in
row-major order (example by example, left to right).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["POOLINGS", "pool", "check_pool"]

Tensor = torch.Tensor


def _mean(hidden: Tensor, mask: Tensor) -> Tensor:
    keep = mask.bool().unsqueeze(-1)
    total = torch.where(keep, hidden, 0.0).sum(1)
    return total / mask.sum(1, keepdim=True).clamp(min=1).to(total.dtype)


def _last(hidden: Tensor, mask: Tensor) -> Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device)
    index = torch.where(mask.bool(), positions, -1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _first(hidden: Tensor, mask: Tensor) -> Tensor:
    index = mask.bool().int().argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _max(hidden: Tensor, mask: Tensor) -> Tensor:
    keep = mask.bool().unsqueeze(-1)
    return torch.where(keep, hidden, float("-inf")).amax(1)


def _none(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden[mask.bool()]


POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean": _mean,
    "last": _last,
    "first": _first,
    "max": _max,
    "none": _none,
}


def check_pool(name: str) -> str:
    """Return ``name`` if it is a known pooling, else raise a ValueError listing them."""
    if name not in POOLINGS:
        raise ValueError(f"unknown pool {name!r}; choose one of {sorted(POOLINGS)}")
    return name


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """Pool token activations with the attention mask.

    Args:
        hidden: ``(batch, tokens, hidden)`` activations, any float dtype.
        mask: ``(batch, tokens)`` attention mask.
        how: ``"mean"``, ``"last"`` (last real token), ``"first"`` (first real token),
            ``"max"`` (per feature over real tokens) or ``"none"`` (every real token).

    Returns:
        float32 ``(batch, hidden)``, or ``(n_real_tokens, hidden)`` for ``"none"``.
    """
    if hidden.dim() != 3:
        raise ValueError(
            f"pooling needs (batch, tokens, hidden) activations, got shape {tuple(hidden.shape)}"
        )
    if how in ("last", "first"):  # a row selection: convert only the chosen rows (logits can be huge)
        return POOLINGS[how](hidden, mask.to(hidden.device)).float()
    return POOLINGS[check_pool(how)](hidden.float(), mask.to(hidden.device))
