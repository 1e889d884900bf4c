"""Architectures: where the residual stream, attention and MLP live in a model.

Probing papers name their read locations by role, not by module path: the residual
stream before and after each block, the attention and MLP updates written into it,
the token embeddings. Module paths differ by family (``transformer.h.3`` in GPT-2,
``gpt_neox.layers.3`` in Pythia, ``model.layers.3`` in Llama, Mistral, Qwen2 and
Gemma, ``bert.encoder.layer.3`` in BERT), so :func:`sites` turns a role into the
site strings of one model::

    sites(model, "resid_post")            # every block's output
    sites(model, "mlp_out", layers=[-1])  # the last MLP update
    sites(model, "embed")                 # the token embeddings (one site)

The paths are found from the module tree rather than from a table of class names,
so a new family with the usual layout needs no entry here. :func:`describe` does it:

1. **Blocks**: the stack of transformer blocks is the ``torch.nn.ModuleList`` whose
   entries are all one class with submodules of their own and which holds the most
   parameters, skipping lists nested inside another such list (an MoE layer's experts).
2. **Attention and MLP**: inside the first block, the child whose name says
   attention (``attn``, ``self_attn``, ``attention``) and the one whose name says MLP
   (``mlp``, ``feed_forward``, ``ffn``); norms, dropouts and cross-attention are
   never taken.
3. **The update written into the residual stream**, which is what ``attn_out`` and
   ``mlp_out`` read, depends on where the norms sit:

   * pre-norm blocks (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Gemma): the attention
     and MLP children's own outputs, so ``resid_post = resid_pre + attn_out +
     mlp_out`` token by token (GPT-NeoX's parallel residual included);
   * "sandwich" blocks that normalize each update before adding it (Gemma 2 and 3,
     OLMo 2, recognised by a ``post_feedforward_layernorm`` child): the
     ``post_attention_layernorm`` and ``post_feedforward_layernorm`` outputs, so the
     same identity holds (the raw attention and MLP outputs do not satisfy it);
   * post-norm BERT-style blocks (BERT, RoBERTa: an ``intermediate`` child and an
     ``output`` child instead of an MLP): the residual is added *inside* the
     ``attention.output`` and ``output`` modules, right before their LayerNorm, so
     no module outputs the bare update except the projection before it. ``attn_out``
     reads ``attention.output.dense`` and ``mlp_out`` reads ``output.dense`` (the
     last linear layer of the sub-module holding the residual norm). What holds is
     ``mid = LN_a(resid_pre + attn_out)`` and ``resid_post = LN_m(mid + mlp_out)``,
     with ``mid`` the ``attention`` module's output.
4. **Embeddings**: the module ``get_input_embeddings()`` returns (Hugging Face
   models), else the largest ``torch.nn.Embedding`` outside the blocks. It is the
   token embedding only: GPT-2 and BERT add position (and token type) embeddings
   afterwards, so the first block's input, ``sites(model, "resid_pre", 0)``, is what
   the stack actually receives; in Llama-family models and GPT-NeoX the two agree
   (Gemma's embedding module includes its ``sqrt(hidden)`` scale).

What this cannot see: a family whose attention or MLP module adds the residual
itself (BLOOM's MLP does) gives an ``attn_out``/``mlp_out`` that includes the
residual. Site strings can always be written by hand instead.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

import torch

from .routers import router_paths

__all__ = ["Architecture", "KINDS", "describe", "sites", "find_blocks", "find_final_norm", "find_unembedding"]

#: The roles :func:`sites` understands, in execution order within a block.
KINDS = ("embed", "resid_pre", "attn_out", "mlp_out", "resid_post")

Layers = Union[str, int, Iterable[int], range, slice]

_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|feed_?forward|ffn|ffw|^ff$", re.IGNORECASE)
_NOT_A_SUBLAYER = re.compile(r"norm|drop|^ln|ln_|_ln|cross|encoder_attn", re.IGNORECASE)
_POST_ATTN_NORM = re.compile(r"^post_(self_)?(attention|attn)_?(layer_?)?norm$", re.IGNORECASE)
_POST_MLP_NORM = re.compile(r"^post_(feed_?forward|ffw|ff|mlp)_?(layer_?)?norm$", re.IGNORECASE)


@dataclass(frozen=True)
class Architecture:
    """Where the roles of :data:`KINDS` live in one model.

    Paths inside a block are relative to it (``"self_attn"``, ``"attention.output.dense"``);
    the others are from the model root.

    Attributes:
        model_class: The model's class name (``"LlamaForCausalLM"``).
        blocks: Path of the block container (``"model.layers"``).
        n_layers: Number of blocks.
        attn: The attention child of a block (``"self_attn"``, ``"attn"``, ``"attention"``).
        mlp: The MLP child of a block (``"mlp"``; BERT-style blocks: ``"output"``, the
            child holding the MLP's output projection and the residual norm).
        attn_out: Module in a block whose output is the attention update to the
            residual stream (``attn`` itself in pre-norm blocks).
        mlp_out: Module in a block whose output is the MLP update (``mlp`` itself in
            pre-norm blocks).
        embed: Path of the token embedding module (``"model.embed_tokens"``).
    """

    model_class: str
    blocks: str
    n_layers: int
    attn: str
    mlp: str
    attn_out: str
    mlp_out: str
    embed: str

    def site(self, kind: str, layer: int | None = None) -> str:
        """The site string of one role, e.g. ``site("mlp_out", -1)`` -> ``"model.layers.31.mlp.output"``.

        Args:
            kind: One of :data:`KINDS`.
            layer: Block index, negative from the end (ignored for ``"embed"``).

        Raises:
            ValueError: an unknown kind, or a missing or out-of-range layer.
        """
        _check_kind(kind)
        if kind == "embed":
            return _join(self.embed, "output")
        if layer is None:
            raise ValueError(f"site kind {kind!r} needs a layer, e.g. site({kind!r}, 0)")
        indices = _layer_indices(layer, self)
        if len(indices) != 1:
            raise ValueError(f"site() takes one layer, got layer={layer!r}; use sites(model, {kind!r}, layers)")
        block = _join(self.blocks, str(indices[0]))
        inside = {"resid_pre": ("", "input"), "resid_post": ("", "output"),
                  "attn_out": (self.attn_out, "output"), "mlp_out": (self.mlp_out, "output")}[kind]
        return _join(block, *inside)


def describe(model: Any) -> Architecture:
    """Find the blocks, attention, MLP and embeddings of a model from its module tree.

    Args:
        model: An nnsight model (see :func:`lm_probe.load_model`) or a plain
            ``torch.nn.Module`` (a Hugging Face model).

    Returns:
        The :class:`Architecture` (see the module docstring for the rules).

    Raises:
        ValueError: no block stack, no attention or MLP child, or no embedding can
            be found; the message names the model class and what was seen.
    """
    module = _torch_module(model)
    name = type(module).__name__
    blocks_path, blocks = _find_blocks(module, name)
    block = blocks[0]
    children = dict(block.named_children())
    attn = _find_child(children, _ATTN, "attention", name, blocks_path)
    mlp = _find_child(children, _MLP, "MLP", name, blocks_path, required=False)
    if mlp is None and "intermediate" in children and "output" in children:
        mlp = "output"  # BERT-style post-norm block: intermediate -> output(dense, LayerNorm(+residual))
        attn_out = _join(attn, _residual_projection(children[attn], attn, name, blocks_path))
        mlp_out = _join(mlp, _residual_projection(children[mlp], mlp, name, blocks_path))
    elif mlp is None:
        raise ValueError(
            f"cannot find the MLP of {name}'s blocks ('{blocks_path}.0' has children "
            f"{list(children)}, none named like mlp/feed_forward/ffn); write site strings by hand, "
            f"e.g. '{blocks_path}.0.<mlp child>.output'"
        )
    else:
        attn_out, mlp_out = attn, mlp
        post_attn = [c for c in children if _POST_ATTN_NORM.match(c)]
        post_mlp = [c for c in children if _POST_MLP_NORM.match(c)]
        if post_mlp:  # sandwich norms: each update is normalized before it is added
            if not post_attn:
                raise ValueError(
                    f"{name}'s blocks normalize the MLP update ('{post_mlp[0]}') but no child "
                    f"of '{blocks_path}.0' looks like the matching attention norm (children: "
                    f"{list(children)}); write the attn_out site by hand"
                )
            attn_out, mlp_out = post_attn[0], post_mlp[0]
    return Architecture(name, blocks_path, len(blocks), attn, mlp, attn_out, mlp_out,
                        _find_embed(module, name, blocks_path))


def sites(model: Any, kind: str, layers: Layers = "all") -> list[str]:
    """Site strings of one role (residual stream, attention or MLP update, embeddings).

    Args:
        model: An nnsight model or a plain ``torch.nn.Module``.
        kind: ``"resid_pre"`` (block input), ``"resid_post"`` (block output),
            ``"attn_out"`` / ``"mlp_out"`` (the update each writes into the residual
            stream), ``"embed"`` (token embedding output; one site) or ``"router"``
            (the mixture-of-experts routers' logits, of the chosen blocks that have one).
        layers: ``"all"``, a block index, a list of indices, a ``range`` or a
            ``slice``. Negative indices count from the end; the result follows the
            given order with repeats dropped. Ignored for ``"embed"``.

    Returns:
        Canonical site strings with non-negative indices, e.g.
        ``["model.layers.0.output", "model.layers.1.output"]``, ready for
        :class:`~lm_probe.ProbeConfig` or :func:`lm_probe.core.sites.resolve_sites`.

    Raises:
        ValueError: an unknown kind, an index out of range (the message gives the
            number of layers), a model whose structure cannot be found, or ``"router"``
            for a model without mixture-of-experts routers.
    """
    if kind == "router":  # the blocks without a router (dense layers of a MoE model) are skipped
        arch = describe(model)
        found = router_paths(_torch_module(model), arch.blocks)
        chosen = [f"{found[i]}.output" for i in _layer_indices(layers, arch) if i in found]
        if not chosen:
            raise ValueError(f"layers={layers!r} has no router; {arch.model_class} routes in blocks {sorted(found)}")
        return chosen
    _check_kind(kind)
    arch = describe(model)
    if kind == "embed":
        return [arch.site("embed")]
    return [arch.site(kind, i) for i in _layer_indices(layers, arch)]


def find_blocks(module: torch.nn.Module) -> str:
    """Path of the block stack, by the structural rule of :func:`describe`.

    Raises:
        ValueError: the model has no ``ModuleList`` of blocks.
    """
    return _find_blocks(module, type(module).__name__)[0]


def find_final_norm(module: torch.nn.Module, blocks: str) -> str:
    """Path of the normalization applied right after the block stack ``blocks``.

    The first norm-like child of the blocks' parent registered after them (HF models
    register modules in the order they run); else the parent's only norm-like child.

    Raises:
        ValueError: no such norm, or several candidates and none after the blocks.
    """
    parent_path, _, name = blocks.rpartition(".")
    children = list(module.get_submodule(parent_path).named_children())
    after = [n for n, m in children[[n for n, _ in children].index(name) + 1:] if _is_norm(m)]
    norms = after[:1] or [n for n, m in children if _is_norm(m)]
    if len(norms) != 1:
        where = parent_path or type(module).__name__
        raise ValueError(
            f"cannot tell the final norm after the blocks '{blocks}': the norm-like children of "
            f"'{where}' are {norms}; its children are {[n for n, _ in children]}"
        )
    return f"{parent_path}.{norms[0]}" if parent_path else norms[0]


def find_unembedding(module: torch.nn.Module) -> str:
    """Path of the unembedding (``module.get_output_embeddings()``).

    Raises:
        ValueError: the model has no output embedding (no language-model head).
    """
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"{type(module).__name__} has no output embedding (get_output_embeddings() is None); "
            "the logit lens needs a model with a language-model head, e.g. AutoModelForCausalLM"
        )
    return next(name for name, m in module.named_modules() if m is head)


# --------------------------------------------------------------------- helpers
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r}; choose one of {list(KINDS)}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _torch_module(model: Any) -> torch.nn.Module:
    """The ``torch.nn.Module`` behind an nnsight model, or the module itself."""
    if isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "__dict__", {}).get("_module")
    if isinstance(inner, torch.nn.Module):
        return inner
    raise TypeError(
        f"expected an nnsight model or a torch.nn.Module, got {type(model).__name__}; "
        "load one with lm_probe.load_model(...)"
    )


def _find_blocks(module: torch.nn.Module, name: str) -> tuple[str, torch.nn.ModuleList]:
    """The outermost ModuleList of same-class, non-leaf modules holding the most parameters."""
    candidates = []
    for path, sub in module.named_modules():
        if (isinstance(sub, torch.nn.ModuleList) and len(sub) > 0
                and len({type(m) for m in sub}) == 1 and any(True for _ in sub[0].children())):
            candidates.append((path, sub))
    outer = [(p, s) for p, s in candidates
             if not any(p.startswith(q + ".") or (q == "" and p) for q, _ in candidates if q != p)]
    if not outer:
        raise ValueError(
            f"cannot find the transformer blocks of {name}: it has no torch.nn.ModuleList whose "
            "entries are all one block class; write site strings by hand, e.g. "
            "'<path to block>.output'"
        )
    return max(outer, key=lambda ps: (sum(p.numel() for p in ps[1].parameters()), len(ps[1])))


def _find_child(children: dict[str, torch.nn.Module], pattern: re.Pattern, what: str, name: str,
                blocks_path: str, required: bool = True) -> str | None:
    """First child of a block whose name matches ``pattern`` (norms, dropouts excluded)."""
    found = [c for c in children if pattern.search(c) and not _NOT_A_SUBLAYER.search(c)]
    if found:
        return next((c for c in found if "self" in c.lower()), found[0])
    if required:
        raise ValueError(
            f"cannot find the {what} of {name}'s blocks: '{blocks_path}.0' has children "
            f"{list(children)}, none named like {pattern.pattern!r}; write site strings by hand, "
            f"e.g. '{blocks_path}.0.<child>.output'"
        )
    return None


def _is_norm(module: torch.nn.Module) -> bool:
    """A normalization layer: torch's LayerNorm/RMSNorm or a class named ``...Norm``."""
    return (isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm))
            or type(module).__name__.lower().endswith("norm"))


def _residual_projection(sub: torch.nn.Module, sub_path: str, name: str, blocks_path: str) -> str:
    """In a post-norm sub-layer, the linear layer whose output is added to the residual.

    It is the last ``Linear`` of the last module (in ``sub``) that has both a norm and a
    ``Linear`` among its direct children: BERT's ``SelfOutput``/``Output`` (``dense``,
    ``LayerNorm``), whose forward is ``LayerNorm(dense(x) + residual)``.
    """
    found = None
    for path, module in sub.named_modules():
        kids = list(module.named_children())
        linears = [k for k, m in kids if isinstance(m, torch.nn.Linear)]
        if linears and any(_is_norm(m) for _, m in kids):
            found = _join(path, linears[-1])
    if found is None:
        raise ValueError(
            f"{name}'s blocks look post-norm (BERT-style), but '{blocks_path}.0.{sub_path}' holds "
            "no module with both a Linear and a norm child; write the attn_out/mlp_out sites by hand"
        )
    return found


def _find_embed(module: torch.nn.Module, name: str, blocks_path: str) -> str:
    """Path of the token embedding: ``get_input_embeddings()``, else the largest Embedding."""
    paths = {id(m): p for p, m in module.named_modules()}
    getter = getattr(module, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except NotImplementedError:  # a PreTrainedModel without embeddings
        embedding = None
    if embedding is not None and id(embedding) in paths:
        return paths[id(embedding)]
    outside = [(p, m) for p, m in module.named_modules()
               if isinstance(m, torch.nn.Embedding) and not (p + ".").startswith(blocks_path + ".")]
    if not outside:
        raise ValueError(
            f"cannot find the token embedding of {name}: no get_input_embeddings() and no "
            "torch.nn.Embedding outside the blocks; write the embedding site by hand"
        )
    return max(outside, key=lambda pm: pm[1].num_embeddings)[0]


def _layer_indices(layers: Layers, arch: Architecture) -> list[int]:
    """Block indices for ``layers``, non-negative, in the given order, repeats dropped."""
    n = arch.n_layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}: use 'all', an int, a list of ints, a range or a slice")
        return list(range(n))
    if isinstance(layers, slice):
        chosen = list(range(n)[layers])
    else:
        items = [layers] if not isinstance(layers, Iterable) else list(layers)
        try:
            if any(isinstance(i, bool) for i in items):
                raise TypeError
            chosen = [operator.index(i) for i in items]
        except TypeError:
            raise ValueError(
                f"layers={layers!r}: use 'all', an int, a list of ints, a range or a slice"
            ) from None
    for i in chosen:
        if not -n <= i < n:
            raise ValueError(
                f"layers={layers!r}: index {i} is out of range; {arch.model_class} has {n} layers "
                f"(0..{n - 1}, or -{n}..-1 from the end)"
            )
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no layer of {arch.model_class}'s {n} layers")
    return list(dict.fromkeys(i % n for i in chosen))
