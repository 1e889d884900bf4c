"""Which weights a mask covers, and putting masks on a model and taking them off exactly.

``masked`` names what a subnetwork or circuit probe may prune: module paths, written as
site paths are (``"transformer.h.0.mlp"``, ``"model.layers[-1].mlp.down_proj"``), or a role
and layers, ``("mlp", range(6))`` / ``("attn", [0, 1])`` / ``("block", 3)``, found by the
structural rules of :func:`lm_probe.core.architectures.sites`. A path stands for every
weight matrix (a parameter named ``weight`` with two or more dimensions: linear, GPT-2
``Conv1D`` and embedding layers) at or below it; biases and norm scales are never masked.
A path holding no weight matrix, or a masked module that runs after the site (no mask on it
could change what the site reads), is refused before any forward pass.

Masks are ``torch.nn.utils.parametrize`` parametrizations: registering one moves the
weight to ``parametrizations.weight.original`` untouched and computes ``weight * mask`` on
each access; :func:`parametrized` removes them in a ``finally`` block with
``leave_parametrized=False``, which puts the original parameter object back, so the model
is bit-identical afterwards, whether the block ended normally or with an exception.
Masks nest: on a weight that is already parametrized (inside :func:`ablate`, or a user's own
parametrization) the mask is appended to its list and only that entry is removed afterwards.
:func:`ablate` uses the same machinery to zero a found subnetwork (or everything but it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch.nn.utils import parametrize

from ..core.architectures import _torch_module, describe, sites
from ..core.sites import Site, SiteError, resolve_sites
from .masks import FixedMask

__all__ = ["ROLES", "Masked", "resolve_masked", "check_upstream", "parametrized", "ablate", "frozen", "kept_fraction",
           "check_shapes"]

#: The roles ``masked`` understands, beside module paths.
ROLES = ("mlp", "attn", "block")

Masked = Sequence[Union[str, tuple[str, Any]]]


def _role_paths(module: torch.nn.Module, role: str, layers: Any) -> list[str]:
    """Module paths of one role in the chosen blocks (BERT-style MLPs: ``intermediate`` and ``output``)."""
    if role not in ROLES:
        raise ValueError(f"masked role {role!r} is unknown; use one of {ROLES} with layers, e.g. ('mlp', range(6)), "
                         "or module paths")
    arch = describe(module)
    blocks = [s[: -len(".output")] for s in sites(module, "resid_post", layers)]
    if role == "block":
        return blocks
    if role == "attn":
        return [f"{b}.{arch.attn}" for b in blocks]
    bert_style = arch.mlp != arch.mlp_out and hasattr(module.get_submodule(blocks[0]), "intermediate")
    return [p for b in blocks for p in ([f"{b}.intermediate"] if bert_style else []) + [f"{b}.{arch.mlp}"]]


def _weight_owners(module: torch.nn.Module, path: str) -> list[str]:
    """Paths of the modules at or below ``path`` that hold a weight matrix."""
    root = module.get_submodule(path)
    return [f"{path}.{name}" if name else path for name, sub in root.named_modules()
            if isinstance(sub._parameters.get("weight"), torch.Tensor) and sub._parameters["weight"].dim() >= 2]


def resolve_masked(model: Any, masked: Masked | str | None) -> list[str]:
    """The modules whose ``weight`` a probe masks, checked against the model.

    Args:
        model: An nnsight model or a ``torch.nn.Module``.
        masked: Module paths and ``(role, layers)`` pairs (see the module docstring); a
            single path; ``None`` or ``[]`` for none (plain probing).

    Returns:
        Canonical paths of weight-holding modules, in model order, without repeats.

    Raises:
        SiteError: a path names no module (the message lists the closest ones).
        ValueError: a path holds no weight matrix, or an unknown role.
    """
    module = _torch_module(model)
    if masked is None:
        return []
    items = [masked] if isinstance(masked, str) else list(masked)
    paths: list[str] = []
    for item in items:
        if isinstance(item, str):
            paths.append(resolve_sites(module, [f"{item}.output"])[f"{item}.output"].path)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            paths.extend(_role_paths(module, *item))
        else:
            raise ValueError(f"masked entry {item!r}: give a module path ('transformer.h.0.mlp') or a (role, layers) "
                             f"pair with a role of {ROLES}, e.g. ('mlp', range(6))")
    owners: list[str] = []
    for path in paths:
        found = _weight_owners(module, path)
        if not found:
            kind = type(module.get_submodule(path)).__name__
            raise ValueError(f"masked module {path!r} ({kind}) holds no weight matrix to mask; name a linear, Conv1D "
                             "or embedding layer, or a part of a block holding them (its MLP or attention)")
        owners.extend(found)
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    owners = sorted(dict.fromkeys(owners), key=order.__getitem__)
    _check_untied(module, owners)
    return owners


def _check_untied(module: torch.nn.Module, owners: Sequence[str]) -> None:
    """Refuse two masked modules sharing one weight (GPT-2's ``wte`` and ``lm_head``): their masks would fight."""
    seen: dict[int, str] = {}
    for path in owners:
        first = seen.setdefault(id(module.get_submodule(path)._parameters["weight"]), path)
        if first != path:
            raise ValueError(f"masked modules {first!r} and {path!r} share one weight (tied embeddings); mask only one "
                             "of them")


def check_upstream(model: Any, site: Site, targets: Sequence[str]) -> None:
    """Refuse masked modules that run at or after the site: no mask on them can change what
    it reads, so only the sparsity penalty would reach them and drive them to zero (a
    ``kept_fraction_`` sparser than what the probe needs). Order is the execution rank of
    each module's input against the site's.

    Raises:
        ValueError: quoting the site and the masked modules downstream of it.
    """
    if not targets:
        return
    module = _torch_module(model)
    entries = resolve_sites(module, [f"{t}.input" for t in targets])
    late = [e.path for e in entries.values() if e.rank >= site.rank]
    if len(late) == len(targets):
        raise ValueError(f"site {site.spec!r} is read before the first masked module {late[0]!r} runs, so no mask "
                         "can change it (nothing to learn); mask modules upstream of the site or read a later site")
    if late:
        raise ValueError(f"masked modules {late} run after site {site.spec!r}, so their masks cannot change it and "
                         "the sparsity penalty alone would prune them; mask only modules upstream of the site "
                         "(e.g. layers up to the site's) or read a later site")


@contextmanager
def parametrized(model: Any, masks: Mapping[str, torch.nn.Module]) -> Iterator[torch.nn.Module]:
    """Put ``weight -> mask(weight)`` on each module for the block, then restore the model exactly.

    Args:
        model: An nnsight model or a ``torch.nn.Module``.
        masks: ``{module path: parametrization}`` (e.g. :class:`~lm_probe.circuits.masks.HardConcrete`).

    Yields:
        The underlying ``torch.nn.Module``.
    """
    module = _torch_module(model)
    done: list[tuple[torch.nn.Module, list[str] | None]] = []
    try:
        for path, mask in masks.items():
            owner = module.get_submodule(path)
            # already parametrized (nested ablate, a user's parametrization): append ours, pop only it later
            order = None if parametrize.is_parametrized(owner, "weight") else list(owner._parameters)
            parametrize.register_parametrization(owner, "weight", mask, unsafe=True)
            done.append((owner, order))
        yield module
    finally:
        for owner, order in reversed(done):
            if order is None:
                owner.parametrizations.weight.pop(-1)
                continue
            parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)
            owner._parameters = {name: owner._parameters[name] for name in order}  # the state_dict's key order too


@contextmanager
def ablate(model: Any, mask: Mapping[str, np.ndarray], *, complement: bool = False) -> Iterator[Any]:
    """Zero a subnetwork's weights for the block (the model is restored exactly afterwards).

    Use it to measure what the model, or a probe read from it, does without the subnetwork::

        with ablate(model, probe.mask_):
            print(probe.score(test, use_mask=False)["accuracy"])

    Args:
        model: An nnsight model or a ``torch.nn.Module``.
        mask: ``{module path: boolean array of its weight's shape}``, True for the weights
            of the subnetwork (a probe's ``mask_``).
        complement: Zero every other weight of those modules instead, keeping only the
            subnetwork.

    Yields:
        ``model`` as given.

    Raises:
        ValueError: a mask whose shape is not its module's weight's.
    """
    module = _torch_module(model)
    check_shapes(module, mask)
    fixed = {}
    for path, keep in mask.items():
        keep = torch.as_tensor(np.asarray(keep, bool), device=module.get_submodule(path).weight.device)
        fixed[path] = FixedMask(keep if complement else ~keep)
    with parametrized(module, fixed):
        yield model


def check_shapes(model: Any, mask: Mapping[str, Any]) -> Mapping[str, Any]:
    """Refuse a mask whose shape is not its module's weight's (a mask from another model).

    Returns:
        ``mask``, unchanged.

    Raises:
        ValueError: naming the module and both shapes.
    """
    module = _torch_module(model)
    for path, keep in mask.items():
        weight = module.get_submodule(path).weight
        if tuple(np.shape(keep)) != tuple(weight.shape):
            raise ValueError(f"mask for {path!r} has shape {tuple(np.shape(keep))}, its weight {tuple(weight.shape)}; "
                             "was it found on another model?")
    return mask


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module in eval mode with ``requires_grad`` off for the block; afterwards every
    submodule's train/eval mode and every parameter's flag is put back as it was (also
    after an exception), not only the root's."""
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    modes = {name: m.training for name, m in module.named_modules()}
    try:
        yield module.eval().requires_grad_(False)
    finally:
        for name, m in module.named_modules():
            m.training = modes.get(name, m.training)
        for name, p in module.named_parameters():
            p.requires_grad_(flags[name])


def kept_fraction(keep: Mapping[str, Any]) -> float:
    """Fraction of all masked weights kept, over every module of ``{path: boolean mask}`` (1.0 if none)."""
    total = sum(int(np.prod(k.shape)) for k in keep.values())
    return float(sum(int(k.sum()) for k in keep.values()) / total) if total else 1.0
