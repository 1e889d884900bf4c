"""Mixture-of-experts routers: where each MoE layer decides which experts a token uses.

A router (Mixtral's ``block_sparse_moe.gate`` in older transformers, ``mlp.gate`` in
transformers 5 for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE) is a linear map from the
token's hidden state to one logit per expert; the layer sends each token to the top-k
experts by softmax probability. A router is found by structure, not by family: a
submodule of a block named ``gate`` (or whose class name ends in ``Router``) that sits
next to an ``experts`` child and holds a 2-D ``weight`` of shape ``(experts, hidden)``.
Shared-expert gates (Qwen2-MoE's ``shared_expert_gate``, one output) are not routers.

Its output (``router_logits`` first, as transformers' ``OutputRecorder`` reads it) has
one row per token of the flattened batch, ``(batch * tokens, experts)``; the trace reads
it as ``(batch, tokens, experts)`` so padding is masked like any other site.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["router_paths", "router_top_k"]


def _is_router(name: str, module: torch.nn.Module, parent: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    named = name == "gate" or type(module).__name__.endswith("Router")
    return (named and hasattr(parent, "experts") and isinstance(weight, torch.Tensor)
            and weight.ndim == 2 and weight.shape[0] > 1)


def router_paths(module: torch.nn.Module, blocks: str) -> dict[int, str]:
    """``{block index: router module path}`` for the blocks of ``blocks`` that route to experts.

    Raises:
        ValueError: no block has a router (the model is not a mixture of experts).
    """
    found: dict[int, str] = {}
    for i, block in enumerate(module.get_submodule(blocks)):
        for path, parent in block.named_modules():
            for name, child in parent.named_children():
                if i not in found and _is_router(name, child, parent):
                    found[i] = f"{blocks}.{i}.{path + '.' if path else ''}{name}"
    if not found:
        raise ValueError(
            f"{type(module).__name__} has no mixture-of-experts router: no block of '{blocks}' holds a 'gate' "
            "(or *Router) module next to an 'experts' module; router sites exist for MoE models such as "
            "Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE"
        )
    return found


def router_top_k(module: torch.nn.Module, router: torch.nn.Module) -> int:
    """Experts per token of ``router``: its ``top_k``, else the config's ``num_experts_per_tok``."""
    config: Any = getattr(module, "config", None)
    k = getattr(router, "top_k", None) or getattr(config, "num_experts_per_tok", None)
    if k is None:
        raise ValueError(f"cannot tell the top-k of router {type(router).__name__}: no top_k attribute and no "
                         "config.num_experts_per_tok; pass top_k=")
    return int(k)
